"""Attention backends over packed sequences, and how one is chosen.

* ``xformers`` — ``memory_efficient_attention`` with a ``BlockDiagonalMask`` over the flat token
  stream: no padding at all (CUDA only; xformers has no CPU kernels).
* ``sdpa`` — ``torch.nn.functional.scaled_dot_product_attention`` on a padded view built from
  the packed layout (CPU and CUDA).
* ``math`` — an explicit softmax(QKᵀ/√d + bias)V reference, for tests.

Every backend takes (N, H, D) packed queries/keys/values and returns (N, H, D). Choice: the
config value if it is not ``auto``; otherwise ``$MMM_ATTENTION`` if set; otherwise xformers on
CUDA when it imports, else SDPA. An optional additive bias (ALiBi) is supported by sdpa and math;
with a bias, an ``auto`` choice on CUDA takes sdpa (xformers' block-diagonal mask cannot carry a
per-sequence distance bias), and an explicit ``xformers`` request is refused with that reason.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mmm.core.packing import PackedSeqInfo
from mmm.registry import ATTENTION_BACKENDS

BACKEND_ENV = "MMM_ATTENTION"
Bias = Optional[Callable[[int, torch.dtype], torch.Tensor]]  # (T_max, dtype) -> (1, H, T, T)


def _padded_mask(seq: PackedSeqInfo, bias: Bias, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Additive/boolean mask for the padded layout, or None when nothing is masked."""
    if bias is None:
        if seq.is_uniform:
            return None
        return seq.key_padding()[:, None, None, :]  # (B, 1, 1, T) True = attend
    b = bias(seq.max_seqlen, dtype)  # (1, H, T, T)
    if seq.is_uniform:
        return b
    neg = torch.finfo(dtype).min
    return b.masked_fill(~seq.key_padding()[:, None, None, :], neg)  # (B, H, T, T)


SDPA_GROUPS = 4  # padded sub-batches per SDPA call site (see PackedSeqInfo.groups)


def _sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSeqInfo, bias: Bias,
                 dropout_p: float) -> torch.Tensor:
    qp, kp, vp = (seq.pad(t).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    mask = _padded_mask(seq, bias, q.dtype)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, dropout_p=dropout_p)
    return seq.unpad(out.transpose(1, 2))  # (N, H, D)


@ATTENTION_BACKENDS.register("sdpa")
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSeqInfo,
                   bias: Bias = None, dropout_p: float = 0.0) -> torch.Tensor:
    """PyTorch SDPA on padded views. Args: q, k, v (N, H, D); returns (N, H, D).

    Sequences are padded in a few contiguous length groups rather than all to the longest one,
    which matters on CPU where no varlen kernel exists (packed batches are sorted longest first).
    """
    if seq.is_uniform or seq.batch_size < 2 * SDPA_GROUPS:
        return _sdpa_padded(q, k, v, seq, bias, dropout_p)
    outs = [_sdpa_padded(q[s:e], k[s:e], v[s:e], sub, bias, dropout_p) for s, e, sub in seq.groups(SDPA_GROUPS)]
    return torch.cat(outs)


@ATTENTION_BACKENDS.register("math")
def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSeqInfo,
                   bias: Bias = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Explicit reference attention. Args: q, k, v (N, H, D); returns (N, H, D)."""
    qp, kp, vp = (seq.pad(t).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    scores = qp @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    mask = _padded_mask(seq, bias, scores.dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return seq.unpad((probs @ vp).transpose(1, 2))


@ATTENTION_BACKENDS.register("xformers")
def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: PackedSeqInfo,
                       bias: Bias = None, dropout_p: float = 0.0) -> torch.Tensor:
    """xformers memory-efficient attention, block-diagonal over the flat stream (no padding)."""
    if bias is not None:
        raise ValueError("the xformers backend does not support an additive bias (ALiBi); use attention: sdpa")
    if q.device.type != "cuda":
        raise RuntimeError("xformers memory_efficient_attention has no CPU kernels; use attention: sdpa or math on CPU")
    from xformers.ops import fmha

    mask = _block_diagonal(tuple(seq.seqlens))
    out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask, p=dropout_p)  # (1, N, H, D)
    return out[0]


@functools.lru_cache(maxsize=64)
def _block_diagonal(seqlens: tuple):
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    return BlockDiagonalMask.from_seqlens(list(seqlens))


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
        requested: config value: ``auto``, ``xformers``, ``sdpa`` or ``math``.
        device: where the tensors live.
        has_bias: whether an additive bias (ALiBi) must be applied.
    """
    name = requested
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if name == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() and not has_bias else "sdpa"
    ATTENTION_BACKENDS.get(name)  # unknown name → error listing the known ones
    if name == "xformers":
        if has_bias:
            raise ValueError("attention backend 'xformers' cannot apply the ALiBi bias; choose sdpa or math")
        if device.type != "cuda":
            raise RuntimeError(
                f"attention backend 'xformers' requested (config or ${BACKEND_ENV}) but tensors are on {device}; "
                "xformers has no CPU kernels: use sdpa or math"
            )
    return name
