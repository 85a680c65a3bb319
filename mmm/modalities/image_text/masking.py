"""Region masker for masked region modeling, registered in :data:`mmm.registry.MASKERS`.

* ``"region_random"`` -- UNITER's region masking (Chen et al. 2020, "UNITER: UNiversal Image-TExt
  Representation Learning"; as LXMERT, Tan & Bansal 2019): ``ratio`` (15%) of an image's
  detector regions are hidden, at least one. With two regions or more at least one stays
  visible, so the image keeps some evidence in its own modality.

A region masker is called as ``masker(num_regions, rng)`` with the number of regions of one image
and an ``np.random.Generator``, and returns a ``(num_regions,)`` bool array, True where a region
is hidden (its features are zeroed by the region embedder; its box stays visible, as in UNITER).
"""
from __future__ import annotations

import numpy as np

from mmm.registry import MASKERS

__all__ = ["RegionRandomMasker"]


@MASKERS.register("region_random")
class RegionRandomMasker:
    """Hide ``max(1, round(ratio * R))`` of the ``R`` regions of an image, chosen uniformly.

    Args:
        ratio: fraction of regions to hide (UNITER: 0.15), in (0, 1).
    """

    masks = "region"  # the input kind it hides; a modality accepts the maskers of its kinds

    def __init__(self, ratio: float = 0.15) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"region_random: ratio must be a number in (0, 1), got {ratio!r}")
        self.ratio = float(ratio)

    def budget(self, num_regions: int) -> int:
        """How many of ``num_regions`` regions are hidden.

        Args:
            num_regions: regions of the image (>= 1).
        """
        k = max(1, int(round(self.ratio * num_regions)))
        return min(k, num_regions - 1) if num_regions >= 2 else num_regions

    def __call__(self, num_regions: int, rng: np.random.Generator) -> np.ndarray:
        """Mask one image's regions.

        Args:
            num_regions: number of regions (>= 1).
            rng: the generator to draw from (seeded per sample by the pipeline).

        Returns:
            (num_regions,) bool, True = hidden.
        """
        if isinstance(num_regions, bool) or not isinstance(num_regions, (int, np.integer)) or num_regions < 1:
            raise ValueError(f"region_random: num_regions must be an int >= 1, got {num_regions!r}")
        n = int(num_regions)
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, size=self.budget(n), replace=False)] = True
        return mask

    def __repr__(self) -> str:
        return f"RegionRandomMasker(ratio={self.ratio})"
