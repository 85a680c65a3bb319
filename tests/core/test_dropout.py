"""The CPU dropout mask (mmm.core.dropout) and the explicit attention path that uses it."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmm.core import attention
from mmm.core.attention import math_attention, sdpa_attention
from mmm.core.dropout import MASK_LEVELS, Dropout, dropout, keep_mask, rounded_probability
from mmm.core.packing import PackedSeqInfo
from mmm.core.position import ALiBi


def test_rounded_probability_is_the_nearest_multiple_of_the_mask_resolution():
    assert rounded_probability(0.1) == 6554 / MASK_LEVELS
    assert rounded_probability(0.5) == 0.5
    assert rounded_probability(1.0) == 1.0
    assert rounded_probability(1e-7) == 0.0


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_keep_mask_keeps_at_the_rounded_rate_and_elements_are_independent(p):
    torch.manual_seed(0)
    n = 1 << 22
    keep = keep_mask((n,), p).float()
    q = 1 - rounded_probability(p)
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(keep.mean().item() - q) < 5 * sigma
    # neighbours come from the same 64-bit draw (4 per word) or from consecutive draws: both must be independent
    for lag in (1, 2, 3, 4, 5):
        both = (keep[:-lag] * keep[lag:]).mean().item()
        assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n), lag


def test_keep_mask_follows_the_torch_seed_and_changes_between_draws():
    torch.manual_seed(3)
    a, b = keep_mask((1000,), 0.2), keep_mask((1000,), 0.2)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((1000,), 0.2), a)
    assert not torch.equal(a, b)
    assert keep_mask((3, 5, 7), 0.2).shape == (3, 5, 7)


def test_dropout_scales_kept_elements_and_is_unbiased():
    torch.manual_seed(1)
    x = torch.ones(1 << 21, requires_grad=True)
    y = dropout(x, 0.1)
    scale = 1 / (1 - rounded_probability(0.1))
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], scale))
    assert abs(y.mean().item() - 1.0) < 5 * math.sqrt(0.1 / 0.9 / x.numel())
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, 2.0 * y.detach())  # backward multiplies by the same scaled mask


def test_dropout_edge_cases_and_errors():
    x = torch.randn(64, 8)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.5, training=False) is x
    assert torch.count_nonzero(dropout(x, 1.0)) == 0
    with pytest.raises(ValueError, match="between 0 and 1, got 1.5"):
        dropout(x, 1.5)
    module = Dropout(0.25)
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.25  # code that sets nn.Dropout.p still finds it
    assert module.eval()(x) is x


def test_dropout_has_the_same_statistics_as_torch_dropout():
    """Same mean and second moment as ``F.dropout`` at one p (a different mask, the same distribution)."""
    torch.manual_seed(2)
    x = torch.randn(1 << 20)
    ours, theirs = dropout(x, 0.3), F.dropout(x, 0.3)
    for moment in (1, 2):
        a, b = (ours ** moment).mean().item(), (theirs ** moment).mean().item()
        assert abs(a - b) < 0.02 * max(1.0, abs(b)), (moment, a, b)


def _qkv(n, h=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g).requires_grad_(True) for _ in range(3)]


def test_explicit_attention_with_dropout_is_softmax_times_the_drawn_mask():
    """The CPU dropout path is softmax(QKᵀ/√D + mask) · (keep / (1 - p)) · V with the mask the seed draws."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    keys = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])[:, None, None, :]
    torch.manual_seed(5)
    out = attention.attend(q, k, v, keys, 0.2)
    torch.manual_seed(5)
    keep = keep_mask((2, 3, 9, 9), 0.2)
    probs = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~keys, float("-inf")), -1)
    expected = (probs * keep / (1 - rounded_probability(0.2))) @ v
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("use_alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_sdpa_with_dropout_matches_the_math_reference_under_the_same_mask(use_alibi, causal):
    """Equal lengths: both backends draw one (B, H, T, T) mask, so the same seed gives the same outputs and gradients."""
    seq = PackedSeqInfo.from_seqlens([20, 20, 20])
    bias = ALiBi(4) if use_alibi else None
    results = []
    for fn in (sdpa_attention, math_attention):
        q, k, v = _qkv(seq.num_tokens)
        torch.manual_seed(11)
        out = fn(q, k, v, seq, bias, dropout_p=0.2, causal=causal)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in (q, k, v)])
    undropped = sdpa_attention(*_qkv(seq.num_tokens), seq, bias, causal=causal).detach()
    assert not torch.allclose(results[0][0], undropped)  # the mask did drop something
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_checkpointed_alibi_blocks_redraw_the_same_dropout_mask_in_backward(monkeypatch):
    """Each ALiBi row block is recomputed in backward: its dropout mask must be the one forward drew."""
    monkeypatch.setattr(attention, "ALIBI_BLOCK_ELEMENTS", 1 << 10)
    seq = PackedSeqInfo.from_seqlens([40, 3, 17, 12])
    results = []
    for recompute in (True, False):
        if not recompute:
            monkeypatch.setattr(attention, "checkpoint", lambda fn, *args, **kw: fn(*args))
        q, k, v = _qkv(seq.num_tokens)
        torch.manual_seed(7)
        out = sdpa_attention(q, k, v, seq, ALiBi(4), dropout_p=0.3)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in (q, k, v)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_explicit_attention_path_masks_like_sdpa_on_uneven_length_groups(use_alibi, causal):
    """A drop probability that rounds to 0 takes the explicit path with an all-keep mask: its masking
    (key padding per length group, causal, ALiBi) must give SDPA's outputs and gradients exactly."""
    seq = PackedSeqInfo.from_seqlens([120, 118, 90, 80, 64, 40, 33, 20, 9, 5])
    assert seq.pad_groups  # several length groups, each padded
    bias = ALiBi(4) if use_alibi else None
    results = []
    for p in (1e-7, 0.0):
        assert rounded_probability(p) == 0.0
        q, k, v = _qkv(seq.num_tokens)
        out = sdpa_attention(q, k, v, seq, bias, dropout_p=p, causal=causal)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in (q, k, v)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_explicit_attention_computes_half_types_in_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    keys = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])[:, None, None, :]
    exact = attention.attend(q, k, v, keys, 1e-7)
    for dtype in (torch.bfloat16, torch.float16):
        out = attention.attend(q.to(dtype), k.to(dtype), v.to(dtype), keys, 1e-7)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), exact, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="either a mask or causal"):
        attention.attend(q, k, v, keys, 0.1, causal=True)


def test_dropout_module_honours_inplace_and_validates_p_in_eval():
    x = torch.randn(100)
    y = Dropout(0.5, inplace=True)(x)
    assert y.data_ptr() == x.data_ptr()
    with pytest.raises(ValueError, match="got -0.1"):
        dropout(x, -0.1, training=False)
