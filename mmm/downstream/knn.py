"""k-nearest-neighbour classification on frozen features, as DINO (Caron et al. 2021) and MAE report it.

Features are L2-normalised; each test sample takes the ``k`` training samples of highest cosine
similarity, and each neighbour votes for its class with weight ``exp(similarity / T)``
(temperature-weighted votes, DINO's ``T = 0.07``, ``k = 20``). ``temperature=None`` gives plain
majority votes. Use the same splits as the linear probe (:func:`mmm.probe.linear_probe`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@dataclass
class KNNScore:
    """Held-out accuracy of a kNN classifier, with the chance level (majority class) for scale."""

    accuracy: float
    chance: float
    k: int
    temperature: Optional[float]
    train_samples: int
    test_samples: int
    classes: int


def class_ids(y: np.ndarray, what: str = "labels") -> np.ndarray:
    """``y`` as (n,) int64 class ids: integers, or floats with integral values (labels read from a
    table or a float array); non-integral, negative, NaN or non-numeric labels are a clear error."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of class ids, got shape {y.shape}")
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{what} must be integer class ids, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{what} must be integer class ids; {what}[{i}] is {y[i].item()!r}")
    if y.size and y.min() < 0:
        i = int(np.argmin(y))
        raise ValueError(f"{what} must be non-negative class ids; {what}[{i}] is {y[i].item()!r}")
    return y.astype(np.int64)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, k: int = DEFAULT_K,
                temperature: Optional[float] = DEFAULT_TEMPERATURE, chunk: int = 1024) -> np.ndarray:
    """Predicted class of each test row.

    Args:
        train_x: (n, d) training features.
        train_y: (n,) non-negative integer labels (integral floats are accepted, see :func:`class_ids`).
        test_x: (m, d) test features.
        k: neighbours (capped at n).
        temperature: vote weight ``exp(cos / T)``; None = each neighbour counts 1.
        chunk: test rows per similarity block (bounds memory at chunk × n).
    """
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y = class_ids(train_y, "training labels")
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"kNN needs (n, d) and (m, d) features, got {train_x.shape} and {test_x.shape}")
    if len(train_x) != len(train_y) or len(train_x) == 0:
        raise ValueError(f"kNN needs as many training labels as features (and at least one), got "
                         f"{len(train_y)} labels for {len(train_x)} rows")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0 or None, got {temperature}")
    for x, split in ((train_x, "training"), (test_x, "test")):
        bad = ~np.isfinite(x).all(1)
        if bad.any():  # NaN votes would pick a class at random and report an accuracy as if valid
            raise ValueError(f"kNN: {int(bad.sum())} of {len(x)} {split} feature rows are not finite (NaN or inf), "
                             f"the first at row {int(np.flatnonzero(bad)[0])}")
    classes = int(train_y.max()) + 1
    tr = torch.nn.functional.normalize(torch.from_numpy(train_x), dim=1)  # (n, d)
    ytr = torch.from_numpy(train_y.astype(np.int64))
    k = min(k, len(tr))
    out = []
    for lo in range(0, len(test_x), chunk):
        te = torch.nn.functional.normalize(torch.from_numpy(test_x[lo:lo + chunk]), dim=1)  # (c, d)
        sim, idx = (te @ tr.T).topk(k, dim=1)  # (c, k)
        # exp((s - s_max) / T): each row's votes scaled by one constant (the same argmax), so a small T cannot
        # overflow float32 into ties of inf (top-k is sorted: column 0 holds the row's largest similarity)
        w = torch.ones_like(sim) if temperature is None else ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(len(te), classes).scatter_add_(1, ytr[idx], w)  # (c, classes)
        out.append(votes.argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def knn_probe(train: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray], *, k: int = DEFAULT_K,
              temperature: Optional[float] = DEFAULT_TEMPERATURE) -> KNNScore:
    """Score a kNN classifier fitted on ``train`` features on ``test``.

    Args:
        train: ``(features, labels)``; labels are non-negative class ids (integral floats accepted).
        test: held-out ``(features, labels)``.
        k: neighbours.
        temperature: DINO vote temperature; None = majority vote.
    """
    (xtr, ytr), (xte, yte) = train, test
    ytr, yte = class_ids(ytr, "training labels"), class_ids(yte, "test labels")
    if len(np.unique(ytr)) < 2:
        raise ValueError(f"kNN needs at least 2 classes in the training labels, got {np.unique(ytr)}")
    if len(yte) == 0:
        raise ValueError("kNN: the test split is empty")
    pred = knn_predict(xtr, ytr, xte, k=k, temperature=temperature)
    acc = float((pred == yte).mean())
    chance = float(np.bincount(yte).max() / len(yte))
    return KNNScore(acc, chance, min(k, len(ytr)), temperature, len(ytr), len(yte),
                    int(len(np.unique(np.concatenate([ytr, yte])))))
