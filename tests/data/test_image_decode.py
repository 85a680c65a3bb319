"""Tests for image decoding: every PIL mode to RGB, corrupt and truncated data, the bomb guard, min size."""
from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from mmm.modalities.image.decode import BACKGROUND, ImageDecodeError, decode_image, read_header, to_rgb


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pixel(data: bytes, xy=(0, 0)):
    img = decode_image(data, "test.img")
    assert img.mode == "RGB"
    return img.getpixel(xy)


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims ``width`` x ``height`` but holds almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def blend(value: int, alpha: int, bg: int) -> int:
    return round((value * alpha + bg * (255 - alpha)) / 255)


def test_rgb_jpeg_png_webp_decode_to_same_size_rgb() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    src = Image.fromarray(arr)
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF"):
        img = decode_image(encode(src, fmt), f"x.{fmt.lower()}")
        assert img.mode == "RGB" and img.size == (30, 20)
    assert np.array_equal(np.asarray(decode_image(encode(src, "PNG"), "x")), arr)  # lossless round trip


def test_grey_palette_and_bilevel_modes() -> None:
    assert pixel(encode(Image.new("L", (4, 3), 100), "PNG")) == (100, 100, 100)
    assert pixel(encode(Image.new("1", (4, 3), 1), "PNG")) == (255, 255, 255)
    pal = Image.new("P", (4, 3), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert pixel(encode(pal, "PNG")) == (10, 200, 30)


def test_alpha_is_composited_onto_the_fixed_background() -> None:
    rgba = Image.new("RGBA", (2, 1), (200, 20, 40, 0))
    rgba.putpixel((1, 0), (200, 20, 40, 128))
    data = encode(rgba, "PNG")
    assert pixel(data, (0, 0)) == BACKGROUND
    assert pixel(data, (1, 0)) == tuple(blend(v, 128, b) for v, b in zip((200, 20, 40), BACKGROUND))
    la = Image.new("LA", (2, 1), (50, 255))
    la.putpixel((1, 0), (50, 0))
    assert pixel(encode(la, "PNG"), (0, 0)) == (50, 50, 50)
    assert pixel(encode(la, "PNG"), (1, 0)) == BACKGROUND


def test_palette_with_transparency_and_colour_key() -> None:
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    data = encode(pal, "PNG", transparency=0)
    assert pixel(data, (0, 0)) == BACKGROUND  # index 0 is transparent
    assert pixel(data, (1, 0)) == (0, 0, 255)
    gif = encode(pal, "GIF", transparency=0)
    assert pixel(gif, (0, 0)) == BACKGROUND and pixel(gif, (1, 0)) == (0, 0, 255)
    keyed = Image.new("RGB", (2, 1), (10, 20, 30))
    keyed.putpixel((1, 0), (1, 2, 3))
    data = encode(keyed, "PNG", transparency=(10, 20, 30))  # tRNS colour key
    assert pixel(data, (0, 0)) == BACKGROUND and pixel(data, (1, 0)) == (1, 2, 3)


def test_cmyk() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    assert pixel(encode(cmyk, "TIFF")) == (255, 0, 0)
    r, g, b = pixel(encode(cmyk, "JPEG", quality=95))
    assert r > 230 and g < 25 and b < 25


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_by_bit_depth_not_clipped(fmt: str) -> None:
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    src = Image.fromarray(values)
    assert src.mode == "I;16"
    data = encode(src, fmt)
    assert read_header(data, "x").mode.startswith("I")
    out = np.asarray(decode_image(data, "x"))
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 4, 128, 255]  # clipping would turn 1000 into 255
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_32_bit_int_and_float_modes() -> None:
    in_range = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert in_range.mode == "I"
    assert np.asarray(decode_image(encode(in_range, "TIFF"), "x"))[0, :, 0].tolist() == [0, 255]
    wide = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32))
    assert np.asarray(decode_image(encode(wide, "TIFF"), "x"))[0, :, 0].tolist() == [0, 127, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.asarray(decode_image(encode(unit, "TIFF"), "x"))[0, :, 0].tolist() == [0, 128, 255]
    big = Image.fromarray(np.array([[10.0, 20.0, 30.0]], dtype=np.float32))
    assert np.asarray(decode_image(encode(big, "TIFF"), "x"))[0, :, 0].tolist() == [0, 128, 255]


def test_to_rgb_other_modes() -> None:
    img = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(img) is img
    r, g, b = to_rgb(Image.new("LAB", (2, 2), (136, 208, 195))).getpixel((0, 0))  # L*=53 a*=80 b*=67: red
    assert r > 200 and g < 40 and b < 40
    assert to_rgb(Image.new("La", (2, 2), (10, 0))).getpixel((0, 0)) == BACKGROUND
    assert to_rgb(Image.new("YCbCr", (2, 2), (255, 128, 128))).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_data_raises_naming_the_image(fmt: str) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    data = encode(Image.fromarray(arr), fmt)
    for cut in (len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
        with pytest.raises(ImageDecodeError, match=r"^shard-7/key\.img: "):
            decode_image(data[:cut], "shard-7/key.img")


def test_corrupt_random_and_empty_bytes_raise() -> None:
    rng = np.random.default_rng(2)
    with pytest.raises(ImageDecodeError, match="junk.jpg: not an image"):
        decode_image(rng.bytes(500), "junk.jpg")
    data = bytearray(encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "PNG"))
    data[60:80] = b"\xff" * 20  # damage the compressed pixel data
    with pytest.raises(ImageDecodeError, match="damaged.png"):
        decode_image(bytes(data), "damaged.png")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", "e")
    with pytest.raises(ImageDecodeError, match="expected image bytes"):
        decode_image("not bytes", "s")  # type: ignore[arg-type]


def test_bomb_guard_refuses_huge_headers_before_decoding() -> None:
    header = read_header(png_header_only(12000, 12000), "h", max_pixels=10**9)
    assert (header.width, header.height, header.format) == (12000, 12000, "PNG")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either: our guard answers first
        with pytest.raises(ImageDecodeError, match=r"big.png: refused before decoding, 12000x12000 .*max_pixels"):
            decode_image(png_header_only(12000, 12000), "big.png")  # 144 MP, between PIL's two limits
    with pytest.raises(ImageDecodeError, match="bomb.png: refused before decoding"):
        decode_image(png_header_only(100_000, 100_000), "bomb.png")  # 10^10 pixels (30 GB as RGB)
    assert time.perf_counter() - start < 2.0  # nothing was allocated or decoded
    small = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match="max_pixels=9999"):
        decode_image(small, "x", max_pixels=9999)
    assert decode_image(small, "x", max_pixels=10000).size == (100, 100)


def test_min_size_reject_and_upscale() -> None:
    data = encode(Image.new("RGB", (40, 10), (9, 9, 9)), "PNG")
    assert decode_image(data, "x", min_size=10).size == (40, 10)
    with pytest.raises(ImageDecodeError, match=r"tiny.png: image is 40x10, smaller than min_size=16"):
        decode_image(data, "tiny.png", min_size=16)
    up = decode_image(data, "x", min_size=16, policy="upscale")
    assert up.size == (64, 16) and up.mode == "RGB"
    with pytest.raises(ValueError, match="policy"):
        decode_image(data, "x", policy="crop")
    with pytest.raises(ValueError, match="min_size"):
        decode_image(data, "x", min_size=0)
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(data, "x", max_pixels=0)


def test_upscaling_is_held_to_max_pixels_before_decoding() -> None:
    # a 1 x 2,000,000 strip passes the header guard but would grow to 8 x 16,000,000 pixels
    strip = png_header_only(2_000_000, 1)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"thin.png: refused before decoding, upscaling the 2000000x1 image "
                                               r"to min_size=8 gives 16000000x8 = 128000000 pixels, over max_pixels"):
        decode_image(strip, "thin.png", min_size=8, policy="upscale")
    assert time.perf_counter() - start < 2.0  # refused on the header: nothing decoded or resized
    data = encode(Image.new("RGB", (40, 10), (9, 9, 9)), "PNG")
    with pytest.raises(ImageDecodeError, match="gives 64x16 = 1024 pixels, over max_pixels=1000"):
        decode_image(data, "x", min_size=16, policy="upscale", max_pixels=1000)
    assert decode_image(data, "x", min_size=16, policy="upscale", max_pixels=1024).size == (64, 16)
