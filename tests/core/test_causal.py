"""Causal attention on packed sequences: no token sees a later one of its sequence, or any other sequence.

Every backend is checked three ways: a perturbation (change one token, see which outputs move), the
token-to-token dependency read off the exact Jacobian (d out_i / d x_j = 0 unless j ≤ i in the same
sequence), and parity with a per-sequence causal reference.
"""
import dataclasses
import math

import pytest
import torch

from mmm.config import EncoderConfig
from mmm.core import attention
from mmm.core.attention import flex_attention_backend, flex_context, math_attention, sdpa_attention, xformers_attention
from mmm.core.encoder import TransformerEncoder
from mmm.core.fusion import CrossModalFusion
from mmm.core.packing import PackedSeqInfo
from mmm.core.position import ALiBi

RAGGED = [7, 1, 12, 5]
GROUPED = [9, 3, 12, 1, 6, 4, 8, 2, 5]  # ≥ 8 sequences: the sdpa backend pads them in length groups
FULL_RUN = [12, 12, 12, 12, 12, 9, 7, 3, 1]  # a leading full-length run: a uniform group of its own
LAYOUTS = {"ragged": RAGGED, "grouped": GROUPED, "full_run": FULL_RUN, "uniform": [6, 6, 6]}

flex_on_cpu = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _flex(q, k, v, seq, bias=None, dropout_p=0.0, causal=False):
    """The flex backend with its per-batch context built as the encoder builds it (uncompiled on CPU)."""
    return flex_attention_backend(q, k, v, seq, flex_context(seq, bias, causal), dropout_p, causal=causal)


BACKENDS = {"sdpa": sdpa_attention, "math": math_attention, "flex": _flex}
CPU_CASES = [(b, a, layout) for b in BACKENDS for a in (False, True) for layout in LAYOUTS
             if b != "flex" or layout == "ragged"]  # eager flex on CPU is slow; layouts matter to padded backends
CPU_IDS = [f"{b}-{'alibi' if a else 'plain'}-{layout}" for b, a, layout in CPU_CASES]


def _qkv(n, h=2, d=8, seed=0, device="cpu", dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _allowed(seq: PackedSeqInfo) -> torch.Tensor:
    """(N, N) bool: token i may see token j (same sequence, j ≤ i)."""
    cu = seq.cu_seqlens.tolist()
    owner = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(seq.lengths))
    idx = torch.arange(seq.num_tokens)
    return (owner[:, None] == owner[None, :]) & (idx[None, :] <= idx[:, None])


def _causal_reference(q, k, v, seq, alibi=None):
    """Sequence by sequence, in float64, with an explicit lower-triangular mask."""
    outs = []
    cu = seq.cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1).double() for t in (q, k, v))  # (H, L, D)
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if alibi is not None:
            scores = scores + alibi.bias(e - s, torch.float64)[0]
        later = torch.ones(e - s, e - s, dtype=torch.bool).triu(1)
        outs.append((scores.masked_fill(later, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


def _perturbation_check(run, seq, x, tol=1e-6):
    """Change token t of one sequence: outputs before t and in other sequences stay; t and later move."""
    s = 2 if seq.batch_size > 2 else 0
    start, length = int(seq.cu_seqlens[s]), seq.lengths[s]
    t = start + length // 2
    base = run(x)
    bumped = x.clone()
    bumped[t] += 1.0 + torch.randn(bumped[t].shape, generator=torch.Generator().manual_seed(1))
    moved = (run(bumped) - base).abs().flatten(1).amax(1)  # (N,) largest change per token
    same = torch.ones(seq.num_tokens, dtype=torch.bool)
    same[t:start + length] = False
    assert moved[same].max() <= tol, f"token {t} changed outputs it must not reach: {moved[same].max()}"
    assert (moved[t:start + length] > 1e-4).all(), moved[t:start + length]


def _dependencies(run, x) -> torch.Tensor:
    """(N, N) largest |d <out_i, w_i> / d x_j| over x_j's features, one exact backward per output token i
    (random weights w_i: a zero there means no dependency at all, almost surely)."""
    x = x.detach().requires_grad_(True)
    out = run(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    rows = [torch.autograd.grad(out[i], x, w[i], retain_graph=True)[0].abs().flatten(1).amax(1)
            for i in range(x.shape[0])]
    return torch.stack(rows)


@flex_on_cpu
@pytest.mark.parametrize("backend,use_alibi,layout", CPU_CASES, ids=CPU_IDS)
def test_backend_causal_perturbation_and_gradient(backend, use_alibi, layout):
    """Attention alone: one stacked (q, k, v) input per token, perturbed and differentiated."""
    seq = PackedSeqInfo.from_seqlens(LAYOUTS[layout])
    alibi = ALiBi(2) if use_alibi else None
    fn = BACKENDS[backend]
    qkv = torch.stack(_qkv(seq.num_tokens), 1)  # (N, 3, H, D)

    def run(x):
        return fn(*x.unbind(1), seq, alibi, causal=True)

    _perturbation_check(run, seq, qkv)
    dep = _dependencies(run, qkv)
    allowed = _allowed(seq)
    assert dep[~allowed].max() == 0, "an output depends on a later token or another sequence"
    assert (dep[allowed] > 0).all(), "an output ignores a token it may see"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("use_alibi", [False, True], ids=["plain", "alibi"])
def test_causal_sdpa_and_math_match_the_reference_forward_and_backward(monkeypatch, use_alibi, layout):
    """Packed variable-length causal attention: sdpa (ALiBi in several small row blocks) = math = per-sequence."""
    monkeypatch.setattr(attention, "ALIBI_BLOCK_ELEMENTS", 1 << 7)  # 2-4 query rows per ALiBi block here
    seq = PackedSeqInfo.from_seqlens(LAYOUTS[layout])
    alibi = ALiBi(2) if use_alibi else None
    results = []
    for fn in (sdpa_attention, math_attention, _causal_reference):
        q, k, v = _qkv(seq.num_tokens, requires_grad=True)
        out = fn(q, k, v, seq, alibi, causal=True) if fn is not _causal_reference else fn(q, k, v, seq, alibi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in (q, k, v)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_causal_is_not_the_bidirectional_result():
    """The flag reaches the kernel: causal and bidirectional outputs differ wherever a later token exists."""
    seq = PackedSeqInfo.from_seqlens(RAGGED)
    q, k, v = _qkv(seq.num_tokens)
    for fn in (sdpa_attention, math_attention):
        diff = (fn(q, k, v, seq, causal=True) - fn(q, k, v, seq)).abs().flatten(1).amax(1)
        last = seq.cu_seqlens[1:].long() - 1  # the last token of each sequence sees its whole sequence either way
        assert diff[last].max() < 1e-5 and (diff > 1e-4).sum() == seq.num_tokens - seq.batch_size


ENCODER_CASES = [(b, r) for b in ("sdpa", "math") for r in ("none", "alibi", "rotary")]


@pytest.mark.parametrize("backend,rel", ENCODER_CASES, ids=[f"{b}-{r}" for b, r in ENCODER_CASES])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_causal_no_token_sees_a_later_one(backend, rel, norm_first):
    """Through two whole blocks (MLPs are per token): perturbation, exact Jacobian, and backend parity."""
    torch.manual_seed(0)
    cfg = EncoderConfig(dim=16, depth=2, heads=2, mlp_hidden=32, attention=backend, relative_position=rel,
                        norm_first=norm_first, final_norm=norm_first)
    enc = TransformerEncoder(cfg).eval()
    seq = PackedSeqInfo.from_seqlens(RAGGED)
    x = torch.randn(seq.num_tokens, 16)

    def run(h):
        return enc(h, seq, causal=True)

    _perturbation_check(run, seq, x)
    dep = _dependencies(run, x)
    allowed = _allowed(seq)
    assert dep[~allowed].max() == 0
    assert (dep[allowed] > 0).all()
    other = TransformerEncoder(dataclasses.replace(cfg, attention="math" if backend == "sdpa" else "sdpa"))
    other.load_state_dict(enc.state_dict())
    torch.testing.assert_close(other.eval()(x, seq, causal=True), run(x), atol=1e-5, rtol=1e-5)
    outs = enc.block_outputs(x, seq, causal=True)
    assert len(outs) == 2 and not torch.allclose(outs[-1], enc.block_outputs(x, seq)[-1])


@flex_on_cpu
def test_flex_context_must_match_the_requested_direction():
    seq = PackedSeqInfo.from_seqlens(RAGGED)
    q, k, v = _qkv(seq.num_tokens)
    with pytest.raises(ValueError, match="causal=True.*causal=False"):
        flex_attention_backend(q, k, v, seq, flex_context(seq, None), causal=True)


def test_two_stream_fusion_refuses_causal():
    cfg = EncoderConfig(dim=16, depth=1, heads=2, mlp_hidden=32)
    seq = PackedSeqInfo.from_seqlens([3, 4])
    with pytest.raises(ValueError, match="no causal form"):
        CrossModalFusion(cfg, 1)(torch.randn(7, 16), seq, torch.tensor([1, 0]), "sdpa", causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[300, 128, 64, 17, 1], [64, 64, 64]], ids=["ragged", "uniform"])
@pytest.mark.parametrize("backend,use_alibi", [("xformers", False), ("flex", False), ("flex", True), ("sdpa", False),
                                               ("sdpa", True)],
                         ids=["xformers", "flex", "flex-alibi", "sdpa", "sdpa-alibi"])
def test_gpu_causal_backends_match_math(backend, use_alibi, lengths, dtype, tol):
    """xformers (BlockDiagonalCausalMask / LowerTriangularMask), compiled flex and sdpa against the math reference."""
    if backend == "xformers":
        pytest.importorskip("xformers")
    seq = PackedSeqInfo.from_seqlens(lengths).to("cuda")
    alibi = ALiBi(8).cuda() if use_alibi else None
    fn = {"xformers": xformers_attention, "flex": flex_attention_backend, "sdpa": sdpa_attention}[backend]
    bias = flex_context(seq, alibi, True) if backend == "flex" else alibi
    results = []
    for f, b in ((fn, bias), (math_attention, alibi)):
        q, k, v = _qkv(seq.num_tokens, h=8, d=64, device="cuda", dtype=dtype, requires_grad=True)
        out = f(q, k, v, seq, b, causal=True)
        out.float().pow(2).sum().backward()
        results.append([out.detach().float()] + [t.grad.float() for t in (q, k, v)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["xformers", "flex", "sdpa"])
def test_gpu_encoder_causal_perturbation(backend):
    if backend == "xformers":
        pytest.importorskip("xformers")
    torch.manual_seed(0)
    cfg = EncoderConfig(dim=64, depth=2, heads=4, mlp_hidden=128, attention=backend, attn_dropout=0.0)
    enc = TransformerEncoder(cfg).cuda().eval()
    seq = PackedSeqInfo.from_seqlens([40, 7, 19, 33]).to("cuda")
    x = torch.randn(seq.num_tokens, 64, device="cuda")
    with torch.no_grad():
        _perturbation_check(lambda h: enc(h, seq, causal=True), seq, x, tol=1e-5)
