"""GLUE metrics against scikit-learn / SciPy; kNN on a separable and a non-separable synthetic set."""
from __future__ import annotations

import numpy as np
import pytest

from mmm.downstream.knn import knn_predict, knn_probe
from mmm.downstream.metrics import check_metric, f1, matthews, mean_std, pearson, spearman
from mmm.probe import linear_probe


def test_metrics_match_reference_implementations() -> None:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    for classes in (2, 4):
        gold = rng.integers(0, classes, 200)
        pred = np.where(rng.random(200) < 0.6, gold, rng.integers(0, classes, 200))
        avg = "binary" if classes == 2 else "macro"
        assert f1(pred, gold, classes) == pytest.approx(f1_score(gold, pred, average=avg))
        assert matthews(pred, gold) == pytest.approx(matthews_corrcoef(gold, pred))
    x = rng.normal(size=100)
    y = x + rng.normal(size=100)
    y[:10] = y[0]  # ties
    assert pearson(x, y) == pytest.approx(pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(spearmanr(x, y)[0])
    assert matthews(np.zeros(5), np.zeros(5)) == 0.0 and pearson(np.ones(4), np.arange(4)) == 0.0


def test_metric_choice_and_mean_std() -> None:
    assert check_metric("matthews", "classification") == "matthews"
    with pytest.raises(ValueError, match="does not apply to regression"):
        check_metric("accuracy", "regression")
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([0.5])["std"] == 0.0


def _blobs(rng, n, separable):
    y = rng.integers(0, 3, n)
    centres = np.eye(3, 16) * 6.0
    x = rng.normal(size=(n, 16))
    if separable:
        x = x + centres[y]
    return x.astype(np.float32), y


def test_knn_separates_separable_data_and_fails_on_noise() -> None:
    rng = np.random.default_rng(1)
    train, test = _blobs(rng, 300, True), _blobs(rng, 150, True)
    s = knn_probe(train, test)
    assert s.accuracy > 0.95 and s.k == 20 and s.temperature == 0.07
    assert linear_probe(train, test).accuracy > 0.95  # same splits as the linear probe
    noise_train, noise_test = _blobs(rng, 300, False), _blobs(rng, 150, False)
    bad = knn_probe(noise_train, noise_test)
    assert bad.accuracy < 0.5  # 3 balanced classes, labels independent of features: ~1/3
    assert knn_probe(noise_train, noise_test, temperature=None).accuracy < 0.5


def test_knn_votes_weighted_vs_majority() -> None:
    # 3 far neighbours of class 0 outvote 2 near ones of class 1 by count, not by weight
    train_x = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]], np.float32)
    train_y = np.array([1, 1, 0, 0, 0])
    q = np.array([[1.0, 0.02]], np.float32)
    assert knn_predict(train_x, train_y, q, k=5, temperature=None)[0] == 0
    assert knn_predict(train_x, train_y, q, k=5, temperature=0.07)[0] == 1
    with pytest.raises(ValueError, match="at least 2 classes"):
        knn_probe((train_x, np.zeros(5, int)), (q, np.zeros(1, int)))
