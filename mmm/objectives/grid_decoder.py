"""The light decoder over the patch grid: MAE's (He et al. 2022, Sec. 3), which data2vec 2.0 (Baevski et
al. 2023) reuses for its drop-masked image student.

The visible encodings go back onto each image's ``prefix + P`` grid, a learned mask token fills the
hidden cells, fixed 2-D sin-cos positions are added, and a few narrow pre-LN Transformer blocks read
the whole grid. The heads keep their own parameters (and their checkpoint names); these functions
are the parts they share: the blocks, the position table and the decoding pass.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from mmm.config import EncoderConfig
from mmm.core.encoder import TransformerEncoder
from mmm.core.packing import PackedSeqInfo


def check_decoder_shape(objective: str, width: object, depth: object, heads: object, min_depth: int = 1) -> None:
    """Refuse a decoder shape the blocks cannot have, naming the objective's own arguments (``decoder_dim``,
    ``decoder_depth``, ``decoder_heads``) rather than the shared encoder's.

    Raises:
        ValueError: a non-integer or too small value, or a width the heads do not divide.
    """
    for name, value, low in (("decoder_dim", width, 1), ("decoder_depth", depth, min_depth), ("decoder_heads", heads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"objective {objective}: {name} must be an integer >= {low}, got {value!r}")
    if depth and width % heads:
        raise ValueError(f"objective {objective}: decoder_dim {width} is not divisible by decoder_heads {heads}")


def decoder_blocks(width: int, depth: int, heads: int, attention: str) -> TransformerEncoder:
    """Narrow decoder blocks as MAE's: pre-LN, GELU MLP, a final LayerNorm (eps 1e-6), no dropout.

    Args:
        width: decoder width.
        depth: blocks.
        heads: attention heads.
        attention: attention backend (the shared encoder's ``attention``).
    """
    return TransformerEncoder(EncoderConfig(
        dim=width, depth=depth, heads=heads, mlp="gelu", norm_first=True, final_norm=True, norm_eps=1e-6,
        dropout=0.0, attn_dropout=0.0, attention=attention))


def grid_positions(prefix: int, grid: Tuple[int, int], width: int) -> torch.Tensor:
    """(prefix + P, width) fixed decoder positions: zeros at the prefix ([CLS]) rows, 2-D sin-cos at the patches.

    Args:
        prefix: tokens before the patches ([CLS]: 1, else 0).
        grid: (rows, columns) of patches.
        width: decoder width.
    """
    from mmm.modalities.image.embedder import sincos_2d_table

    return torch.cat([torch.zeros(prefix, width), sincos_2d_table(grid, width)])


def decode_grid(x: torch.Tensor, dropped: torch.Tensor, prefix: int, mask_token: torch.Tensor,
                positions: torch.Tensor, blocks: nn.Module) -> torch.Tensor:
    """(N_img, w) embedded image tokens → (B, P, w) decoder states at every patch.

    Args:
        x: the image tokens the encoder read, already mapped to the decoder width, in stream order (per
            image its prefix, then its patches not dropped).
        dropped: (B, P) bool, True = the patch was not encoded (all False in mask-token mode).
        prefix: tokens before the patches ([CLS]: 1, else 0).
        mask_token: (1, w) the learned token at every cell the encoder did not read.
        positions: (prefix + P, w) added to every cell (:func:`grid_positions`).
        blocks: the decoder blocks (:func:`decoder_blocks`).
    """
    from mmm.modalities.image.embedder import visible_slots

    b, t = dropped.shape[0], prefix + dropped.shape[1]
    slot = visible_slots(dropped, prefix, count=x.shape[0])  # (N_img,) each token's cell, [CLS] in column 0
    dtype = torch.promote_types(x.dtype, mask_token.dtype)  # fp32 under autocast: the decoder's stream is not bf16
    full = mask_token.to(dtype).expand(b * t, -1).index_copy(0, slot, x.to(dtype))  # (B*T, w)
    full = (full.view(b, t, -1) + positions.to(dtype)).view(b * t, -1)
    out = blocks(full, PackedSeqInfo.from_seqlens([t] * b, device=full.device))  # (B*T, w)
    return out.view(b, t, -1)[:, prefix:]  # (B, P, w)
