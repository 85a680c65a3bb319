"""Masked language modeling head (BERT, Devlin et al. 2019), computed only at masked positions.

The head gathers the hidden states of the masked positions *before* the transform and the
vocabulary projection, so the (M, V) logits cover only the M predicted tokens instead of all
N tokens: with 15-30% masking and a 30k vocabulary that is most of a small model's step
(MosaicBERT, Portes et al. 2023, does the same). The projection is tied to the token embedding
by default (Press & Wolf 2017), with an untied option.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import PackedBatch
from mmm.objectives.base import ObjectiveOutput
from mmm.registry import OBJECTIVES


class MLMHead(nn.Module):
    """Transform (dense → GELU → LayerNorm) + vocabulary projection.

    Args:
        dim: hidden size.
        vocab_size: number of output classes.
        norm_eps: LayerNorm epsilon.
        tied_embedding: an ``nn.Embedding`` whose weight is reused as the projection; None = untied.
    """

    def __init__(self, dim: int, vocab_size: int, norm_eps: float = 1e-12,
                 tied_embedding: Optional[nn.Embedding] = None) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.tied_embedding = tied_embedding
        self.decoder_weight = None if tied_embedding is not None else nn.Parameter(torch.empty(vocab_size, dim))
        if self.decoder_weight is not None:
            nn.init.normal_(self.decoder_weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    @property
    def weight(self) -> torch.Tensor:
        return self.tied_embedding.weight if self.tied_embedding is not None else self.decoder_weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, d) hidden states at predicted positions → (M, V) logits."""
        h = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(h, self.weight, self.bias)


@OBJECTIVES.register("mlm")
class MaskedLanguageModeling(nn.Module):
    """MLM objective: cross-entropy and accuracy over the masked positions of a packed batch.

    Args:
        dim: encoder width (given by the model builder).
        embedder: the text embedder whose token table the head ties to (given by the builder).
        norm_eps: LayerNorm epsilon (given by the builder).
        tie_weights: reuse the token embedding as the output projection (config).
    """

    def __init__(self, dim: int, embedder: nn.Module, norm_eps: float = 1e-12, tie_weights: bool = True) -> None:
        super().__init__()
        vocab = embedder.tokens.num_embeddings
        self.head = MLMHead(dim, vocab, norm_eps, embedder.tokens if tie_weights else None)

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) encoder output → loss and masked-token accuracy."""
        if batch.mlm_positions.numel() == 0:
            zero = hidden.sum() * 0.0  # keeps the graph connected; no prediction this batch
            return ObjectiveOutput(zero, {"acc": zero.detach()}, 0)
        logits = self.head(hidden.index_select(0, batch.mlm_positions))  # (M, V)
        loss = F.cross_entropy(logits.float(), batch.mlm_labels)
        acc = (logits.argmax(-1) == batch.mlm_labels).float().mean()
        return ObjectiveOutput(loss, {"acc": acc.detach()}, int(batch.mlm_labels.numel()))
