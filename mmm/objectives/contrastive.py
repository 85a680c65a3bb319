"""CLIP-style image-text contrastive learning (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision") with the shared encoder as both towers.

The batch holds B images and their B captions, each its own sequence
(:class:`~mmm.batch.ContrastiveTargets`). A caption's embedding is a linear projection of its
[CLS] hidden state; an image's is a projection of the mean of its token hidden states (patches
or regions; pooled with ``index_add``). Both are L2-normalised, scaled by a learned temperature
(``logit_scale`` stored as a log, initialised to 1/0.07 and clamped at 100 as in CLIP), and
scored with the symmetric InfoNCE loss of ``open_clip.loss.ClipLoss``, which gathers the
embeddings of every rank (with gradients) under ``torch.distributed``.

Under DDP the loss is the one over the gathered global batch, not a count-normalised sum like the
other heads': every rank scores all pairs (``local_loss: false``; each rank logs the same loss),
and the gather's backward sums every rank's gradient, which DDP's averaging turns back into the
gradient of that one loss. With ``local_loss: true`` each rank scores its own rows against all
columns and the ranks' mean is the global loss only when every rank holds the same number of
pairs, which the gather needs anyway (every rank must bring the same batch size). Validation
gathers nothing: each batch is scored against its own pairs, as on one process.

:meth:`ImageTextContrastive.embed_pairs` gives the normalised embeddings for retrieval evaluation.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmm.batch import ContrastiveTargets, PackedBatch
from mmm.config import EncoderConfig
from mmm.objectives.base import ObjectiveOutput, in_lockstep, zero_output
from mmm.registry import OBJECTIVES


def mean_pool(tokens: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """(R, d) tokens, (R,) owner in [0, count) → (count, d) per-owner means (zero for an owner without tokens)."""
    sums = tokens.new_zeros(count, tokens.shape[-1]).index_add(0, owner, tokens)  # (B, d)
    n = torch.bincount(owner, minlength=count).clamp_min(1).to(tokens.dtype)  # (B,)
    return sums / n[:, None]


@OBJECTIVES.register("itc")
class ImageTextContrastive(nn.Module):
    """Projections, learned temperature and the CLIP loss over in-batch (and cross-rank) pairs.

    Args:
        dim: encoder width (given by the builder).
        embedders: the model's embedders (given by the builder; unused).
        encoder_cfg: the shared encoder's config (given by the builder; unused).
        embed_dim: size of the joint embedding space; None = ``dim``.
        init_temperature: initial softmax temperature (CLIP: 0.07, i.e. logit scale 14.3).
        max_logit_scale: clamp of the logit scale (CLIP: 100).
        local_loss: with several ranks, score only this rank's rows against all (open_clip's
            ``local_loss``; less memory, same gradient); False = every rank computes the full matrix.
        target: key of the :class:`~mmm.batch.ContrastiveTargets` in ``batch.targets``.
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 embed_dim: Optional[int] = None, init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 local_loss: bool = False, target: str = "itc") -> None:
        super().__init__()
        from open_clip.loss import ClipLoss

        if not 0 < init_temperature or not 1.0 / init_temperature <= max_logit_scale:
            raise ValueError(f"objective itc: need 0 < init_temperature and 1/init_temperature ≤ max_logit_scale; got "
                             f"init_temperature={init_temperature}, max_logit_scale={max_logit_scale}")
        self.embed_dim = int(embed_dim or dim)
        self.init_temperature, self.max_logit_scale, self.target = init_temperature, float(max_logit_scale), target
        self.image_proj = nn.Linear(dim, self.embed_dim, bias=False)
        self.text_proj = nn.Linear(dim, self.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP initialisation: projections N(0, dim^-1/2), logit scale log(1/init_temperature)."""
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1.0 / self.init_temperature))

    def scale(self) -> torch.Tensor:
        """The logit scale ``exp(logit_scale)`` clamped at ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def embed_pairs(self, hidden: torch.Tensor, targets: ContrastiveTargets) -> Tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised ``(image_emb (B, E), text_emb (B, E))`` in float32; row ``i`` of each is pair ``i``.

        Args:
            hidden: (N, d) encoder output of the batch.
            targets: its :class:`~mmm.batch.ContrastiveTargets`.
        """
        b = targets.count
        text = hidden.index_select(0, targets.text_positions)  # (B, d)
        image = mean_pool(hidden.index_select(0, targets.image_positions).float(), targets.image_owner, b)  # (B, d)
        image_emb = F.normalize(self.image_proj(image.to(text.dtype)).float(), dim=-1)  # (B, E)
        text_emb = F.normalize(self.text_proj(text).float(), dim=-1)  # (B, E)
        return image_emb, text_emb

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) encoder output → symmetric contrastive loss and in-batch retrieval accuracies."""
        t = batch.targets.get(self.target)
        if t is None or t.count == 0:
            # no count all-reduce: ClipLoss gathers embeddings instead (see the module docstring)
            return zero_output(hidden, self, ("i2t_acc", "t2i_acc", "logit_scale"), sync_count=False)
        if not isinstance(t, ContrastiveTargets):
            raise TypeError(f"objective itc: batch.targets[{self.target!r}] is a {type(t).__name__}, "
                            f"expected ContrastiveTargets")
        image, text = self.embed_pairs(hidden, t)  # (B, E), (B, E)
        scale = self.scale()
        # gather only in training steps (every rank takes them); validation scores each batch's own pairs,
        # as one process does, since ranks may hold different numbers of validation batches
        distributed = in_lockstep(self) and dist.is_available() and dist.is_initialized()
        self.loss_fn.rank = dist.get_rank() if distributed else 0
        self.loss_fn.world_size = dist.get_world_size() if distributed else 1
        loss = self.loss_fn(image, text, scale)
        with torch.no_grad():
            logits = image @ text.T  # (B, B) local pairs; the scale does not change the argmax
            truth = torch.arange(t.count, device=logits.device)
            metrics = {"i2t_acc": (logits.argmax(1) == truth).float().mean(),
                       "t2i_acc": (logits.argmax(0) == truth).float().mean(),
                       "logit_scale": scale.detach()}
        return ObjectiveOutput(loss, metrics, t.count)
