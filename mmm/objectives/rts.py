"""Random token substitution (RTS; Di Liello, Gabburo and Moschitti 2022, "Effective Pre-Training
Objectives for Transformer-based Autoencoders"): a cheap ELECTRA without a generator.

A fraction of the tokens is replaced by tokens drawn uniformly from the vocabulary (special
tokens excluded), and a binary head over *every* token says whether it is the original or a
substitute. The substitution is the token masker's: ``bert_random`` with ``mask_prob: 0,
random_prob: 1`` replaces each chosen token by a random one and records the original as the
label (see ``configs/text_rts_tiny.yaml``), so it runs in the data workers with their seeded
generators. A draw that happens to equal the original counts as original (ELECTRA's rule).
The head reads that from the batch: a token is replaced where the MLM targets' label differs
from the input id. The masker must write no [MASK] tokens here (``mask_prob: 0``): a [MASK] is a
substitution anyone can spot.

The same paper's swapped language modeling (SLM: the random substitutes are predicted back to
their original ids) needs no code: it is that masker recipe with the ``mlm`` head
(``configs/text_slm_tiny.yaml``).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import PackedBatch
from mmm.config import EncoderConfig
from mmm.objectives.base import ObjectiveOutput, global_mean, in_lockstep, token_table, zero_output
from mmm.registry import OBJECTIVES


def substituted(ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: True where the input id differs from the original one.

    Args:
        ids: (N,) input (corrupted) ids.
        positions: (M,) positions the masker chose.
        labels: (M,) their original ids.
    """
    out = torch.zeros_like(ids, dtype=torch.bool)
    return out.index_copy(0, positions, ids.index_select(0, positions) != labels)


@OBJECTIVES.register("rts")
class RandomTokenSubstitution(nn.Module):
    """Binary cross-entropy of "original or substituted" over every token of the modality.

    Args:
        dim, embedders, encoder_cfg: given by the model builder (see :mod:`mmm.objectives.base`).
        modality: the token modality (``text`` or ``dna``) whose tokens are classified (config).
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 modality: str = "text") -> None:
        super().__init__()
        token_table(embedders, modality, "rts", "random token substitution")
        self.modality = modality
        # one logit per token: dense -> GELU -> linear, ELECTRA's discriminator head
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    @staticmethod
    def check_masker(masker: object) -> None:
        """Refuse a masker that writes [MASK] tokens (``mask_prob > 0``): the detector would learn to spot them."""
        mask_prob = getattr(masker, "mask_prob", 0.0)
        if mask_prob > 0:
            raise ValueError(f"objective rts classifies substituted tokens, so its masker must write no [MASK] tokens: "
                             f"set masking.args.mask_prob: 0 and random_prob: 1 (as configs/text_rts_tiny.yaml), got "
                             f"mask_prob {mask_prob}")

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) encoder output → detection loss, accuracy, share of substituted tokens, recall on them."""
        names = ("acc", "replaced", "recall")
        inp = batch.inputs.get(self.modality)
        if inp is None:
            return zero_output(hidden, self, names)
        if inp.index is not None or inp.ids.numel() != batch.num_tokens:
            raise ValueError(f"objective rts: the {self.modality!r} tokens must fill the packed stream alone; this "
                             f"batch mixes modalities")
        t = batch.targets.get(self.modality)
        if t is None:
            replaced = torch.zeros_like(inp.ids, dtype=torch.bool)
        else:
            replaced = substituted(inp.ids, t.positions, t.labels)  # (N,)
        logits = self.head(hidden).squeeze(-1).float()  # (N,)
        loss = global_mean(F.binary_cross_entropy_with_logits(logits, replaced.float(), reduction="sum"),
                           replaced.numel(), in_lockstep(self))
        guess = logits > 0
        acc = (guess == replaced).float().mean()
        recall = (guess & replaced).sum().float() / replaced.sum().clamp_min(1).float()
        metrics = {"acc": acc.detach(), "replaced": replaced.float().mean().detach(), "recall": recall.detach()}
        return ObjectiveOutput(loss, metrics, int(replaced.numel()))
