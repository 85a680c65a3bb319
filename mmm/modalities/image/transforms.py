"""Image augmentation and normalization for masked image modeling, seeded by an explicit generator.

:func:`train_transform` is the augmentation of MAE (He et al. 2022, "Masked Autoencoders Are
Scalable Vision Learners"): a random resized crop (scale (0.2, 1.0), aspect ratio (3/4, 4/3),
bicubic) and a horizontal flip. The crop box and the flip are drawn from the
``np.random.Generator`` the caller passes (never torch's global RNG), so the same generator state
gives the same pixels, which exact mid-epoch resume depends on. :func:`eval_transform` is
deterministic. Both return ``uint8`` tensors ``(3, size, size)``: images stay uint8 (4x smaller
than float) through the data loader's inter-process queues, and :func:`normalize` turns a
collated batch into floats afterwards, ideally on the accelerator.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from mmm.modalities.image.decode import to_rgb

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "denormalize",
    "eval_transform",
    "normalize",
    "sample_crop_box",
    "train_transform",
]

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of ImageNet-1k on the [0, 1] scale."""
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of ImageNet-1k on the [0, 1] scale."""

ImageLike = Union[Image.Image, torch.Tensor]
_BICUBIC = InterpolationMode.BICUBIC


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (output side in pixels), got {size!r}")
    return size


def _check_range(name: str, value: Sequence[float], upper: float) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not (0.0 < lo <= hi <= upper):
        raise ValueError(f"{name} must satisfy 0 < low <= high <= {upper}, got {value!r}")
    return lo, hi


def _prepare(img: ImageLike) -> Tuple[ImageLike, int, int]:
    """An RGB PIL image or a (3, H, W) uint8 tensor, with its (height, width)."""
    if isinstance(img, Image.Image):
        img = to_rgb(img)
        return img, img.height, img.width
    if isinstance(img, torch.Tensor):
        if img.ndim != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
            raise ValueError(f"expected a (3, H, W) uint8 image tensor, got shape {tuple(img.shape)} dtype {img.dtype}")
        return img, int(img.shape[1]), int(img.shape[2])
    raise TypeError(f"expected a PIL image or a (3, H, W) uint8 tensor, got {type(img).__name__}")


def _to_tensor(img: ImageLike) -> torch.Tensor:
    return TF.pil_to_tensor(img) if isinstance(img, Image.Image) else img.contiguous()


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: Tuple[float, float] = (0.2, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Tuple[int, int, int, int]:
    """Draw a random-resized-crop box ``(top, left, h, w)`` from ``rng``.

    Up to ``attempts`` times: draw an area fraction uniformly from ``scale`` and an aspect ratio
    (w / h) log-uniformly from ``ratio``; keep the first box that fits in the image, at a uniform
    position. If none fits, fall back to the largest centred box whose aspect ratio is clamped
    into ``ratio`` (the same scheme as torchvision's ``RandomResizedCrop``).

    Args:
        height: image height in pixels.
        width: image width in pixels.
        rng: the generator to draw from.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        attempts: boxes drawn before the fallback.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect_in = width / height
    if aspect_in < ratio[0]:
        w, h = width, max(1, int(round(width / ratio[0])))
    elif aspect_in > ratio[1]:
        w, h = max(1, int(round(height * ratio[1]))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(
    img: ImageLike,
    rng: np.random.Generator,
    size: int,
    scale: Tuple[float, float] = (0.2, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> torch.Tensor:
    """MAE training augmentation: random resized crop (bicubic, antialiased) then horizontal flip.

    Draw order from ``rng``: the crop box (:func:`sample_crop_box`), then one uniform for the flip.

    Args:
        img: an RGB PIL image (other modes are converted with ``to_rgb``) or a (3, H, W) uint8 tensor.
        rng: the generator to draw from (seeded per sample/worker by the pipeline).
        size: output side in pixels.
        scale: crop area range as a fraction of the image.
        ratio: crop aspect-ratio (width / height) range.
        hflip: probability of a horizontal flip.

    Returns:
        (3, size, size) uint8 tensor.
    """
    _check_size(size)
    scale = _check_range("scale", scale, 1.0)
    ratio = _check_range("ratio", ratio, math.inf)
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
    img, height, width = _prepare(img)
    top, left, h, w = sample_crop_box(height, width, rng, scale, ratio)
    out = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=_BICUBIC, antialias=True)
    if rng.random() < hflip:
        out = TF.horizontal_flip(out)
    return _to_tensor(out)  # (3, size, size) uint8


MAX_EVAL_ASPECT = 8
"""Longer side over shorter side above which :func:`eval_transform` first crops the image's centre to this ratio."""


def eval_transform(img: ImageLike, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """Evaluation transform: resize the shorter side to ``round(size / crop_pct)``, centre-crop ``size``.

    An image longer than :data:`MAX_EVAL_ASPECT` times its shorter side is first cropped around its centre to that
    ratio (the part the centre crop keeps, with a margin): resizing an 8 x 8,000,000 strip whole would need about
    140 GiB. The cut is even, so the kept part is centred exactly. Up to that ratio the result is exactly
    torchvision's ``Resize`` + ``CenterCrop``.

    With the default ``crop_pct=1.0`` the shorter side becomes ``size`` and only the longer side is
    cropped (a square image is simply resized to ``size``, so small images such as 32x32 lose no
    border). ``crop_pct=0.875`` is the usual ImageNet evaluation (resize to 256, crop 224).

    Args:
        img: an RGB PIL image (other modes are converted) or a (3, H, W) uint8 tensor.
        size: output side in pixels.
        crop_pct: fraction of the resized shorter side kept by the centre crop, in (0, 1].

    Returns:
        (3, size, size) uint8 tensor.
    """
    _check_size(size)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    img, h, w = _prepare(img)
    if max(h, w) > MAX_EVAL_ASPECT * min(h, w):  # a thin strip: resizing it whole could take gigabytes
        keep = MAX_EVAL_ASPECT * min(h, w)
        keep += (max(h, w) - keep) % 2  # an even cut: the kept part is centred exactly
        img = TF.center_crop(img, [min(h, keep), min(w, keep)])
    short = max(size, int(round(size / crop_pct)))
    out = TF.resize(img, [short], interpolation=_BICUBIC, antialias=True)
    out = TF.center_crop(out, [size, size])
    return _to_tensor(out)  # (3, size, size) uint8


def _stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected images shaped (..., 3, H, W), got shape {tuple(x.shape)}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=x.device).view(3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images -> float, scaled to [0, 1] then standardized with ImageNet mean and std.

    Args:
        images: (B, 3, H, W) or (3, H, W) uint8 tensor (any device).
        dtype: floating dtype of the result.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got dtype {images.dtype} (already normalized?)")
    if not dtype.is_floating_point:
        raise ValueError(f"normalize: dtype must be a floating dtype, got {dtype}")
    x = images.to(dtype)
    mean, std = _stats(x)
    return (x / 255.0 - mean) / std


def denormalize(images: torch.Tensor, to_uint8: bool = False) -> torch.Tensor:
    """Undo :func:`normalize`: float images back on the [0, 1] scale (or uint8 0..255).

    Args:
        images: (B, 3, H, W) or (3, H, W) float tensor from :func:`normalize` (or a model's output).
        to_uint8: clamp to [0, 1] and return rounded uint8 values (for saving or display).
    """
    if not images.is_floating_point():
        raise ValueError(f"denormalize expects float images, got dtype {images.dtype}")
    mean, std = _stats(images)
    out = images * std + mean
    return (out.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8) if to_uint8 else out
