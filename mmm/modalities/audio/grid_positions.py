"""Position ids of audio tokens laid out on a time-frequency grid (spectrogram patches, AudioMAE).

Patches come row-major: ``rows`` frequency patches by ``cols`` time patches. The flat index of a patch
moves with the clip's width (the first patch of row 1 is index ``cols``), so it would not name one
time-frequency cell. ``row * (max_len // rows) + col`` does, and stays inside the position table for
sequences of at most ``max_len // rows`` columns. The audio collate and the standalone encoder both
use :func:`grid_position_ids`.
"""
from __future__ import annotations

import torch


def grid_position_ids(index: torch.Tensor, seq_len: torch.Tensor, rows: int, max_len: int) -> torch.Tensor:
    """Position ids of row-major grid tokens: ``row * (max_len // rows) + col``.

    Args:
        index: (N,) int64 index of each token inside its sequence.
        seq_len: (N,) int64 length of each token's sequence (``rows`` times its columns).
        rows: frequency rows of the grid (1 for time tokens: the ids are ``index`` itself).
        max_len: size of the position table; ids stay below it as long as a sequence has at most
            ``max_len // rows`` columns (what :func:`~mmm.modalities.audio.pipeline.max_columns` cuts to).
    """
    if rows == 1:
        return index
    cols = seq_len // rows
    return (index // cols) * (max_len // rows) + index % cols
