"""Text embedder: token + absolute position (+ segment) embeddings, LayerNorm, dropout (BERT, Devlin et al. 2019).

The tokenizer lives in :mod:`mmm.modalities.text.tokenizer`; this module turns packed token ids
into the (N, d) embeddings the shared encoder reads.

Segments (BERT's token types) are optional (``segments: 0`` = none, as RoBERTa). With them, a token's
segment is the number of ``[SEP]`` tokens before it in its sequence, capped at ``segments - 1``: for
``[CLS] a [SEP] b [SEP]`` that is 0 up to the first ``[SEP]`` and 1 after it, the ``token_type_ids`` an
HF BERT tokenizer gives a pair. They are derived from the ids, so every caller (pretraining, ``embed``,
``finetune``, :class:`~mmm.encoders.TextEncoder`) gets them without a second id stream.
"""
from __future__ import annotations

from typing import Optional

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
        segments: rows of the segment table (BERT's token types); 0 = no segment embeddings.
        sep_id: the ``[SEP]`` id that starts a new segment; needed when ``segments > 0``.
    """

    def __init__(self, vocab_size: int, dim: int, max_len: int, position: str = "learned", embed_norm: bool = True,
                 norm_eps: float = 1e-12, dropout: float = 0.1, pad_id: int = 0, segments: int = 0,
                 sep_id: Optional[int] = None) -> None:
        super().__init__()
        if segments < 0:
            raise ValueError(f"segments must be >= 0, got {segments}")
        if segments and (sep_id is None or not 0 <= sep_id < vocab_size):
            raise ValueError(f"segment embeddings need the tokenizer's [SEP] id in [0, {vocab_size}), got {sep_id!r}")
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.sep_id = sep_id
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = AbsolutePositions(position, max_len, dim)
        self.segments = nn.Embedding(segments, dim) if segments else None
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

    def segment_ids(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(N,) segment of each packed token: the ``[SEP]`` tokens before it in its sequence (a sequence starts
        where its position id is 0), capped at ``segments - 1``. Tensor ops only (no host read)."""
        seps = (input_ids == self.sep_id).long()
        before = torch.cumsum(seps, 0) - seps  # [SEP]s before each token in the whole pack
        at_start = torch.where(position_ids == 0, before, torch.zeros_like(before))
        start = torch.cummax(at_start, 0).values  # the count where the token's own sequence began (non-decreasing)
        return (before - start).clamp_(max=self.segments.num_embeddings - 1)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(N,) ids and (N,) positions → (N, d)."""
        x = self.tokens(input_ids)
        pos = self.positions(position_ids)
        if pos is not None:
            x = x + pos
        if self.segments is not None:
            x = x + self.segments(self.segment_ids(input_ids, position_ids))
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)
