"""Masked language modeling head (BERT, Devlin et al. 2019), computed only at masked positions.

The head gathers the hidden states of the masked positions *before* the transform and the
vocabulary projection, so the (M, V) logits cover only the M predicted tokens instead of all
N tokens: with 15-30% masking and a 30k vocabulary that is most of a small model's step
(MosaicBERT, Portes et al. 2023, does the same). The projection is tied to the token embedding
by default (Press & Wolf 2017), with an untied option.

``decoder_layers: k`` adds an enhanced MLM decoder (DrBERT, "Unveiling the Potential of Masked
Language Modeling Decoder in BERT pretraining"; DeBERTa's enhanced mask decoder before it): k
extra Transformer blocks of the encoder's shape over the whole packed sequence, between the
encoder and the head, used only in pretraining. They belong to this head, so
:func:`~mmm.encoders.load_encoder` and the HF export (``embedders.*`` and ``encoder.*`` only) drop
them and fine-tuning costs nothing extra.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import PackedBatch
from mmm.config import EncoderConfig
from mmm.core.encoder import TransformerEncoder
from mmm.objectives.base import ObjectiveOutput, global_mean, in_lockstep, token_table, top1_accuracy
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

    Serves every discrete-token modality (text; DNA as in DNABERT and the Nucleotide
    Transformer): ``modality`` names both the embedder whose token table the head ties to and the
    :class:`~mmm.batch.TokenTargets` it reads from ``batch.targets``.

    Args:
        dim: encoder width (given by the model builder).
        embedders: the model's embedders (given by the builder).
        encoder_cfg: the shared encoder's config (given by the builder; its LayerNorm epsilon is used).
        tie_weights: reuse the token embedding as the output projection (config).
        modality: which token modality this head predicts (config).
        decoder_layers: extra Transformer blocks before the head, pretraining only (DrBERT); 0 = none (config).
    """

    reports_perplexity = True  # the trainer logs val/<head>_ppl from the token-weighted loss

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 tie_weights: bool = True, modality: str = "text", decoder_layers: int = 0) -> None:
        super().__init__()
        tokens = token_table(embedders, modality, "mlm", "MLM")
        if isinstance(decoder_layers, bool) or not isinstance(decoder_layers, int) or decoder_layers < 0:
            raise ValueError(f"objective mlm: decoder_layers must be an int >= 0, got {decoder_layers!r}")
        self.modality = modality
        # DrBERT's enhanced decoder: blocks of the encoder's shape (no experts), dropped at export
        self.decoder = (TransformerEncoder(dataclasses.replace(encoder_cfg, depth=decoder_layers, experts=False))
                        if decoder_layers else None)
        self.head = MLMHead(dim, tokens.num_embeddings, encoder_cfg.norm_eps, tokens if tie_weights else None)

    def reads_rows(self, batch: PackedBatch) -> Optional[torch.Tensor]:
        """The stream rows of the final hidden states this head reads (its masked positions), for the
        final-layer subset; None with the enhanced decoder, which reads every token."""
        if self.decoder is not None:
            return None
        t = batch.targets.get(self.modality)
        return t.positions if t is not None else torch.zeros(0, dtype=torch.long)

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) encoder output → loss and masked-token accuracy."""
        t = batch.targets.get(self.modality)
        sync = in_lockstep(self)  # training steps run on every rank in lockstep: the count is all-reduced
        if t is None or t.positions.numel() == 0:
            zero = hidden.sum() * 0.0  # keeps the graph connected; no prediction this batch
            return ObjectiveOutput(global_mean(zero, 0, sync), {"acc": zero.detach()}, 0)
        if self.decoder is not None:
            hidden = self.decoder(hidden, batch.seq)  # (N, d): the decoder sees the whole sequence
        logits = self.head(hidden.index_select(0, t.positions))  # (M, V)
        # sum / (global count / world size): exact under DDP gradient averaging (a plain mean on one rank)
        loss = global_mean(F.cross_entropy(logits.float(), t.labels, reduction="sum"), int(t.labels.numel()), sync)
        return ObjectiveOutput(loss, {"acc": top1_accuracy(logits, t.labels, share_ties=not self.training)}, int(t.labels.numel()))
