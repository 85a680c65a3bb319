import dataclasses

import pytest
import torch

from mmm.config import EncoderConfig
from mmm.core.encoder import TransformerEncoder
from mmm.core.packing import PackedSeqInfo
from mmm.core.position import Rotary

VARIANTS = {
    "bert_post_ln": dict(norm_first=False, mlp="gelu"),
    "vit_pre_ln": dict(norm_first=True, final_norm=True, mlp="gelu", norm_eps=1e-6),
    "mosaic_geglu_alibi": dict(mlp="geglu", relative_position="alibi"),
    "swiglu_rotary": dict(norm_first=True, final_norm=True, mlp="swiglu", relative_position="rotary"),
    "glu_no_qkv_bias": dict(mlp="glu", qkv_bias=False),
}


def _encoder(**kw):
    torch.manual_seed(0)
    cfg = EncoderConfig(dim=32, depth=2, heads=4, mlp_hidden=48, dropout=0.0, attn_dropout=0.0, **kw)
    return TransformerEncoder(cfg).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_agree_across_backends_and_ignore_packing_neighbours(name):
    enc = _encoder(**VARIANTS[name])
    lens = [5, 12, 1, 9]
    seq = PackedSeqInfo.from_seqlens(lens)
    x = torch.randn(seq.num_tokens, 32)
    outs = {}
    for backend in ("sdpa", "math"):
        enc.cfg.attention = backend
        outs[backend] = enc(x, seq)
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=1e-5, rtol=1e-5)
    # a sequence's output does not depend on what it is packed with
    alone = enc(x[5:17], PackedSeqInfo.from_seqlens([12]))
    torch.testing.assert_close(outs["math"][5:17], alone, atol=1e-5, rtol=1e-5)
    # gradients flow
    enc.train()
    enc(x.requires_grad_(), seq).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


def test_bert_layer_matches_textbook_post_ln_formula():
    enc = _encoder(norm_first=False, mlp="gelu")
    blk = enc.blocks[0]
    x = torch.randn(6, 32)
    seq = PackedSeqInfo.from_seqlens([6])
    q, k, v = blk.attn.qkv(x).view(6, 3, 4, 8).unbind(1)
    att = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) / 8 ** 0.5, -1)
    a = blk.attn.proj(torch.einsum("hij,jhd->ihd", att, v).reshape(6, 32))
    h = blk.norm1(x + a)
    ref = blk.norm2(h + blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(h))))
    torch.testing.assert_close(blk(x, seq, "sdpa", None, None), ref, atol=1e-5, rtol=1e-5)


def test_rotary_scores_depend_only_on_relative_offset():
    rot = Rotary(8)
    q = torch.randn(1, 1, 8).expand(2, 1, 8)
    k = torch.randn(1, 1, 8).expand(2, 1, 8)
    (q1, k1), (q2, k2) = rot(q, k, torch.tensor([3, 5])), rot(q, k, torch.tensor([10, 12]))
    torch.testing.assert_close((q1[0] * k1[1]).sum(), (q2[0] * k2[1]).sum(), atol=1e-5, rtol=1e-5)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="encoder.dim=30 is not divisible by encoder.heads=4"):
        TransformerEncoder(EncoderConfig(dim=30, heads=4))
    with pytest.raises(ValueError, match="unknown mlp kind 'relu'"):
        TransformerEncoder(EncoderConfig(mlp="relu"))
    with pytest.raises(ValueError, match="relative_position 'xpos'"):
        TransformerEncoder(EncoderConfig(relative_position="xpos"))
    with pytest.raises(ValueError, match="attention=flex has no attention dropout"):
        TransformerEncoder(EncoderConfig(attention="flex", attn_dropout=0.1))


@pytest.mark.parametrize("name", ["bert_post_ln", "mosaic_geglu_alibi", "swiglu_rotary"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_a_batch_in_data_order_runs_longest_first_on_sdpa_and_matches_math(name, causal):
    """The sdpa path reorders a batch not sorted by length once (its length groups then hold similar
    lengths) and scatters back: outputs, every block's output and all gradients equal the math reference."""
    enc = _encoder(**VARIANTS[name])
    seq = PackedSeqInfo.from_seqlens([30, 70, 2, 50, 1, 64, 9, 40, 3, 56, 11])
    assert seq.longest_first is not None
    x0 = torch.randn(seq.num_tokens, 32)
    outs, blocks, grads = {}, {}, {}
    for backend in ("sdpa", "math"):
        enc.cfg.attention = backend
        enc.zero_grad()
        x = x0.clone().requires_grad_()
        out = enc(x, seq, causal=causal)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs[backend], grads[backend] = out.detach(), [x.grad] + [p.grad for p in enc.parameters()]
        blocks[backend] = [b.detach() for b in enc.block_outputs(x0, seq, causal=causal)]
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=1e-5, rtol=1e-5)
    for a, b in zip(blocks["sdpa"] + grads["sdpa"], blocks["math"] + grads["math"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
