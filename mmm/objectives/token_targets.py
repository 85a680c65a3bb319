"""Classification of hidden positions into discrete targets prepared by the data pipeline.

One head serves every "predict the discrete id of what was hidden" objective whose ids are not
the input vocabulary: BEiT's masked visual-token prediction (Bao et al. 2022; here the ids come
from a k-means codebook over patch pixels, :mod:`mmm.modalities.image.modality`) and HuBERT's
masked prediction of k-means cluster ids of acoustic features (Hsu et al. 2021; several target
sets at once, each with its own head, as MERT combines acoustic and musical teachers).
The pipeline puts a :class:`~mmm.batch.TokenTargets` under ``batch.targets[target]``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import PackedBatch
from mmm.config import EncoderConfig
from mmm.host_reads import on_host
from mmm.objectives.base import ObjectiveOutput, global_mean, in_lockstep, zero_output
from mmm.registry import OBJECTIVES


@OBJECTIVES.register("token_targets")
class TokenTargetClassification(nn.Module):
    """Dense → GELU → LayerNorm → linear over ``num_classes`` at the target positions; cross-entropy.

    Args:
        dim: encoder width (given by the builder).
        embedders: the model's embedders (given by the builder; unused).
        encoder_cfg: the shared encoder's config (given by the builder; its LayerNorm epsilon).
        target: key of the targets in ``batch.targets`` (e.g. ``image_tokens``, ``audio_mfcc``).
        num_classes: number of target ids (the codebook size).
    """

    reports_perplexity = True  # the trainer logs val/<head>_ppl from the token-weighted loss
    reads_token_targets = True  # its target and num_classes are checked against the run's codebooks (target_check)

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: Optional[EncoderConfig] = None,
                 target: str = "image_tokens", num_classes: int = 256) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"objective token_targets: num_classes must be an integer >= 2, got {num_classes!r}")
        self.target, self.num_classes = target, num_classes
        eps = encoder_cfg.norm_eps if encoder_cfg is not None else 1e-12
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=eps))
        self.classifier = nn.Linear(dim, num_classes)

    def reads_rows(self, batch: PackedBatch) -> Optional[torch.Tensor]:
        """The stream rows this head reads (its target positions), for the final-layer subset."""
        t = batch.targets.get(self.target)
        return t.positions if t is not None else torch.zeros(0, dtype=torch.long)

    def check_batch(self, batch: PackedBatch) -> None:
        """Every target id is in [0, ``num_classes``): on the host, before the batch moves to a GPU
        (:meth:`mmm.model.MaskedModel.check_batch`), or in ``forward`` for a batch on the CPU."""
        t = batch.targets.get(self.target)
        if t is None or t.labels.numel() == 0:
            return
        with on_host():
            low, top = int(t.labels.min()), int(t.labels.max())
        if top >= self.num_classes or low < 0:
            raise ValueError(f"objective token_targets: target {self.target!r} has ids in [{low}, {top}] but "
                             f"num_classes={self.num_classes}; set num_classes to the codebook size")

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        t = batch.targets.get(self.target)
        if t is None or t.positions.numel() == 0:
            return zero_output(hidden, self, ("acc",))
        if t.labels.device.type == "cpu":  # a batch bound for a GPU is checked before it moves (check_batch)
            self.check_batch(batch)
        logits = self.classifier(self.transform(hidden.index_select(0, t.positions)))  # (M, K)
        # cross-entropy summed / global count of targets: exact under DDP (the plain mean on one rank)
        loss = global_mean(F.cross_entropy(logits.float(), t.labels, reduction="sum"), t.count, in_lockstep(self))
        acc = (logits.argmax(-1) == t.labels).float().mean()
        return ObjectiveOutput(loss, {"acc": acc.detach()}, t.count)
