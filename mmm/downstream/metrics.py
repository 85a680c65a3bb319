"""Task metrics by GLUE's convention (Wang et al. 2019): accuracy, F1, Matthews correlation,
Pearson and Spearman correlation; and the mean ± standard deviation over seeds.

CoLA reports Matthews correlation, MRPC/QQP F1 (of the positive class, label 1), STS-B Pearson
and Spearman, the other classification tasks accuracy. Multi-class F1 here is the macro average.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    """Share of exact matches."""
    return float((np.asarray(pred) == np.asarray(gold)).mean())


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """F1 of class 1 when the labels are binary (GLUE's MRPC/QQP), else the macro average over classes."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.union1d(pred, gold)
    positive = [1] if set(classes.tolist()) <= {0, 1} else classes.tolist()
    scores = []
    for c in positive:
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation coefficient (its multi-class form, Gorodkin 2004); 0 when undefined."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.union1d(pred, gold)
    idx = {c: i for i, c in enumerate(classes.tolist())}
    cm = np.zeros((len(classes), len(classes)))
    for p, g in zip(pred.tolist(), gold.tolist()):
        cm[idx[g], idx[p]] += 1
    t, p = cm.sum(1), cm.sum(0)
    c, s = np.trace(cm), cm.sum()
    denom = math.sqrt(max(s * s - (p * p).sum(), 0.0) * max(s * s - (t * t).sum(), 0.0))
    return 0.0 if denom == 0 else float((c * s - (t * p).sum()) / denom)


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant."""
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return 0.0 if denom == 0 else float((x * y).sum() / denom)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of the average ranks)."""
    return pearson(_ranks(np.asarray(pred, dtype=np.float64)), _ranks(np.asarray(gold, dtype=np.float64)))


METRICS: Dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def check_metric(name: str, task_type: str) -> str:
    """``name`` if it suits ``task_type`` (``classification`` or ``regression``), else a clear error.

    Args:
        name: a key of :data:`METRICS`.
        task_type: ``classification`` or ``regression``.
    """
    allowed = CLASSIFICATION_METRICS if task_type == "classification" else REGRESSION_METRICS
    if task_type not in ("classification", "regression"):
        raise ValueError(f"task type must be 'classification' or 'regression', got {task_type!r}")
    if name not in allowed:
        raise ValueError(f"metric {name!r} does not apply to {task_type}; choose one of {list(allowed)}")
    return name


def score_all(pred: np.ndarray, gold: np.ndarray, task_type: str) -> Dict[str, float]:
    """Every metric of ``task_type`` on one prediction set."""
    names = CLASSIFICATION_METRICS if task_type == "classification" else REGRESSION_METRICS
    return {n: METRICS[n](pred, gold) for n in names}


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "std", "n"}`` with the sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std of no values")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
