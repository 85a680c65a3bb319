"""Decode image bytes into an RGB ``PIL.Image``, refusing anything broken, huge or too small.

:func:`decode_image` is the one entry point the image pipeline and the image dataset definition
use. It

* reads the size from the header (``Image.open`` parses only the header) and refuses more than
  ``max_pixels`` pixels *before* any pixel is decoded (a decompression-bomb guard that does not
  depend on PIL's global ``MAX_IMAGE_PIXELS`` warning);
* forces the full decode (``Image.load``) inside the error handling, so truncated or corrupt data
  raises instead of yielding a partly grey image later (a PNG must also end with its IEND chunk);
* converts every PIL mode to RGB (:func:`to_rgb`): transparency is composited onto the fixed
  :data:`BACKGROUND` (white), 16-bit data is scaled by its bit depth, CMYK uses PIL's conversion;
* applies a minimum size: ``policy="reject"`` raises, ``policy="upscale"`` resizes the image so
  its shorter side is ``min_size``; the upscaled size is checked against ``max_pixels`` too, before
  decoding (a 1 x 2,000,000 strip would otherwise grow to 8 x 16,000,000).

Every failure raises :class:`ImageDecodeError` (a ``ValueError``) whose message starts with
``where``, so a pipeline's counting error handler sees one exception type. EXIF orientation is
not applied (as in torchvision's and timm's loaders); ICC profiles are ignored. PIL's global
``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (its default) for truncation to be caught.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Tuple

import numpy as np
from PIL import Image

__all__ = [
    "BACKGROUND",
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageHeader",
    "decode_image",
    "read_header",
    "to_rgb",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
"""Suffixes of the image files read from folders (the image shard builders, ``mmm embed``), lower case."""
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""Largest image accepted by default: 64 MP (about 8192 x 8192)."""

BACKGROUND: Tuple[int, int, int] = (255, 255, 255)
"""RGB colour that transparent pixels are composited onto (white, as an image viewer shows them)."""

_POLICIES = ("reject", "upscale")
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the 12-byte end chunk every complete PNG has


class ImageDecodeError(ValueError):
    """Image bytes that cannot be used: corrupt, truncated, too large or too small.

    The message starts with the ``where`` the caller passed (a file or shard key).
    """


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image says, read without decoding pixels.

    Args:
        width: pixels.
        height: pixels.
        format: PIL's format name ("JPEG", "PNG", "WEBP", ...).
        mode: PIL's mode before conversion ("RGB", "L", "I;16", ...).
    """

    width: int
    height: int
    format: str
    mode: str


def _check_bytes(data: bytes, where: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"{where}: expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError(f"{where}: empty image data (0 bytes)")
    return bytes(data)


def _check_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def _open(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) plus the pixel-count guard; nothing is decoded yet."""
    data = _check_bytes(data, where)
    _check_max_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own guard follows
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exn:
        raise ImageDecodeError(f"{where}: refused before decoding, the header claims too many pixels ({exn})") from exn
    except Image.UnidentifiedImageError as exn:
        raise ImageDecodeError(f"{where}: not an image in a format PIL reads "
                               f"({len(data)} bytes starting {data[:8]!r})") from exn
    except Exception as exn:  # noqa: BLE001 - PIL raises many types for unreadable headers
        raise ImageDecodeError(f"{where}: not a readable image ({type(exn).__name__}: {exn}; "
                               f"{len(data)} bytes starting {data[:8]!r})") from exn
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{where}: image header says {width}x{height} pixels (empty image)")
    if width * height > max_pixels:
        raise ImageDecodeError(f"{where}: refused before decoding, {width}x{height} = {width * height} pixels "
                               f"is over max_pixels={max_pixels} (possible decompression bomb)")
    return img


def read_header(data: bytes, where: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Size, format and mode of an image from its header alone (no pixel decoding).

    Args:
        data: encoded image bytes.
        where: names the image in error messages (a path or a shard key).
        max_pixels: refuse headers claiming more pixels than this.
    """
    img = _open(data, where, max_pixels)
    return ImageHeader(img.width, img.height, str(img.format), img.mode)


def _scale_high_depth(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float single-channel image -> 8-bit "L", scaled, never clipped.

    ``I;16*`` is scaled by its bit depth (0..65535 -> 0..255). ``I`` (32-bit int, PIL's mode for
    some 16-bit sources) is scaled the same way when its values lie in 0..65535, otherwise its
    min..max range is stretched to 0..255. ``F`` is taken as intensity in [0, 1] when its values
    lie there, otherwise min..max is stretched; NaN/inf become 0.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        if lo < 0.0 or hi > 1.0:
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        out = np.rint(a * 255.0)
    else:
        a = arr.astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            out = (a * 255 + 32767) // 65535
        else:
            out = (a - lo) * 255 // (hi - lo) if hi > lo else np.zeros_like(a)
    return Image.fromarray(out.astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: Tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Convert a decoded image of any PIL mode to RGB.

    Modes with alpha (RGBA, LA, PA, premultiplied RGBa/La) and images with a transparency key
    (palette or colour ``transparency`` in ``img.info``) are alpha-composited onto ``background``.
    High bit-depth single-channel modes (I;16, I, F) are scaled to 8 bit (see
    :func:`_scale_high_depth`) and replicated to three channels (a transparency key on them is
    ignored). LAB goes through a colour-managed L*a*b* -> sRGB transform. Everything else (L, 1,
    P, CMYK, YCbCr, HSV, ...) goes through PIL's own conversion (CMYK naively, no ICC profile).
    An RGB image without transparency is returned as is.

    Args:
        img: a loaded PIL image.
        background: RGB colour under transparent pixels.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        return _scale_high_depth(img).convert("RGB")
    if img.mode == "LAB":  # PIL's plain convert treats L*a*b* channels as if they were RGB
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(img, lab_to_srgb)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def _upscaled_size(width: int, height: int, min_size: int) -> Tuple[int, int]:
    """(width, height) after scaling so the shorter side is ``min_size``, keeping the aspect ratio."""
    scale = min_size / min(width, height)
    return max(min_size, round(width * scale)), max(min_size, round(height * scale))


def _upscale(img: Image.Image, min_size: int) -> Image.Image:
    """Resize (bicubic) so the shorter side is ``min_size``, keeping the aspect ratio."""
    return img.resize(_upscaled_size(*img.size, min_size), Image.Resampling.BICUBIC)


def decode_image(
    data: bytes,
    where: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 1,
    policy: str = "reject",
) -> Image.Image:
    """Decode image bytes into a fully loaded RGB ``PIL.Image``.

    Args:
        data: encoded image bytes (any format PIL reads; animated images give their first frame).
        where: names the image in error messages (a path or a shard key).
        max_pixels: refuse images whose header claims more pixels than this, or (``"upscale"``)
            that upscaling would take past this, before decoding.
        min_size: smallest accepted width and height, in pixels.
        policy: what to do with an image smaller than ``min_size`` on either side: ``"reject"``
            raises (checked on the header, before decoding); ``"upscale"`` resizes it (bicubic)
            so its shorter side is ``min_size``.

    Raises:
        ImageDecodeError: corrupt, truncated, unsupported, too large or (with ``"reject"``) too
            small; the message starts with ``where``.
    """
    if policy not in _POLICIES:
        raise ValueError(f"policy must be one of {list(_POLICIES)}, got {policy!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive int, got {min_size!r}")
    data = _check_bytes(data, where)
    img = _open(data, where, max_pixels)
    width, height = img.size
    small = width < min_size or height < min_size
    if small and policy == "reject":
        raise ImageDecodeError(f"{where}: image is {width}x{height}, smaller than min_size={min_size} on a side "
                               "(policy='upscale' resizes such images instead)")
    if small:
        new_w, new_h = _upscaled_size(width, height, min_size)
        if new_w * new_h > max_pixels:
            raise ImageDecodeError(f"{where}: refused before decoding, upscaling the {width}x{height} image to "
                                   f"min_size={min_size} gives {new_w}x{new_h} = {new_w * new_h} pixels, over "
                                   f"max_pixels={max_pixels} (aspect ratio {max(width, height) / min(width, height):.0f}:1)")
    try:
        img.load()  # decode every pixel now: truncation and corruption surface here, not later
        if img.format == "PNG" and _PNG_IEND not in data:
            # PIL accepts a PNG cut after its last pixel row; the missing end chunk shows the cut
            raise OSError("the PNG end chunk (IEND) is missing")
        rgb = to_rgb(img)
    except Exception as exn:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib errors...
        raise ImageDecodeError(f"{where}: cannot decode {img.format or 'image'} {width}x{height} "
                               f"mode {img.mode} ({type(exn).__name__}: {exn}; truncated or corrupt?)") from exn
    return _upscale(rgb, min_size) if small else rgb
