"""Two-stream cross-modality layers (LXMERT): partner cross-attention against a naive per-pair reference."""
import math

import pytest
import torch

from mmm.config import EncoderConfig
from mmm.core.fusion import CrossModalFusion, PartnerCrossAttention
from mmm.core.packing import PackedSeqInfo

CFG = EncoderConfig(dim=16, depth=1, heads=4, mlp_hidden=32, dropout=0.0, attn_dropout=0.0)


def _naive(att: PartnerCrossAttention, x, lengths, partners):
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    out = torch.zeros_like(x)
    h, d = att.heads, att.head_dim
    for s, (a, n) in enumerate(zip(starts, lengths)):
        p = int(partners[s])
        if p < 0:
            continue
        q = att.q(x[a:a + n]).view(n, h, d)
        k, v = att.kv(x[starts[p]:starts[p] + lengths[p]]).view(lengths[p], 2, h, d).unbind(1)
        w = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(d)
        o = torch.einsum("hnm,mhd->nhd", w.softmax(-1), v).reshape(n, h * d)
        out[a:a + n] = att.proj(o)
    return out


def test_partner_cross_attention_matches_a_per_pair_reference():
    torch.manual_seed(0)
    att = PartnerCrossAttention(CFG).eval()
    lengths = [5, 3, 4, 7, 2]
    partners = torch.tensor([2, 3, 0, 1, -1])  # pairs (0, 2) and (1, 3); sequence 4 has no partner
    x = torch.randn(sum(lengths), 16)
    got = att(x, PackedSeqInfo.from_seqlens(lengths), partners)
    want = _naive(att, x, lengths, partners)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got[-2:], torch.zeros(2, 16))  # no partner, no update


def test_fusion_mixes_only_within_a_pair_and_checks_the_partner_count():
    torch.manual_seed(0)
    fusion = CrossModalFusion(CFG, depth=2).eval()
    lengths = [3, 4, 5, 2]
    partners = torch.tensor([1, 0, 3, 2])
    seq = PackedSeqInfo.from_seqlens(lengths)
    x = torch.randn(sum(lengths), 16)
    y = fusion(x, seq, partners, "sdpa")
    x2 = x.clone()
    x2[7:] += 1.0  # change pair (2, 3) only
    y2 = fusion(x2, seq, partners, "sdpa")
    assert torch.allclose(y[:7], y2[:7], atol=1e-6) and not torch.allclose(y[7:], y2[7:])
    with pytest.raises(ValueError, match="partners has 3 entries but the batch has 4 sequences"):
        fusion(x, seq, partners[:3], "sdpa")
    with pytest.raises(ValueError, match="cross_layers must be >= 1"):
        CrossModalFusion(CFG, depth=0)


def test_partner_cross_attention_with_attention_dropout_takes_the_explicit_cpu_path():
    """With attention dropout on CPU the cross-attention runs :func:`mmm.core.attention.attend`'s explicit
    softmax; at a dropout of 1e-7 it must equal the dropout-free result, partnerless sequence included
    (a fully masked row there would give NaN)."""
    torch.manual_seed(0)
    att = PartnerCrossAttention(CFG).eval()
    lengths = [5, 3, 4, 7, 2]
    partners = torch.tensor([2, 3, 0, 1, -1])
    x = torch.randn(sum(lengths), 16)
    seq = PackedSeqInfo.from_seqlens(lengths)
    want = att(x, seq, partners)
    att.train()
    att.attn_dropout = 1e-7
    got = att(x, seq, partners)
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)
    att.attn_dropout = 0.5
    torch.manual_seed(1)
    dropped = att(x, seq, partners)
    assert not torch.allclose(dropped[:-2], want[:-2], atol=1e-3) and torch.equal(dropped[-2:], torch.zeros(2, 16))


@pytest.mark.parametrize("position", ["alibi", "rotary"])
def test_the_fusion_layers_use_the_encoders_relative_positions(position):
    """They called their blocks with no ALiBi bias and no rotary tables: within a sequence the fused states
    were those of a bag of tokens (shuffling its tokens shuffled the output alike)."""
    from mmm.core.encoder import TransformerEncoder

    torch.manual_seed(0)
    cfg = EncoderConfig(dim=16, depth=1, heads=2, dropout=0.0, attn_dropout=0.0, relative_position=position)
    enc, fusion = TransformerEncoder(cfg).eval(), CrossModalFusion(cfg, 2).eval()
    seq, partners = PackedSeqInfo.from_seqlens([5, 4]), torch.tensor([1, 0])
    perm = torch.tensor([1, 3, 0, 4, 2, 5, 6, 7, 8])  # shuffle sequence 0's tokens
    h = torch.randn(9, 16)

    def fused(x):
        return fusion(x, seq, partners, "sdpa", alibi=enc.alibi, rotary=enc.rotary)

    with torch.no_grad():
        assert not torch.allclose(fused(h[perm]), fused(h)[perm], atol=1e-4)  # order matters, as in the encoder
        bag = fusion(h[perm], seq, partners, "sdpa")  # without the modules: no positions (the old behaviour)
        assert torch.allclose(bag, fusion(h, seq, partners, "sdpa")[perm], atol=1e-5)


def test_the_model_hands_its_encoders_positions_to_the_fusion_layers(monkeypatch):
    from mmm.batch import PackedBatch, TokenInput
    from mmm.config import ModelConfig, ObjectiveConfig
    from mmm.model import build_model
    from mmm.registry import EMBEDDERS

    cfg = ModelConfig(encoder=EncoderConfig(dim=16, depth=1, heads=2, mlp_hidden=32, relative_position="rotary"))
    cfg.image_text.layout, cfg.image_text.cross_layers = "two_stream", 1
    model = build_model(cfg, [ObjectiveConfig("mlm")], {"text": EMBEDDERS.create("text", vocab_size=20, dim=16,
                                                                                 max_len=8, position="none")})
    seen = {}
    forward = type(model.fusion).forward

    def spy(self, *args, **kw):
        seen.update(kw)
        return forward(self, *args, **kw)

    monkeypatch.setattr(type(model.fusion), "forward", spy)
    seq = PackedSeqInfo.from_seqlens([3, 3])
    batch = PackedBatch(seq, {"text": TokenInput(torch.tensor([2, 5, 3, 2, 6, 3]), seq.position_ids, torch.arange(6))},
                        partners=torch.tensor([1, 0]))
    model.encode(batch)
    assert seen["rotary"] is model.encoder.rotary and seen["alibi"] is model.encoder.alibi


def test_a_batch_refuses_partners_that_name_no_sequence_of_it():
    from mmm.batch import PackedBatch
    seq = PackedSeqInfo.from_seqlens([3, 4, 5, 2])
    PackedBatch(seq, {}, partners=torch.tensor([1, 0, -1, -1]))  # -1: no partner
    with pytest.raises(ValueError, match=r"names sequence 4, but the batch has 4 sequences.*\[0, 4\) or -1"):
        PackedBatch(seq, {}, partners=torch.tensor([1, 0, 4, 2]))  # was a bare IndexError in the fusion layers
    with pytest.raises(ValueError, match="names sequence -2"):
        PackedBatch(seq, {}, partners=torch.tensor([1, 0, -2, 2]))
    with pytest.raises(ValueError, match=r"one entry per sequence \(4\), got shape \(3,\)"):
        PackedBatch(seq, {}, partners=torch.tensor([1, 0, 3]))
    with pytest.raises(ValueError, match="integer sequence indices, got dtype torch.float32"):
        PackedBatch(seq, {}, partners=torch.tensor([1.0, 0.0, 3.0, 2.0]))
