"""CLIP-style contrastive head: parity with the symmetric cross-entropy formula, pooling, temperature."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmm.batch import ContrastiveTargets, PackedBatch
from mmm.config import EncoderConfig
from mmm.core.packing import PackedSeqInfo
from mmm.objectives.contrastive import mean_pool
import mmm.objectives  # noqa: F401  (registers the objectives)
from mmm.registry import OBJECTIVES

D = 16


def _itc(**kw):
    torch.manual_seed(0)
    return OBJECTIVES.create("itc", dim=D, embedders={}, encoder_cfg=EncoderConfig(dim=D, heads=2), **kw)


def _batch(b=4, patches=(3, 5, 2, 4), text_len=4):
    """B images (CLS + patches), then B captions; pooled image tokens exclude the image CLS."""
    seqlens, image_pos, owner, text_pos, off = [], [], [], [], 0
    for i in range(b):
        image_pos += range(off + 1, off + 1 + patches[i])
        owner += [i] * patches[i]
        seqlens.append(1 + patches[i])
        off += 1 + patches[i]
    for i in range(b):
        text_pos.append(off)
        seqlens.append(text_len)
        off += text_len
    t = ContrastiveTargets(torch.tensor(text_pos), torch.tensor(image_pos), torch.tensor(owner))
    return PackedBatch(PackedSeqInfo.from_seqlens(seqlens), {}, {"itc": t}), off


def test_loss_equals_symmetric_cross_entropy():
    head = _itc(embed_dim=8)
    batch, n = _batch()
    t = batch.targets["itc"]
    hidden = torch.randn(n, D)
    out = head(hidden, batch)
    # the formula by hand, pooling by a Python loop
    image = torch.stack([hidden[t.image_positions[t.image_owner == i]].mean(0) for i in range(4)])
    img = F.normalize(image @ head.image_proj.weight.T, dim=-1)
    txt = F.normalize(hidden[t.text_positions] @ head.text_proj.weight.T, dim=-1)
    logits = (1 / 0.07) * img @ txt.T
    truth = torch.arange(4)
    expected = (F.cross_entropy(logits, truth) + F.cross_entropy(logits.T, truth)) / 2
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.count == 4 and set(out.metrics) == {"i2t_acc", "t2i_acc", "logit_scale"}
    assert float(out.metrics["i2t_acc"]) == float((logits.argmax(1) == truth).float().mean())
    assert float(out.metrics["t2i_acc"]) == float((logits.argmax(0) == truth).float().mean())
    image_emb, text_emb = head.embed_pairs(hidden, t)
    assert torch.allclose(image_emb, img, atol=1e-6) and torch.allclose(text_emb, txt, atol=1e-6)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(4)) and torch.allclose(text_emb.norm(dim=-1), torch.ones(4))


def test_gradients_reach_only_pooled_tokens_and_learning():
    head = _itc()
    batch, n = _batch()
    t = batch.targets["itc"]
    hidden = torch.nn.Parameter(torch.randn(n, D))
    out = head(hidden, batch)
    out.loss.backward()
    used = torch.zeros(n, dtype=torch.bool)
    used[t.text_positions] = True
    used[t.image_positions] = True
    assert hidden.grad[used].abs().sum() > 0 and hidden.grad[~used].abs().sum() == 0
    assert head.logit_scale.grad is not None and head.image_proj.weight.grad is not None
    opt = torch.optim.Adam([hidden, *head.parameters()], lr=1e-2)
    first = out.loss.item()
    for _ in range(25):
        opt.zero_grad()
        out = head(hidden, batch)
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.5 * first and float(out.metrics["i2t_acc"]) == 1.0


def test_logit_scale_init_and_clamp():
    head = _itc()
    assert head.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        head.logit_scale.fill_(math.log(500.0))
    assert head.scale().item() == pytest.approx(100.0)
    head.reset_parameters()
    assert head.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with pytest.raises(ValueError, match="init_temperature"):
        _itc(init_temperature=0.001)


def test_a_scale_at_the_cap_still_gets_the_gradient_and_the_parameter_is_clamped_after_the_step():
    """The forward clamp cut the gradient at the cap: once Adam carried the parameter past log 100, the temperature
    stayed at 1/100 for good, even where the loss wanted it lower. Now, as CLIP: the parameter is clamped after each
    optimizer step, and the capped value passes the gradient."""
    head = _itc()
    with torch.no_grad():
        head.logit_scale.fill_(math.log(100.0) + 1e-3)
    scale = head.scale()
    assert scale.item() == pytest.approx(100.0)
    scale.backward()
    assert head.logit_scale.grad.item() > 0
    head.after_optimizer_step(None)
    assert head.logit_scale.item() == pytest.approx(math.log(100.0))


def test_zero_targets_connected():
    head = _itc()
    hidden = torch.randn(6, D, requires_grad=True)
    out = head(hidden, PackedBatch(PackedSeqInfo.from_seqlens([6]), {}))
    assert out.loss.item() == 0.0 and out.loss.requires_grad and out.count == 0
    out.loss.backward()
    assert hidden.grad.abs().sum() == 0 and head.logit_scale.grad is not None


def test_mean_pool():
    tokens = torch.arange(10.0).view(5, 2)
    pooled = mean_pool(tokens, torch.tensor([2, 0, 2, 0, 2]), 4)
    assert pooled.tolist() == [[4.0, 5.0], [0.0, 0.0], [4.0, 5.0], [0.0, 0.0]]


def test_powers_mod_match_python_and_copy_nothing_to_the_device():
    from mmm.host_reads import HostReadDetector
    from mmm.objectives.contrastive import _HASH_BASES, _HASH_MODULI, powers_mod

    for base, mod in zip(_HASH_BASES, _HASH_MODULI):
        for count in (0, 1, 2, 7, 128, 513):
            with HostReadDetector() as d:
                got = powers_mod(base, count, mod, torch.device("cpu"))
            assert d.found == []
            assert got.tolist() == [pow(base, i + 1, mod) for i in range(count)]
