"""Image-text matching with optional word-region alignment (UNITER, Chen et al. 2020, Sec. 3.1).

* ITM: one joint sequence per pair (caption tokens, then image tokens); UNITER's pooler (dense +
  tanh on the [CLS] hidden state) and a 2-way classifier decide whether the caption belongs to the
  image, cross-entropy against :class:`~mmm.batch.PairTargets` ``labels``.
* WRA (``wra_weight`` > 0): the optimal transport distance between each pair's contextualised word
  and image-token embeddings, with the cosine distance as cost and uniform marginals, solved by
  IPOT (:mod:`mmm.objectives.optimal_transport`). As in UNITER, matched pairs' distances are
  minimised and mismatched pairs' maximised: ``wra = (Σ_pos d − Σ_neg d) / B``, and the loss adds
  ``wra_weight · wra``. All pairs are solved at once on padded, masked problems.

Negatives (``negatives``):

* ``batch`` -- the data stage swapped captions in-batch (``itm`` batches, UNITER's random ITM);
* ``hard`` -- mined by contrastive similarity (ALBEF, Li et al. 2021; UNITER's ITM-hard) on ``itc``
  batches, by the model: the head names the step strategy
  :class:`~mmm.steps.hard_negatives.HardNegativeMining` (``step``), which the builder gives the
  model; the model runs it between its shared pass and this head, and the head scores the mined
  joint batch it returns like any other. Train ``itc`` on the same task (``objectives: [itc, itm]``,
  ``options: {mode: itc}``). ``itm`` batches still score as with ``batch`` negatives (evaluation).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import PackedBatch, PairTargets
from mmm.config import EncoderConfig
from mmm.objectives.base import ObjectiveOutput, global_mean, in_lockstep, zero_output
from mmm.objectives.optimal_transport import cosine_cost, ot_distance, pad_by_group
from mmm.registry import OBJECTIVES


@OBJECTIVES.register("itm")
class ImageTextMatching(nn.Module):
    """ITM head (pooler → linear(2)) and, optionally, the WRA optimal-transport loss.

    Args:
        dim, embedders, encoder_cfg: given by the model builder (see :mod:`mmm.objectives.base`).
        wra_weight: weight of the word-region alignment loss added to the ITM loss (0 = off; UNITER: 0.1).
        ot_beta: IPOT proximal step β (UNITER: 0.5).
        ot_iterations: IPOT outer iterations (UNITER: 50).
        ot_inner: Sinkhorn scalings per IPOT iteration (UNITER: 1).
        target: key of the :class:`~mmm.batch.PairTargets` in ``batch.targets``.
        negatives: ``batch`` (in-batch caption swaps from the data) or ``hard`` (mined by similarity: the
            head asks the model for the ``itm_hard_negatives`` step strategy, see ``step``).
        similarity_head: with ``hard``, the contrastive head whose projections rank the candidates.
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 wra_weight: float = 0.0, ot_beta: float = 0.5, ot_iterations: int = 50, ot_inner: int = 1,
                 target: str = "itm", negatives: str = "batch", similarity_head: str = "itc") -> None:
        super().__init__()
        if negatives not in ("batch", "hard"):
            raise ValueError(f"objective itm: negatives must be 'batch' or 'hard', got {negatives!r}")
        self.negatives, self.similarity_head = negatives, similarity_head
        # the model-level step strategy (registry name, arguments) whose output this head reads, or None
        self.step = ("itm_hard_negatives", {"similarity_head": similarity_head, "target": target}) \
            if negatives == "hard" else None
        if wra_weight < 0:
            raise ValueError(f"objective itm: wra_weight must be ≥ 0 (0 = WRA off), got {wra_weight}")
        if ot_beta <= 0 or ot_iterations < 1 or ot_inner < 1:
            raise ValueError(f"objective itm: need ot_beta > 0, ot_iterations ≥ 1, ot_inner ≥ 1; got ot_beta={ot_beta}, "
                             f"ot_iterations={ot_iterations}, ot_inner={ot_inner}")
        self.wra_weight, self.target = float(wra_weight), target
        self.ot_args = dict(beta=float(ot_beta), iterations=int(ot_iterations), inner=int(ot_inner))
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, 2)
        self._metrics = ("acc", "wra") if self.wra_weight > 0 else ("acc",)

    def wra(self, hidden: torch.Tensor, t: PairTargets) -> torch.Tensor:
        """(B,) OT distance between each pair's text-token and image-token hidden states."""
        b = t.count
        text_len, image_len = t.longest if t.longest is not None else (None, None)  # host counts: no device read
        text, text_mask = pad_by_group(hidden.index_select(0, t.text_positions).float(), t.text_pair, b,
                                       text_len)  # (B, n, d)
        image, image_mask = pad_by_group(hidden.index_select(0, t.image_positions).float(), t.image_pair, b,
                                         image_len)  # (B, m, d)
        cost = cosine_cost(text, image)  # (B, n, m)
        distance, _ = ot_distance(cost, text_mask, image_mask, **self.ot_args)  # (B,)
        return distance

    def logits(self, hidden: torch.Tensor, t: PairTargets) -> torch.Tensor:
        """(B, 2) match logits of the pairs of ``t`` (pooler on each pair's [CLS], then the classifier)."""
        pooled = torch.tanh(self.pooler(hidden.index_select(0, t.cls_positions)))  # (B, d)
        return self.classifier(pooled).float()  # (B, 2)

    def predict(self, hidden: torch.Tensor, t: PairTargets) -> torch.Tensor:
        """(B,) 1 where the head judges the caption to match the image (evaluation)."""
        return self.logits(hidden, t).argmax(-1)

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) encoder output → ITM cross-entropy (+ ``wra_weight`` · WRA) and accuracy.

        Args:
            hidden: the batch's encoder output.
            batch: an ``itm`` batch, or with ``negatives: hard`` the joint batch the model's step strategy
                mined from an ``itc`` batch.
        """
        t = batch.targets.get(self.target)
        if t is None or t.count == 0:
            return zero_output(hidden, self, self._metrics)
        if not isinstance(t, PairTargets):
            raise TypeError(f"objective itm: batch.targets[{self.target!r}] is a {type(t).__name__}, expected PairTargets")
        logits = self.logits(hidden, t)  # (B, 2)
        loss_sum = F.cross_entropy(logits, t.labels, reduction="sum")
        metrics = {"acc": (logits.detach().argmax(-1) == t.labels).float().mean()}
        if self.wra_weight > 0:
            distance = self.wra(hidden, t)  # (B,)
            ot_sum = torch.where(t.labels == 1, distance, -distance).sum()  # matched pairs closer, others farther
            loss_sum = loss_sum + self.wra_weight * ot_sum
            metrics["wra"] = (ot_sum / t.count).detach()
        # summed over this rank's pairs / global pair count: exact under DDP (the mean over pairs on one rank)
        return ObjectiveOutput(global_mean(loss_sum, t.count, in_lockstep(self)), metrics, t.count)
