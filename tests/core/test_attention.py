import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mmm.core import attention
from mmm.core.attention import (BACKEND_ENV, flex_attention_backend, flex_context, math_attention, resolve_backend,
                                sdpa_attention, xformers_attention)
from mmm.core.packing import PackedSeqInfo
from mmm.core.position import ALiBi, alibi_slopes
from mmm.registry import RegistryError

LENGTHS = [7, 1, 33, 16, 64]


def _qkv(n, h=4, d=16, dtype=torch.float32, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, h, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _naive_per_sequence(q, k, v, seq, bias=None):
    """Attention computed sequence by sequence: the definition packed attention must match."""
    outs = []
    cu = seq.cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1).double() for t in (q, k, v))  # (H, L, D)
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if bias is not None:
            scores = scores + bias.bias(e - s, torch.float64)[0]
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


@pytest.mark.parametrize("backend", [sdpa_attention, math_attention], ids=["sdpa", "math"])
@pytest.mark.parametrize("use_alibi", [False, True], ids=["plain", "alibi"])
def test_packed_backends_match_per_sequence_reference(backend, use_alibi):
    seq = PackedSeqInfo.from_seqlens(LENGTHS)
    q, k, v = _qkv(seq.num_tokens)
    bias = ALiBi(4) if use_alibi else None
    out = backend(q, k, v, seq, bias)
    ref = _naive_per_sequence(q, k, v, seq, bias)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sdpa_and_math_agree_forward_and_backward():
    seq = PackedSeqInfo.from_seqlens(LENGTHS)
    grads = []
    outs = []
    for fn in (sdpa_attention, math_attention):
        q, k, v = _qkv(seq.num_tokens, requires_grad=True)
        out = fn(q, k, v, seq)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v)])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_alibi", [False, True], ids=["plain", "alibi"])
def test_grouped_padding_path_matches_reference(use_alibi):
    """Batches of ≥ 8 sequences are padded in length groups; any order of lengths must still be exact."""
    seq = PackedSeqInfo.from_seqlens([40, 3, 17, 64, 1, 9, 33, 12, 5, 28, 2])
    q, k, v = _qkv(seq.num_tokens)
    bias = ALiBi(4) if use_alibi else None
    assert len(seq.pad_groups) == 4 and sum(g[2].batch_size for g in seq.pad_groups) == 11
    torch.testing.assert_close(sdpa_attention(q, k, v, seq, bias), _naive_per_sequence(q, k, v, seq, bias),
                               atol=1e-5, rtol=1e-5)


def test_uniform_lengths_take_the_unmasked_path():
    seq = PackedSeqInfo.from_seqlens([8, 8, 8])
    q, k, v = _qkv(seq.num_tokens)
    torch.testing.assert_close(sdpa_attention(q, k, v, seq), _naive_per_sequence(q, k, v, seq), atol=1e-5, rtol=1e-5)


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert len(alibi_slopes(12)) == 12 and alibi_slopes(12).min() > 0
    b = ALiBi(2).bias(3, torch.float32)
    assert b.shape == (1, 2, 3, 3)
    torch.testing.assert_close(b[0, 0], torch.tensor([[0, -1 / 16, -2 / 16], [-1 / 16, 0, -1 / 16], [-2 / 16, -1 / 16, 0]]))


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("math", cpu) == "math"
    monkeypatch.setenv(BACKEND_ENV, "math")
    assert resolve_backend("auto", cpu) == "math"
    assert resolve_backend("sdpa", cpu) == "sdpa"  # an explicit config value wins over the environment
    with pytest.raises(RuntimeError, match="no CPU kernels"):
        resolve_backend("xformers", cpu)
    with pytest.raises(ValueError, match="ALiBi"):
        resolve_backend("xformers", torch.device("cuda"), has_bias=True)
    with pytest.raises(RuntimeError, match="flex.*CUDA only"):
        resolve_backend("flex", cpu)
    with pytest.raises(RegistryError, match="known attention backends: flex, math, sdpa, xformers"):
        resolve_backend("flash9", cpu)
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(RegistryError, match="bogus"):
        resolve_backend("auto", cpu)


def test_xformers_refuses_cpu_tensors_clearly():
    seq = PackedSeqInfo.from_seqlens([3])
    q, k, v = _qkv(3)
    with pytest.raises(RuntimeError, match="no CPU kernels"):
        xformers_attention(q, k, v, seq)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_gpu_backends_agree_forward_and_backward(dtype, tol):
    pytest.importorskip("xformers")
    seq = PackedSeqInfo.from_seqlens([128, 17, 300, 64, 1]).to("cuda")
    results = {}
    for name, fn in (("xformers", xformers_attention), ("sdpa", sdpa_attention), ("math", math_attention)):
        q, k, v = _qkv(seq.num_tokens, h=8, d=64, dtype=dtype, device="cuda", requires_grad=True)
        out = fn(q, k, v, seq)
        out.float().pow(2).sum().backward()
        results[name] = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
    for name in ("xformers", "sdpa"):
        for a, b in zip(results[name], results["math"]):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("lengths", [[40, 3, 17, 64, 1, 9, 33, 12, 5, 28, 2], [30, 30], [64, 20, 7]],
                         ids=["grouped", "uniform", "ragged"])
def test_blocked_alibi_matches_the_dense_reference_forward_and_backward(monkeypatch, lengths):
    """Many small query-row blocks (each checkpointed) give the dense-bias reference's outputs and gradients."""
    monkeypatch.setattr(attention, "ALIBI_BLOCK_ELEMENTS", 1 << 10)  # 2-8 query rows per block here
    seq = PackedSeqInfo.from_seqlens(lengths)
    alibi = ALiBi(4)
    results = []
    for fn in (sdpa_attention, math_attention):
        q, k, v = _qkv(seq.num_tokens, requires_grad=True)
        out = fn(q, k, v, seq, alibi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in (q, k, v)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _peak_cpu_bytes(fn) -> int:
    """Peak of the bytes the CPU allocator holds while ``fn`` runs, from the profiler's allocation records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage  # allocations minus frees attributed to this op alone
        peak = max(peak, held)
    return peak


def _alibi_step_peak(fn, lengths, heads=4) -> int:
    seq = PackedSeqInfo.from_seqlens(lengths)
    q, k, v = _qkv(seq.num_tokens, h=heads, d=8, requires_grad=True)
    alibi = ALiBi(heads)
    return _peak_cpu_bytes(lambda: fn(q, k, v, seq, alibi).sum().backward())


def test_alibi_memory_grows_with_tokens_not_with_b_h_t_squared(monkeypatch):
    """About 1,500 tokens as 3 sequences of ≤ 512 or as one of 1,504: B·H·T² grows 2.9x, the sdpa path's memory does not.

    The dense reference (math) holds (B, H, T, T) scores, bias and probabilities; the sdpa path
    builds the bias in (B, H, rows, T) blocks and recomputes them in backward, so what it holds
    is proportional to the (padded) tokens.
    """
    monkeypatch.setattr(attention, "ALIBI_BLOCK_ELEMENTS", 1 << 16)  # a 256 KiB bias block
    short, long = [512, 512, 480], [1504]
    peaks = {(fn.__name__, name): _alibi_step_peak(fn, lens)
             for fn in (sdpa_attention, math_attention) for name, lens in (("short", short), ("long", long))}
    dense_growth = peaks["math_attention", "long"] / peaks["math_attention", "short"]
    blocked_growth = peaks["sdpa_attention", "long"] / peaks["sdpa_attention", "short"]
    assert dense_growth > 2.5, peaks
    assert blocked_growth < 1.6, peaks  # ~1.0 measured; profiler attribution jitters (1.48 seen once under load)
    assert peaks["sdpa_attention", "long"] * 20 < peaks["math_attention", "long"], peaks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_gpu_blocked_alibi_matches_the_dense_reference(monkeypatch, dtype, tol):
    monkeypatch.setattr(attention, "ALIBI_BLOCK_ELEMENTS", 1 << 18)  # several row blocks at this size
    seq = PackedSeqInfo.from_seqlens([300, 128, 64, 17, 1], device="cuda")
    alibi = ALiBi(8).cuda()
    results = []
    for fn in (sdpa_attention, math_attention):
        q, k, v = _qkv(seq.num_tokens, h=8, d=64, dtype=dtype, device="cuda", requires_grad=True)
        out = fn(q, k, v, seq, alibi)
        out.float().pow(2).sum().backward()
        results.append([out.detach().float()] + [t.grad.float() for t in (q, k, v)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_gpu_xformers_takes_the_layout_mask_and_the_uniform_shortcut():
    pytest.importorskip("xformers")
    ragged = PackedSeqInfo.from_seqlens([40, 7, 19]).to("cuda")
    uniform = PackedSeqInfo.from_seqlens([16, 16, 16], device="cuda")
    assert ragged.attn_bias is not None and uniform.is_uniform and uniform.attn_bias is None
    for seq in (ragged, uniform):
        q, k, v = _qkv(seq.num_tokens, h=4, d=32, device="cuda")
        torch.testing.assert_close(xformers_attention(q, k, v, seq), math_attention(q, k, v, seq), atol=2e-4, rtol=2e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("use_alibi", [False, True], ids=["plain", "alibi"])
def test_flex_backend_semantics_match_the_reference_forward_and_backward(use_alibi):
    """Block mask and ALiBi score_mod, checked with uncompiled FlexAttention on CPU (the kernel compiles on CUDA)."""
    seq = PackedSeqInfo.from_seqlens([40, 17, 9, 1])
    alibi = ALiBi(4) if use_alibi else None
    results = []
    for fn, bias in ((flex_attention_backend, flex_context(seq, alibi)), (math_attention, alibi)):
        q, k, v = _qkv(seq.num_tokens, requires_grad=True)
        out = fn(q, k, v, seq, bias)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in (q, k, v)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no attention dropout"):
        flex_attention_backend(*_qkv(seq.num_tokens), seq, None, dropout_p=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_gpu_compiled_flex_alibi_matches_the_dense_reference(dtype, tol):
    seq = PackedSeqInfo.from_seqlens([300, 128, 64, 17, 1], device="cuda")
    alibi = ALiBi(8).cuda()
    results = []
    for fn, bias in ((flex_attention_backend, flex_context(seq, alibi)), (math_attention, alibi)):
        q, k, v = _qkv(seq.num_tokens, h=8, d=64, dtype=dtype, device="cuda", requires_grad=True)
        out = fn(q, k, v, seq, bias)
        out.float().pow(2).sum().backward()
        results.append([out.detach().float()] + [t.grad.float() for t in (q, k, v)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("use_alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, False)],
                         ids=["bf16-autocast", "bf16", "fp16"])
def test_half_precision_cpu_sdpa_runs_in_fp32(monkeypatch, use_alibi, dtype, autocast):
    """SDPA's CPU flash backward is 2-3x slower in bf16 than in fp32 (torch 2.9.1), so half-precision CPU inputs are
    attended in fp32, also under autocast (which would cast them back); the result comes back in the inputs' dtype,
    equal to fp32 SDPA on the same values, and its gradients reach the half-precision inputs."""
    seq = PackedSeqInfo.from_seqlens([40, 3, 17, 64, 1, 9, 33, 12, 5, 28, 2])  # length groups, key masks
    bias = ALiBi(12) if use_alibi else None  # 12 heads: slopes that are not powers of two (bf16 rounds them)
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(seq.num_tokens, h=12, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = sdpa_attention(q, k, v, seq, bias)
    assert seen and all(d == (torch.float32,) * 3 for d in seen)
    assert out.dtype == dtype
    ref = sdpa_attention(*(t.detach().float() for t in (q, k, v)), seq, bias).to(dtype)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in (q, k, v))
    torch.testing.assert_close(out.float(), _naive_per_sequence(q.detach().float(), k.detach().float(),
                                                                v.detach().float(), seq, bias), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("use_alibi", [False, True], ids=["plain", "alibi"])
def test_fp32_inputs_under_cpu_autocast_are_attended_in_fp32_when_a_backward_follows(use_alibi):
    """Autocast casts fp32 SDPA inputs to bf16 (SDPA is on its lower-precision list), which took the slow bf16 CPU
    backward; fp32 inputs under autocast take the fp32 route as half inputs do, and stay fp32."""
    seq = PackedSeqInfo.from_seqlens([40, 3, 17, 64, 1, 9, 33, 12, 5, 28, 2])
    bias = ALiBi(12) if use_alibi else None
    q, k, v = _qkv(seq.num_tokens, h=12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q, k, v, seq, bias)
        with torch.no_grad():  # forward alone stays with autocast's bf16 (faster)
            inference = sdpa_attention(q, k, v, seq, bias)
    assert out.dtype == torch.float32 and inference.dtype == torch.bfloat16
    ref = sdpa_attention(*(t.detach() for t in (q, k, v)), seq, bias)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (q, k, v))


def test_cpu_attention_with_dropout_computes_in_fp32_under_autocast():
    """The explicit dropout path computes scores, softmax and the weighted sum in fp32 as SDPA's math kernel does;
    under autocast its products ran in bf16 and rounded the scores to bf16 before the softmax."""
    seq = PackedSeqInfo.from_seqlens([40, 3, 17, 64, 1, 9, 33, 12, 5, 28, 2])
    q, k, v = _qkv(seq.num_tokens, dtype=torch.bfloat16)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q, k, v, seq, dropout_p=0.1)
    torch.manual_seed(3)  # the same dropout masks
    ref = sdpa_attention(q.float(), k.float(), v.float(), seq, dropout_p=0.1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.parametrize("use_alibi", [False, True], ids=["plain", "alibi"])
def test_half_precision_cpu_sdpa_without_a_backward_stays_in_bf16(monkeypatch, use_alibi):
    """Forward alone, SDPA's CPU kernel is faster in bf16 (2.6 against 5.6 ms at the tiny model's shapes), so
    inference and validation keep it; an ALiBi bias built in fp32 for half queries is cast to their dtype."""
    seq = PackedSeqInfo.from_seqlens([40, 3, 17, 64, 1, 9, 33, 12, 5, 28, 2])
    bias = ALiBi(12) if use_alibi else None
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.dtype, None if attn_mask is None else attn_mask.dtype))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(seq.num_tokens, h=12, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q, k, v, seq, bias)
    assert out.dtype == torch.bfloat16 and seen
    assert all(qd == torch.bfloat16 and md in (None, torch.bool, torch.bfloat16) for qd, md in seen), seen
    torch.testing.assert_close(out.float(), _naive_per_sequence(q.detach().float(), k.detach().float(),
                                                                v.detach().float(), seq, bias), atol=3e-2, rtol=3e-2)


def test_alibi_blocks_with_dropout_under_autocast_recompute_the_same_masks_and_dtypes(monkeypatch):
    """The ALiBi row blocks run under activation checkpointing; with attention dropout under bf16 autocast the
    recomputation must redraw the same dropout masks and keep the fp32 region's dtypes: outputs and gradients equal
    those of the same blocks run without checkpointing, exactly."""
    seq = PackedSeqInfo.from_seqlens([40, 3, 17, 64, 1, 9, 33, 12, 5, 28, 2])
    monkeypatch.setattr(attention, "ALIBI_BLOCK_ELEMENTS", 4096)  # several row blocks per length group
    runs = []
    for checkpointed in (True, False):
        if not checkpointed:
            monkeypatch.setattr(attention, "checkpoint", lambda fn, *args, **kwargs: fn(*args))
        q, k, v = _qkv(seq.num_tokens, h=12, dtype=torch.bfloat16, requires_grad=True)
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sdpa_attention(q, k, v, seq, ALiBi(12), dropout_p=0.1)
        out.float().square().sum().backward()
        runs.append([out.detach(), q.grad, k.grad, v.grad])
    for a, b in zip(*runs):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, atol=0, rtol=0)
