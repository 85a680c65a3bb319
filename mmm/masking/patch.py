"""Patch maskers for masked image modeling, registered in :data:`mmm.registry.MASKERS`.

* ``"mae_random"`` -- uniform random masking of MAE (He et al. 2022, "Masked Autoencoders Are
  Scalable Vision Learners"): exactly ``round(ratio * P)`` of the ``P`` patches hidden, ratio 0.75.
* ``"beit_block"`` -- blockwise masking of BEiT (Bao et al. 2022, "BEiT: BERT Pre-Training of
  Image Transformers"): rectangles of random area and log-uniform aspect ratio are hidden until
  about ``ratio`` (0.4) of the patches are; the count varies from image to image.
* ``"simmim_random"`` -- random masking of SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework
  for Masked Image Modeling") at a coarser mask-patch size: the grid is cut into
  ``mask_patch x mask_patch`` cells of model patches (2 = 32 px cells over 16 px patches) and
  ``round(ratio * cells)`` cells are hidden, ratio 0.6.

A masker is called as ``masker(grid, rng)`` with the patch grid ``(gh, gw)`` and an
``np.random.Generator``, and returns a ``(gh * gw,)`` bool array in row-major order, True where a
patch is hidden. Every mask hides at least one patch and leaves at least one visible. Maskers
use NumPy and the explicit generator because they run per sample in data-loader workers.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Protocol, Tuple

import numpy as np

from mmm.registry import MASKERS

logger = logging.getLogger("mmm.data")

__all__ = ["BeitBlockMasker", "MaeRandomMasker", "PatchMasker", "SimMIMRandomMasker", "check_grid"]


class PatchMasker(Protocol):
    """Call signature every registered patch masker implements."""

    def __call__(self, grid: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """Mask one image.

        Args:
            grid: ``(gh, gw)`` patches along height and width.
            rng: the generator to draw from (seeded per sample by the pipeline).

        Returns:
            (gh * gw,) bool, row-major, True = hidden.
        """
        ...


def check_grid(grid: Tuple[int, int]) -> Tuple[int, int]:
    """``(gh, gw)`` as two ints >= 1 with at least 2 patches (one hidden, one visible).

    Args:
        grid: the patch grid.
    """
    try:
        gh, gw = grid
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (gh, gw) of patch counts, got {grid!r}") from None
    if any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 for g in (gh, gw)):
        raise ValueError(f"grid must be two ints >= 1, got {grid!r}")
    if gh * gw < 2:
        raise ValueError(f"grid {grid!r} has {gh * gw} patch; masking needs at least 2 (one hidden, one visible)")
    return int(gh), int(gw)


def _check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _exact_count(ratio: float, total: int) -> int:
    """``round(ratio * total)`` kept within [1, total - 1]."""
    return min(total - 1, max(1, int(round(ratio * total))))


def _random_subset(total: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """(total,) bool with exactly ``count`` True entries at uniformly random places."""
    mask = np.zeros(total, dtype=bool)
    mask[rng.permutation(total)[:count]] = True
    return mask


@MASKERS.register("mae_random")
class MaeRandomMasker:
    """Hide exactly ``round(ratio * P)`` patches, uniformly at random (MAE).

    Args:
        ratio: fraction of patches hidden, strictly between 0 and 1 (MAE: 0.75). The count is
            kept within [1, P - 1].
    """

    masks = "patch"  # the input kind it hides; a modality accepts the maskers of its kinds

    def __init__(self, ratio: float = 0.75) -> None:
        self.ratio = _check_ratio("ratio", ratio)

    def __call__(self, grid: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        gh, gw = check_grid(grid)
        total = gh * gw
        return _random_subset(total, _exact_count(self.ratio, total), rng)  # (gh * gw,)

    def __repr__(self) -> str:
        return f"MaeRandomMasker(ratio={self.ratio})"


@MASKERS.register("beit_block")
class BeitBlockMasker:
    """Hide random rectangles of patches until about ``ratio`` of them are hidden (BEiT).

    The target is ``round(ratio * P)`` patches (within [1, P - 1]). Each step draws a block area
    uniformly between ``min_patches`` and ``min(max_patches, patches still to hide)`` (in whichever
    order they come, as BEiT's ``random.uniform(min, max)``: near the end the area is drawn between
    the few patches left and ``min_patches``, so most late blocks overshoot and are rejected rather than
    filling the target with one-patch specks) and an aspect ratio log-uniformly from
    ``[min_aspect, 1 / min_aspect]``, places the block at a random position, and keeps it when it hides
    at least one new patch without overshooting the target. After ``attempts`` draws in a row that add
    nothing, masking stops, so the hidden count varies per image and usually ends a little under the
    target (never over it; 14x14 at 0.4: mean 77.5 of 78, sd 0.9, as BEiT's reference generator). If no
    block fitted at all, one random patch is hidden. On a grid whose target is below ``min_patches`` most
    blocks overshoot, and BEiT's generator hides far fewer patches than the target (4x4 at 0.4: about 4 of 6,
    often 1): a warning says so once, and a smaller ``min_patches`` fits such grids.

    Args:
        ratio: target fraction of hidden patches (BEiT: 0.4).
        min_patches: smallest block area in patches (BEiT: 16; the draw's lower end while more remain to hide).
        max_patches: largest block area; None: no limit but the remaining target.
        min_aspect: smallest block aspect ratio (height / width), in (0, 1]; the largest is its inverse.
        attempts: block draws per step before masking stops.
    """

    masks = "patch"  # the input kind it hides; a modality accepts the maskers of its kinds

    def __init__(
        self,
        ratio: float = 0.4,
        min_patches: int = 16,
        max_patches: Optional[int] = None,
        min_aspect: float = 0.3,
        attempts: int = 10,
    ) -> None:
        self.ratio = _check_ratio("ratio", ratio)
        self.min_patches = _check_positive_int("min_patches", min_patches)
        if max_patches is not None:
            _check_positive_int("max_patches", max_patches)
            if max_patches < min_patches:
                raise ValueError(f"max_patches ({max_patches}) must be >= min_patches ({min_patches})")
        self.max_patches = max_patches
        if isinstance(min_aspect, bool) or not isinstance(min_aspect, (int, float)) or not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must be a number in (0, 1], got {min_aspect!r}")
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))
        self.min_aspect = float(min_aspect)
        self.attempts = _check_positive_int("attempts", attempts)
        self._warned = False

    def _add_block(self, mask: np.ndarray, remaining: int, rng: np.random.Generator) -> int:
        """Try ``attempts`` blocks; apply the first that hides 1..remaining new patches. Returns how many."""
        gh, gw = mask.shape
        hi = remaining if self.max_patches is None else min(self.max_patches, remaining)
        lo, hi = sorted((self.min_patches, hi))  # BEiT's uniform(min_patches, max): either order
        for _ in range(self.attempts):
            area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = max(1, int(round(math.sqrt(area * aspect))))
            w = max(1, int(round(math.sqrt(area / aspect))))
            if h > gh or w > gw:
                continue
            top = int(rng.integers(0, gh - h + 1))
            left = int(rng.integers(0, gw - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= remaining:
                block[...] = True
                return new
        return 0

    def __call__(self, grid: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        gh, gw = check_grid(grid)
        target = _exact_count(self.ratio, gh * gw)
        if target < self.min_patches and not self._warned:
            self._warned = True
            logger.warning("beit_block: the %dx%d patch grid's target of %d hidden patches is below min_patches=%d, "
                           "so most blocks overshoot it and far fewer patches are hidden (BEiT's generator: 4x4 at 0.4 "
                           "hides about 4 of 6); set masking.args.min_patches to at most %d", gh, gw, target,
                           self.min_patches, max(1, target // 2))
        mask = np.zeros((gh, gw), dtype=bool)
        hidden = 0
        while hidden < target:
            added = self._add_block(mask, target - hidden, rng)
            if added == 0:
                break
            hidden += added
        if hidden == 0:
            mask.flat[int(rng.integers(0, gh * gw))] = True
        return mask.reshape(-1)  # (gh * gw,)

    def __repr__(self) -> str:
        return (f"BeitBlockMasker(ratio={self.ratio}, min_patches={self.min_patches}, max_patches={self.max_patches}, "
                f"min_aspect={self.min_aspect}, attempts={self.attempts})")


@MASKERS.register("simmim_random")
class SimMIMRandomMasker:
    """Hide ``round(ratio * cells)`` random cells of ``mask_patch x mask_patch`` patches (SimMIM).

    SimMIM masks 32 px squares; with 16 px model patches that is ``mask_patch=2``, with 4 px Swin
    patches ``mask_patch=8``; ``mask_patch=1`` masks single patches (for tiny models). Both grid
    sides must be multiples of ``mask_patch``.

    Args:
        ratio: fraction of cells hidden (SimMIM: 0.6); the count is kept within [1, cells - 1].
        mask_patch: side of a mask cell in model patches.
    """

    masks = "patch"  # the input kind it hides; a modality accepts the maskers of its kinds

    def __init__(self, ratio: float = 0.6, mask_patch: int = 2) -> None:
        self.ratio = _check_ratio("ratio", ratio)
        self.mask_patch = _check_positive_int("mask_patch", mask_patch)

    def __call__(self, grid: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        gh, gw = check_grid(grid)
        m = self.mask_patch
        if gh % m or gw % m:
            raise ValueError(f"grid {(gh, gw)} is not divisible by mask_patch={m} (SimMIM masks whole "
                             f"{m}x{m} cells of patches; pick a mask_patch dividing both sides)")
        ch, cw = gh // m, gw // m
        if ch * cw < 2:
            raise ValueError(f"grid {(gh, gw)} holds {ch * cw} mask cell of {m}x{m} patches; need at least 2 "
                             "(use a smaller mask_patch)")
        cells = _random_subset(ch * cw, _exact_count(self.ratio, ch * cw), rng).reshape(ch, cw)
        return np.repeat(np.repeat(cells, m, axis=0), m, axis=1).reshape(-1)  # (gh * gw,)

    def __repr__(self) -> str:
        return f"SimMIMRandomMasker(ratio={self.ratio}, mask_patch={self.mask_patch})"
