"""Two-stream fusion: cross-modality layers over paired sequences of a packed stream (LXMERT).

LXMERT (Tan & Bansal 2019) and InterBERT encode the caption and the image as two separate
sequences first, then fuse them in cross-modality layers: every token attends to the tokens of
the *other* sequence of its pair (one cross-attention, shared by both directions as in LXMERT),
then to its own sequence (self-attention) and goes through the MLP. In mmm the two streams are
separate sequences of one packed batch, encoded by the shared encoder (each attends only within
its own sequence, so the encoder is a single-modality encoder for both), and
``PackedBatch.partners`` names, for every sequence, the sequence it is paired with. The fusion
layers then run over the same packed stream; a sequence without a partner (-1) skips the
cross-attention. Their self-attention uses the encoder's relative positions (ALiBi bias or rotary
tables, within each sequence), as the encoder's blocks do.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from mmm.config import EncoderConfig
from mmm.core.attention import attend, flex_context
from mmm.core.dropout import Dropout
from mmm.core.encoder import EncoderBlock
from mmm.core.packing import PackedSeqInfo


class PartnerCrossAttention(nn.Module):
    """Multi-head attention of every packed sequence's tokens to the tokens of its partner sequence.

    Args:
        cfg: the encoder configuration (width, heads, dropout).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=cfg.qkv_bias)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout = cfg.attn_dropout

    def forward(self, x: torch.Tensor, seq: PackedSeqInfo, partners: torch.Tensor) -> torch.Tensor:
        """(N, d) tokens, (S,) partner of each sequence (-1: none) → (N, d) update (zero without a partner)."""
        pad, mask = seq.pad(x), seq.key_padding  # (S, L, d), (S, L)
        s, width, d = pad.shape
        has = partners >= 0  # (S,)
        other = partners.clamp(min=0)
        q = self.q(pad).view(s, width, self.heads, self.head_dim).transpose(1, 2)  # (S, H, L, D)
        k, v = self.kv(pad[other]).view(s, width, 2, self.heads, self.head_dim).unbind(2)  # (S, L, H, D) each
        keys = mask[other] & has[:, None]  # (S, L) real partner tokens
        keys = keys | ~keys.any(1, keepdim=True)  # a sequence without a partner attends to padding; zeroed below
        out = attend(q, k.transpose(1, 2), v.transpose(1, 2), keys[:, None, None, :],
                     self.attn_dropout if self.training else 0.0)  # (S, H, L, D)
        out = self.proj(out.transpose(1, 2).reshape(s, width, d))  # (S, L, d)
        out = out * has[:, None, None].to(out.dtype)
        return seq.unpad(out)  # (N, d)


class CrossModalityLayer(nn.Module):
    """Cross-attention to the partner sequence, then an encoder block (self-attention + MLP); pre- or post-LN."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.cross = PartnerCrossAttention(cfg)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.dropout = Dropout(cfg.dropout)
        self.block = EncoderBlock(cfg)

    def forward(self, x: torch.Tensor, seq: PackedSeqInfo, partners: torch.Tensor, backend: str,
                bias: Any = None, rope: Any = None) -> torch.Tensor:
        """``bias`` / ``rope``: the encoder's ALiBi bias (or flex context) and rotary tables for ``seq``, or None."""
        if self.norm_first:
            x = x + self.dropout(self.cross(self.norm(x), seq, partners))
        else:
            x = self.norm(x + self.dropout(self.cross(x, seq, partners)))
        return self.block(x, seq, backend, bias, rope)


class CrossModalFusion(nn.Module):
    """``depth`` :class:`CrossModalityLayer` s over a packed batch with paired sequences (LXMERT's 5 by default).

    Args:
        cfg: the shared encoder's configuration (the fusion layers take its width, heads, norms, MLP).
        depth: number of cross-modality layers.
    """

    def __init__(self, cfg: EncoderConfig, depth: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"model.image_text.cross_layers must be >= 1 for the two-stream layout, got {depth}")
        self.layers = nn.ModuleList(CrossModalityLayer(cfg) for _ in range(depth))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.final_norm else None

    def forward(self, x: torch.Tensor, seq: PackedSeqInfo, partners: torch.Tensor, backend: str,
                causal: bool = False, alibi: Optional[nn.Module] = None, rotary: Optional[nn.Module] = None
                ) -> torch.Tensor:
        """(N, d) encoder output, (S,) partner per sequence → (N, d) fused states.

        ``alibi`` / ``rotary``: the encoder's relative-position modules (``encoder.alibi``, ``encoder.rotary``),
        applied in the fusion layers' self-attention as in the encoder's blocks; None without them.

        ``causal`` must stay False: a token reads its whole partner sequence here, so the fusion
        layers have no causal form (a causal objective needs the single-stream layout).
        """
        if causal:
            raise ValueError("the two-stream cross-modality layers (model.image_text.layout: two_stream) attend to the "
                             "whole partner sequence and have no causal form; use a bidirectional objective with "
                             "them, or layout: single for a causal one")
        if partners.numel() != seq.batch_size:
            raise ValueError(f"partners has {partners.numel()} entries but the batch has {seq.batch_size} sequences")
        rope = rotary.tables(seq.position_ids) if rotary is not None else None  # once per batch
        bias = flex_context(seq, alibi, False) if backend == "flex" else alibi
        for layer in self.layers:
            x = layer(x, seq, partners, backend, bias, rope)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x
