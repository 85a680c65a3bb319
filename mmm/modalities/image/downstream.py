"""Image inputs downstream (``mmm embed``, ``mmm finetune``, probes): a PIL image.

Resized and centre-cropped to the encoder's size (the pretraining evaluation transform) and
ImageNet-normalised. ``mean`` pooling averages the patch tokens (MAE's global pool); ``cls`` reads the
[CLS] token of an encoder that has one, whose last block then runs for that row alone. Raw files: the
image formats PIL reads, decoded with the shard reader's guards (bombs, truncation, every mode to RGB).
Embedded tasks (:func:`image_tasks`): ``digits`` (real) and ``shapes`` (synthetic), read from the embedded
shard sets of the ``image`` dataset definition, built into the cache on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from mmm.downstream.inputs import InputAdapter, pool_padded
from mmm.downstream.tasks import DownstreamTask, embedded_shards, shard_splits
from mmm.modalities.image.decode import IMAGE_SUFFIXES



class ImageInputs(InputAdapter):
    """PIL images → normalised pixels → pooled patch tokens of an image encoder."""

    modality = "image"
    file_suffixes = tuple(sorted(IMAGE_SUFFIXES))

    def __init__(self, encoder: nn.Module, source: str = "") -> None:
        super().__init__(encoder, source)
        self.image_size = int(encoder.config.image_size)

    @property
    def has_cls(self) -> bool:
        return bool(self.encoder.config.cls_token)

    def prepare(self, raw: Any, where: str = "") -> torch.Tensor:
        from mmm.modalities.image.transforms import eval_transform, normalize

        return normalize(eval_transform(raw, self.image_size))  # (3, S, S)

    def forward(self, items: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(hidden (B, T, d), mask (B, T) bool)`` of prepared images, mask True on the patch tokens."""
        hidden = self.encoder(torch.stack(list(items)).to(self.device))  # (B, T, d)
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if self.encoder.config.cls_token:
            mask[:, 0] = False  # mean pooling over patch tokens (MAE's global pool); cls pooling reads row 0
        return hidden, mask

    def pooled(self, items: Sequence[torch.Tensor], pooling: str, cls_last_block: bool = True) -> torch.Tensor:
        if pooling == "cls" and cls_last_block:  # [CLS] alone in the last block
            return self.encoder(torch.stack(list(items)).to(self.device), first_token_only=True)  # (B, d)
        hidden, mask = self.forward(items)
        return pool_padded(hidden, mask, pooling)

    @classmethod
    def decode_sample(cls, sample: Dict[str, Any]) -> Tuple[Any, Optional[int]]:
        from mmm.modalities.image.pipeline import ImageSettings, read_image_sample

        img, meta = read_image_sample(sample, ImageSettings(image_size=32, patch_size=4, cls_token=False,
                                                            drop_masked=False, min_size=1))
        return img, meta.get("label")

    @classmethod
    def decode_file(cls, path: Path) -> Any:
        """The RGB PIL image of an image file (the shard reader's guards); ValueError names the file."""
        from mmm.modalities.image.decode import decode_image

        return decode_image(path.read_bytes(), str(path))


def image_tasks() -> Dict[str, DownstreamTask]:
    """The image modality's embedded tasks (:meth:`~mmm.modalities.image.modality.ImageModality.downstream_tasks`)."""
    return {
        "digits": DownstreamTask("image", "real", "scikit-learn handwritten digits (10 classes)",
                                 shard_splits(embedded_shards("image", "embedded_default_digits"), "image")),
        "shapes": DownstreamTask("image", "synthetic", "rendered shapes (shape class)",
                                 shard_splits(embedded_shards("image"), "image")),
    }
