"""global_mean and the heads that use it: the plain mean on one process; in a data-parallel training
step, every head divides its local sum by the all-reduced count per rank (``count_global / world``).

The multi-rank cases here fake a 2-rank world (the all-reduce adds the other rank's count); real
two-process DDP runs are in tests/train/test_ddp.py.
"""
from typing import Callable, Dict, Tuple

import pytest
import torch

import mmm.objectives  # noqa: F401  (registers the objectives)
from mmm.batch import (ContrastiveTargets, FeatureInput, ImageInput, PackedBatch, PairTargets, RegionTargets, TokenInput,
                       TokenTargets)
from mmm.config import EncoderConfig
from mmm.core.packing import PackedSeqInfo
from mmm.modalities.audio.embedder import AudioEmbedder
from mmm.modalities.image.embedder import ImageEmbedder
from mmm.objectives.base import global_mean
from mmm.registry import EMBEDDERS, OBJECTIVES

D = 16
OTHER = 7  # the other (fake) rank's count


def test_single_process_is_the_plain_mean():
    losses = torch.tensor([1.0, 2.0, 4.5], requires_grad=True)
    out = global_mean(losses.sum(), 3)
    assert torch.allclose(out, losses.mean())
    out.backward()
    assert torch.allclose(losses.grad, torch.full((3,), 1 / 3))


def test_no_prediction_gives_zero_not_nan():
    zero = torch.zeros((), requires_grad=True) * 0.0
    assert float(global_mean(zero, 0).detach()) == 0.0
    assert float(global_mean(zero, 0, sync=False).detach()) == 0.0


# ------------------------------------------------------------------ every head, in a fake 2-rank world


def _create(name: str, embedders=None, **kw):
    return OBJECTIVES.create(name, dim=D, embedders=embedders or {}, encoder_cfg=EncoderConfig(dim=D, heads=2), **kw)


def _tokens(positions, labels) -> TokenTargets:
    return TokenTargets(torch.tensor(positions), torch.tensor(labels))


def _mlm(empty: bool):
    emb = EMBEDDERS.create("text", vocab_size=20, dim=D, max_len=8)
    seq = PackedSeqInfo.from_seqlens([6, 4])
    ids = torch.arange(10) % 20
    targets = {} if empty else {"text": _tokens([1, 2, 7], [5, 9, 11])}
    return _create("mlm", {"text": emb}), PackedBatch(seq, {"text": TokenInput(ids, seq.position_ids)}, targets), 10


def _token_targets(empty: bool):
    targets = {} if empty else {"image_tokens": _tokens([0, 3, 4, 8], [1, 4, 2, 0])}
    return _create("token_targets", num_classes=5), PackedBatch(PackedSeqInfo.from_seqlens([5, 5]), {}, targets), 10


def _features(empty: bool):
    emb = AudioEmbedder(feature_dim=6, dim=D, max_len=8)
    seq = PackedSeqInfo.from_seqlens([5, 3])
    mask = None if empty else torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    feats = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    return (_create("masked_features", {"audio": emb}, modality="audio"),
            PackedBatch(seq, {"audio": FeatureInput(feats, seq.position_ids, mask)}), 8)


def _image(name: str, drop_masked: bool, **kw):
    def make(empty: bool):
        emb = ImageEmbedder(D, image_size=8, patch_size=4, cls_token=True, position="sincos")
        mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
        if empty:
            mask = torch.zeros_like(mask)
        lengths = [1 + int((~m).sum() if drop_masked else m.numel()) for m in mask]
        pixels = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        batch = PackedBatch(PackedSeqInfo.from_seqlens(lengths), {"image": ImageInput(pixels, mask, drop_masked)})
        return _create(name, {"image": emb}, **kw), batch, sum(lengths)
    return make


def _regions(name: str, **kw):
    def make(empty: bool):
        g = torch.Generator().manual_seed(4)
        t = RegionTargets(torch.tensor([1, 3, 4, 8, 10]), torch.randn(5, 10, generator=g),
                          torch.randn(5, 6, generator=g).softmax(-1))
        targets = {} if empty else {"mrm": t}
        return _create(name, **kw), PackedBatch(PackedSeqInfo.from_seqlens([6, 6]), {}, targets), 12
    return make


def _itm(empty: bool):
    # three pairs laid out as [CLS] text text image image
    t = PairTargets(torch.tensor([0, 5, 10]), torch.tensor([1, 0, 1]), torch.tensor([1, 2, 6, 7, 11, 12]),
                    torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([3, 4, 8, 9, 13, 14]),
                    torch.tensor([0, 0, 1, 1, 2, 2]))
    targets = {} if empty else {"itm": t}
    return _create("itm", wra_weight=0.1, ot_iterations=5), PackedBatch(PackedSeqInfo.from_seqlens([5] * 3), {},
                                                                        targets), 15


HEADS: Dict[str, Callable[[bool], Tuple]] = {
    "mlm": _mlm, "token_targets": _token_targets, "masked_features": _features,
    "mae": _image("mae", True, decoder_dim=8, decoder_depth=1, decoder_heads=2),
    "simmim": _image("simmim", False),
    "mrfr": _regions("mrfr", feature_dim=10), "mrc": _regions("mrc", num_classes=6),
    "mrc_kl": _regions("mrc_kl", num_classes=6), "itm": _itm,
}


class FakeWorld:
    """torch.distributed as seen by rank 0 of 2, whose partner has ``OTHER`` predictions."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        dist = torch.distributed
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self.calls += 1
        tensor += OTHER


def _run(name: str, empty: bool = False):
    torch.manual_seed(0)  # the same weights (embedders included) in every call
    head, batch, n = HEADS[name](empty)
    hidden = torch.randn(n, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    return head(hidden, batch)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_divides_its_sum_by_the_global_count_per_rank_in_training(name, monkeypatch):
    alone = _run(name)
    assert alone.count > 0 and torch.isfinite(alone.loss)
    world = FakeWorld(monkeypatch)
    ddp = _run(name)
    assert world.calls == 1, "one count all-reduce per head and step"
    assert ddp.count == alone.count
    # local sum (= plain mean x count) over the global count per rank ((count + OTHER) / 2)
    expected = alone.loss.detach() * alone.count / ((alone.count + OTHER) / 2)
    torch.testing.assert_close(ddp.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    ddp.loss.backward()  # still differentiable


@pytest.mark.parametrize("name", sorted(HEADS))
def test_outside_training_steps_heads_keep_the_per_rank_mean_and_run_no_collective(name, monkeypatch):
    alone = _run(name)
    world = FakeWorld(monkeypatch)
    with torch.no_grad():  # validation: ranks may see different numbers of batches, so no collective
        val = _run(name)
    assert world.calls == 0
    torch.testing.assert_close(val.loss, alone.loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_head_without_targets_still_joins_the_count_all_reduce(name, monkeypatch):
    # the other ranks run the all-reduce in this step; a rank that skipped it would hang them
    world = FakeWorld(monkeypatch)
    out = _run(name, empty=True)
    assert world.calls == 1 and out.count == 0 and float(out.loss.detach()) == 0.0 and out.loss.requires_grad


def test_itc_validation_scores_its_own_pairs_without_a_collective(monkeypatch):
    # three captions (3 tokens each) then three images (2 tokens each); ClipLoss gathers only in training steps
    t = ContrastiveTargets(torch.tensor([0, 3, 6]), torch.tensor([9, 10, 11, 12, 13, 14]), torch.tensor([0, 0, 1, 1, 2, 2]))
    batch = PackedBatch(PackedSeqInfo.from_seqlens([3, 3, 3, 2, 2, 2]), {}, {"itc": t})
    hidden = torch.randn(15, D, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    head = _create("itc")
    with torch.no_grad():
        alone = head(hidden, batch)
    FakeWorld(monkeypatch)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    with torch.no_grad():
        val = head(hidden, batch)
    assert val.count == 3
    torch.testing.assert_close(val.loss, alone.loss)
