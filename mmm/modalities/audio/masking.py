"""Maskers for audio token sequences, registered in :data:`mmm.registry.MASKERS`.

* ``"time_span"`` -- span masking over time of wav2vec 2.0 (Baevski et al. 2020, "wav2vec 2.0: A
  Framework for Self-Supervised Learning of Speech Representations") and HuBERT (Hsu et al. 2021):
  a fraction ``p`` of the tokens are drawn (without replacement) as span starts and the ``span``
  tokens from each start are masked; spans may overlap. wav2vec 2.0 uses p=0.065 and HuBERT p=0.08,
  both M=10 on 20 ms frames (about 49% and 57% of the frames masked). Our default tokens are 40 ms (4 frames of 10 ms), so
  the defaults p=0.13, span=5 keep both the span duration (200 ms) and the masked fraction
  (``1 - (1 - p) ** span``, about 50%).
* ``"spec_patch"`` -- AudioMAE patch masking (Huang et al. 2022, "Masked Autoencoders that
  Listen") over a ``(freq_patches, time_patches)`` grid: an exact number of patches at random
  (``structure="none"``, the pretraining default at ratio 0.8), or whole time columns
  (``"time"``), whole frequency rows (``"freq"``), or both (``"time_freq"``, the SpecAugment-like
  variant AudioMAE tried).

Both return only *which* tokens are hidden (a bool mask); what is written there (a learned mask
embedding, or dropping the tokens in MAE mode) is the embedder's business, since audio tokens are
continuous features and have no ids to corrupt. Like the token maskers they work on NumPy with an
explicit ``np.random.Generator`` and are deterministic under it.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from mmm.registry import MASKERS

__all__ = ["TimeSpanMasker", "SpecPatchMasker", "SPEC_PATCH_STRUCTURES"]

SPEC_PATCH_STRUCTURES = ("none", "time", "freq", "time_freq")


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _check_fraction(name: str, value: float, *, closed_high: bool) -> float:
    ok_type = not isinstance(value, bool) and isinstance(value, (int, float, np.floating))
    ok = ok_type and 0.0 < float(value) and (float(value) <= 1.0 if closed_high else float(value) < 1.0)
    if not ok:
        interval = "(0, 1]" if closed_high else "(0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


@MASKERS.register("time_span")
class TimeSpanMasker:
    """wav2vec 2.0 / HuBERT span masking of a (T,) token sequence.

    The number of span starts is ``floor(p * T + u)`` with ``u ~ U[0, 1)`` (``p * T`` in
    expectation), at least ``max(1, min_masks)`` and at most the number of valid starts. Starts
    lie in ``[0, T - L]`` so every span fits, where ``L = min(span, max(1, T // 2))``: spans are
    shortened on sequences shorter than two spans so that one span never hides the whole clip, and
    when the spans together hide every token of a clip (two spans can on a short one), one token drawn at
    random is shown again, so some evidence always stays visible (a single token, T=1, is always masked).

    Args:
        p: probability that a token starts a span, in (0, 1].
        span: span length in tokens, >= 1.
        min_masks: least number of spans per sequence (at least 1 is always used).
    """

    masks = "audio"  # the input kind it hides; a modality accepts the maskers of its kinds

    def __init__(self, p: float = 0.13, span: int = 5, min_masks: int = 1) -> None:
        self.p = _check_fraction("p", p, closed_high=True)
        if isinstance(span, bool) or not isinstance(span, (int, np.integer)) or span < 1:
            raise ValueError(f"span must be an int >= 1, got {span!r}")
        self.span = int(span)
        self.min_masks = _check_count("min_masks", min_masks)

    def span_length(self, num_tokens: int) -> int:
        """The span length used on a sequence of ``num_tokens`` tokens.

        Args:
            num_tokens: T.
        """
        return min(self.span, max(1, num_tokens // 2))

    def __call__(self, num_tokens: int, rng: np.random.Generator) -> np.ndarray:
        """Bool (T,) mask, True = hidden.

        Args:
            num_tokens: T, the sequence length (0 gives an empty mask).
            rng: generator to draw from.
        """
        t = _check_count("num_tokens", num_tokens)
        mask = np.zeros(t, dtype=bool)
        if t == 0:
            return mask
        length = self.span_length(t)
        n_valid = t - length + 1
        n_spans = int(self.p * t + rng.random())
        n_spans = min(max(n_spans, self.min_masks, 1), n_valid)
        starts = rng.choice(n_valid, size=n_spans, replace=False)
        idx = (starts[:, None] + np.arange(length)[None, :]).reshape(-1)  # (n_spans * L,)
        mask[idx] = True
        if t > 1 and mask.all():  # nothing left to predict from
            mask[int(rng.integers(0, t))] = False
        return mask

    def __repr__(self) -> str:
        return f"TimeSpanMasker(p={self.p}, span={self.span}, min_masks={self.min_masks})"


def _check_grid(grid: Tuple[int, int]) -> Tuple[int, int]:
    ok = isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
        not isinstance(g, bool) and isinstance(g, (int, np.integer)) and g >= 1 for g in grid
    )
    if not ok:
        raise ValueError(f"grid must be a (freq_patches, time_patches) pair of ints >= 1, got {grid!r}")
    return int(grid[0]), int(grid[1])


def _exact_count(ratio: float, n: int) -> int:
    """``round(ratio * n)`` clipped to [1, n - 1] (to [1, 1] when n == 1): hide some, keep some."""
    return 1 if n == 1 else min(max(int(round(ratio * n)), 1), n - 1)


@MASKERS.register("spec_patch")
class SpecPatchMasker:
    """AudioMAE masking of a ``(freq_patches, time_patches)`` patch grid.

    Counts are exact: ``round(ratio * n)`` items clipped to ``[1, n - 1]`` so at least one item
    is hidden and, when there are two or more, one stays visible. Items are patches for
    ``structure="none"``, time columns for ``"time"``, frequency rows for ``"freq"``. For
    ``"time_freq"`` columns and rows are each hidden with ratio ``1 - sqrt(1 - ratio)``, so their
    union covers about ``ratio`` of the grid. A structured axis with a single item (one column for
    ``"time"``, one row for ``"freq"``, either for ``"time_freq"``) is hidden whole, and with it
    the whole grid.

    Args:
        ratio: fraction to hide, in (0, 1) (0.8 in AudioMAE pretraining).
        structure: ``"none"``, ``"time"``, ``"freq"`` or ``"time_freq"``.
    """

    masks = "audio"  # the input kind it hides; a modality accepts the maskers of its kinds

    def __init__(self, ratio: float = 0.8, structure: str = "none") -> None:
        self.ratio = _check_fraction("ratio", ratio, closed_high=False)
        if structure not in SPEC_PATCH_STRUCTURES:
            raise ValueError(f"structure must be one of {SPEC_PATCH_STRUCTURES}, got {structure!r}")
        self.structure = structure

    def __call__(self, grid: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """Bool (F * T,) mask in row-major grid order (index ``f * T + t``), True = hidden.

        Args:
            grid: ``(freq_patches, time_patches)``, e.g. from ``AudioFrontend.token_grid``.
            rng: generator to draw from.
        """
        rows, cols = _check_grid(grid)
        mask = np.zeros((rows, cols), dtype=bool)
        if self.structure == "none":
            n = rows * cols
            mask.reshape(-1)[rng.choice(n, size=_exact_count(self.ratio, n), replace=False)] = True
            return mask.reshape(-1)
        ratio = self.ratio if self.structure != "time_freq" else 1.0 - float(np.sqrt(1.0 - self.ratio))
        if self.structure in ("time", "time_freq"):
            mask[:, rng.choice(cols, size=_exact_count(ratio, cols), replace=False)] = True
        if self.structure in ("freq", "time_freq"):
            mask[rng.choice(rows, size=_exact_count(ratio, rows), replace=False), :] = True
        return mask.reshape(-1)

    def __repr__(self) -> str:
        return f"SpecPatchMasker(ratio={self.ratio}, structure={self.structure!r})"
