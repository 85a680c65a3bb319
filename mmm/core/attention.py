"""Attention backends over packed sequences, and how one is chosen.

* ``xformers`` — ``memory_efficient_attention`` with a ``BlockDiagonalMask`` over the flat token
  stream: no padding at all (CUDA only; xformers has no CPU kernels).
* ``sdpa`` — ``torch.nn.functional.scaled_dot_product_attention`` on a padded view built from
  the packed layout (CPU and CUDA). With attention dropout on CPU, where SDPA would fall back to
  its math kernel anyway, the same softmax(QKᵀ/√D + mask)·V is computed explicitly with
  :func:`mmm.core.dropout.dropout`'s cheaper mask. Half-precision CPU inputs are attended in fp32
  when a backward follows (SDPA's CPU backward is 2–3× slower in bf16).
* ``math`` — an explicit softmax(QKᵀ/√d + bias)V reference, for tests.
* ``flex`` — FlexAttention over the flat stream with a per-sequence block mask and ALiBi as a
  score modification (CUDA, explicit choice only; no attention dropout).

Every backend takes (N, H, D) packed queries/keys/values and returns (N, H, D); ``causal=True``
makes each token attend only to itself and the earlier tokens of its own sequence (xformers'
``BlockDiagonalCausalMask``, SDPA's ``is_causal`` on the padded view, a lower-triangular mask in
math and flex), with or without ALiBi (whose ``-slope·|i - j|`` is then the causal ``-slope·(i - j)``
of Press et al.). Choice: the
config value if it is not ``auto``; otherwise ``$MMM_ATTENTION`` if set; otherwise xformers on
CUDA when it imports, else SDPA. An optional ALiBi bias is supported by sdpa and math;
with a bias, an ``auto`` choice on CUDA takes sdpa (xformers' block-diagonal mask cannot carry a
per-sequence distance bias), and an explicit ``xformers`` request is refused with that reason.

ALiBi never materialises a dense (B, H, T, T) bias on the sdpa path: queries are split into
blocks whose (B, H, rows, T) bias stays under :data:`ALIBI_BLOCK_ELEMENTS` elements, and each
block runs under activation checkpointing, so backward keeps q, k, v and the output rather than
the bias. Memory then grows with the tokens of the batch, not with B·H·T². The math backend
keeps the dense bias: it is the reference. (FlexAttention, which would compute the bias inside
the kernel, does not compile on CPU in torch 2.9.1: inductor's CPU lowering fails even for a
plain ``flex_attention`` call, and its eager fallback materialises the full score matrix; on
CUDA the ``flex`` backend does it.)
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from torch.utils.checkpoint import checkpoint

from mmm.core.dropout import dropout
from mmm.core.packing import PackedSeqInfo
from mmm.core.position import ALiBi, alibi_block
from mmm.registry import ATTENTION_BACKENDS

BACKEND_ENV = "MMM_ATTENTION"
Bias = Optional[ALiBi]  # the relative-position bias module, or None

ALIBI_BLOCK_ELEMENTS = 1 << 22
"""Largest (B, H, rows, T) ALiBi bias block the sdpa backend builds at once (16 MiB in fp32)."""


def _causal_keys(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(R, K) bool, True where key position ≤ query position (padding keys of a padded layout sit
    after every real token of their sequence, so this alone also hides them from real queries)."""
    return keys[None, :] <= rows[:, None]


def _dense_mask(seq: PackedSeqInfo, bias: Bias, dtype: torch.dtype, causal: bool = False) -> Optional[torch.Tensor]:
    """Additive/boolean mask for the whole padded layout, or None when nothing is masked (reference path)."""
    if causal:
        pos = torch.arange(seq.max_seqlen, device=seq.key_padding.device)
        keys = _causal_keys(pos, pos)[None, None]  # (1, 1, T, T) True = attend
    else:
        keys = None if seq.is_uniform else seq.key_padding[:, None, None, :]  # (B, 1, 1, T) True = attend
    if bias is None:
        return keys
    b = bias.bias(seq.max_seqlen, dtype)  # (1, H, T, T)
    if keys is None:
        return b
    return b.masked_fill(~keys, torch.finfo(dtype).min)  # (B or 1, H, T, T)


def _masked(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention scores with ``mask`` applied: bool (True = attend; False → -inf) or additive; None = as they are."""
    if mask is None:
        return scores
    return scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask


HALF_DTYPES = (torch.float16, torch.bfloat16)


def bias_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype to build an additive attention bias (ALiBi) in for queries ``q``: fp32 for half-precision CPU
    queries, which :func:`attend` computes in fp32 when a backward follows or with dropout (a bf16 ALiBi bias is
    off by up to 0.25 at 128 tokens), the queries' dtype otherwise. :func:`attend` casts it to bf16 where it does
    run SDPA in bf16."""
    return torch.float32 if q.device.type == "cpu" and q.dtype in HALF_DTYPES else q.dtype


def _half_on_cpu(q: torch.Tensor) -> bool:
    """SDPA would run ``q`` in half precision on the CPU: half inputs, or fp32 ones that CPU autocast casts down."""
    return q.dtype in HALF_DTYPES or (q.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
                                      and torch.get_autocast_dtype("cpu") in HALF_DTYPES)


def _backward_follows(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _as_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]):
    """``q``, ``k``, ``v`` in fp32, and ``mask`` too where it is additive (a boolean mask stays as it is)."""
    return q.float(), k.float(), v.float(), mask.float() if mask is not None and mask.is_floating_point() else mask


def _sdpa_in_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  causal: bool) -> torch.Tensor:
    """SDPA of half-precision CPU inputs (or fp32 ones under CPU autocast) computed in fp32, the output cast back
    to the queries' dtype.

    SDPA's CPU flash kernel is slow backward in bf16: in torch 2.9.1, forward + backward at 1 thread
    took 44 ms in bf16 against 16 ms with the inputs cast to fp32 (B 32, H 4, T 128, D 32) and 39
    against 22 ms (B 8, H 12, T 128, D 64), which made bf16 autocast training slower than fp32 on a
    CPU with bf16 matrix units. Its forward alone is faster in bf16 (2.6 against 5.6 ms), so
    :func:`attend` takes this route only when a backward follows. Autocast is switched off around the
    call, since it would cast the inputs back to bf16 (SDPA is on its lower-precision list).
    """
    qf, kf, vf, mask = _as_fp32(q, k, v, mask)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, is_causal=causal)
    return out.to(q.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], dropout_p: float,
           causal: bool = False) -> torch.Tensor:
    """SDPA of (B, H, R, D) queries over (B, H, K, D) keys/values; ``mask``: bool (True = attend) or additive.

    On the CPU (eager), two cases take another route to the same computation: attention dropout
    (:func:`_explicit_attention`), and half-precision inputs with a backward to follow
    (:func:`_sdpa_in_fp32`; fp32 inputs under CPU autocast too, which SDPA would otherwise run in bf16). An additive mask built in fp32 for half queries (:func:`bias_dtype`) is
    cast to the queries' dtype where SDPA runs in it.
    Callers guarantee that no row is fully masked (a fully masked row would give NaN on the explicit
    path where SDPA gives 0): the padded backends' queries all see their own sequence's first key, the
    LXMERT cross-attention lets a partnerless sequence see padding, and MTO's key masks keep every
    token's own key.
    """
    eager_cpu = q.device.type == "cpu" and not torch.compiler.is_compiling()
    if eager_cpu and dropout_p > 0.0:
        return _explicit_attention(q, k, v, mask, dropout_p, causal)
    if eager_cpu and _half_on_cpu(q) and _backward_follows(q, k, v):
        return _sdpa_in_fp32(q, k, v, mask, causal)
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                        dropout_p: float, causal: bool) -> torch.Tensor:
    """softmax(QKᵀ/√D + mask)·V with attention dropout, computed explicitly (CPU).

    With attention dropout on CPU, SDPA falls back to its math kernel, whose dropout mask takes one
    Mersenne-Twister draw per attention probability, and whose "safe" softmax re-checks every row
    for being fully masked. This path computes the same explicitly with
    :func:`mmm.core.dropout.dropout` (four mask elements per 64-bit draw) and a plain softmax. As in
    SDPA's math kernel, half-precision inputs are attended in fp32 (scores, softmax and weighted
    sum), also under autocast, which would otherwise run the products in bf16 and round the scores to
    bf16 before the softmax.
    """
    if causal and mask is not None:
        raise ValueError("pass either a mask or causal=True, not both (as SDPA)")
    dtype = q.dtype
    with torch.autocast("cpu", enabled=False):
        if dtype in HALF_DTYPES:
            q, k, v, mask = _as_fp32(q, k, v, mask)
        scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)  # (B, H, R, K)
        if causal:  # top-left aligned, as SDPA's is_causal: query row i sees keys 0..i
            keys = torch.arange(k.shape[-2], device=q.device)
            scores = scores.masked_fill(~_causal_keys(keys[:q.shape[-2]], keys), float("-inf"))
        return (dropout(torch.softmax(_masked(scores, mask), dim=-1), dropout_p) @ v).to(dtype)


def _alibi_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: Optional[torch.Tensor],
                query_pos: torch.Tensor, key_pos: torch.Tensor, slopes: torch.Tensor,
                dropout_p: float, causal: bool) -> torch.Tensor:
    """SDPA for a block of query rows with its own ALiBi bias. q (B, H, R, D), k/v (B, H, K, D) → (B, H, R, D)."""
    mask = alibi_block(slopes, query_pos, key_pos, bias_dtype(q))  # (1, H, R, K)
    if causal:
        mask = mask.masked_fill(~_causal_keys(query_pos, key_pos), torch.finfo(mask.dtype).min)
    elif keys is not None:
        mask = mask.masked_fill(~keys, torch.finfo(mask.dtype).min)  # (B, H, R, K)
    return attend(q, k, v, mask, dropout_p)


def _sdpa_alibi(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, seq: PackedSeqInfo, alibi: ALiBi,
                dropout_p: float, causal: bool) -> torch.Tensor:
    """(B, H, T, D) padded attention with ALiBi, the bias built and kept per block of query rows only.

    Causal: a block of rows [i0, i1) reads only the keys before i1 (the later ones are masked anyway).
    """
    b, h, t, _ = qp.shape
    rows = max(1, ALIBI_BLOCK_ELEMENTS // (b * h * t))
    keys = None if seq.is_uniform else seq.key_padding[:, None, None, :]  # (B, 1, 1, T)
    pos = torch.arange(t, device=qp.device)  # (T,) padded positions
    recompute = torch.is_grad_enabled() and (qp.requires_grad or kp.requires_grad or vp.requires_grad)
    outs = []
    for i0 in range(0, t, rows):
        i1 = min(i0 + rows, t)
        kv_end = i1 if causal else t
        args = (qp[:, :, i0:i1], kp[:, :, :kv_end], vp[:, :, :kv_end], keys, pos[i0:i1], pos[:kv_end], alibi.slopes,
                dropout_p, causal)
        outs.append(checkpoint(_alibi_rows, *args, use_reentrant=False) if recompute else _alibi_rows(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def _sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSeqInfo, bias: Bias,
                 dropout_p: float, causal: bool) -> torch.Tensor:
    qp, kp, vp = (seq.pad(t).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if bias is not None:
        out = _sdpa_alibi(qp, kp, vp, seq, bias, dropout_p, causal)
    elif causal:  # key padding sits after every real query: the causal mask alone is exact
        out = attend(qp, kp, vp, None, dropout_p, causal=True)
    else:
        out = attend(qp, kp, vp, _dense_mask(seq, None, q.dtype), dropout_p)
    return seq.unpad(out.transpose(1, 2))  # (N, H, D)


@ATTENTION_BACKENDS.register("sdpa")
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSeqInfo,
                   bias: Bias = None, dropout_p: float = 0.0, causal: bool = False) -> torch.Tensor:
    """PyTorch SDPA on padded views. Args: q, k, v (N, H, D); bias: an :class:`ALiBi` or None;
    causal: attend only to earlier tokens of one's own sequence; returns (N, H, D).

    Sequences are padded in a few contiguous length groups (``seq.pad_groups``) rather than all to
    the longest one, which matters on CPU where no varlen kernel exists (packed batches are sorted
    longest first).
    """
    if not seq.pad_groups:
        return _sdpa_padded(q, k, v, seq, bias, dropout_p, causal)
    # split, not slices: a slice's backward writes a zero-filled (N, H, D) gradient per group and sums them
    sizes = [e - s for s, e, _ in seq.pad_groups]
    outs = [_sdpa_padded(qg, kg, vg, sub, bias, dropout_p, causal)
            for qg, kg, vg, (_, _, sub) in zip(q.split(sizes), k.split(sizes), v.split(sizes), seq.pad_groups)]
    return torch.cat(outs)


@ATTENTION_BACKENDS.register("math")
def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSeqInfo,
                   bias: Bias = None, dropout_p: float = 0.0, causal: bool = False) -> torch.Tensor:
    """Explicit reference attention (dense (B, H, T, T) scores and bias). Args: q, k, v (N, H, D);
    causal: a lower-triangular mask per sequence; returns (N, H, D)."""
    qp, kp, vp = (seq.pad(t).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    scores = qp @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    probs = dropout(torch.softmax(_masked(scores, _dense_mask(seq, bias, scores.dtype, causal)), dim=-1), dropout_p)
    return seq.unpad((probs @ vp).transpose(1, 2))


@ATTENTION_BACKENDS.register("xformers")
def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSeqInfo,
                       bias: Bias = None, dropout_p: float = 0.0, causal: bool = False) -> torch.Tensor:
    """xformers memory-efficient attention, block-diagonal over the flat stream (no padding).

    The ``BlockDiagonalMask`` (``causal``: ``BlockDiagonalCausalMask``) comes with the layout
    (``seq.attn_bias`` / ``seq.causal_attn_bias``, built once per batch when it moves to CUDA); a
    uniform batch needs none (``causal``: a ``LowerTriangularMask``) and runs as (B, T, H, D).
    """
    if bias is not None:
        raise ValueError("the xformers backend does not support an additive bias (ALiBi); use attention: sdpa")
    if q.device.type != "cuda":
        raise RuntimeError("xformers memory_efficient_attention has no CPU kernels; use attention: sdpa or math on CPU")
    from xformers.ops import fmha

    if seq.is_uniform:
        shape = (seq.batch_size, seq.max_seqlen) + q.shape[1:]
        mask = fmha.attn_bias.LowerTriangularMask() if causal else None
        out = fmha.memory_efficient_attention(q.view(shape), k.view(shape), v.view(shape), attn_bias=mask, p=dropout_p)
        return out.reshape(q.shape)
    mask = seq.causal_attn_bias if causal else seq.attn_bias
    if mask is None:
        raise RuntimeError("this packed layout has no xformers mask: build it on the GPU (PackedSeqInfo.to('cuda'))")
    out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask, p=dropout_p)  # (1, N, H, D)
    return out[0]


class FlexContext(NamedTuple):
    """What the flex backend needs per batch, built once by the encoder (:func:`flex_context`)."""

    block_mask: Any  # torch.nn.attention.flex_attention.BlockMask: attend within one's own sequence
    score_mod: Optional[Callable]  # ALiBi as a score modification, or None
    causal: bool = False  # the block mask also hides every later token


def flex_context(seq: PackedSeqInfo, alibi: Bias, causal: bool = False) -> FlexContext:
    """Per-document block mask over the flat stream and, with ALiBi, its score modification.

    Args:
        seq: the batch layout.
        alibi: the ALiBi module, or None.
        causal: mask every later token of the sequence too (tokens of one sequence are contiguous
            and in order in the stream, so "earlier in the sequence" is "earlier in the stream").
    """
    from torch.nn.attention.flex_attention import create_block_mask

    doc = seq.pad_index // seq.max_seqlen  # (N,) sequence of each token
    pos = seq.position_ids

    def same_sequence(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def same_sequence_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    n = seq.num_tokens
    mask = create_block_mask(same_sequence_causal if causal else same_sequence, None, None, n, n, device=pos.device)
    if alibi is None:
        return FlexContext(mask, None, causal)
    slopes = alibi.slopes

    def alibi_score(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (pos[q_idx] - pos[kv_idx]).abs()

    return FlexContext(mask, alibi_score, causal)


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@ATTENTION_BACKENDS.register("flex")
def flex_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSeqInfo,
                           bias: Any = None, dropout_p: float = 0.0, causal: bool = False) -> torch.Tensor:
    """FlexAttention over the flat stream: a per-sequence block mask, ALiBi computed inside the kernel (CUDA).

    Args:
        q, k, v: (N, H, D) packed.
        seq: the batch layout.
        bias: a :class:`FlexContext` (the encoder builds one per batch), an :class:`ALiBi`, or None.
        dropout_p: must be 0 (FlexAttention has no attention dropout).
        causal: attend only to earlier tokens of one's own sequence (must match a given context's).

    On CPU the uncompiled FlexAttention runs (it materialises the (H, N, N) scores: for tests only);
    on CUDA the compiled kernel never builds the bias or the scores.
    """
    if dropout_p > 0:
        raise ValueError("the flex attention backend has no attention dropout; set encoder.attn_dropout: 0")
    ctx = bias if isinstance(bias, FlexContext) else flex_context(seq, bias, causal)
    if ctx.causal != causal:
        raise ValueError(f"flex attention called with causal={causal} but its block mask was built with "
                         f"causal={ctx.causal}; build the context with flex_context(seq, alibi, causal={causal})")
    if q.device.type == "cuda":
        fn = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as fn
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
             score_mod=ctx.score_mod, block_mask=ctx.block_mask)  # (1, H, N, D)
    return out[0].transpose(0, 1)


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    """True when xformers imports and CUDA is present (its kernels are CUDA-only)."""
    if not torch.cuda.is_available():
        return False
    try:
        from xformers.ops import fmha  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(requested: str, device: torch.device, has_bias: bool = False) -> str:
    """Pick the backend name for a device.

    Args:
        requested: config value: ``auto``, ``xformers``, ``sdpa``, ``math`` or ``flex`` (CUDA; chosen only explicitly).
        device: where the tensors live.
        has_bias: whether an additive bias (ALiBi) must be applied.
    """
    name = requested
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if name == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() and not has_bias else "sdpa"
    ATTENTION_BACKENDS.get(name)  # unknown name → error listing the known ones
    if name == "flex" and device.type != "cuda":
        raise RuntimeError(f"attention backend 'flex' requested (config or ${BACKEND_ENV}) but tensors are on {device}; "
                           "FlexAttention kernels compile for CUDA only here (torch 2.9.1's CPU lowering fails): "
                           "use sdpa or math")
    if name == "xformers":
        if has_bias:
            raise ValueError("attention backend 'xformers' cannot apply the ALiBi bias; choose sdpa or math")
        if device.type != "cuda":
            raise RuntimeError(
                f"attention backend 'xformers' requested (config or ${BACKEND_ENV}) but tensors are on {device}; "
                "xformers has no CPU kernels: use sdpa or math"
            )
    return name
