"""Region embedder and modality: precomputed detector regions as image tokens (UNITER, LXMERT).

UNITER (Chen et al. 2020, "UNITER: UNiversal Image-TExt Representation Learning") and LXMERT
(Tan & Bansal 2019) stand for an image by the regions of a frozen object detector: per region a
pooled feature vector ``f`` (2048-d for Faster R-CNN) and its box geometry ``b`` (UNITER's 7-d
``x1, y1, x2, y2, w, h, w*h`` normalised by the image size). A region token is

    LN(LN(W_f f) + LN(W_b b) [+ p]) -> dropout

with ``p`` an optional learned position (``model.regions.position``; UNITER has none, the box
places the region). Masked region modeling hides a region by zeroing its features before the
projection, as UNITER does; its box stays visible.

Regions have no stand-alone stream: they come from image-text shards, through the ``image_text``
modality (:mod:`mmm.modalities.image_text.modality`), which builds their batches.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from mmm.config import ComponentConfig, EncoderConfig, ModelConfig, RegionConfig
from mmm.core.dropout import Dropout
from mmm.core.position import AbsolutePositions
from mmm.data.epoch import EpochCounter
from mmm.modalities.base import Handler, Modality
from mmm.registry import EMBEDDERS, MODALITIES

REGION_POSITIONS = ("none", "learned")


@EMBEDDERS.register("regions")
class RegionEmbedder(nn.Module):
    """Packed region features and boxes → (N, d) tokens.

    Args:
        dim: token size (the encoder width).
        feature_dim: size of one region feature vector.
        box_dim: size of one box geometry vector (7 for UNITER's geometry).
        max_regions: most regions per image (size of the learned position table).
        position: ``none`` (the box places the region, UNITER) or ``learned`` positions per region index.
        norm_eps: LayerNorm epsilon.
        dropout: dropout on the output tokens.
    """

    def __init__(self, dim: int, feature_dim: int, box_dim: int = 7, max_regions: int = 100, position: str = "none",
                 norm_eps: float = 1e-12, dropout: float = 0.1) -> None:
        super().__init__()
        if position not in REGION_POSITIONS:
            raise ValueError(f"unknown region position kind {position!r}; expected one of {REGION_POSITIONS}")
        for name, value in (("feature_dim", feature_dim), ("box_dim", box_dim), ("max_regions", max_regions)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RegionEmbedder: {name} must be an int >= 1, got {value!r}")
        self.dim, self.feature_dim, self.box_dim, self.max_regions = dim, feature_dim, box_dim, max_regions
        self.feature_proj = nn.Linear(feature_dim, dim)
        self.feature_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.box_proj = nn.Linear(box_dim, dim)
        self.box_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.positions = AbsolutePositions(position, max_regions, dim) if position == "learned" else None
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.dropout = Dropout(dropout)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed packed regions.

        Args:
            features: (N, F) float region features.
            boxes: (N, G) float box geometry.
            mask: (N,) bool, True = hidden region (its features are zeroed); None = nothing hidden.
            position_ids: (N,) int64 index of each region in its image; needed with learned positions.

        Returns:
            (N, d) tokens.
        """
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"region features must be (N, feature_dim={self.feature_dim}), got {tuple(features.shape)}")
        if boxes.dim() != 2 or boxes.shape != (features.shape[0], self.box_dim):
            raise ValueError(f"region boxes must be (N={features.shape[0]}, box_dim={self.box_dim}), got "
                             f"{tuple(boxes.shape)}")
        dtype = self.feature_proj.weight.dtype
        f = features.to(dtype)  # (N, F)
        if mask is not None:
            if mask.shape != (features.shape[0],) or mask.dtype != torch.bool:
                raise ValueError(f"region mask must be a ({features.shape[0]},) bool tensor, got "
                                 f"{tuple(mask.shape)} {mask.dtype}")
            f = f.masked_fill(mask[:, None], 0.0)  # (N, F) hidden regions zeroed (UNITER)
        x = self.feature_norm(self.feature_proj(f)) + self.box_norm(self.box_proj(boxes.to(dtype)))  # (N, d)
        if self.positions is not None:
            if position_ids is None:
                raise ValueError("RegionEmbedder(position='learned') needs position_ids (each region's index in its "
                                 "image); pass them, or use model.regions.position: none")
            x = x + self.positions(position_ids)  # (N, d)
        return self.dropout(self.norm(x))  # (N, d)


@MODALITIES.register("regions")
class RegionModality(Modality):
    """Detector regions as image tokens; builds the region embedder and the region masker.

    It feeds batches only through image-text tasks (``image_text`` with
    ``model.image_text.image_input: regions``); it has no stream of its own.
    """

    name = "regions"
    order = 50
    config_class = RegionConfig
    config_help = "precomputed image-region features (vision-language)"
    masks = ("region",)
    masks_what = "image regions"
    masker_hint = " (regions are masked through image_text tasks with options.mode: mrm)"

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__(model_cfg)
        self.cfg = model_cfg.regions
        if self.cfg.position not in REGION_POSITIONS:
            raise ValueError(f"model.regions.position must be one of {REGION_POSITIONS}, got {self.cfg.position!r}")

    def build_embedder(self, encoder_cfg: EncoderConfig) -> nn.Module:
        c = self.cfg
        return EMBEDDERS.create("regions", dim=encoder_cfg.dim, feature_dim=c.feature_dim, box_dim=c.box_dim,
                                max_regions=c.max_regions, position=c.position, norm_eps=encoder_cfg.norm_eps,
                                dropout=encoder_cfg.dropout)

    def build_masker(self, masking: ComponentConfig) -> Any:
        return self.create_masker(masking)

    def stages(self, masker: Any, *, batch_size: int, seed: int, handler: Handler, fixed_masking: bool,
               epochs: Optional[EpochCounter], train: bool, options: Optional[Dict[str, Any]] = None) -> List:
        raise ValueError("modality 'regions' has no stream of its own: region features are used through image_text "
                         "tasks (data.dataset: image_text, model.image_text.image_input: regions, options.mode: "
                         "mlm | mrm | itm | itc)")

    def settings(self) -> Dict[str, Any]:
        c = self.cfg
        return {"feature_dim": c.feature_dim, "box_dim": c.box_dim, "max_regions": c.max_regions,
                "position": c.position}
