"""Tests for k-means codebooks: recovering blobs, determinism, safetensors round trip, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmm.targets import Codebook, CodebookError


def blobs(seed: int = 0, k: int = 4, per: int = 150, dim: int = 6):
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(k, dim) + rng.normal(size=(k, dim))  # pairwise ~14 apart, unit noise
    x = np.concatenate([c + rng.normal(size=(per, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(k), per)
    return x, y


def test_fit_recovers_well_separated_blobs() -> None:
    x, y = blobs()
    cb = Codebook.fit(x, k=4, seed=0)
    ids = cb.assign(x)
    assert ids.dtype == np.int64 and ids.shape == (600,) and cb.k == 4 and cb.dim == 6
    # each blob maps to one cluster and each cluster to one blob
    pairs = {(int(a), int(b)) for a, b in zip(y, ids)}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4 and len({b for _, b in pairs}) == 4


def test_fit_is_deterministic_under_seed() -> None:
    x, _ = blobs(1)
    a = Codebook.fit(x, k=6, seed=3)
    b = Codebook.fit(x, k=6, seed=3)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.assign(x), b.assign(x))


@pytest.mark.parametrize("standardize", [True, False])
def test_save_load_round_trip(tmp_path, standardize: bool) -> None:
    x, _ = blobs(2)
    cb = Codebook.fit(x, k=5, seed=0, standardize=standardize)
    path = cb.save(tmp_path / "sub" / "codebook.safetensors")
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle
    back = Codebook.load(path)
    np.testing.assert_array_equal(back.centroids, cb.centroids)
    assert (back.mean is None) == (not standardize)
    np.testing.assert_array_equal(back.assign(x), cb.assign(x))
    np.testing.assert_array_equal(back.assign(torch.from_numpy(x)), cb.assign(x))  # torch input too


def test_json_round_trip_is_exact() -> None:
    x, _ = blobs(4)
    cb = Codebook.fit(x, k=3, seed=1)
    back = Codebook.from_json(cb.to_json())
    np.testing.assert_array_equal(back.centroids, cb.centroids)
    np.testing.assert_array_equal(back.std, cb.std)
    plain = Codebook.from_dict({"centroids": [[0.0, 1.0], [2.0, 3.0]]})  # format/mean/std optional
    assert plain.mean is None and plain.assign(np.array([[1.9, 3.2]])).tolist() == [1]
    with pytest.raises(CodebookError, match="centroids"):
        Codebook.from_dict({"mean": [0.0]})
    with pytest.raises(CodebookError, match="invalid"):
        Codebook.from_json("{")


def test_assign_is_the_nearest_centroid_with_small_chunks() -> None:
    rng = np.random.default_rng(5)
    cb = Codebook(rng.normal(size=(7, 3)).astype(np.float32))
    x = rng.normal(size=(101, 3)).astype(np.float32)
    brute = ((x[:, None, :] - cb.centroids[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(cb.assign(x, chunk=16), brute)


def test_shape_and_value_errors_are_clear(tmp_path) -> None:
    x, _ = blobs(3)
    cb = Codebook.fit(x, k=3, seed=0)
    with pytest.raises(CodebookError, match="features have 5 dims, the codebook expects 6"):
        cb.assign(np.zeros((2, 5), np.float32))
    with pytest.raises(CodebookError, match=r"must be 2-D"):
        cb.assign(np.zeros(6, np.float32))
    with pytest.raises(CodebookError, match="at least k=10"):
        Codebook.fit(x[:5], k=10)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(CodebookError, match="NaN"):
        Codebook.fit(bad, k=3)
    with pytest.raises(CodebookError, match=r"mean/std must have shape \(6,\)"):
        Codebook(cb.centroids, np.zeros(4), np.ones(4))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CodebookError, match="junk.safetensors"):
        Codebook.load(tmp_path / "junk.safetensors")
    from safetensors.numpy import save_file

    save_file({"centroids": cb.centroids}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CodebookError, match="not an mmm k-means codebook"):
        Codebook.load(tmp_path / "other.safetensors")


def test_repeated_rows_leave_no_dead_code_and_too_few_distinct_rows_are_refused():
    """Half the rows one repeated vector (digital silence): MiniBatchKMeans re-seeded its low-count centres on the
    repeats, giving identical centroids of which only the lowest id was ever assigned (45 of 64 codes used)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6000, 39)).astype(np.float32)
    x[rng.random(6000) < 0.5] = x[0]
    book = Codebook.fit(x, 64, seed=0)
    assert len(np.unique(book.assign(x))) == 64
    assert len(np.unique(book.centroids, axis=0)) == 64
    few = np.repeat(rng.normal(size=(10, 4)).astype(np.float32), 50, axis=0)
    with pytest.raises(CodebookError, match=r"the 500 feature rows hold only 10 distinct ones, fewer than k=16"):
        Codebook.fit(few, 16)


def test_data_without_repeated_rows_is_fitted_as_before():
    from sklearn.cluster import MiniBatchKMeans

    x = np.random.default_rng(1).normal(size=(3000, 8)).astype(np.float32)
    book = Codebook.fit(x, 32, seed=3)
    z = (x - x.mean(0, dtype=np.float64).astype(np.float32)) / np.maximum(x.std(0, dtype=np.float64), 1e-6).astype(np.float32)
    plain = MiniBatchKMeans(n_clusters=32, random_state=3, batch_size=4096, max_iter=100, n_init=3, init="k-means++").fit(z)
    assert np.array_equal(book.centroids, plain.cluster_centers_.astype(np.float32))
