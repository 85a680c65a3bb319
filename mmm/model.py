"""Composition: embedder + shared encoder + objective heads, assembled from a config.

:class:`MaskedModel` receives built parts (injection, as torchmultimodal composes FLAVA);
:func:`build_model` is the one place that turns a :class:`~mmm.config.ModelConfig` and the
objective list into those parts via the registries.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

import mmm.objectives.mlm  # noqa: F401  (registers objectives)
import mmm.modalities.text  # noqa: F401  (registers embedders)
from mmm.batch import PackedBatch
from mmm.config import ModelConfig, ObjectiveConfig
from mmm.core.encoder import TransformerEncoder
from mmm.objectives.base import ObjectiveOutput
from mmm.registry import EMBEDDERS, OBJECTIVES


class MaskedModel(nn.Module):
    """Embedder → shared encoder → heads; returns the weighted loss and each objective's output.

    Args:
        embedder: packed ids → (N, d).
        encoder: the shared :class:`TransformerEncoder`.
        objectives: name → head module with ``forward(hidden, batch) -> ObjectiveOutput``.
        weights: name → loss weight.
    """

    def __init__(self, embedder: nn.Module, encoder: TransformerEncoder, objectives: Dict[str, nn.Module],
                 weights: Dict[str, float]) -> None:
        super().__init__()
        self.embedder = embedder
        self.encoder = encoder
        self.objectives = nn.ModuleDict(objectives)
        self.weights = dict(weights)

    def encode(self, batch: PackedBatch) -> torch.Tensor:
        """(N, d) hidden states of a packed batch."""
        x = self.embedder(batch.input_ids, batch.seq.position_ids)
        return self.encoder(x, batch.seq)

    def forward(self, batch: PackedBatch) -> Tuple[torch.Tensor, Dict[str, ObjectiveOutput]]:
        hidden = self.encode(batch)
        outputs = {name: head(hidden, batch) for name, head in self.objectives.items()}
        total = sum(self.weights[name] * out.loss for name, out in outputs.items())
        return total, outputs


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation: N(0, std) for linear/embedding weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("positions.weight"):
            nn.init.normal_(p, std=std)


def build_text_embedder(cfg: ModelConfig, vocab_size: int, pad_id: int) -> nn.Module:
    """The text embedder for ``cfg`` and a tokenizer of ``vocab_size`` ids."""
    t, e = cfg.text, cfg.encoder
    return EMBEDDERS.create("text", vocab_size=vocab_size, dim=e.dim, max_len=t.max_len, position=t.position,
                            embed_norm=t.embed_norm, norm_eps=e.norm_eps, dropout=e.dropout, pad_id=pad_id)


def build_model(cfg: ModelConfig, objectives: List[ObjectiveConfig], vocab_size: int, pad_id: int = 0) -> MaskedModel:
    """Assemble and initialise a :class:`MaskedModel`.

    Args:
        cfg: network configuration.
        objectives: heads to attach (registry names, weights, args).
        vocab_size: tokenizer vocabulary size.
        pad_id: tokenizer padding id.
    """
    if not objectives:
        raise ValueError("config.objectives is empty: at least one objective is needed")
    embedder = build_text_embedder(cfg, vocab_size, pad_id)
    encoder = TransformerEncoder(cfg.encoder)
    heads: Dict[str, nn.Module] = {}
    for o in objectives:
        if o.name in heads:
            raise ValueError(f"objective {o.name!r} is listed twice in config.objectives")
        heads[o.name] = OBJECTIVES.create(o.name, dim=cfg.encoder.dim, embedder=embedder,
                                          norm_eps=cfg.encoder.norm_eps, **o.args)
    model = MaskedModel(embedder, encoder, heads, {o.name: o.weight for o in objectives})
    init_weights(model, cfg.init_std)
    return model
