"""Tests for image augmentation: determinism under an explicit generator, torchvision parity, normalization."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from mmm.modalities.image.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    eval_transform,
    normalize,
    sample_crop_box,
    train_transform,
)


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("hw", [(48, 64), (64, 40), (8, 200), (32, 32)])
def test_outputs_are_uint8_square(hw) -> None:
    img = random_image(*hw)
    out = train_transform(img, np.random.default_rng(0), 24)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    out = eval_transform(img, 24)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def test_train_transform_is_determined_by_the_generator_alone() -> None:
    img = random_image(50, 70)
    torch.manual_seed(0)
    a = train_transform(img, np.random.default_rng(7), 32)
    torch.manual_seed(123)  # torch's global RNG plays no part
    b = train_transform(img, np.random.default_rng(7), 32)
    assert torch.equal(a, b)
    others = [train_transform(img, np.random.default_rng(s), 32) for s in range(8, 12)]
    assert not any(torch.equal(a, o) for o in others)
    rng = np.random.default_rng(7)
    first, second = train_transform(img, rng, 32), train_transform(img, rng, 32)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances


def test_matches_torchvision_resized_crop_and_flip() -> None:
    img = random_image(60, 90)
    for seed in range(5):
        box = sample_crop_box(60, 90, np.random.default_rng(seed))
        expected = TF.pil_to_tensor(TF.resized_crop(img, *box, [32, 32], interpolation=T.InterpolationMode.BICUBIC))
        assert torch.equal(train_transform(img, np.random.default_rng(seed), 32, hflip=0.0), expected)
        assert torch.equal(train_transform(img, np.random.default_rng(seed), 32, hflip=1.0), expected.flip(-1))


def test_tensor_input_and_mode_conversion() -> None:
    img = random_image(40, 40)
    as_tensor = TF.pil_to_tensor(img)
    a = train_transform(img, np.random.default_rng(3), 16)
    b = train_transform(as_tensor, np.random.default_rng(3), 16)
    assert (a.int() - b.int()).abs().max() <= 2  # same box; PIL vs tensor bicubic rounding
    grey = train_transform(img.convert("L"), np.random.default_rng(3), 16)
    assert grey.shape == (3, 16, 16) and torch.equal(grey[0], grey[1])
    with pytest.raises(ValueError, match=r"\(3, H, W\) uint8"):
        train_transform(as_tensor.float(), np.random.default_rng(0), 16)


def test_crop_box_bounds_and_fallback() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = sample_crop_box(50, 80, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 80
        assert 0.15 * 4000 <= h * w <= 4000
    # no square box of >= 90% of a 100x10 image exists: the fallback is the centred 10x10 box
    assert sample_crop_box(10, 100, np.random.default_rng(0), scale=(0.9, 1.0), ratio=(1.0, 1.0)) == (0, 45, 10, 10)


def test_eval_transform_crops_a_thin_strip_before_resizing(monkeypatch) -> None:
    """An 8 x 40,000 strip passed the decode guards, then the short-side resize made it 224 x 1.1 M pixels (1 GiB;
    140 GiB at the 64 MP decode limit)."""
    from mmm.modalities.image import transforms

    wide = random_image(10, 80)  # exactly 8:1: left whole, the plain torchvision pipeline (computed before the spy)
    expected = TF.pil_to_tensor(T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(16)])(wide))
    seen = []
    real_resize = transforms.TF.resize

    def spy(img, *args, **kwargs):
        seen.append(img.size if isinstance(img, Image.Image) else tuple(img.shape[-2:])[::-1])
        return real_resize(img, *args, **kwargs)

    monkeypatch.setattr(transforms.TF, "resize", spy)
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 40000, 3), dtype=np.uint8))
    assert eval_transform(strip, 224).shape == (3, 224, 224)
    assert seen == [(64, 8)]  # the centre 8:1, then resized
    tall = torch.randint(0, 256, (3, 99, 7), dtype=torch.uint8)  # 99 > 8 x 7: cropped to 57 x 7 (an even cut)
    assert eval_transform(tall, 16).shape == (3, 16, 16) and seen[-1] == (7, 57)
    assert torch.equal(eval_transform(wide, 16), expected) and seen[-1] == (80, 10)


def test_eval_transform() -> None:
    img = random_image(40, 60)
    expected = TF.pil_to_tensor(T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32)])(img))
    assert torch.equal(eval_transform(img, 32), expected)
    square = random_image(32, 32)
    assert torch.equal(eval_transform(square, 32), TF.pil_to_tensor(square))  # crop_pct=1: nothing lost
    assert eval_transform(img, 224, crop_pct=0.875).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(img, 32, crop_pct=0.0)


def test_argument_errors_name_the_argument() -> None:
    img = random_image(20, 20)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="size"):
        train_transform(img, rng, 0)
    with pytest.raises(ValueError, match="scale"):
        train_transform(img, rng, 8, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio"):
        train_transform(img, rng, 8, ratio=(0.0, 1.0))
    with pytest.raises(ValueError, match="hflip"):
        train_transform(img, rng, 8, hflip=1.5)
    with pytest.raises(TypeError, match="PIL image"):
        train_transform(np.zeros((8, 8, 3), np.uint8), rng, 8)  # type: ignore[arg-type]


def test_normalize_and_denormalize() -> None:
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    x = normalize(batch)
    assert x.dtype == torch.float32 and x.shape == batch.shape
    ref = (batch.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-6)
    assert torch.equal(denormalize(x, to_uint8=True), batch)
    assert torch.allclose(denormalize(x), batch.float() / 255, atol=1e-6)
    assert normalize(batch[0], dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="uint8"):
        normalize(x)
    with pytest.raises(ValueError, match="float"):
        denormalize(batch)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        normalize(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
