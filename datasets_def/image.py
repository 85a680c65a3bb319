"""Image dataset definition: image folders -> WebDataset tar shards, plus two embedded image sets.

Each shard sample is ``{"__key__", "<ext>": image bytes, "json": metadata}`` where ``<ext>`` is
``jpg``, ``png`` or ``webp``. JPEG, PNG and WebP files keep their original bytes; any other
format PIL reads (BMP, TIFF, GIF, PPM, ...) is decoded, converted to RGB and re-encoded as PNG
(lossless, so it decodes to the pixels the original decodes to), and its json says
``"reencoded_from"``. The json holds ``source`` (path relative to the input folder), ``label``
(int or null), ``label_name`` (str or null), ``caption`` (str or null), ``width``, ``height``
and ``reencoded_from`` (null or the original format).

:func:`build_shards` reads an ImageFolder-style tree (class subfolders, labels in sorted folder
order as torchvision's ``ImageFolder``), a flat folder (no labels), or a folder with a labels CSV,
decodes every image once to validate it, and assigns train/val by a stable hash of the relative path.

:func:`embedded_default` renders ``image-shapes-v1`` locally with PIL (no download): 32x32 scenes
of one coloured shape with a caption, where six (shape, colour) pairs appear only in val so a
vision-language model can be tested on unseen combinations. :func:`embedded_default_digits`
converts scikit-learn's bundled 8x8 digits to 32x32 PNGs (``image-digits-v1``).
"""
from __future__ import annotations

import codecs
import csv
import functools
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from mmm.modalities.image.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, read_header
from mmm.data.jsonl import json_objects
from mmm.data.tar import ReadOptions
from mmm.data.utf8 import NotUTF8, decode_utf8
from mmm.modalities.image.decode import IMAGE_SUFFIXES  # noqa: F401  (re-exported for image_text)
from mmm.registry import DATASETS
from datasets_def.building import (BuildReport, MANIFEST, SPLITS, ShardWriters, build_args, cached_build, check_build_args, find_inputs,  # noqa: F401
                                   finish_build, ignored_manifest, log_ignored, prepare_output, read_split,
                                   stable_split, write_manifest)
from datasets_def.skipper import BadInputSkipper

logger = logging.getLogger("mmm.data")

IMAGE_FIELDS = ("jpg", "png", "webp")
EMBEDDED_SHAPES = "image-shapes-v1"
EMBEDDED_DIGITS = "image-digits-v1"
PathLike = Union[str, "os.PathLike[str]"]

# PIL format name -> shard field for the encodings kept byte for byte (MPO is a camera JPEG)
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_FIELD_FORMATS = {"jpg": ("JPEG", "MPO"), "png": ("PNG",), "webp": ("WEBP",)}


class ImageBuildError(ValueError):
    """Bad input or output for an image shard build; the message names the file."""


# --------------------------------------------------------------------------------------------
# writing samples


@dataclass(kw_only=True)
class ImageBuildReport(BuildReport):
    """What a shard build wrote (:class:`datasets_def.building.BuildReport`; a sample is an image), with the
    label names and the count of images re-encoded for the shards."""

    label_names: Optional[List[str]] = None
    reencoded: int = 0


class _SplitWriters(ShardWriters):
    """The shard writers of an image build (:class:`datasets_def.building.ShardWriters`: atomic
    shards rotated on ``samples_per_shard`` only), counting samples per label as well."""

    def __init__(self, out: Path, samples_per_shard: int, error: type = ImageBuildError) -> None:
        super().__init__(out, samples_per_shard, error)
        self.per_label: Dict[str, Dict[str, int]] = {s: {} for s in SPLITS}

    def add(self, split: str, key: str, ext: str, data: bytes, meta: Dict[str, Any],
            extra: Optional[Dict[str, bytes]] = None) -> None:
        """Write one sample: the image (field ``ext``), ``json`` from ``meta``, and ``extra`` fields."""
        record = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        self.write(split, {"__key__": key, ext: data, "json": record, **(extra or {})})
        name = meta.get("label_name") if meta.get("label_name") is not None else meta.get("label")
        if name is not None:
            counts = self.per_label[split]
            counts[str(name)] = counts.get(str(name), 0) + 1


def _split_manifest(writers: _SplitWriters, shards: Dict[str, List[str]]) -> Dict[str, Dict[str, Any]]:
    return {
        s: {"samples": writers.samples[s], "shards": len(shards[s]),
            "per_label": dict(sorted(writers.per_label[s].items()))}
        for s in SPLITS
    }


def _encode_png(img: Image.Image, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_for_shard(data: bytes, where: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                     min_size: int = 1) -> Tuple[str, bytes, Dict[str, Any]]:
    """Validate one image file and choose what goes in the shard.

    Args:
        data: the file's bytes.
        where: names the file in error messages.
        max_pixels: refuse larger images (checked on the header, before decoding).
        min_size: refuse images narrower or shorter than this.

    Returns:
        ``(field, bytes, info)``: the shard field (``jpg``/``png``/``webp``), the original bytes
        (or a PNG re-encoding for other formats), and ``{"width", "height", "reencoded_from"}``.

    Raises:
        ImageDecodeError: the image does not decode or is out of the size limits.
    """
    header = read_header(data, where, max_pixels=max_pixels)
    img = decode_image(data, where, max_pixels=max_pixels, min_size=min_size, policy="reject")
    ext = _KEPT_FORMATS.get(header.format)
    info: Dict[str, Any] = {"width": img.width, "height": img.height, "reencoded_from": None}
    if ext is None:
        info["reencoded_from"] = header.format
        return "png", _encode_png(img), info
    return ext, bytes(data), info


# --------------------------------------------------------------------------------------------
# reading an image folder


def _rel_key(text: str) -> str:
    """Normalize a path written in a labels/captions table to the relative posix form used here."""
    rel = text.strip().replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    return rel


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _find_images(root: Path, skipper: BadInputSkipper,
                 error: type = ImageBuildError) -> Tuple[List[Tuple[Path, str]], List[str]]:
    """((file, relative posix path) sorted by path, ignored non-image files) of a folder of images (optionally with
    class subfolders); hidden entries skipped. Symbolic links to folders are followed (as ImageFolder), each folder
    once (:func:`datasets_def.building.find_inputs`)."""
    return find_inputs(root, _is_image_name, "image", "an image", f"image files ({', '.join(sorted(IMAGE_SUFFIXES))})",
                       skipper, error, single_file=False, skip_hidden=True)


def not_utf8_error(path: Path, what: str, error: type) -> Exception:
    """``error`` for a text file that does not decode as UTF-8, naming the file, line and byte offset.

    Args:
        path: the file (read again here, in binary, to locate the first bad byte).
        what: what the file is, for the message (``"captions file"``).
        error: the builder's error type.
    """
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return error(f"{path}: the {what} is UTF-16 (it starts with a UTF-16 byte-order mark); expected UTF-8 "
                     "(save it as UTF-8)")
    try:
        decode_utf8(data)
    except NotUTF8 as exn:
        return error(f"{path}:{exn.line}: the {what} is not UTF-8: byte {exn.byte!r} at byte offset {exn.offset} "
                     f"({exn.reason}); expected UTF-8 text (convert it, e.g. iconv -f latin1 -t utf-8)")
    return error(f"{path}: the {what} is not UTF-8 text")


def csv_rows(fh: Iterable[str], path: Path, required: Tuple[str, ...], error: type,
             bad: Callable[[str, str], None]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """``(file:line, row)`` of every row of a CSV table whose header holds the ``required`` columns.

    A row with more fields than the header (an unquoted comma in a value) goes to ``bad`` naming
    its line and the field counts, instead of losing the extra text; a header without the columns
    or unparsable CSV raises ``error`` naming the file (and line).

    Args:
        fh: the open file (``newline=""``).
        path: the file, for messages.
        required: the columns the header must have.
        error: the builder's error type.
        bad: ``(where, reason)`` sink for bad rows (a :class:`BadInputSkipper`'s ``bad``).
    """
    reader = csv.DictReader(fh)
    try:
        columns = reader.fieldnames or []
        if any("\x00" in c for c in columns):
            raise error(f"{path}: the CSV header holds NUL bytes, so the file looks UTF-16 (without a byte-order mark) "
                        "or binary; expected UTF-8 text")
        if any(c not in columns for c in required):
            raise error(f"{path}: a CSV header with columns {' and '.join(map(repr, required))} is required, "
                        f"got {columns}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            extra = row.pop(None, None)  # csv.DictReader files fields beyond the header under None
            if extra is not None:
                bad(where, f"found {len(columns) + len(extra)} fields, expected {len(columns)} ({','.join(columns)}); "
                           f"extra {extra!r}: quote a value that holds a comma, e.g. \"a red, round ball\"")
                continue
            yield where, row
    except csv.Error as exn:
        raise error(f"{path}:{reader.line_num}: not readable as CSV ({exn})") from None


def _read_table(path: Path, column: str, skipper: BadInputSkipper) -> Dict[str, str]:
    """``{relative path: value}`` from a CSV (header with ``path`` and ``column``) or a JSONL file; bad rows go to
    ``skipper``, a file that cannot be read or is not UTF-8 raises the skipper's error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{column} file does not exist: {path}")
    try:
        return _read_table_file(path, column, skipper)
    except UnicodeDecodeError:
        raise not_utf8_error(path, f"{column}s file", skipper.error) from None
    except OSError as exn:
        raise skipper.error(f"{path}: cannot read the {column}s file ({type(exn).__name__}: {exn.strerror or exn})") from None


def _read_table_file(path: Path, column: str, skipper: BadInputSkipper) -> Dict[str, str]:
    table: Dict[str, str] = {}

    def add(where: str, rel: Any, value: Any) -> None:
        if not isinstance(rel, str) or not rel.strip():
            skipper.bad(where, "missing or empty 'path'")
        elif value is None or (isinstance(value, str) and not value.strip()):
            skipper.bad(where, f"missing or empty {column!r} for {rel!r}")
        elif _rel_key(rel) in table:
            skipper.bad(where, f"{_rel_key(rel)!r} is listed twice in {path.name}")
        else:
            table[_rel_key(rel)] = str(value).strip()

    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8-sig") as fh:
            for lineno, record in json_objects(fh, lambda n: f"{path}:{n}", skipper.error, skipper.bad):
                add(f"{path}:{lineno}", record.get("path"), record.get(column))
        return table
    with path.open(encoding="utf-8-sig", newline="") as fh:
        for where, row in csv_rows(fh, path, ("path", column), skipper.error, skipper.bad):
            add(where, row.get("path"), row.get(column))
    return table


def _as_int(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        return None


def _labels_of(images: List[Tuple[Path, str]], root: Path, labels: Union[str, PathLike, None],
               skipper: BadInputSkipper) -> Tuple[Dict[str, Tuple[Optional[int], Optional[str]]], Optional[List[str]]]:
    """``{relative path: (label, label_name)}`` for the images that have one, and the label names.

    ``labels="folders"`` on a folder with no image inside a subfolder (a flat folder, the usual MAE
    input) means no labels; once any image lies in a subfolder, every image must (its class)."""
    if isinstance(labels, str) and labels == "folders" and images and all("/" not in rel for _, rel in images):
        logger.info("image build: %s has no class subfolders holding images, so the images get no labels", root)
        labels = None
    if labels is None:
        return {rel: (None, None) for _, rel in images}, None
    if isinstance(labels, str) and labels == "folders":
        names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        index = {n: i for i, n in enumerate(names)}
        out: Dict[str, Tuple[Optional[int], Optional[str]]] = {}
        for _, rel in images:
            if "/" not in rel:
                skipper.bad(rel, "not inside a class folder, while other images are (labels='folders' takes the label "
                                 "from the first subfolder; use labels=None / --labels none for no labels)")
                continue
            name = rel.split("/", 1)[0]
            out[rel] = (index[name], name)
        return out, names
    table = _read_table(Path(labels).expanduser(), "label", skipper)
    values = list(table.values())
    ints = [_as_int(v) for v in values]
    if values and all(i is not None and i >= 0 for i in ints):
        mapping: Dict[str, Tuple[Optional[int], Optional[str]]] = {rel: (int(v), None) for rel, v in table.items()}
        names_out: Optional[List[str]] = None
    else:
        names_out = sorted(set(values))
        index = {n: i for i, n in enumerate(names_out)}
        mapping = {rel: (index[v], v) for rel, v in table.items()}
    present = {rel for _, rel in images}
    for rel in sorted(set(table) - present):
        skipper.bad(f"{labels}", f"lists {rel!r}, which is not an image file under {root}")
    out = {}
    for _, rel in images:
        if rel not in mapping:
            skipper.bad(rel, f"has no row in the labels file {labels}")
            continue
        out[rel] = mapping[rel]
    return out, names_out


def _split_of(rel: str, val_fraction: float, seed: int) -> str:
    """Stable train/val assignment of one file (same on every machine and run)."""
    return stable_split(val_fraction, seed, rel)


def _encoded_images(items: List[Tuple[int, Path, str]], val_fraction: float, seed: int, skipper: BadInputSkipper, *,
                    max_pixels: int, min_size: int) -> Iterator[Tuple[str, int, str, str, bytes, Dict[str, Any]]]:
    """``(split, index, rel, ext, payload, info)`` of every image that decodes (:func:`encode_for_shard`), split by
    split, in a seeded random order within each (so a shard mixes classes); the others go to ``skipper``.

    Args:
        items: ``(index, file, relative path)`` of the images to write.
        val_fraction, seed: the stable split (:func:`_split_of`); ``seed`` also seeds the order.
        skipper: where images that cannot be read or decoded are reported.
        max_pixels, min_size: as :func:`encode_for_shard`.
    """
    rng = np.random.default_rng(seed)
    for split in SPLITS:
        members = [item for item in items if _split_of(item[2], val_fraction, seed) == split]
        for j in rng.permutation(len(members)):
            index, path, rel = members[j]
            try:
                ext, payload, info = encode_for_shard(path.read_bytes(), rel, max_pixels=max_pixels, min_size=min_size)
            except ImageDecodeError as exn:
                skipper.bad(rel, str(exn).removeprefix(f"{rel}: "))
                continue
            except OSError as exn:
                skipper.bad(rel, f"cannot read file ({type(exn).__name__}: {exn.strerror or exn})")
                continue
            yield split, index, rel, ext, payload, info


# --------------------------------------------------------------------------------------------
# building shards from a folder


def build_shards(
    input_path: PathLike,
    output_dir: PathLike,
    *,
    labels: Union[str, PathLike, None] = "folders",
    captions: Optional[PathLike] = None,
    samples_per_shard: int = 1000,
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 1,
) -> ImageBuildReport:
    """Validate the images of a folder and write them to ``{output_dir}/{split}-{index:06d}.tar``.

    Image files are found recursively by extension (hidden files skipped, other files ignored
    and counted) and sorted by relative path; each is decoded once to check it. Within a split,
    samples are written in a seeded random order, so a shard mixes classes. Also writes
    ``{output_dir}/manifest.json`` (counts per split and label, label names, skipped files).

    Args:
        input_path: the image folder.
        output_dir: where shards go; must hold no shards/manifest unless ``overwrite``.
        labels: ``"folders"``: the first subfolder is the class, labels are indices into the
            sorted subfolder names (as torchvision's ImageFolder); a folder with no image in a
            subfolder (flat) gets no labels; None: no labels; a CSV or JSONL path (``path,label``,
            paths relative to ``input_path``): integer labels are used as they are, names are
            numbered in sorted order.
        captions: None, or a CSV (``path,caption``) or JSONL (``{"path", "caption"}``) file;
            images without a row get a null caption, rows naming no image are counted and logged.
        samples_per_shard: samples per tar shard.
        val_fraction: fraction of files (by a stable hash of the relative path) put in val.
        seed: salt of the split hash and of the write order.
        skip_bad: skip (and report) bad files instead of raising.
        overwrite: delete existing ``*.tar`` and manifest in ``output_dir`` first.
        max_pixels: refuse images with more pixels (checked on the header, before decoding).
        min_size: refuse images narrower or shorter than this many pixels.
    """
    check_build_args(samples_per_shard, val_fraction, ImageBuildError)
    if not (labels is None or labels == "folders" or isinstance(labels, (str, os.PathLike))):
        raise ImageBuildError(f"labels must be 'folders', None or a CSV path, got {labels!r}")
    src = Path(input_path).expanduser()
    out = Path(output_dir).expanduser()
    skipper = BadInputSkipper(skip_bad, ImageBuildError)
    images, ignored = _find_images(src, skipper)
    caption_of = _read_table(Path(captions).expanduser(), "caption", skipper) if captions is not None else {}
    if caption_of:
        matched = caption_of.keys() & {rel for _, rel in images}
        if not matched:
            raise ImageBuildError(f"captions file {captions}: none of its {len(caption_of)} paths names an image "
                                  f"under {src} (paths must be relative to the input folder, e.g. {images[0][1]!r})")
    unmatched_captions = len(caption_of.keys() - {rel for _, rel in images})
    if unmatched_captions:
        logger.warning("captions file %s lists %d path(s) with no image under %s", captions, unmatched_captions, src)
    label_of, label_names = _labels_of(images, src, labels, skipper)
    prepare_output(out, overwrite, ImageBuildError)
    log_ignored("image", ignored, "images (" + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")

    keyed = [(i, path, rel) for i, (path, rel) in enumerate(images) if rel in label_of]
    reencoded = 0
    with _SplitWriters(out, samples_per_shard) as writers:
        for split, index, rel, ext, payload, info in _encoded_images(keyed, val_fraction, seed, skipper,
                                                                    max_pixels=max_pixels, min_size=min_size):
            label, label_name = label_of[rel]
            meta = {"source": rel, "label": label, "label_name": label_name, "caption": caption_of.get(rel), **info}
            reencoded += info["reencoded_from"] is not None
            writers.add(split, f"{index:09d}", ext, payload, meta)
        shards = writers.close()
    total = sum(writers.samples.values())
    if total == 0:
        writers.abort()
        raise ImageBuildError(f"no usable images in {src} ({len(skipper.skipped)} skipped: {skipper.skipped[:3]})")

    manifest = {
        "dataset": "image",
        "fields": list(ImageDatasetDef.fields),
        "image_fields": list(IMAGE_FIELDS),
        "files": len(images),
        **ignored_manifest(ignored),
        "splits": _split_manifest(writers, shards),
        "shard_files": shards,
        "label_names": label_names,
        "reencoded": reencoded,
        "captions_unmatched": unmatched_captions,
        "build_args": build_args(src, samples_per_shard, val_fraction, seed, skip_bad,
                                 labels=labels if labels is None or labels == "folders" else str(labels),
                                 captions=None if captions is None else str(captions), max_pixels=max_pixels,
                                 min_size=min_size),
    }
    finish_build("image", writers, manifest, skipper.skipped, ImageBuildError)
    return ImageBuildReport(output_dir=out, files=len(images), samples=dict(writers.samples), shards=shards,
                            skipped=skipper.skipped, ignored=len(ignored), label_names=label_names, reencoded=reencoded)


# --------------------------------------------------------------------------------------------
# embedded default: procedurally rendered shapes with captions

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 135, 20),
    "yellow": (235, 215, 35),
    "green": (40, 160, 60),
    "blue": (35, 80, 215),
    "purple": (135, 55, 185),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("plain", "gradient", "stripes", "checker")
HELD_OUT_COMBOS: Tuple[Tuple[str, str], ...] = tuple(
    (shape, list(COLORS)[(i + 2) % len(COLORS)]) for i, shape in enumerate(SHAPES)
)
"""(shape, colour) pairs rendered only in val: each shape and each colour is in exactly one."""

_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the center"}
_TEMPLATES = ("a {size} {color} {shape} {where}", "{where}, a {size} {color} {shape}",
              "there is a {size} {color} {shape} {where}")
_RADIUS = {"small": 0.15, "large": 0.27}  # shape radius as a fraction of the image side
_SUPERSAMPLE = 4


def shape_caption(shape: str, color: str, size: str, position: str, template: int = 0) -> str:
    """Caption of one rendered scene from the small grammar; template 0 is the canonical form.

    ``shape_caption("circle", "red", "small", "left")`` -> ``"a small red circle on the left"``.

    Args:
        shape: one of :data:`SHAPES`.
        color: one of :data:`COLORS`.
        size: one of :data:`SIZES`.
        position: one of :data:`POSITIONS`.
        template: index into the templates (0: canonical, 1: position first, 2: "there is ...").
    """
    return _TEMPLATES[template].format(size=size, color=color, shape=shape, where=_WHERE[position])


@functools.lru_cache(maxsize=4)
def _grid(side: int) -> Tuple[np.ndarray, np.ndarray]:
    """(yy, xx) float pixel coordinates of a ``side`` x ``side`` image (read-only, cached)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _backgrounds(n: int, side: int, rng: np.random.Generator) -> Tuple[np.ndarray, List[str]]:
    """(n, side, side, 3) float32 greyish backgrounds (so saturated shapes stand out) and their kinds."""
    kinds = [BACKGROUNDS[k] for k in rng.integers(len(BACKGROUNDS), size=n)]
    base = rng.uniform(70, 190, size=(n, 1)) + rng.uniform(-22, 22, size=(n, 3))  # (n, 3) first tint
    other = base + (rng.choice([-1.0, 1.0], size=(n, 1)) * rng.uniform(18, 35, size=(n, 1)))  # second tint
    angle = rng.uniform(0, math.pi, size=n)  # direction of gradients and stripes
    stripe = rng.uniform(2.5, 5.0, size=n)  # stripe width in pixels
    check = rng.integers(3, 7, size=n)  # checker square side in pixels
    yy, xx = _grid(side)
    t = np.zeros((n, side, side), dtype=np.float32)  # weight of the second tint; 0 everywhere for "plain"
    for i, kind in enumerate(kinds):
        along = xx * math.cos(angle[i]) + yy * math.sin(angle[i])
        if kind == "gradient":
            t[i] = (along - along.min()) / max(1e-9, float(along.max() - along.min()))
        elif kind == "stripes":
            t[i] = np.floor(along / stripe[i]) % 2
        elif kind == "checker":
            t[i] = (xx // check[i] + yy // check[i]) % 2
    t = t[..., None]  # (n, side, side, 1)
    bg = base.astype(np.float32)[:, None, None, :] * (1 - t) + other.astype(np.float32)[:, None, None, :] * t
    return bg, kinds


def _shape_mask(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    """(side, side) coverage in [0, 1] of one shape, drawn supersampled and box-filtered."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (side * s, side * s), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, r = cx * s, cy * s, r * s
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((x - h, y - h, x + h, y + h), fill=255)
    elif shape == "triangle":
        corners = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)  # pointing up
        pts = [(x + 1.1 * r * math.cos(a), y + 1.1 * r * math.sin(a)) for a in corners]
        draw.polygon(pts, fill=255)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle((x - r, y - t, x + r, y + t), fill=255)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=255)
    elif shape == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        inner = r * 0.55
        draw.ellipse((x - inner, y - inner, x + inner, y + inner), fill=0)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    small = canvas.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


_DIRECTION = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}


def render_scenes(specs: List[Tuple[str, str, str, str]], rng: np.random.Generator,
                  side: int = 32) -> Tuple[np.ndarray, List[str]]:
    """Render scenes: each a coloured shape on a greyish plain/gradient/striped/checkered background.

    Each shape's radius, centre and colour are jittered slightly and light Gaussian noise
    (sigma 4) is added, all drawn from ``rng`` (batched: the result depends on the whole list).

    Args:
        specs: ``(shape, color, size, position)`` per scene, from :data:`SHAPES`, :data:`COLORS`,
            :data:`SIZES` and :data:`POSITIONS`.
        rng: the generator to draw from.
        side: image width and height in pixels.

    Returns:
        ``(images, kinds)``: (N, side, side, 3) uint8 RGB and each background's kind.
    """
    n = len(specs)
    bg, kinds = _backgrounds(n, side, rng)
    scale = rng.uniform(0.92, 1.08, size=n)
    jitter = rng.uniform(-0.03, 0.03, size=(n, 2)) * side
    tint = rng.uniform(-12, 12, size=(n, 3))
    alpha = np.empty((n, side, side, 1), dtype=np.float32)
    rgb = np.empty((n, 1, 1, 3), dtype=np.float32)
    for i, (shape, color, size, position) in enumerate(specs):
        r = _RADIUS[size] * side * scale[i]
        offset = max(0.0, side / 2 - 1.1 * r - 1)  # keep the whole shape inside the image
        dx, dy = _DIRECTION[position]
        cx, cy = side / 2 + dx * offset + jitter[i, 0], side / 2 + dy * offset + jitter[i, 1]
        alpha[i, ..., 0] = _shape_mask(shape, cx, cy, r, side)
        rgb[i, 0, 0] = np.asarray(COLORS[color]) + tint[i]
    images = bg * (1 - alpha) + rgb * alpha + 4.0 * rng.standard_normal(size=bg.shape, dtype=np.float32)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), kinds


def render_scene(shape: str, color: str, size: str, position: str, rng: np.random.Generator,
                 side: int = 32) -> Tuple[Image.Image, str]:
    """Render one scene (see :func:`render_scenes`); returns (RGB image, background kind).

    Args:
        shape: one of :data:`SHAPES`.
        color: one of :data:`COLORS`.
        size: ``"small"`` or ``"large"``.
        position: one of :data:`POSITIONS` (left/right/top/bottom/center).
        rng: the generator to draw from.
        side: image width and height in pixels.
    """
    images, kinds = render_scenes([(shape, color, size, position)], rng, side)
    return Image.fromarray(images[0], mode="RGB"), kinds[0]


def _build_shapes(out: Path, *, side: int = 32, train_per_combo: int = 200, val_per_combo: int = 28,
                  samples_per_shard: int = 1000, seed: int = 0, batch: int = 64) -> str:
    """Render the shapes set into ``out``: seen combos in train, every combo in val; returns its size."""
    out.mkdir(parents=True, exist_ok=True)
    held_out = set(HELD_OUT_COMBOS)
    combos = [(s, c) for s in SHAPES for c in COLORS]
    plan = {
        "train": [combo for combo in combos if combo not in held_out for _ in range(train_per_combo)],
        "val": [combo for combo in combos for _ in range(val_per_combo)],
    }
    writers = _SplitWriters(out, samples_per_shard)
    unseen = 0
    key = 0
    for split_id, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, split_id])
        order = rng.permutation(len(plan[split]))
        n = len(order)
        sizes = rng.integers(len(SIZES), size=n)
        positions = rng.integers(len(POSITIONS), size=n)
        templates = rng.integers(len(_TEMPLATES), size=n)
        specs = [(*plan[split][j], SIZES[sizes[i]], POSITIONS[positions[i]]) for i, j in enumerate(order)]
        for first in range(0, n, batch):
            images, kinds = render_scenes(specs[first : first + batch], rng, side)
            for k, (array, kind) in enumerate(zip(images, kinds)):
                i = first + k
                shape, color, size, position = specs[i]
                is_unseen = (shape, color) in held_out
                unseen += split == "val" and is_unseen
                meta = {
                    "source": f"{EMBEDDED_SHAPES}/{split}/{i:05d}", "label": SHAPES.index(shape), "label_name": shape,
                    "caption": shape_caption(shape, color, size, position, int(templates[i])),
                    "width": side, "height": side, "reencoded_from": None, "shape": shape, "color": color,
                    "size": size, "position": position, "background": kind, "unseen_combo": is_unseen,
                }
                writers.add(split, f"{key:09d}", "png", _encode_png(Image.fromarray(array, mode="RGB"), 1), meta)
                key += 1
    shards = writers.close()
    splits = _split_manifest(writers, shards)
    splits["val"]["unseen_combo_samples"] = unseen
    write_manifest(out, {
        "dataset": "image",
        "name": EMBEDDED_SHAPES,
        "fields": list(ImageDatasetDef.fields),
        "image_fields": list(IMAGE_FIELDS),
        "image_size": [side, side],
        "splits": splits,
        "shard_files": shards,
        "label_names": list(SHAPES),
        "attributes": {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES),
                       "position": list(POSITIONS), "background": list(BACKGROUNDS)},
        "held_out_combos": [list(c) for c in HELD_OUT_COMBOS],
        "caption_templates": list(_TEMPLATES),
        "build_args": {"samples_per_shard": samples_per_shard, "train_per_combo": train_per_combo,
                       "val_per_combo": val_per_combo, "seed": seed, "side": side},
        "skipped": [],
    }, ImageBuildError)
    return f"{writers.total} images"


def embedded_default(cache_dir: Optional[PathLike] = None) -> Path:
    """The embedded default image set ``image-shapes-v1``, rendered once with PIL and cached.

    32x32 RGB scenes, each one shape (:data:`SHAPES`, the label) in one colour (:data:`COLORS`),
    small or large, at the left/right/top/bottom/center, on a greyish plain, gradient, striped or
    checkered background with light noise. The json carries ``caption`` (from the grammar of
    :func:`shape_caption`), ``shape``, ``color``, ``size``, ``position``, ``background`` and
    ``unseen_combo``. Train: the 30 (shape, colour) pairs not in :data:`HELD_OUT_COMBOS`, 200
    images each (6000). Val: all 36 pairs, 28 images each (1008, of which 168 unseen in train);
    the manifest lists ``held_out_combos``. Deterministic; built in a few seconds at
    ``{cache_dir}/datasets/image-shapes-v1/`` in a temporary directory renamed into place when
    complete (``DONE`` marker last).

    Args:
        cache_dir: cache root; default ``$MMM_CACHE_DIR`` or ``~/.cache/mmm``.

    Returns:
        The directory holding ``train-*.tar``, ``val-*.tar`` and ``manifest.json``.
    """
    return cached_build(EMBEDDED_SHAPES, cache_dir, _build_shapes, ImageBuildError)


# --------------------------------------------------------------------------------------------
# second embedded set: scikit-learn's bundled handwritten digits

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _build_digits(out: Path, *, side: int = 32, val_count: int = 297, samples_per_shard: int = 1000,
                  seed: int = 0) -> str:
    """Write scikit-learn's 1797 8x8 digits as ``side`` x ``side`` RGB PNGs: 1500 train, 297 val; returns the size."""
    out.mkdir(parents=True, exist_ok=True)
    from sklearn.datasets import load_digits  # reads a file bundled with scikit-learn; no download

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8), ink bright
    order = np.random.default_rng(seed).permutation(len(images))
    val = set(order[:val_count].tolist())
    writers = _SplitWriters(out, samples_per_shard)
    for split in SPLITS:
        for i in order:
            if (int(i) in val) != (split == "val"):
                continue
            img = Image.fromarray(images[i], mode="L").resize((side, side), Image.Resampling.BILINEAR).convert("RGB")
            label = int(digits.target[i])
            meta = {"source": f"sklearn.datasets.load_digits[{int(i)}]", "label": label, "label_name": str(label),
                    "caption": f"a handwritten digit {_DIGIT_WORDS[label]}", "width": side, "height": side,
                    "reencoded_from": None}
            writers.add(split, f"{int(i):09d}", "png", _encode_png(img), meta)
    shards = writers.close()
    write_manifest(out, {
        "dataset": "image",
        "name": EMBEDDED_DIGITS,
        "fields": list(ImageDatasetDef.fields),
        "image_fields": list(IMAGE_FIELDS),
        "image_size": [side, side],
        "splits": _split_manifest(writers, shards),
        "shard_files": shards,
        "label_names": [str(d) for d in range(10)],
        "build_args": {"samples_per_shard": samples_per_shard, "val_count": val_count, "seed": seed, "side": side},
        "skipped": [],
    }, ImageBuildError)
    return f"{writers.total} images"


def embedded_default_digits(cache_dir: Optional[PathLike] = None) -> Path:
    """A second embedded set, ``image-digits-v1``: scikit-learn's bundled handwritten digits.

    The 1797 8x8 grey digits of ``sklearn.datasets.load_digits`` scaled to 0..255 (bright ink on
    black), upscaled bilinearly to 32x32 and stored as RGB PNGs; label = the digit, caption "a
    handwritten digit seven". 1500 train / 297 val by a seeded permutation. Cached like
    :func:`embedded_default`.

    Args:
        cache_dir: cache root; default ``$MMM_CACHE_DIR`` or ``~/.cache/mmm``.
    """
    return cached_build(EMBEDDED_DIGITS, cache_dir, _build_digits, ImageBuildError)


# --------------------------------------------------------------------------------------------
# reading shards back and checking samples


def iter_images(shard_dir: PathLike, split: str = "train", *,
                options: Optional[ReadOptions] = None) -> Iterator[Tuple[Image.Image, Dict[str, Any]]]:
    """Stream ``(RGB image, json dict)`` pairs of one split, in shard order, with no extraction to disk.

    Args:
        shard_dir, split, options: as :func:`datasets_def.building.read_split` reads them.
    """
    def fields(sample: Dict[str, Any]) -> Optional[str]:
        present = [f for f in IMAGE_FIELDS if f in sample]
        return None if len(present) == 1 else f"expected one image field of {list(IMAGE_FIELDS)}"

    for sample, where, meta in read_split(shard_dir, split, options, fields, ImageBuildError):
        field_name = next(f for f in IMAGE_FIELDS if f in sample)
        yield decode_image(sample[field_name], where), meta


def check_sample(sample: Dict[str, Any]) -> Optional[str]:
    """Say what is wrong with one raw shard sample, or None when it is sound.

    Exactly one image field of :data:`IMAGE_FIELDS` must be present, hold that encoding (a
    ``png`` field holds PNG data) and decode (:func:`~mmm.modalities.image.decode.decode_image`);
    ``json`` must be a JSON object whose ``width`` / ``height``, when present, match the image.

    Args:
        sample: ``{"<field>": bytes, ...}`` as read from a shard (``__key__`` etc. are ignored).
    """
    problems: List[str] = []
    present = [f for f in IMAGE_FIELDS if f in sample]
    size: Optional[Tuple[int, int]] = None
    if len(present) != 1:
        what = "none" if not present else f"{len(present)} ({present})"
        problems.append(f"expected exactly one image field of {list(IMAGE_FIELDS)}, found {what}")
    else:
        ext = present[0]
        data = bytes(sample[ext])
        try:
            header = read_header(data, f"field {ext!r}")
            img = decode_image(data, f"field {ext!r}")
        except ImageDecodeError as exn:
            problems.append(str(exn))
        else:
            size = img.size
            if header.format not in _FIELD_FORMATS[ext]:
                problems.append(f"field {ext!r} holds {header.format} data (expected {'/'.join(_FIELD_FORMATS[ext])})")
    meta = sample.get("json")
    if meta is not None:
        try:
            record = json.loads(bytes(meta).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            problems.append(f"field 'json' is not UTF-8 JSON ({type(exn).__name__}: {exn})")
        else:
            if not isinstance(record, dict):
                problems.append(f"field 'json' must be a JSON object, got {type(record).__name__}")
            elif size is not None and "width" in record and (record.get("width"), record.get("height")) != size:
                problems.append(f"field 'json' says {record.get('width')}x{record.get('height')}, "
                                f"the image is {size[0]}x{size[1]}")
    return "; ".join(problems) or None


@DATASETS.register("image")
class ImageDatasetDef:
    """The ``image`` dataset: one image (``jpg``, ``png`` or ``webp``) and a ``json`` per sample.

    ``fields`` lists the fields every sample has; ``image_fields`` (also exposed as the generic
    ``optional_fields``) the fields of which exactly one holds the image.
    """

    name = "image"
    fields = ("json",)
    image_fields = IMAGE_FIELDS
    optional_fields = IMAGE_FIELDS

    build_shards = staticmethod(build_shards)
    embedded_default = staticmethod(embedded_default)
    embedded_default_digits = staticmethod(embedded_default_digits)
    check_sample = staticmethod(check_sample)
    iter_images = staticmethod(iter_images)
