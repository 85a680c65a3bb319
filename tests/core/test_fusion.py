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
