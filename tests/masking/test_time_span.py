"""Tests for the audio maskers: wav2vec 2.0 time spans and AudioMAE spectrogram patches."""
from __future__ import annotations

import numpy as np
import pytest

from mmm.modalities.audio.masking import SpecPatchMasker, TimeSpanMasker
from mmm.registry import MASKERS


def runs(mask: np.ndarray) -> list:
    """Lengths of the maximal runs of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(edges[1::2] - edges[::2])


# ------------------------------------------------------------------ time_span
def test_time_span_is_registered_and_deterministic() -> None:
    masker = MASKERS.create("time_span", p=0.1, span=4)
    assert isinstance(masker, TimeSpanMasker)
    a = masker(200, np.random.default_rng(3))
    b = masker(200, np.random.default_rng(3))
    c = masker(200, np.random.default_rng(4))
    assert a.dtype == bool and a.shape == (200,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_time_span_masks_whole_spans() -> None:
    single = TimeSpanMasker(p=1e-6, span=7, min_masks=1)
    for seed in range(20):
        m = single(100, np.random.default_rng(seed))
        assert runs(m) == [7]  # exactly one span of 7 tokens
    masker = TimeSpanMasker(p=0.05, span=5)
    for seed in range(20):
        m = masker(300, np.random.default_rng(seed))
        assert m.any() and all(r >= 5 for r in runs(m))  # overlapping spans only make runs longer
    three = TimeSpanMasker(p=1e-6, span=3, min_masks=3)
    for seed in range(10):  # three distinct starts: 5 (fully overlapping) to 9 tokens
        assert 5 <= three(50, np.random.default_rng(seed)).sum() <= 9


def test_time_span_ratio_matches_the_span_coverage() -> None:
    masker = TimeSpanMasker()  # p=0.13, span=5: about half of the tokens
    rng = np.random.default_rng(0)
    frac = np.mean([masker(500, rng).mean() for _ in range(100)])
    assert abs(frac - (1 - (1 - 0.13) ** 5)) < 0.05


def test_time_span_short_sequences() -> None:
    masker = TimeSpanMasker(p=0.05, span=10)
    rng = np.random.default_rng(0)
    assert masker(0, rng).shape == (0,)
    np.testing.assert_array_equal(masker(1, rng), [True])
    for t in range(2, 20):
        m = masker(t, rng)
        assert 1 <= m.sum() < t  # at least one hidden, some context left
    assert masker.span_length(6) == 3 and masker.span_length(40) == 10


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"p": 0.0}, "p must"), ({"p": 1.5}, "p must"), ({"span": 0}, "span must"), ({"span": 2.5}, "span must"),
     ({"min_masks": -1}, "min_masks must")],
)
def test_time_span_rejects_bad_arguments(kwargs, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        TimeSpanMasker(**kwargs)


def test_time_span_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="num_tokens must be an int >= 0, got -1"):
        TimeSpanMasker()(-1, np.random.default_rng(0))


# ------------------------------------------------------------------ spec_patch
def test_spec_patch_exact_count_and_determinism() -> None:
    masker = MASKERS.create("spec_patch", ratio=0.8)
    for grid in [(8, 64), (4, 7), (1, 3)]:
        m = masker(grid, np.random.default_rng(1))
        n = grid[0] * grid[1]
        assert m.shape == (n,) and m.dtype == bool
        assert m.sum() == min(max(round(0.8 * n), 1), n - 1)
        np.testing.assert_array_equal(m, masker(grid, np.random.default_rng(1)))
    np.testing.assert_array_equal(masker((1, 1), np.random.default_rng(0)), [True])


def test_spec_patch_structured_masks_whole_rows_or_columns() -> None:
    rng = np.random.default_rng(2)
    time = SpecPatchMasker(ratio=0.5, structure="time")((4, 10), rng).reshape(4, 10)
    cols = time.all(axis=0)
    assert cols.sum() == 5 and (time.any(axis=0) == cols).all()  # whole time columns only
    freq = SpecPatchMasker(ratio=0.5, structure="freq")((4, 10), rng).reshape(4, 10)
    rows = freq.all(axis=1)
    assert rows.sum() == 2 and (freq.any(axis=1) == rows).all()
    both = SpecPatchMasker(ratio=0.75, structure="time_freq")((8, 20), rng).reshape(8, 20)
    r, c = both.all(axis=1), both.all(axis=0)
    np.testing.assert_array_equal(both, r[:, None] | c[None, :])  # a union of rows and columns
    assert r.sum() == 4 and c.sum() == 10


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"ratio": 0.0}, "ratio must"), ({"ratio": 1.0}, "ratio must"), ({"ratio": True}, "ratio must"),
     ({"structure": "diagonal"}, "structure must")],
)
def test_spec_patch_rejects_bad_arguments(kwargs, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        SpecPatchMasker(**kwargs)


@pytest.mark.parametrize("grid", [(0, 4), (4,), (2.0, 3), "4x4", (4, -1)])
def test_spec_patch_rejects_bad_grids(grid) -> None:
    with pytest.raises(ValueError, match="grid must be"):
        SpecPatchMasker()(grid, np.random.default_rng(0))


def test_time_span_always_leaves_a_token_visible():
    """Two non-overlapping spans could hide a short clip whole (p=0.2, span=3 at T=6: 3.6% of clips)."""
    from mmm.modalities.audio.masking import TimeSpanMasker

    for p, span, t in ((0.2, 3, 6), (0.13, 5, 8), (0.13, 5, 10), (0.08, 10, 16)):
        m = TimeSpanMasker(p=p, span=span)
        masks = [m(t, np.random.default_rng(s)) for s in range(1000)]
        assert not any(x.all() for x in masks), (p, span, t)
        assert all(x.any() for x in masks)
    assert TimeSpanMasker()(1, np.random.default_rng(0)).all()  # one token: masked, as before
