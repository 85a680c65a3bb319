"""Position encodings.

Absolute (added to token embeddings by a modality embedder):
  * ``learned`` — a trained table (BERT, ViT).
  * ``sinusoidal`` — fixed sin/cos table (Vaswani et al. 2017, "Attention Is All You Need").
Relative (applied inside attention by the encoder):
  * ``alibi`` — linear distance penalty per head (Press et al. 2022, "Train Short, Test Long");
    symmetric |i - j| for a bidirectional encoder, as in MosaicBERT.
  * ``rotary`` — rotate queries/keys by position (Su et al. 2021, "RoFormer").
"""
from __future__ import annotations

import math
from typing import Optional, Set, Tuple

import torch
from torch import nn

from mmm.registry import POSITIONS

ABSOLUTE_POSITIONS = ("learned", "sinusoidal", "none")
RELATIVE_POSITIONS = ("none", "alibi", "rotary")


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed sin/cos position table."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


class AbsolutePositions(nn.Module):
    """Absolute position embeddings looked up by packed position ids.

    Args:
        kind: ``learned``, ``sinusoidal`` or ``none``.
        max_len: longest supported sequence.
        dim: embedding size.
    """

    def __init__(self, kind: str, max_len: int, dim: int) -> None:
        super().__init__()
        if kind not in ABSOLUTE_POSITIONS:
            raise ValueError(f"unknown absolute position kind {kind!r}; expected one of {ABSOLUTE_POSITIONS}")
        self.kind = kind
        self.max_len = max_len
        if kind == "learned":
            self.weight = nn.Parameter(torch.zeros(max_len, dim))
        elif kind == "sinusoidal":
            self.register_buffer("weight", sinusoidal_table(max_len, dim), persistent=False)
        else:
            self.weight = None

    def no_weight_decay(self) -> Set[str]:
        """A learned position table is not decayed (timm's ``no_weight_decay`` convention)."""
        return {"weight"}

    def forward(self, position_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """(N,) → (N, dim), or None for ``none``."""
        if self.weight is None:
            return None
        return self.weight[position_ids]


def alibi_slopes(heads: int) -> torch.Tensor:
    """(heads,) ALiBi slopes: a geometric sequence starting at 2^(-8/heads) (Press et al.)."""

    def power_of_two(n: int) -> list:
        start = 2 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        slopes = power_of_two(heads)
    else:  # the paper's recipe for non powers of two: interleave from the next power of two
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


@POSITIONS.register("alibi")
class ALiBi(nn.Module):
    """Additive attention bias ``-slope_h * |i - j|`` (bidirectional ALiBi)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def bias(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """(1, H, length, length) dense additive bias (the reference; the SDPA backend builds it in blocks)."""
        idx = torch.arange(length, device=self.slopes.device)
        return alibi_block(self.slopes, idx, idx, dtype)


def alibi_block(slopes: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """(1, H, Q, K) ALiBi bias ``-slope_h * |i - j|`` between the given query and key positions.

    Args:
        slopes: (H,) per-head slopes (:func:`alibi_slopes`).
        query_pos: (Q,) positions of the queries inside their sequences.
        key_pos: (K,) positions of the keys.
        dtype: dtype of the result.
    """
    dist = (key_pos[None, :] - query_pos[:, None]).abs().to(torch.float32)  # (Q, K)
    return (-slopes[:, None, None] * dist[None]).unsqueeze(0).to(dtype)


@POSITIONS.register("rotary")
class Rotary(nn.Module):
    """Rotary position embedding on (N, H, D) packed queries/keys (half-split layout).

    Args:
        head_dim: per-head size (even).
        base: frequency base (10000 in RoFormer).
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim, got {head_dim}")
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def tables(self, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N,) positions → float32 ``(cos, sin)``, each (N, 1, D): computed once per batch, shared by every layer."""
        angles = position_ids.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (N, D/2)
        angles = torch.cat([angles, angles], -1)[:, None, :]  # (N, 1, D)
        return angles.cos(), angles.sin()

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate (N, H, D) queries and keys by their positions."""
        return apply_rotary(q, k, *self.tables(position_ids))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate (N, H, D) queries and keys with precomputed (N, 1, D) tables (:meth:`Rotary.tables`)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (N, H, D) queries or keys with their (N, 1, D) tables (:meth:`Rotary.tables`)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)
