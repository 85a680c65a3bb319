"""Discrete prediction targets computed offline from features (k-means codebooks)."""
from mmm.targets.kmeans import Codebook, CodebookError

__all__ = ["Codebook", "CodebookError"]
