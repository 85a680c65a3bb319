"""Types shared by every token masker.

A masker sees one tokenized sequence (ids plus the word each token belongs to) and returns the
corrupted ids together with the positions to predict and their original ids. Maskers work on
NumPy arrays with an explicit ``np.random.Generator`` because they run per sample inside data
loader workers, where small NumPy ops are much cheaper than torch ops and seeding is explicit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, Protocol

import numpy as np


@dataclass(frozen=True)
class TokenVocab:
    """What a masker must know about the vocabulary it corrupts.

    Args:
        size: number of token ids; random replacements are drawn from ``[0, size)`` minus specials.
        mask_id: id written at positions replaced by the mask token.
        special_ids: ids that are never masked and never drawn as random replacements.
    """

    size: int
    mask_id: int
    special_ids: FrozenSet[int] = field(default_factory=frozenset)


@dataclass
class MaskedTokens:
    """One masked sequence.

    Args:
        input_ids: (T,) int64 corrupted ids fed to the encoder.
        positions: (M,) int64 sorted positions (into ``input_ids``) the objective predicts.
        labels: (M,) int64 original ids at ``positions``.
    """

    input_ids: np.ndarray
    positions: np.ndarray
    labels: np.ndarray


class TokenMasker(Protocol):
    """Call signature every registered token masker implements."""

    def __call__(self, ids: np.ndarray, word_ids: np.ndarray, rng: np.random.Generator) -> MaskedTokens:
        """Mask one sequence.

        Args:
            ids: (T,) int64 token ids, special tokens included.
            word_ids: (T,) int64 index of the word each token belongs to; -1 for special tokens.
            rng: the generator to draw from (seeded per worker by the pipeline).
        """
        ...
