"""Masked region modeling heads (MRFR, MRC, MRC-kl) on hand-built batches with shard targets."""
import pytest
import torch

from conftest import fit_head
import torch.nn.functional as F

from mmm.batch import PackedBatch, RegionTargets
from mmm.config import EncoderConfig
from mmm.core.packing import PackedSeqInfo
import mmm.objectives  # noqa: F401  (registers the objectives)
from mmm.registry import OBJECTIVES

D, N, M, FDIM, C = 16, 12, 5, 10, 6


def _head(name, **kw):
    torch.manual_seed(0)
    return OBJECTIVES.create(name, dim=D, embedders={}, encoder_cfg=EncoderConfig(dim=D, heads=2), **kw)


def _batch(features=True, soft=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = RegionTargets(torch.tensor([1, 3, 4, 8, 10]),
                      torch.randn(M, FDIM, generator=g) if features else None,
                      torch.randn(M, C, generator=g).softmax(-1) if soft else None)
    return PackedBatch(PackedSeqInfo.from_seqlens([6, 6]), {}, {"mrm": t})


def _hidden():
    return torch.nn.Parameter(torch.randn(N, D, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name,kw,metrics", [("mrfr", {"feature_dim": FDIM}, {"cos"}),
                                             ("mrc", {"num_classes": C}, {"acc"}),
                                             ("mrc_kl", {"num_classes": C}, set())])
def test_losses_finite_gradients_masked_only_and_learning(name, kw, metrics):
    head, batch, hidden = _head(name, **kw), _batch(), _hidden()
    out = head(hidden, batch)
    assert torch.isfinite(out.loss) and out.count == M and set(out.metrics) == metrics
    out.loss.backward()
    pos = batch.targets["mrm"].positions
    rest = torch.ones(N, dtype=torch.bool)
    rest[pos] = False
    assert hidden.grad[pos].abs().sum() > 0 and hidden.grad[rest].abs().sum() == 0  # only hidden tokens are scored
    assert all(p.grad is not None for p in head.parameters())
    first = out.loss.item()
    out = fit_head(head, hidden, batch)
    assert out.loss.item() < 0.7 * first


def test_mrc_uses_argmax_of_soft_labels():
    head, batch, hidden = _head("mrc", num_classes=C), _batch(), _hidden()
    t = batch.targets["mrm"]
    logits = head.head(hidden[t.positions])
    out = head(hidden, batch)
    assert torch.allclose(out.loss, F.cross_entropy(logits, t.soft_labels.argmax(-1)), atol=1e-6)
    assert float(out.metrics["acc"]) == float((logits.argmax(-1) == t.soft_labels.argmax(-1)).float().mean())


def test_mrc_background_class_is_never_the_hard_label():
    """UNITER's code takes the argmax over the object classes, skipping the detector's background class 0."""
    head, batch, hidden = _head("mrc", num_classes=C, background=0), _batch(), _hidden()
    t = batch.targets["mrm"]
    t.soft_labels[:, 0] = 0.9  # background dominates every region
    logits = head.head(hidden[t.positions])
    want = t.soft_labels[:, 1:].argmax(-1) + 1  # UNITER: max(soft[:, 1:]) + 1
    assert torch.allclose(head(hidden, batch).loss, F.cross_entropy(logits, want), atol=1e-6)
    assert (_head("mrc", num_classes=C).score(logits, t.soft_labels)[0] / M).item() == pytest.approx(
        F.cross_entropy(logits, torch.zeros(M, dtype=torch.long)).item(), abs=1e-5)  # without it: class 0
    for bad in (C, -1, True, "0"):
        with pytest.raises(ValueError, match=r"objective mrc: background must be a class index in \[0, 6\)"):
            _head("mrc", num_classes=C, background=bad)


def test_mrfr_tied_to_the_region_embedders_projection():
    """UNITER's code: the MRFR output layer is the region embedder's img_linear, transposed, with its own bias."""
    emb = torch.nn.Module()
    emb.feature_proj = torch.nn.Linear(FDIM, D)
    torch.manual_seed(0)
    head = OBJECTIVES.create("mrfr", dim=D, embedders={"regions": emb}, encoder_cfg=EncoderConfig(dim=D, heads=2),
                             feature_dim=FDIM, tie_to="regions")
    assert not hasattr(head.head, "out") and "regions" not in dict(head.named_modules())  # shared, not copied
    batch, hidden = _batch(), _hidden()
    t = batch.targets["mrm"]
    h = head.head.norm(F.gelu(head.head.dense(hidden[t.positions])))
    want = F.mse_loss(F.linear(h, emb.feature_proj.weight.t(), head.head.out_bias), t.features)
    out = head(hidden, batch)
    assert torch.allclose(out.loss, want, atol=1e-6)
    out.loss.backward()
    assert emb.feature_proj.weight.grad.abs().sum() > 0  # the regression trains the embedder's projection
    with pytest.raises(ValueError, match=r"tie_to='image' names no embedder of the model \(embedders: \['regions'\]\)"):
        OBJECTIVES.create("mrfr", dim=D, embedders={"regions": emb}, encoder_cfg=EncoderConfig(dim=D, heads=2),
                          feature_dim=FDIM, tie_to="image")
    with pytest.raises(ValueError, match=r"its feature_proj maps 10 → 16, the head regresses feature_dim=12"):
        OBJECTIVES.create("mrfr", dim=D, embedders={"regions": emb}, encoder_cfg=EncoderConfig(dim=D, heads=2),
                          feature_dim=12, tie_to="regions")


def test_mrc_kl_equals_hand_kl():
    head, batch, hidden = _head("mrc_kl", num_classes=C), _batch(), _hidden()
    t = batch.targets["mrm"]
    q = head.head(hidden[t.positions]).softmax(-1)
    p = t.soft_labels
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(head(hidden, batch).loss, expected, atol=1e-5)


def test_mrfr_is_mse_to_the_features():
    head, batch, hidden = _head("mrfr", feature_dim=FDIM), _batch(), _hidden()
    t = batch.targets["mrm"]
    pred = head.head(hidden[t.positions])
    assert torch.allclose(head(hidden, batch).loss, ((pred - t.features) ** 2).mean(), atol=1e-6)


@pytest.mark.parametrize("name,kw", [("mrfr", {"feature_dim": FDIM}), ("mrc", {"num_classes": C}),
                                     ("mrc_kl", {"num_classes": C})])
def test_zero_targets_give_a_connected_zero(name, kw):
    head, hidden = _head(name, **kw), _hidden()
    empty = PackedBatch(PackedSeqInfo.from_seqlens([12]), {}, {"mrm": RegionTargets(torch.zeros(0, dtype=torch.long))})
    for batch in (empty, PackedBatch(PackedSeqInfo.from_seqlens([12]), {})):
        out = head(hidden, batch)
        assert out.loss.item() == 0.0 and out.loss.requires_grad and out.count == 0
        out.loss.backward()
        assert hidden.grad.abs().sum() == 0 and all(p.grad is not None for p in head.parameters())


def test_dimension_errors_name_both_sides():
    with pytest.raises(ValueError, match="feature_dim=7"):
        _head("mrfr", feature_dim=7)(_hidden(), _batch())
    with pytest.raises(ValueError, match=r"num_classes=4.*\(5, 6\)|\(5, 6\).*num_classes=4"):
        _head("mrc_kl", num_classes=4)(_hidden(), _batch())
    with pytest.raises(ValueError, match="set feature_dim"):
        _head("mrfr")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        _head("mrc", num_classes=0)


def test_missing_targets_without_teacher_is_explained():
    head = _head("mrc", num_classes=C)
    with pytest.raises(ValueError, match="no pixel_index"):
        head(_hidden(), _batch(soft=False))
    batch = _batch(soft=False)
    batch.targets["mrm"].pixel_index = torch.zeros(M, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="configure a teacher"):
        head(_hidden(), batch)
