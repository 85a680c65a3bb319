"""Tests for the patch maskers: counts, block shape, SimMIM cells, determinism, argument errors."""
from __future__ import annotations

import numpy as np
import pytest

from mmm.masking.patch import BeitBlockMasker, MaeRandomMasker, SimMIMRandomMasker
from mmm.registry import MASKERS, RegistryError

NAMES = ("mae_random", "beit_block", "simmim_random")


def boundary_per_hidden(mask: np.ndarray) -> float:
    """Hidden/visible neighbour pairs per hidden patch: low for compact blocks, high for scattered patches."""
    edges = (mask[1:, :] != mask[:-1, :]).sum() + (mask[:, 1:] != mask[:, :-1]).sum()
    return edges / mask.sum()


def test_registered_and_created_by_name() -> None:
    for name in NAMES:
        assert name in MASKERS
    assert isinstance(MASKERS.create("mae_random", ratio=0.5), MaeRandomMasker)
    assert isinstance(MASKERS.create("beit_block"), BeitBlockMasker)
    assert MASKERS.create("simmim_random", mask_patch=1).mask_patch == 1
    with pytest.raises(RegistryError, match="mask_ratio"):
        MASKERS.create("mae_random", mask_ratio=0.5)


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_determinism(name: str) -> None:
    masker = MASKERS.create(name)
    a = masker((14, 14), np.random.default_rng(5))
    assert a.shape == (196,) and a.dtype == bool
    assert np.array_equal(a, masker((14, 14), np.random.default_rng(5)))
    assert any(not np.array_equal(a, masker((14, 14), np.random.default_rng(s))) for s in range(6, 9))


@pytest.mark.parametrize("grid", [(14, 14), (7, 10), (1, 2), (3, 1)])
@pytest.mark.parametrize("ratio", [0.001, 0.25, 0.75, 0.999])
def test_mae_random_hides_exactly_round_ratio(grid, ratio) -> None:
    total = grid[0] * grid[1]
    expected = min(total - 1, max(1, round(ratio * total)))
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert MaeRandomMasker(ratio)(grid, rng).sum() == expected


def test_mae_random_is_uniform_over_positions() -> None:
    rng = np.random.default_rng(0)
    freq = np.mean([MaeRandomMasker(0.75)((8, 8), rng) for _ in range(2000)], axis=0)
    assert np.abs(freq - 0.75).max() < 0.05


def test_beit_block_ratio_near_target_and_blocks_compact() -> None:
    rng = np.random.default_rng(0)
    masker = BeitBlockMasker()  # ratio 0.4 over 14 x 14: target 78 patches
    masks = [masker((14, 14), rng).reshape(14, 14) for _ in range(300)]
    counts = np.array([m.sum() for m in masks])
    assert counts.max() <= 78 and abs(counts.mean() / 196 - 0.4) < 0.03
    random_masks = [MaeRandomMasker(0.4)((14, 14), rng).reshape(14, 14) for _ in range(300)]
    block_edges = np.mean([boundary_per_hidden(m) for m in masks])
    random_edges = np.mean([boundary_per_hidden(m) for m in random_masks])
    assert block_edges < 0.5 * random_edges


def test_beit_block_respects_max_patches_and_small_grids() -> None:
    rng = np.random.default_rng(1)
    for grid in [(1, 2), (2, 2), (3, 5), (4, 4)]:
        for _ in range(50):
            m = BeitBlockMasker(ratio=0.5)(grid, rng)
            assert 1 <= m.sum() <= m.size - 1
    # one block of at most 4 patches per step: many steps, still near the target
    m = BeitBlockMasker(ratio=0.5, min_patches=1, max_patches=4)((10, 10), rng)
    assert 40 <= m.sum() <= 50


@pytest.mark.parametrize("mask_patch,grid", [(2, (14, 14)), (1, (5, 7)), (4, (8, 12))])
def test_simmim_masks_whole_cells(mask_patch, grid) -> None:
    rng = np.random.default_rng(0)
    masker = SimMIMRandomMasker(ratio=0.6, mask_patch=mask_patch)
    gh, gw = grid
    ch, cw = gh // mask_patch, gw // mask_patch
    for _ in range(10):
        m = masker(grid, rng).reshape(gh, gw)
        cells = m.reshape(ch, mask_patch, cw, mask_patch)
        assert (cells.all(axis=(1, 3)) == cells.any(axis=(1, 3))).all()  # each cell all hidden or all visible
        assert cells.all(axis=(1, 3)).sum() == min(ch * cw - 1, max(1, round(0.6 * ch * cw)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ratio", [0.001, 0.999])
def test_at_least_one_hidden_and_one_visible(name: str, ratio: float) -> None:
    masker = MASKERS.create(name, ratio=ratio)
    grid = (4, 4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = masker(grid, rng)
        assert 1 <= m.sum() <= m.size - 1


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: MaeRandomMasker(0.0), "ratio"),
        (lambda: MaeRandomMasker(1.0), "ratio"),
        (lambda: MaeRandomMasker("0.5"), "ratio"),
        (lambda: MaeRandomMasker(True), "ratio"),
        (lambda: BeitBlockMasker(min_patches=0), "min_patches"),
        (lambda: BeitBlockMasker(min_patches=8, max_patches=4), "max_patches"),
        (lambda: BeitBlockMasker(min_aspect=0.0), "min_aspect"),
        (lambda: BeitBlockMasker(min_aspect=2.0), "min_aspect"),
        (lambda: BeitBlockMasker(attempts=0), "attempts"),
        (lambda: SimMIMRandomMasker(mask_patch=0), "mask_patch"),
        (lambda: SimMIMRandomMasker(ratio=1.2), "ratio"),
    ],
)
def test_bad_arguments_are_named(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grid", [(0, 4), (1, 1), (2.5, 3), "ab", (4,)])
def test_bad_grids(name: str, grid) -> None:
    with pytest.raises(ValueError, match="grid"):
        MASKERS.create(name)(grid, np.random.default_rng(0))


def test_simmim_grid_must_divide_into_cells() -> None:
    with pytest.raises(ValueError, match="not divisible by mask_patch=2"):
        SimMIMRandomMasker(mask_patch=2)((7, 8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 2"):
        SimMIMRandomMasker(mask_patch=4)((4, 4), np.random.default_rng(0))


def test_beit_block_draws_late_block_areas_as_beit_does():
    """BEiT draws each block's area with ``uniform(min_patches, remaining)`` in either order; capping the lower end
    at the remaining count hit the target exactly on every image, filling its last patches with tiny specks
    (14x14 at 0.4: sd 0.03 instead of BEiT's 0.9; 27% of regions of 3 patches or fewer instead of 7%)."""
    from mmm.masking.patch import BeitBlockMasker

    m = BeitBlockMasker(ratio=0.4)
    counts = np.array([m((14, 14), np.random.default_rng(s)).sum() for s in range(400)])
    assert counts.max() <= 78 and 76.8 < counts.mean() < 78.0
    assert counts.std() > 0.5  # BEiT's reference generator: mean 77.5, sd 0.9


def test_beit_block_warns_when_the_grid_is_too_small_for_its_blocks(caplog):
    from mmm.masking.patch import BeitBlockMasker

    small = BeitBlockMasker(ratio=0.4)  # 4x4: target 6 < min_patches 16
    with caplog.at_level("WARNING", logger="mmm.data"):
        counts = [small((4, 4), np.random.default_rng(s)).sum() for s in range(200)]
    assert np.mean(counts) < 5.0  # BEiT's generator on such a grid: about 4 of 6
    assert caplog.text.count("beit_block: the 4x4 patch grid's target of 6 hidden patches is below min_patches=16") == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmm.data"):
        BeitBlockMasker(ratio=0.4, min_patches=3)((4, 4), np.random.default_rng(0))
    assert "beit_block" not in caplog.text
