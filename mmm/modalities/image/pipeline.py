"""Image stages of the streaming pipeline: decode → augment → mask → collate into a packed batch.

Decoding converts every PIL mode to RGB and refuses bombs, truncated files and tiny images
(:mod:`mmm.modalities.image.decode`); bad samples go to the pipeline's counting handler. Augmentation
(MAE's random resized crop + flip) and patch masks draw from a generator keyed by
(seed, rank, worker, epoch), so a resumed run sees the same crops and masks. Images stay uint8
until the collate step normalises the whole batch at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import webdataset as wds

from mmm.batch import ImageInput, PackedBatch, TokenTargets
from mmm.core.packing import PackedSeqInfo
from mmm.data.epoch import EpochCounter, SeededMap
from mmm.data.fields import first_field, sample_json, sample_where
from mmm.modalities.image.decode import ImageDecodeError, decode_image
from mmm.modalities.image.transforms import eval_transform, normalize, train_transform

Handler = Callable[[Exception], bool]
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ImageSample:
    """One decoded, augmented (and masked) image.

    Args:
        image: (3, S, S) uint8.
        mask: (P,) bool, True = hidden patch; None = unmasked.
        label: class label from the sample's json, -1 when absent.
        key: the sample's key.
    """

    image: torch.Tensor
    mask: Optional[np.ndarray]
    label: int
    key: str


@dataclass(frozen=True)
class ImageSettings:
    """What the image stages need from the config."""

    image_size: int
    patch_size: int
    cls_token: bool
    drop_masked: bool
    crop_scale: Tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    max_pixels: int = 64 * 1024 * 1024
    min_size: int = 8
    small_images: str = "upscale"

    @property
    def grid(self) -> Tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


def read_image_sample(sample: Dict[str, Any], settings: ImageSettings) -> Tuple[Any, Dict[str, Any]]:
    """(RGB PIL image, json metadata) of a raw shard sample; errors name the shard and key."""
    img = decode_image(sample[first_field(sample, IMAGE_FIELDS, "image", ImageDecodeError)], sample_where(sample),
                       max_pixels=settings.max_pixels, min_size=settings.min_size, policy=settings.small_images)
    return img, sample_json(sample, ImageDecodeError)


def _decode(src: Iterator[dict], settings: ImageSettings, handler: Handler) -> Iterator[Tuple[Any, Dict, str]]:
    for sample in src:
        try:
            img, meta = read_image_sample(sample, settings)
        except (ImageDecodeError, ValueError) as e:
            if handler(e):  # counts; raises unless skipping is configured
                continue
            raise
        yield img, meta, sample.get("__key__", "?")


class _AugmentAndMask:
    """``(image, meta, key), rng -> ImageSample``: crop/flip (train) or resize (eval), then the patch mask."""

    def __init__(self, settings: ImageSettings, masker: Optional[Any], train: bool) -> None:
        self.settings, self.masker, self.train = settings, masker, train

    def __call__(self, item: Tuple[Any, Dict, str], rng: np.random.Generator) -> ImageSample:
        img, meta, key = item
        s = self.settings
        if self.train:
            pixels = train_transform(img, rng, s.image_size, scale=s.crop_scale, hflip=s.hflip)
        else:
            pixels = eval_transform(img, s.image_size)
        mask = np.asarray(self.masker(s.grid, rng), dtype=bool) if self.masker is not None else None
        label = meta.get("label")
        return ImageSample(pixels, mask, int(label) if isinstance(label, int) else -1, key)


def patch_pixels(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) → (B, P, patch*patch*C) patches, row-major grid, channels last inside a patch (MAE's order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def visual_token_features(images: torch.Tensor, patch: int) -> np.ndarray:
    """(B, P, F) float32 per-patch-standardised pixels: the features a visual-token codebook clusters."""
    x = patch_pixels(images.float() / 255.0, patch)
    x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 0.05)
    return x.numpy().astype(np.float32)


def collate_images(samples: Sequence[ImageSample], settings: ImageSettings, codebook: Optional[Any] = None,
                   modality: str = "image") -> PackedBatch:
    """Stack images into one :class:`PackedBatch` (longest token run first).

    In MAE mode (``drop_masked``) an image contributes its [CLS] plus its visible patches; in
    mask-token mode all patches. With a ``codebook``, the batch carries ``targets["image_tokens"]``:
    the visual-token id of every hidden patch at its stream position (BEiT-style targets).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of images")
    prefix = 1 if settings.cls_token else 0
    num_patches = settings.grid[0] * settings.grid[1]
    masked = samples[0].mask is not None
    if masked:
        counts = [int(s.mask.sum()) for s in samples]
        lengths = [prefix + (num_patches - c if settings.drop_masked else num_patches) for c in counts]
    else:
        lengths = [prefix + num_patches] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: -lengths[i])
    samples = [samples[i] for i in order]
    lengths = [lengths[i] for i in order]
    images = torch.stack([s.image for s in samples])  # (B, 3, S, S) uint8
    mask = torch.from_numpy(np.stack([s.mask for s in samples])) if masked else None
    seq = PackedSeqInfo.from_seqlens(lengths)
    targets: Dict[str, Any] = {}
    if codebook is not None and mask is not None:
        if settings.drop_masked:
            raise ValueError("visual-token targets need mask-token mode (model.image.drop_masked: false): "
                             "in MAE mode hidden patches have no place in the encoder's output")
        ids = codebook.assign(visual_token_features(images, settings.patch_size).reshape(-1, codebook.dim))
        ids = torch.from_numpy(ids.reshape(len(samples), num_patches))
        starts = seq.cu_seqlens[:-1].long()[:, None] + prefix  # (B, 1)
        where = mask.nonzero()  # (M, 2) image, patch
        positions = (starts[where[:, 0], 0] + where[:, 1]).long()
        targets["image_tokens"] = TokenTargets(positions, ids[mask].long())
    extras = {"labels": torch.tensor([s.label for s in samples], dtype=torch.long), "keys": [s.key for s in samples]}
    return PackedBatch(seq, {modality: ImageInput(normalize(images), mask, settings.drop_masked)}, targets,
                       extras=extras)


def image_stages(settings: ImageSettings, masker: Optional[Any], *, batch_size: int, seed: int, handler: Handler,
                 fixed_masking: bool = False, epochs: Optional[EpochCounter] = None, train: bool = True,
                 codebook: Optional[Any] = None, modality: str = "image") -> List:
    """Pipeline stages turning image shard samples into :class:`~mmm.batch.PackedBatch` es.

    Args:
        settings: image size, patch grid, augmentation and decoding limits.
        masker: patch masker (``mae_random``, ``beit_block``, ``simmim_random``); None = no mask (probes).
        batch_size: images per batch (the last batch of a pass may be smaller).
        seed: seed of crops, flips and masks.
        handler: bad-sample handler.
        fixed_masking: the same crops and masks on every pass (validation).
        epochs: the pipeline's epoch counter.
        train: random resized crop + flip (True) or a plain resize (False).
        codebook: visual-token codebook for BEiT-style targets, or None.
        modality: the name batches key the input under.
    """
    return [
        wds.pipelinefilter(_decode)(settings, handler),
        SeededMap(_AugmentAndMask(settings, masker, train), seed, fixed_masking, epochs),
        wds.batched(batch_size, collation_fn=partial(collate_images, settings=settings, codebook=codebook,
                                                     modality=modality), partial=True),
    ]
