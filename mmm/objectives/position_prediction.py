"""Position prediction (MP3: Zhai et al. 2022, "Position Prediction as an Effective Pretraining
Strategy").

The encoder's input carries **no position** -- ``model.image.position: none`` (or
``model.audio.position: none`` for audio tokens) and no relative positions in attention -- so a
token is known only by its content and by the other tokens it attends to. A linear head (or a
one-hidden-layer MLP) classifies each token into its position: a patch's cell of the image grid
(``num_patches`` classes), or an audio token's index in its sequence (the embedder's ``max_len``
classes). The loss is the cross-entropy over positions, averaged over the scored tokens.

Like MP3, a random subset of the patches is hidden to make the task harder and to cut the
encoder's cost; here hidden patches are dropped from the stream (``drop_masked``, any patch
masker), so only the visible patches are encoded and scored (MP3 keeps every patch as a query
and removes the hidden ones from the keys and values). In mask-token mode, hidden tokens are
mask embeddings, which carry nothing to locate, and are not scored either. A [CLS] token is
never scored.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import FeatureInput, ImageInput, PackedBatch
from mmm.config import EncoderConfig
from mmm.core.packing import mask_positions
from mmm.objectives.base import ObjectiveOutput, global_mean, in_lockstep, zero_output
from mmm.registry import OBJECTIVES


@OBJECTIVES.register("mp3")
class PositionPrediction(nn.Module):
    """Classify every visible token's position, from an input without position embeddings.

    Args:
        dim: encoder width (given by the builder).
        embedders: the model's embedders (given by the builder; the modality's one must add no position).
        encoder_cfg: the shared encoder's config (given by the builder; it must have no relative positions).
        modality: ``image`` (patch-grid cells) or an audio modality (positions in the sequence) (config).
        hidden: MLP hidden size (Linear → GELU → LayerNorm → Linear); 0 = one linear layer (config).
        label_smoothing: cross-entropy label smoothing (config).
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig,
                 modality: str = "image", hidden: int = 0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        emb = embedders.get(modality)
        if emb is None:
            raise ValueError(f"objective mp3: no embedder named {modality!r} (modalities: {sorted(embedders)})")
        if encoder_cfg.relative_position != "none":
            raise ValueError(f"objective mp3: encoder.relative_position is {encoder_cfg.relative_position!r}, which "
                             f"tells attention where each token is; position prediction needs 'none'")
        if hidden < 0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"objective mp3: hidden must be >= 0 and label_smoothing in [0, 1), got {hidden} and "
                             f"{label_smoothing}")
        if hasattr(emb, "visible_index"):
            if emb.position != "none":
                raise ValueError(f"objective mp3: the {modality!r} embedder adds {emb.position!r} positions, which "
                                 f"give the answer away; set model.image.position: none")
            self.num_positions = int(emb.num_patches)
        elif hasattr(emb, "feature_dim"):
            if emb.positions.kind != "none":
                raise ValueError(f"objective mp3: the {modality!r} embedder adds {emb.positions.kind!r} positions, "
                                 f"which give the answer away; set model.{modality}.position: none")
            self.num_positions = int(emb.max_len)
        else:
            raise ValueError(f"objective mp3: the {modality!r} embedder is neither an image patch embedder nor an "
                             f"audio feature embedder")
        self.modality, self.label_smoothing = modality, float(label_smoothing)
        self.prefix = int(getattr(emb, "num_prefix_tokens", 0))  # image: [CLS] before the patches
        if hidden:
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=encoder_cfg.norm_eps),
                                      nn.Linear(hidden, self.num_positions))
        else:
            self.head = nn.Linear(dim, self.num_positions)

    def scored(self, batch: PackedBatch) -> Optional[tuple]:
        """``(rows, labels)``: (M,) rows of the modality's tokens (in its own order) that are scored,
        and (M,) their positions; None when the batch has no such input."""
        inp = batch.inputs.get(self.modality)
        if inp is None:
            return None
        if isinstance(inp, ImageInput):
            from mmm.modalities.image.embedder import visible_patches

            dropped = inp.mask is not None and inp.drop_masked
            layout = inp.mask if dropped else torch.zeros(inp.num_images, self.num_positions, dtype=torch.bool,
                                                            device=inp.pixels.device)
            b, p, hidden = inp.num_images, self.num_positions, inp.hidden_count  # hidden: a host count, or None
            known = inp.mask is None or hidden is not None
            tokens = b * (self.prefix + p) - (hidden if dropped else 0) if known else None
            idx = visible_patches(layout, self.prefix, count=tokens)  # where each token of the stream came from
            keep = idx.patch >= 0  # not [CLS]
            if inp.mask is not None and not dropped:  # mask embeddings carry nothing to locate
                keep &= ~inp.mask[idx.image, idx.patch.clamp_min(0)]
            rows = mask_positions(keep, b * p - (hidden or 0) if known else None)
            return rows, idx.patch.index_select(0, rows)
        if isinstance(inp, FeatureInput):
            keep = torch.ones_like(inp.position_ids, dtype=torch.bool) if inp.mask is None else ~inp.mask
            known = inp.mask is None or inp.hidden_count is not None
            rows = mask_positions(keep, keep.shape[0] - (inp.hidden_count or 0) if known else None)
            return rows, inp.position_ids.index_select(0, rows)
        raise ValueError(f"objective mp3: the {self.modality!r} input is a {type(inp).__name__}, expected image "
                         f"patches or audio features")

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        found = self.scored(batch)
        if found is None or found[0].numel() == 0:
            return zero_output(hidden, self, ("acc",))
        rows, labels = found
        inp = batch.inputs[self.modality]
        h = hidden if inp.index is None else hidden.index_select(0, inp.index)  # (N_m, d)
        logits = self.head(h.index_select(0, rows)).float()  # (M, positions)
        count = int(labels.numel())
        loss_sum = F.cross_entropy(logits, labels, reduction="sum", label_smoothing=self.label_smoothing)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return ObjectiveOutput(global_mean(loss_sum, count, in_lockstep(self)), {"acc": acc}, count)
