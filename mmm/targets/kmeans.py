"""Offline k-means codebooks: continuous features -> discrete prediction targets.

This is HuBERT's offline clustering step (Hsu et al. 2021, "HuBERT: Self-Supervised Speech
Representation Learning by Masked Prediction of Hidden Units"): cluster acoustic features (MFCCs
in the first iteration, a previous model's hidden states later) and train the encoder to predict
the cluster id of each masked frame. Fitted on image patch features instead, the same codebook
gives BEiT / VIOLET-style discrete visual tokens (Bao et al. 2022; Fu et al. 2021) without a
learned dVAE tokenizer.

Features are standardized (per-dimension mean/std stored with the codebook) before clustering, so
dimensions of very different scale (MFCC c0 vs. deltas) count alike. Fitting uses scikit-learn's
``MiniBatchKMeans`` (deterministic under ``seed``); assignment is plain NumPy, chunked, so it runs
inside data-loader workers. Codebooks are saved as safetensors files or as JSON text (for
checkpoint assets), never pickle.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np

__all__ = ["Codebook", "CodebookError"]

logger = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]
_FORMAT = "mmm-kmeans-codebook"
_MIN_STD = 1e-6


class CodebookError(ValueError):
    """Bad features, shapes or codebook files; the message gives the shapes involved."""


def _as_features(x: Any, what: str, dim: Optional[int] = None) -> np.ndarray:
    """(N, F) finite float32 array from a NumPy array or torch tensor."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise CodebookError(f"{what}: features must be 2-D (N, F), got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise CodebookError(f"{what}: features have {a.shape[1]} dims, the codebook expects {dim} (shape {a.shape})")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise CodebookError(f"{what}: features must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise CodebookError(f"{what}: features contain NaN/inf values")
    return a


def _codes_used(book: "Codebook", standardized: np.ndarray) -> int:
    """How many of ``book``'s codes are the nearest centroid of some row of the (standardized) fitting data."""
    rows = standardized if book.mean is None else standardized * book.std + book.mean  # assign standardizes again
    return int(np.unique(book.assign(rows)).shape[0])


@dataclass(eq=False)
class Codebook:
    """K centroids in (optionally standardized) feature space.

    Args:
        centroids: (K, F) float32 cluster centres, in standardized space when ``mean``/``std`` are set.
        mean: (F,) float32 feature mean subtracted before distances, or None.
        std: (F,) float32 feature std divided out before distances, or None.
    """

    centroids: np.ndarray
    mean: Optional[np.ndarray] = None
    std: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        c = np.asarray(self.centroids, dtype=np.float32)
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise CodebookError(f"centroids must be (K, F) with K, F >= 1, got shape {c.shape}")
        if not np.isfinite(c).all():
            raise CodebookError("centroids contain NaN/inf values")
        self.centroids = c
        if (self.mean is None) != (self.std is None):
            raise CodebookError("give both mean and std, or neither")
        if self.mean is not None:
            self.mean = np.asarray(self.mean, dtype=np.float32).reshape(-1)
            self.std = np.asarray(self.std, dtype=np.float32).reshape(-1)
            if self.mean.shape != (c.shape[1],) or self.std.shape != (c.shape[1],):
                raise CodebookError(f"mean/std must have shape ({c.shape[1]},) to match centroids {c.shape}, "
                                    f"got {self.mean.shape} and {self.std.shape}")
            if (self.std <= 0).any() or not (np.isfinite(self.mean).all() and np.isfinite(self.std).all()):
                raise CodebookError("mean/std must be finite with std > 0")
        self._sq_norms = (self.centroids.astype(np.float64) ** 2).sum(axis=1)  # (K,)

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension F."""
        return int(self.centroids.shape[1])

    @classmethod
    def fit(cls, features: Any, k: int, seed: int = 0, *, standardize: bool = True, batch_size: int = 4096,
            max_iter: int = 100, n_init: int = 3) -> "Codebook":
        """Cluster ``features`` into ``k`` groups with ``MiniBatchKMeans`` (k-means++ init).

        Args:
            features: (N, F) with N >= k.
            k: number of clusters (100 / 500 in HuBERT's first / second iteration).
            seed: random state; the same seed and data give the same codebook.
            standardize: store per-dimension mean/std and cluster standardized features.
            batch_size: mini-batch size.
            max_iter: passes over the data at most.
            n_init: k-means++ initializations tried (the best is kept).
        """
        from sklearn.cluster import MiniBatchKMeans  # heavy import, only needed when fitting

        x = _as_features(features, "Codebook.fit")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise CodebookError(f"Codebook.fit: k must be an int >= 1, got {k!r}")
        if x.shape[0] < k:
            raise CodebookError(f"Codebook.fit: need at least k={k} feature rows, got {x.shape[0]}")
        mean = std = None
        if standardize:
            mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
            std = np.maximum(x.std(axis=0, dtype=np.float64), _MIN_STD).astype(np.float32)
            x = (x - mean) / std
        km = MiniBatchKMeans(n_clusters=int(k), random_state=int(seed), batch_size=int(batch_size),
                             max_iter=int(max_iter), n_init=int(n_init), init="k-means++")
        km.fit(x)
        book = cls(km.cluster_centers_.astype(np.float32), mean, std)
        used = _codes_used(book, x)
        if used < k:
            # Repeated rows (digital silence, flat image regions): MiniBatchKMeans re-seeds low-count centres on
            # sampled rows, and drawn from the repeats they land on one point, identical centroids whose higher ids
            # no row is ever assigned to. Then the fit is redone with Lloyd's k-means (seeded by k-means++ on
            # distinct points; it moves an emptied centre to a far row) on the distinct rows weighted by their
            # counts: the same objective.
            rows, first, counts = np.unique(x, axis=0, return_index=True, return_counts=True)
            if rows.shape[0] < x.shape[0]:
                if rows.shape[0] < k:
                    raise CodebookError(f"Codebook.fit: the {x.shape[0]} feature rows hold only {rows.shape[0]} "
                                        f"distinct ones, fewer than k={k} clusters; fit on more varied data or use "
                                        f"fewer clusters")
                from sklearn.cluster import KMeans

                keep = np.argsort(first)  # the distinct rows in their first-seen order
                lloyd = KMeans(n_clusters=int(k), random_state=int(seed), max_iter=int(max_iter) * 3,
                               n_init=int(n_init), init="k-means++")
                lloyd.fit(x[first[keep]], sample_weight=counts[keep].astype(np.float64))
                book = cls(lloyd.cluster_centers_.astype(np.float32), mean, std)
                used = _codes_used(book, x)
        if used < k:
            logger.warning("k-means codebook: %d of its k=%d codes are nearest to no training row (duplicate or "
                           "stranded centroids); the head still has %d classes", k - used, k, k)
        return book

    def transform(self, x: Any) -> np.ndarray:
        """Features in the codebook's space: standardized if the codebook was, (N, F) float32.

        Args:
            x: (N, F) features.
        """
        a = _as_features(x, "Codebook.assign", self.dim)
        return a if self.mean is None else (a - self.mean) / self.std

    def assign(self, x: Any, chunk: int = 8192) -> np.ndarray:
        """Nearest centroid (Euclidean) of each row; ties go to the lower id.

        Args:
            x: (N, F) features (NumPy array or torch tensor).
            chunk: rows per distance block (bounds memory at ``chunk * K`` floats).

        Returns:
            (N,) int64 cluster ids in ``[0, K)``.
        """
        z = self.transform(x)
        out = np.empty(z.shape[0], dtype=np.int64)
        ct = self.centroids.T.astype(np.float64)  # (F, K)
        for lo in range(0, z.shape[0], max(1, int(chunk))):
            block = z[lo : lo + chunk].astype(np.float64)  # (n, F)
            d = self._sq_norms[None, :] - 2.0 * (block @ ct)  # (n, K); ||x||^2 is constant per row
            out[lo : lo + chunk] = np.argmin(d, axis=1)
        return out

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready ``{"format", "centroids", "mean", "std"}`` (nested lists; mean/std None when unset).

        float32 values survive a JSON round trip exactly, so this is the form to keep a codebook
        as text inside a checkpoint.
        """
        return {
            "format": _FORMAT,
            "centroids": self.centroids.tolist(),
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Codebook":
        """Inverse of :meth:`to_dict` (``format`` may be absent; ``mean``/``std`` may be absent or None).

        Args:
            d: a dict with ``centroids`` (K x F nested lists) and optionally ``mean``/``std``.
        """
        if not isinstance(d, dict) or "centroids" not in d:
            raise CodebookError(f"a codebook dict needs a 'centroids' entry, got {type(d).__name__} "
                                f"{sorted(d) if isinstance(d, dict) else ''}")
        if d.get("format", _FORMAT) != _FORMAT:
            raise CodebookError(f"not an mmm k-means codebook (format {d.get('format')!r})")
        try:
            arrays = [None if d.get(k) is None else np.asarray(d[k], dtype=np.float32) for k in ("centroids", "mean", "std")]
        except (TypeError, ValueError) as exn:
            raise CodebookError(f"codebook entries must be numeric arrays: {exn}") from exn
        return cls(arrays[0], arrays[1], arrays[2])

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Codebook":
        """Inverse of :meth:`to_json`.

        Args:
            text: JSON written by :meth:`to_json`.
        """
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exn:
            raise CodebookError(f"codebook JSON is invalid: {exn}") from exn
        return cls.from_dict(d)

    def save(self, path: PathLike) -> Path:
        """Write the codebook as a safetensors file (tensors ``centroids`` [, ``mean``, ``std``]).

        Args:
            path: file to write (``.safetensors`` by convention); parent folders are created.
        """
        from safetensors.numpy import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"centroids": self.centroids}
        if self.mean is not None and self.std is not None:
            tensors.update(mean=self.mean, std=self.std)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"format": _FORMAT, "version": "1", "k": str(self.k), "dim": str(self.dim)})
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: PathLike) -> "Codebook":
        """Read a codebook written by :meth:`save`.

        Args:
            path: the safetensors file.
        """
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"codebook file not found: {p}")
        try:
            with safe_open(str(p), framework="np") as fh:
                meta = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as exn:  # safetensors raises its own error types for bad headers
            raise CodebookError(f"cannot read codebook {p}: {type(exn).__name__}: {exn}") from exn
        if meta.get("format") != _FORMAT:
            raise CodebookError(f"{p} is not an mmm k-means codebook (metadata format {meta.get('format')!r})")
        if "centroids" not in tensors:
            raise CodebookError(f"{p} has no 'centroids' tensor (has {sorted(tensors)})")
        try:
            return cls(tensors["centroids"], tensors.get("mean"), tensors.get("std"))
        except CodebookError as exn:
            raise CodebookError(f"{p}: {exn}") from exn

    def __repr__(self) -> str:
        return f"Codebook(k={self.k}, dim={self.dim}, standardized={self.mean is not None})"
