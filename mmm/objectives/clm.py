"""Causal (next-token) language modeling on the shared encoder, with the MEAP input option.

The encoder runs causally for this head (``causal = True``: :class:`~mmm.model.MaskedModel` gives
it an encoder pass in which each token attends only to itself and the earlier tokens of its own
packed sequence), and the head predicts token ``t + 1`` from position ``t``, within each sequence:
the last token of a sequence predicts nothing, so no prediction crosses a sequence boundary.

* CLM → MLM: the CLM-vs-MLM study (Gisserot-Boukhlef et al. 2025, "Should We Still Pretrain
  Encoders with Masked Language Modeling?") trains CLM first and MLM after, at a fixed budget, and
  finds this biphasic schedule beats either objective alone. ``phases:`` in the config
  (:mod:`mmm.train.phases`) runs it; ``share_head: mlm`` lets the two objectives use one language
  modeling head (transform + tied projection), as one model with one LM head is trained through
  both phases there, so the MLM phase starts from a head that already predicts tokens.
* MEAP (Zhuang et al. 2025, "Mask-Enhanced Autoregressive Prediction"): a small fraction of the
  *input* tokens is masked and the model still predicts every next (original) token. With
  ``meap: true`` the head keeps the run's masker's corruption in its input (so the masker's
  ``ratio`` is the MEAP fraction, its ``mask_prob`` how many become [MASK]); without it the head
  restores the original ids, so the masker's corruption never reaches a CLM pass.

The batch the data pipeline delivers is the masker's output either way: :meth:`prepare` (called
inside the step, before this head's encoder pass) rebuilds the original ids from the MLM targets,
so a phased run needs no change of the data stream at the phase switch.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import PackedBatch, TokenTargets
from mmm.config import EncoderConfig
from mmm.core.packing import PackedSeqInfo, mask_positions
from mmm.objectives.base import (ObjectiveOutput, global_mean, in_lockstep, sole_input, token_table, top1_accuracy,
                                 zero_output)
from mmm.objectives.mlm import MLMHead
from mmm.registry import OBJECTIVES


def next_token_positions(seq: PackedSeqInfo) -> torch.Tensor:
    """(N - S,) int64 stream positions that have a next token in their own sequence (all but each sequence's last).

    Args:
        seq: the packed layout (``cu_seqlens`` of S sequences over N tokens).
    """
    cu = seq.cu_seqlens.long()
    n = seq.num_tokens
    last = torch.where(cu[1:] > cu[:-1], cu[1:] - 1, n)  # (S,) each sequence's last token; n for an empty one
    keep = torch.ones(n + 1, dtype=torch.bool, device=cu.device).index_fill_(0, last, False)[:n]
    return mask_positions(keep, n - sum(1 for length in seq.seqlens if length > 0))  # sizes from the host lengths


@OBJECTIVES.register("clm")
class CausalLanguageModeling(nn.Module):
    """Next-token cross-entropy over every token with a successor in its sequence (causal encoder pass).

    Args:
        dim, embedders, encoder_cfg: given by the model builder (see :mod:`mmm.objectives.base`).
        modality: the token modality (``text`` or ``dna``) the head predicts (config).
        tie_weights: the output projection is the token embedding (config; ignored with ``share_head``).
        share_head: name (label) of an ``mlm`` head whose transform and projection this head uses
            instead of its own (config); null = its own head.
        meap: keep the masker's corruption in the input (MEAP); false = predict from the original ids (config).
    """

    causal = True  # MaskedModel encodes causally for this head
    reports_perplexity = True  # the trainer logs val/<head>_ppl

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 modality: str = "text", tie_weights: bool = True, share_head: Optional[str] = None,
                 meap: bool = False) -> None:
        super().__init__()
        tokens = token_table(embedders, modality, "clm", "next-token prediction")
        self.modality = modality
        self.target_key = f"{modality}_next"
        self.share_head = share_head
        self.meap = bool(meap)
        self.head = MLMHead(dim, tokens.num_embeddings, encoder_cfg.norm_eps, tokens if tie_weights else None)

    def bind_heads(self, heads: Dict[str, nn.Module]) -> None:
        """Take the MLM head named ``share_head`` (called by :func:`~mmm.model.build_model` once all heads exist)."""
        if self.share_head is None:
            return
        other = heads.get(self.share_head)
        head = getattr(other, "head", None)
        if not isinstance(head, MLMHead):
            raise ValueError(f"objective clm: share_head {self.share_head!r} must name an mlm objective of this model "
                             f"(heads: {sorted(heads)})")
        if getattr(other, "modality", None) != self.modality:
            raise ValueError(f"objective clm: share_head {self.share_head!r} predicts {other.modality!r}, this head "
                             f"{self.modality!r}")
        self.head = head  # one module under both heads: its parameters are shared (and saved under both names)

    def prepare(self, batch: PackedBatch) -> PackedBatch:
        """The batch this head's causal pass reads: original ids (or, with MEAP, the masker's corrupted
        ids) and the next-token targets under ``targets[f"{modality}_next"]``. The input batch is not modified."""
        inp = sole_input(batch, self.modality, "clm", "next tokens are read along each sequence")
        if inp is None:
            return batch
        t = batch.targets.get(self.modality)
        original = inp.ids if t is None or t.positions.numel() == 0 else inp.ids.index_copy(0, t.positions, t.labels)
        positions = next_token_positions(batch.seq)  # (N - S,)
        target = TokenTargets(positions, original.index_select(0, positions + 1))
        ids = inp.ids if self.meap else original
        return dataclasses.replace(batch, inputs={**batch.inputs, self.modality: dataclasses.replace(inp, ids=ids)},
                                   targets={**batch.targets, self.target_key: target})

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) causal encoder output → next-token loss and accuracy."""
        if self.modality not in batch.inputs:
            return zero_output(hidden, self, ("acc",))
        t = batch.targets.get(self.target_key)
        if t is None:
            raise ValueError(f"objective clm: the batch has no {self.target_key!r} targets; they are made in "
                             f"prepare(batch), which MaskedModel.forward calls before the encoder")
        if t.positions.numel() == 0:  # only one-token sequences
            return zero_output(hidden, self, ("acc",))
        logits = self.head(hidden.index_select(0, t.positions))  # (M, V), M = N - S
        loss = global_mean(F.cross_entropy(logits.float(), t.labels, reduction="sum"), int(t.labels.numel()),
                           in_lockstep(self))
        return ObjectiveOutput(loss, {"acc": top1_accuracy(logits, t.labels, share_ties=not self.training)}, int(t.labels.numel()))
