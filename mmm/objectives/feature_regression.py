"""Masked feature regression: predict the input features of every hidden token (mask-token mode).

The acoustic counterpart of masked image modeling by pixel regression: AudioMAE (Huang et al.
2022, "Masked Autoencoders that Listen") regresses the log-mel patches of hidden spectrogram
patches with an MSE, like MAE (He et al. 2022) on pixels, optionally against per-patch
normalised targets (MAE's ``norm_pix_loss``); here the encoder sees mask embeddings in place of
hidden tokens (as SimMIM, Xie et al. 2022, and MAE-AST-style frame models do) and a light head
maps each hidden token's encoding back to its features. Targets are the unmodified input
features at the hidden rows, ``batch.inputs[modality].features[mask]``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import FeatureInput, PackedBatch
from mmm.config import EncoderConfig
from mmm.objectives.base import ObjectiveOutput, global_mean, in_lockstep, zero_output
from mmm.registry import OBJECTIVES


def normalize_tokens(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token standardisation of (M, F) feature targets (MAE's ``norm_pix_loss`` applied to tokens)."""
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + eps).sqrt()


@OBJECTIVES.register("masked_features")
class MaskedFeatureRegression(nn.Module):
    """Linear (or one-hidden-layer MLP) head from hidden tokens' encodings to their features; MSE.

    Args:
        dim: encoder width (given by the builder).
        embedders: the model's embedders (given by the builder; the modality's one gives ``feature_dim``).
        encoder_cfg: the shared encoder's config (given by the builder; its LayerNorm epsilon).
        modality: name of the feature-token modality (``audio``).
        hidden: MLP hidden size (Linear → GELU → LayerNorm → Linear); 0 = a single linear layer.
        norm_targets: regress per-token standardised features instead of the raw (normalised log-mel) values.
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: Optional[EncoderConfig] = None,
                 modality: str = "audio", hidden: int = 0, norm_targets: bool = False) -> None:
        super().__init__()
        emb = embedders.get(modality)
        if emb is None or not hasattr(emb, "feature_dim"):
            raise ValueError(f"objective masked_features: no feature-token embedder named {modality!r} "
                             f"(modalities: {sorted(embedders)})")
        if hidden < 0:
            raise ValueError(f"objective masked_features: hidden must be >= 0, got {hidden}")
        self.modality, self.feature_dim, self.norm_targets = modality, int(emb.feature_dim), norm_targets
        eps = encoder_cfg.norm_eps if encoder_cfg is not None else 1e-12
        if hidden:
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps),
                                      nn.Linear(hidden, self.feature_dim))
        else:
            self.head = nn.Linear(dim, self.feature_dim)

    def target(self, features: torch.Tensor) -> torch.Tensor:
        """(M, F) regression targets of the hidden tokens' (M, F) input features."""
        t = features.float()
        return normalize_tokens(t) if self.norm_targets else t

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        inp = batch.inputs.get(self.modality)
        if not isinstance(inp, FeatureInput):
            raise ValueError(f"objective masked_features needs a feature input named {self.modality!r}; the batch has "
                             f"{sorted(batch.inputs)}")
        if inp.mask is None or inp.hidden_count == 0 or (inp.hidden_count is None and not bool(inp.mask.any())):
            return zero_output(hidden, self)
        h = hidden if inp.index is None else hidden.index_select(0, inp.index)  # (N_m, d)
        rows = inp.hidden_positions()  # (M,) no device read when the count came from the host
        pred = self.head(h.index_select(0, rows))  # (M, F)
        target = self.target(inp.features.index_select(0, rows))  # (M, F)
        count = int(target.shape[0])
        # per-token mean squared error, summed; / global token count: exact under DDP (the plain mean on one rank)
        loss_sum = F.mse_loss(pred.float(), target, reduction="sum") / self.feature_dim
        return ObjectiveOutput(global_mean(loss_sum, count, in_lockstep(self)), {}, count)
