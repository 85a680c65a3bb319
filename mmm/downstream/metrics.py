"""Task metrics by GLUE's convention (Wang et al. 2019): accuracy, F1, Matthews correlation,
Pearson and Spearman correlation; and the mean ± standard deviation over seeds.

CoLA reports Matthews correlation, MRPC/QQP F1 (of the positive class, label 1), STS-B Pearson
and Spearman, the other classification tasks accuracy. F1 depends on the task, not on the labels a
split happens to hold: the caller passes the task's number of classes (``num_classes``); a 2-class
task scores the F1 of class 1, a task with more classes the macro average over the labels present
in gold or predictions (scikit-learn's ``average="binary"`` / ``"macro"``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    """Share of exact matches."""
    return float((np.asarray(pred) == np.asarray(gold)).mean())


def f1(pred: np.ndarray, gold: np.ndarray, num_classes: Optional[int] = None) -> float:
    """F1 of class 1 for a 2-class task (GLUE's MRPC/QQP), else the macro average over the labels in
    gold or predictions.

    Args:
        pred, gold: class ids in ``[0, num_classes)``.
        num_classes: the task's number of classes (required: the labels present do not tell a
            binary task from a multi-class split that lacks some classes).
    """
    if num_classes is None:
        raise ValueError("f1 needs the task's number of classes (num_classes=...): with 2 it is the F1 of "
                         "class 1, with more the macro average")
    if num_classes < 2:
        raise ValueError(f"f1 needs a task of at least 2 classes, got num_classes={num_classes}")
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.union1d(pred, gold)
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"f1: labels {classes.tolist()} are not all class ids of a {num_classes}-class task")
    positive = [1] if num_classes == 2 else classes.tolist()
    scores = []
    for c in positive:
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


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
    """Spearman rank correlation (Pearson of the average ranks); NaN when a value is not finite (as Pearson's)."""
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    return pearson(_ranks(x), _ranks(y))


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


def metric_value(name: str, pred: np.ndarray, gold: np.ndarray, num_classes: Optional[int] = None) -> float:
    """One metric; ``num_classes`` (the task's, needed by ``f1``) is ignored by the others."""
    if name == "f1":
        return f1(pred, gold, num_classes)
    return METRICS[name](pred, gold)


def score_all(pred: np.ndarray, gold: np.ndarray, task_type: str,
              num_classes: Optional[int] = None) -> Dict[str, float]:
    """Every metric of ``task_type`` on one prediction set (``num_classes``: the task's, for F1)."""
    names = CLASSIFICATION_METRICS if task_type == "classification" else REGRESSION_METRICS
    return {n: metric_value(n, pred, gold, num_classes) for n in names}


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "std", "n"}`` with the sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std of no values")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
