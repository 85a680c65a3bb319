"""Text embedder: token + absolute position embeddings, LayerNorm, dropout (BERT, Devlin et al. 2019).

The tokenizer lives in :mod:`mmm.modalities.text.tokenizer`; this module turns packed token ids
into the (N, d) embeddings the shared encoder reads.
"""
from __future__ import annotations

import torch
from torch import nn

from mmm.core.dropout import Dropout
from mmm.core.position import AbsolutePositions
from mmm.registry import EMBEDDERS


@EMBEDDERS.register("text")
class TextEmbedder(nn.Module):
    """Packed token ids → (N, d) embeddings.

    Args:
        vocab_size: number of token ids.
        dim: embedding size (the encoder width).
        max_len: longest sequence (size of the position table).
        position: ``learned``, ``sinusoidal`` or ``none`` (use ``none`` with ALiBi/rotary).
        embed_norm: LayerNorm after the sum (BERT); off for pre-LN models that norm inside blocks.
        norm_eps: LayerNorm epsilon.
        dropout: dropout on the embeddings.
        pad_id: padding id (its embedding row is kept at zero by the initialiser).
    """

    def __init__(self, vocab_size: int, dim: int, max_len: int, position: str = "learned", embed_norm: bool = True,
                 norm_eps: float = 1e-12, dropout: float = 0.1, pad_id: int = 0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = AbsolutePositions(position, max_len, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if embed_norm else None
        self.dropout = Dropout(dropout)

    @property
    def max_len(self) -> int:
        return self.positions.max_len

    def fold_modality_vector(self, vector: torch.Tensor) -> None:
        """Absorb a constant ``vector`` added to every output token into the weights (exact in eval
        mode; called under ``torch.no_grad``): into the LayerNorm's bias when there is one (output =
        dropout(LN(x))), else into the token table (every token takes exactly one row)."""
        if self.norm is not None and self.norm.bias is not None:
            self.norm.bias += vector
        else:
            self.tokens.weight += vector

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(N,) ids and (N,) positions → (N, d)."""
        x = self.tokens(input_ids)
        pos = self.positions(position_ids)
        if pos is not None:
            x = x + pos
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)
