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


# ----------------------------------------------------------------------------- edge cases (review)


def test_knn_votes_at_a_small_temperature_do_not_overflow() -> None:
    """At T = 0.01 exp(cos / T) overflowed float32 to inf, and argmax over tied infs picked class 0."""
    from mmm.downstream.knn import knn_predict

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    ytr = np.repeat(np.arange(5), 20)
    xtr = (centers[ytr] + 0.05 * rng.normal(size=(100, 16))).astype(np.float32)
    yte = np.repeat(np.arange(5), 10)
    xte = (centers[yte] + 0.05 * rng.normal(size=(50, 16))).astype(np.float32)
    pred = knn_predict(xtr, ytr, xte, k=20, temperature=0.01)
    # float64 reference of the same weighted vote
    a = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    b = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    sim = a.astype(np.float64) @ b.T.astype(np.float64)
    idx = np.argsort(-sim, axis=1)[:, :20]
    want = np.array([np.bincount(ytr[i], weights=np.exp(s[i] / 0.01), minlength=5).argmax() for s, i in zip(sim, idx)])
    np.testing.assert_array_equal(pred, want)
    assert (pred == yte).mean() > 0.9


def test_spearman_of_non_finite_values_is_nan_and_an_empty_probe_test_split_is_named() -> None:
    from mmm.downstream.metrics import pearson, spearman
    from mmm.probe import linear_probe

    x, y = np.array([1.0, np.nan, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0])
    assert np.isnan(pearson(x, y)) and np.isnan(spearman(x, y))
    feats = np.random.default_rng(0).normal(size=(8, 4))
    with pytest.raises(ValueError, match="linear probe: the test split is empty"):
        linear_probe((feats, np.array([0, 1] * 4)), (feats[:0], np.zeros(0, np.int64)))


def test_a_split_that_cannot_score_or_select_is_refused_naming_it() -> None:
    """Constant regression targets (dev Pearson always 0) or one class under Matthews made dev pick its first state
    by chance, silently; constant training targets trained a constant."""
    from mmm.downstream.data import DownstreamDataError, Labels, Split
    from mmm.downstream.finetune import check_scorable, prepare_split

    flat = Split("train.tsv", ["a", "b", "c"], ["3", "3.0", "3"], ["r1", "r2", "r3"])
    with pytest.raises(DownstreamDataError, match=r"train.tsv: every regression target is 3.0 \(3 rows\)"):
        Labels.fit(flat, "regression")
    reg, cls2 = Labels("regression", []), Labels("classification", ["neg", "pos"])
    dev = Split("dev.tsv", ["a", "b"], ["2.5", "2.5"], ["r1", "r2"])
    with pytest.raises(DownstreamDataError, match=r"dev.tsv: every regression target is 2.5: pearson is undefined"):
        check_scorable(dev, [2.5, 2.5], "pearson", reg)
    with pytest.raises(DownstreamDataError, match=r"dev.tsv: every label is 'neg': Matthews correlation is 0"):
        check_scorable(dev, [0, 0], "matthews", cls2)
    with pytest.raises(DownstreamDataError, match=r"no row has class 'pos' \(class 1\): its F1 is 0"):
        check_scorable(dev, [0, 0], "f1", cls2)
    check_scorable(dev, [0, 0], "accuracy", cls2)  # accuracy still tells models apart
    check_scorable(dev, [0, 1], "matthews", cls2)

    from mmm.downstream.inputs import InputAdapter

    class Refuses(InputAdapter):  # prepare_split takes the adapter of the encoder being fine-tuned
        def prepare(self, raw, where=""):
            raise ValueError(f"{where}: invalid DNA character '-'")

    bad = Split("bad.csv", ["A-C", "G-T"], ["0", "1"], ["bad.csv:row 2", "bad.csv:row 3"])
    with pytest.raises(DownstreamDataError, match=r"bad.csv: no usable rows \(2 skipped, e.g. bad.csv:row 2: "
                                                  r"invalid DNA character '-'\)"):
        prepare_split(Refuses(None), bad, skip_bad=True)


def test_an_empty_split_given_through_the_api_is_named() -> None:
    from mmm.downstream.data import DownstreamDataError, Split
    from mmm.downstream.finetune import prepare_split
    from mmm.downstream.inputs import InputAdapter

    with pytest.raises(DownstreamDataError, match=r"test.tsv: no usable rows \(it has no rows\)"):
        prepare_split(InputAdapter(None), Split("test.tsv", [], [], []), skip_bad=False)


def test_knn_refuses_non_finite_features_naming_the_split_and_row() -> None:
    """NaN features made NaN vote weights and an accuracy reported as if valid (the linear probe raises)."""
    rng = np.random.default_rng(0)
    xtr, ytr = rng.normal(size=(20, 4)), np.arange(20) % 2
    xte, yte = rng.normal(size=(6, 4)), np.arange(6) % 2
    xte[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"kNN: 1 of 6 test feature rows are not finite .*the first at row 3"):
        knn_probe((xtr, ytr), (xte, yte))
    xtr[[5, 7]] = np.inf
    with pytest.raises(ValueError, match=r"kNN: 2 of 20 training feature rows are not finite .*row 5"):
        knn_predict(xtr, ytr, xte)
