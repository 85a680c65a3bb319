"""The typed batch that crosses pipeline stages: a packed token stream plus prediction targets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mmm.core.packing import PackedSeqInfo
from mmm.masking.base import MaskedTokens


@dataclass
class PackedBatch:
    """A packed, masked batch.

    Args:
        input_ids: (N,) int64 corrupted token ids of every sequence, concatenated.
        seq: layout (``cu_seqlens``, ``max_seqlen``, ``position_ids``).
        mlm_positions: (M,) int64 indices into the flat stream where the MLM head predicts.
        mlm_labels: (M,) int64 original ids at those positions.
    """

    input_ids: torch.Tensor
    seq: PackedSeqInfo
    mlm_positions: torch.Tensor
    mlm_labels: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_sequences(self) -> int:
        return self.seq.batch_size

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(
            self.input_ids.to(device, non_blocking=True),
            self.seq.to(device),
            self.mlm_positions.to(device, non_blocking=True),
            self.mlm_labels.to(device, non_blocking=True),
        )

    def pin_memory(self) -> "PackedBatch":
        return PackedBatch(self.input_ids.pin_memory(), self.seq, self.mlm_positions.pin_memory(), self.mlm_labels.pin_memory())


def pack_masked(samples: Sequence[MaskedTokens]) -> PackedBatch:
    """Concatenate masked sequences into one :class:`PackedBatch` (no padding), longest first.

    Sorting by length lets backends without a varlen kernel pad small groups of similar
    lengths (:meth:`~mmm.core.packing.PackedSeqInfo.groups`); order within a batch is irrelevant
    to the loss.

    Args:
        samples: masked sequences, each with at least one token.
    """
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    samples = sorted(samples, key=lambda s: -len(s.input_ids))
    lengths = [len(s.input_ids) for s in samples]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ids = np.concatenate([s.input_ids for s in samples]).astype(np.int64)
    positions = np.concatenate([s.positions + off for s, off in zip(samples, offsets)]).astype(np.int64)
    labels = np.concatenate([s.labels for s in samples]).astype(np.int64)
    return PackedBatch(
        torch.from_numpy(ids),
        PackedSeqInfo.from_seqlens(lengths),
        torch.from_numpy(positions),
        torch.from_numpy(labels),
    )
