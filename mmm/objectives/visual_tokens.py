"""Masked visual-token modeling (MVM): classify each hidden image patch into a visual-token codebook.

VIOLET (Fu et al. 2021, "VIOLET: End-to-End Video-Language Transformers with Masked Visual-token
Modeling") tokenizes the original frame patches into discrete visual tokens and trains the
video-language transformer to recover the tokens of the masked patches, with the caption
visible; E-ViLM (Fang et al. 2023) does the same with a semantic vector-quantized tokenizer.
Both use a pretrained tokenizer network. Here the tokens are teacher-free: the image modality's
k-means codebook over per-patch standardised pixels (``model.image.visual_tokens``, fitted once
per run on the training images, :mod:`mmm.modalities.image.modality`), the same codes BEiT-style
image tasks predict. The image-text pipeline labels every hidden patch of an ``mrm`` batch with
the code of its original pixels (``targets["image_tokens"]``), and in an image task the image
pipeline does, so one ``mvm`` head can serve both.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from mmm.batch import ImageInput, PackedBatch
from mmm.config import EncoderConfig
from mmm.objectives.base import ObjectiveOutput
from mmm.objectives.token_targets import TokenTargetClassification
from mmm.registry import OBJECTIVES


@OBJECTIVES.register("mvm")
class MaskedVisualTokenModeling(nn.Module):
    """Dense → GELU → LayerNorm → linear over the codebook at the hidden patches; cross-entropy; logs ``acc``.

    Args:
        dim: encoder width (given by the builder).
        embedders: the model's embedders (given by the builder; ``modality`` must be a patch embedder).
        encoder_cfg: the shared encoder's config (given by the builder; its LayerNorm epsilon).
        num_classes: the codebook size, ``model.image.visual_tokens``.
        modality: the image modality whose patches are hidden.
        target: key of the visual-token targets in ``batch.targets``.
    """

    reports_perplexity = True  # the trainer logs val/<head>_ppl from the token-weighted loss
    reads_token_targets = True  # its target and num_classes are checked against the run's codebooks (target_check)

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: Optional[EncoderConfig] = None,
                 num_classes: Optional[int] = None, modality: str = "image", target: str = "image_tokens") -> None:
        super().__init__()
        if not hasattr(embedders.get(modality), "patch_size"):
            raise ValueError(f"objective mvm predicts visual tokens of image patches, but there is no patch image "
                             f"embedder named {modality!r} (modalities: {sorted(embedders)}); with "
                             f"model.image_text.image_input: regions use mrfr / mrc / mrc_kl")
        if num_classes is None or isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise ValueError(f"objective mvm: set num_classes to model.image.visual_tokens (the codebook size), "
                             f"got {num_classes!r}")
        self.modality, self.target = modality, target
        self.head = TokenTargetClassification(dim, embedders, encoder_cfg, target=target, num_classes=num_classes)

    def check_batch(self, batch: PackedBatch) -> None:
        """The codebook ids' range, on the host (:meth:`TokenTargetClassification.check_batch`)."""
        self.head.check_batch(batch)

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        """(N, d) encoder output → cross-entropy over the codebook at the hidden patches."""
        if self.target not in batch.targets:
            inp = batch.inputs.get(self.modality)
            hides = isinstance(inp, ImageInput) and inp.mask is not None and not inp.drop_masked and bool(inp.mask.any())
            if hides or "mrm" in batch.targets:
                raise ValueError(f"objective mvm: the batch hides image tokens but carries no visual-token targets "
                                 f"(batch.targets[{self.target!r}]); set model.image.visual_tokens > 0 (the image "
                                 f"modality's k-means codebook) and model.image_text.image_input: patches")
        return self.head(hidden, batch)
