"""Image-text dataset definition (UNITER-style pairs): image folder + captions -> WebDataset shards.

One shard sample per image (Chen et al. 2020, "UNITER"; as COCO / Visual Genome captions, an
image has several captions)::

    {"__key__", "<jpg|png|webp>": image bytes, "json": metadata, "txt": captions joined by "\\n",
     optional "features.npy" (R, F) float16/32, "boxes.npy" (R, 7) float32, "soft.npy" (R, C) float32}

``json`` holds ``source`` (path relative to the input folder), ``captions`` (list of strings),
``label`` / ``label_name`` (or null), ``width``, ``height``, ``reencoded_from`` and, with
regions, ``num_regions``. ``txt`` lets the text modality train its tokenizer on the caption
words (:func:`datasets_def.text.iter_texts` reads the ``.txt`` members of the training shards).
Region fields are a detector's outputs (UNITER / LXMERT use Faster R-CNN's): pooled features,
box geometry ``x1, y1, x2, y2, w, h, w*h`` normalised by the image size, and the detector's
class distribution per region (the target of masked region classification).

:func:`build_shards` reads an image folder (as :mod:`datasets_def.image`), a captions CSV
(``path,caption``, one row per caption, several rows per image allowed) or JSONL (``{"path",
"caption"}`` or ``{"path", "captions": [...]}``), and optionally a folder of per-image ``.npz``
files (``<relative path without extension>.npz`` with ``features``, ``boxes`` and optional
``soft``). Boxes given as (R, 4) pixel ``x1, y1, x2, y2`` are converted to the 7-d normalised
geometry. Everything is validated at build time; bad input stops with a message naming the file,
line or field, or with ``skip_bad`` is skipped and listed in ``manifest.json``. Nothing is lost
silently.

:func:`embedded_default` builds ``image-text-shapes-v1`` locally from the rendered
``image-shapes-v1`` scenes, with **simulated detector outputs** per scene (see its docstring).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from datasets_def import image as image_def
from datasets_def.building import (build_args, cached_build, check_build_args, finish_build, ignored_manifest, log_ignored,
                                   prepare_output, write_manifest)
from datasets_def.image import (IMAGE_FIELDS, IMAGE_SUFFIXES, MANIFEST, SPLITS, ImageBuildError, ImageBuildReport,
                                _encoded_images, _find_images, _labels_of, _rel_key, _split_manifest, _SplitWriters,
                                not_utf8_error)
from mmm.modalities.image.decode import DEFAULT_MAX_PIXELS
from mmm.modalities.image_text.pipeline import (BOX_DIM, REGION_FIELDS, RegionArrayError, captions_of, check_region_arrays, load_npy,
                                 xyxy_to_geometry)
from mmm.data.jsonl import json_objects
from mmm.modalities.text.codec import BLANK_KINDS, is_blank
from mmm.data.tar import ReadOptions, read_samples
from mmm.registry import DATASETS
from datasets_def.skipper import BadInputSkipper

logger = logging.getLogger("mmm.data")

EMBEDDED_IMAGE_TEXT = "image-text-shapes-v1"
REGION_CLASSES = (*image_def.SHAPES, "background")
"""Classes of the embedded set's simulated detector: the six shapes, then background."""
PathLike = Union[str, "os.PathLike[str]"]


class ImageTextBuildError(ImageBuildError):
    """Bad input or output for an image-text shard build; the message names the file, line or field."""


@dataclass(kw_only=True)
class ImageTextBuildReport(ImageBuildReport):
    """What a shard build wrote: an image build's report (:class:`datasets_def.image.ImageBuildReport`; ``samples``
    counts images) with the captions per split and the region arrays' sizes."""

    captions: Dict[str, int] = field(default_factory=dict)
    feature_dim: Optional[int] = None
    soft_dim: Optional[int] = None
    boxes_converted: int = 0


class _PairWriters(_SplitWriters):
    """The image set's split writers, writing image-text samples (image, json, txt, region arrays)."""

    def __init__(self, out: Path, samples_per_shard: int) -> None:
        super().__init__(out, samples_per_shard, ImageTextBuildError)
        self.captions = {s: 0 for s in SPLITS}

    def write_pair(self, split: str, key: str, ext: str, data: bytes, meta: Dict[str, Any],
                   arrays: Dict[str, np.ndarray]) -> None:
        extra = {"txt": "\n".join(meta["captions"]).encode("utf-8"), **{name: npy_bytes(a) for name, a in arrays.items()}}
        self.add(split, key, ext, data, meta, extra)
        self.captions[split] += len(meta["captions"])


def npy_bytes(a: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (no pickles).

    Args:
        a: the array.
    """
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# reading the inputs


def read_captions(path: PathLike) -> Tuple[Dict[str, List[Tuple[str, str]]], List[Tuple[str, str]]]:
    """Captions per image from a CSV (``path,caption``) or JSONL (``path`` + ``caption`` or ``captions``) file.

    Args:
        path: the captions file.

    Returns:
        ``(table, bad)``: relative path → ``[(where, caption), ...]`` in file order (``where`` is
        ``file:line``), and ``[(where, reason)]`` for empty or malformed rows, CSV rows with more
        fields than the header included (the caller raises or skips them).

    Raises:
        ImageTextBuildError: the file cannot be read, is not UTF-8 (naming line and byte offset)
            or a CSV without the ``path`` and ``caption`` columns.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"captions file does not exist: {path}")
    try:
        return _read_captions_file(path)
    except UnicodeDecodeError:
        raise not_utf8_error(path, "captions file", ImageTextBuildError) from None
    except OSError as exn:
        raise ImageTextBuildError(f"{path}: cannot read the captions file ({type(exn).__name__}: "
                                  f"{exn.strerror or exn})") from None


def _read_captions_file(path: Path) -> Tuple[Dict[str, List[Tuple[str, str]]], List[Tuple[str, str]]]:
    table: Dict[str, List[Tuple[str, str]]] = {}
    bad: List[Tuple[str, str]] = []

    def add(where: str, rel: Any, caption: Any) -> None:
        if not isinstance(rel, str) or not rel.strip():
            bad.append((where, "missing or empty 'path'"))
        elif not isinstance(caption, str):
            bad.append((where, f"caption of {rel!r} must be a string, got {type(caption).__name__}"))
        elif is_blank(caption):
            bad.append((where, f"empty caption for {rel!r} (only {BLANK_KINDS})"))
        else:
            table.setdefault(_rel_key(rel), []).append((where, " ".join(caption.split())))

    def bad_row(where: str, reason: str) -> None:
        bad.append((where, reason))

    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8-sig") as fh:
            for lineno, record in json_objects(fh, lambda n: f"{path}:{n}", ImageTextBuildError, bad_row):
                where = f"{path}:{lineno}"
                if ("caption" in record) == ("captions" in record):
                    bad.append((where, f"expected a JSON object with 'path' and one of 'caption' (a string) or "
                                       f"'captions' (a list of strings), got keys {sorted(record)}"))
                    continue
                caps = record["captions"] if "captions" in record else [record["caption"]]
                if not isinstance(caps, list):
                    bad.append((where, f"'captions' must be a list of strings, got {type(caps).__name__}"))
                    continue
                if not caps:
                    bad.append((where, f"empty 'captions' list for {record.get('path')!r}"))
                for cap in caps:
                    add(where, record.get("path"), cap)
        return table, bad
    with path.open(encoding="utf-8-sig", newline="") as fh:
        for where, row in image_def.csv_rows(fh, path, ("path", "caption"), ImageTextBuildError, bad_row):
            add(where, row.get("path"), row.get("caption") or "")
    return table, bad


def read_region_file(path: Path, width: int, height: int, *, feature_dim: Optional[int],
                     soft_dim: Optional[int]) -> Tuple[Dict[str, np.ndarray], bool]:
    """The checked region arrays of one ``.npz`` file, boxes as (R, 7) normalised geometry.

    Args:
        path: the ``.npz`` file (arrays ``features`` (R, F), ``boxes`` (R, 4) pixels or (R, 7)
            normalised, optional ``soft`` (R, C)).
        width: the image's width in pixels (for pixel boxes).
        height: the image's height in pixels.
        feature_dim: the dataset's feature size, or None for the first file.
        soft_dim: the dataset's soft-label size, or None.

    Returns:
        ``({"features.npy", "boxes.npy"[, "soft.npy"]}: arrays, boxes were converted)``.

    Raises:
        RegionArrayError: a missing, malformed or inconsistent array (the message names file and field).
    """
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, KeyError) as exn:
        raise RegionArrayError(f"{where}: not a readable .npz file ({type(exn).__name__}: {exn})") from None
    missing = [k for k in ("features", "boxes") if k not in arrays]
    if missing:
        raise RegionArrayError(f"{where}: missing array(s) {missing} (has {sorted(arrays)}; expected 'features', "
                               "'boxes' and optional 'soft')")
    extra = sorted(set(arrays) - {"features", "boxes", "soft"})
    if extra:
        raise RegionArrayError(f"{where}: unexpected array(s) {extra} (expected 'features', 'boxes', optional 'soft')")
    features, boxes, soft = arrays["features"], arrays["boxes"], arrays.get("soft")
    converted = False
    if boxes.ndim == 2 and boxes.shape[1] == 4 and np.issubdtype(boxes.dtype, np.number):
        b = boxes.astype(np.float64)
        if not np.isfinite(b).all():
            raise RegionArrayError(f"{where}: array 'boxes' holds NaN or inf")
        outside = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > width) | (b[:, 3] > height)
        flipped = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        if (outside | flipped).any():
            r = int(np.nonzero(outside | flipped)[0][0])
            raise RegionArrayError(f"{where}: array 'boxes' row {r} = {b[r].tolist()} is not an x1, y1, x2, y2 pixel "
                                   f"box inside the {width}x{height} image (x1 <= x2, y1 <= y2)")
        if len(b) and b.max() <= 1.0 and max(width, height) > 4:
            raise RegionArrayError(f"{where}: every coordinate of array 'boxes' is in [0, 1]: boxes normalised to the "
                                   f"image size, but (R, 4) boxes are x1, y1, x2, y2 in pixels of the {width}x{height} "
                                   f"image; multiply x by {width} and y by {height}, or give (R, 7) geometry")
        boxes, converted = xyxy_to_geometry(b, width, height), True
    if features.dtype == np.float64:
        features = features.astype(np.float32)
    check_region_arrays(features, boxes, soft, where, feature_dim=feature_dim, box_dim=BOX_DIM, soft_dim=soft_dim,
                        names=("features", "boxes", "soft"))
    out = {"features.npy": features, "boxes.npy": boxes.astype(np.float32)}
    if soft is not None:
        out["soft.npy"] = soft.astype(np.float32)
    return out, converted


def _region_path(regions: Path, rel: str) -> Path:
    return regions / (rel.rsplit(".", 1)[0] + ".npz")


def _images_sharing_region_files(regions: Path, images: List[Tuple[Path, str]]) -> Dict[str, List[str]]:
    """``{relative path: every image with its region file}`` for images whose region file another image would use
    too (``x.jpg`` and ``x.png`` both name ``x.npz``); the others are left out."""
    by_file: Dict[Path, List[str]] = {}
    for _, rel in images:
        by_file.setdefault(_region_path(regions, rel), []).append(rel)
    return {rel: rels for rels in by_file.values() if len(rels) > 1 for rel in rels}


# --------------------------------------------------------------------------------------------
# building shards from a folder


def build_shards(
    input_path: PathLike,
    output_dir: PathLike,
    *,
    captions: Optional[PathLike] = None,
    regions: Optional[PathLike] = None,
    labels: Union[str, PathLike, None] = None,
    feature_dim: Optional[int] = None,
    samples_per_shard: int = 1000,
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 1,
) -> ImageTextBuildReport:
    """Validate images, captions and region files and write ``{output_dir}/{split}-{index:06d}.tar``.

    Bad input (an image that does not decode, an image with no caption, a caption naming no image,
    an empty caption, a captions CSV row with more fields than its header (an unquoted comma), two
    images whose region file would be the same (``x.jpg`` and ``x.png``), a missing or malformed
    region file: wrong rank or shape, NaN, a feature size or soft-label size differing from the
    dataset's, soft rows not summing to 1, pixel boxes outside the image) stops the build with a
    message naming the file and field; with ``skip_bad`` it is skipped and listed in the manifest's
    ``skipped``.

    Args:
        input_path: the image folder (searched recursively; hidden files skipped).
        output_dir: where shards go; must hold no shards/manifest unless ``overwrite``.
        captions: CSV (``path,caption``; one row per caption) or JSONL (``{"path", "caption"}`` or
            ``{"path", "captions": [...]}``) file, paths relative to ``input_path``. Required.
        regions: None, or a folder of ``<relative path without extension>.npz`` region files,
            one per image (arrays ``features`` (R, F), ``boxes`` (R, 4) pixel xyxy or (R, 7)
            normalised UNITER geometry, optional ``soft`` (R, C)).
        labels: None, ``"folders"`` or a labels CSV, as in :func:`datasets_def.image.build_shards`.
        feature_dim: the region feature size every file must have (e.g. ``model.regions.feature_dim``);
            None: the first region file written sets it.
        samples_per_shard: images per tar shard.
        val_fraction: fraction of images (by a stable hash of the relative path) put in val.
        seed: salt of the split hash and of the write order.
        skip_bad: skip (and report) bad input instead of raising.
        overwrite: delete existing ``*.tar`` and manifest in ``output_dir`` first.
        max_pixels: refuse images with more pixels (checked on the header, before decoding).
        min_size: refuse images narrower or shorter than this many pixels.
    """
    if captions is None:
        raise ImageTextBuildError("the image_text dataset needs a captions file (captions=... / --captions x.csv)")
    check_build_args(samples_per_shard, val_fraction, ImageTextBuildError)
    src = Path(input_path).expanduser()
    out = Path(output_dir).expanduser()
    region_dir = Path(regions).expanduser() if regions is not None else None
    if region_dir is not None and not region_dir.is_dir():
        raise FileNotFoundError(f"regions folder does not exist: {region_dir}")
    skipper = BadInputSkipper(skip_bad, ImageTextBuildError)
    images, ignored = _find_images(src, skipper, ImageTextBuildError)
    caption_table, bad_rows = read_captions(captions)
    for where, reason in bad_rows:
        skipper.bad(where, reason)
    present = {rel for _, rel in images}
    for rel in sorted(caption_table.keys() - present):
        skipper.bad(caption_table[rel][0][0], f"caption for {rel!r}, which is not an image file under {src}")
    label_of, label_names = _labels_of(images, src, labels, skipper)
    sharing = _images_sharing_region_files(region_dir, images) if region_dir is not None else {}
    usable = []
    for i, (path, rel) in enumerate(images):
        if rel not in label_of:
            continue  # reported by _labels_of
        if rel not in caption_table:
            skipper.bad(rel, f"image has no caption in {captions}")
            continue
        if rel in sharing:
            others = ", ".join(repr(r) for r in sharing[rel] if r != rel)
            skipper.bad(rel, f"region file {_region_path(region_dir, rel)} would also serve {others} (region files are "
                             "named by the image path without its extension): rename one image so each has its own")
            continue
        usable.append((i, path, rel))
    if region_dir is not None:
        wanted = {_region_path(region_dir, rel).resolve() for _, rel in images}
        for p in sorted(region_dir.rglob("*.npz")):
            if p.resolve() not in wanted:
                skipper.bad(str(p), f"region file names no image under {src} (expected <image path without "
                                    "extension>.npz)")
    prepare_output(out, overwrite, ImageTextBuildError)
    log_ignored("image_text", ignored, "images (" + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")

    soft_dim: Optional[int] = None
    dims_from = "" if feature_dim is None else "feature_dim"
    converted = 0
    first_written = ""  # the first region file written: it sets whether the dataset has soft labels
    with _PairWriters(out, samples_per_shard) as writers:
        for split, index, rel, ext, payload, info in _encoded_images(usable, val_fraction, seed, skipper,
                                                                    max_pixels=max_pixels, min_size=min_size):
            arrays: Dict[str, np.ndarray] = {}
            if region_dir is not None:
                rp = _region_path(region_dir, rel)
                if not rp.is_file():
                    skipper.bad(rel, f"no region file {rp} (every image needs one when regions are given)")
                    continue
                try:
                    arrays, conv = read_region_file(rp, info["width"], info["height"], feature_dim=feature_dim,
                                                    soft_dim=soft_dim)
                except RegionArrayError as exn:
                    reason = str(exn).removeprefix(f"{rp}: ")
                    skipper.bad(str(rp), reason + (f" (the dataset's sizes were set by {dims_from})"
                                                   if dims_from and "expected" in reason else ""))
                    continue
                if not first_written:
                    first_written = str(rp)
                    if feature_dim is None:
                        feature_dim, dims_from = int(arrays["features.npy"].shape[1]), str(rp)
                    soft_dim = int(arrays["soft.npy"].shape[1]) if "soft.npy" in arrays else None
                elif (soft_dim is None) != ("soft.npy" not in arrays):
                    skipper.bad(str(rp), f"array 'soft' is {'missing' if soft_dim else 'present'} but "
                                         f"{first_written} {'has' if soft_dim else 'has none'} (soft labels for "
                                         "every image or for none)")
                    continue
                converted += conv
            label, label_name = label_of[rel]
            meta = {"source": rel, "captions": [c for _, c in caption_table[rel]], "label": label,
                    "label_name": label_name, **info}
            if arrays:
                meta["num_regions"] = int(arrays["features.npy"].shape[0])
            writers.write_pair(split, f"{index:09d}", ext, payload, meta, arrays)
        shards = writers.close()
    if sum(writers.samples.values()) == 0:
        writers.abort()
        raise ImageTextBuildError(f"no usable image-caption pairs in {src} ({len(skipper.skipped)} skipped: "
                                  f"{skipper.skipped[:3]})")
    splits = _split_manifest(writers, shards)
    for s in SPLITS:
        splits[s]["captions"] = writers.captions[s]
    manifest = {
        "dataset": "image_text",
        "fields": list(ImageTextDatasetDef.fields),
        "image_fields": list(IMAGE_FIELDS),
        "region_fields": list(REGION_FIELDS) if region_dir is not None else [],
        "files": len(images),
        **ignored_manifest(ignored),
        "splits": splits,
        "shard_files": shards,
        "label_names": label_names,
        "feature_dim": feature_dim,
        "box_dim": BOX_DIM if region_dir is not None else None,
        "soft_dim": soft_dim,
        "boxes_converted_from_xyxy": converted,
        "build_args": build_args(src, samples_per_shard, val_fraction, seed, skip_bad, captions=str(captions),
                                 regions=None if region_dir is None else str(region_dir),
                                 labels=labels if labels is None or labels == "folders" else str(labels),
                                 max_pixels=max_pixels, min_size=min_size),
    }
    finish_build("image_text", writers, manifest, skipper.skipped, ImageTextBuildError)
    return ImageTextBuildReport(output_dir=out, files=len(images), samples=dict(writers.samples), shards=shards,
                                skipped=skipper.skipped, ignored=len(ignored), label_names=label_names,
                                captions=dict(writers.captions), feature_dim=feature_dim, soft_dim=soft_dim,
                                boxes_converted=converted)


# --------------------------------------------------------------------------------------------
# embedded default: rendered shapes + simulated detector regions


def _raw_samples(shard: str, options: Optional[ReadOptions] = None) -> Iterator[Dict[str, bytes]]:
    """Raw ``{"__key__", field: bytes}`` samples of one tar shard, in order (:func:`mmm.data.tar.read_samples`)."""
    for sample in read_samples([shard], options):
        sample.pop("__url__", None)
        yield sample


def object_box(pixels: np.ndarray, color: str) -> Optional[Tuple[int, int, int, int]]:
    """Pixel box ``x1, y1, x2, y2`` (end exclusive) of the pixels that show the scene's shape colour.

    A pixel belongs to the shape when it is within 60 of the nominal colour and saturated (the
    backgrounds are greyish); None when no pixel matches.

    Args:
        pixels: (H, W, 3) uint8 image.
        color: one of :data:`datasets_def.image.COLORS`.
    """
    x = pixels.astype(np.float32)
    dist = np.linalg.norm(x - np.asarray(image_def.COLORS[color], dtype=np.float32), axis=-1)  # (H, W)
    sat = x.max(-1) - x.min(-1)
    ys, xs = np.nonzero((dist < 60) & (sat > 60))
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_iou(a: Tuple[int, int, int, int], b: np.ndarray) -> np.ndarray:
    """(R,) intersection over union of box ``a`` with each of the (R, 4) boxes ``b`` (xyxy).

    Args:
        a: one box.
        b: (R, 4) boxes.
    """
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    area = lambda x1, y1, x2, y2: (x2 - x1) * (y2 - y1)  # noqa: E731
    return inter / (area(*a) + area(b[:, 0], b[:, 1], b[:, 2], b[:, 3]) - inter)


def simulated_region_features(pixels: np.ndarray, boxes: np.ndarray, grid: int = 4) -> np.ndarray:
    """(..., R, 3·grid² + 16) float32 features computed from the pixels inside each box.

    Per box: the crop averaged over a ``grid x grid`` grid of cells, RGB in [0, 1] (48 values at
    grid 4), the crop's mean and std per channel (6), an 8-bin histogram of saturation
    (max - min channel) (8), the share of saturated pixels (1) and the box's log aspect ratio (1).
    Sums over a box (or a cell) are contractions with its row and column indicator vectors, so a
    whole shard of images costs a few array operations.

    Args:
        pixels: (H, W, 3) uint8 image, or (N, H, W, 3) images.
        boxes: (R, 4) int pixel boxes xyxy (end exclusive), each at least 1x1, or (N, R, 4).
        grid: cells per side of the averaged crop.
    """
    single = pixels.ndim == 3
    px = pixels[None] if single else pixels  # (N, H, W, 3)
    b = np.asarray(boxes, dtype=np.int64)
    b = b[None] if single else b  # (N, R, 4)
    n, r = b.shape[:2]
    h, w = px.shape[1:3]
    x = px.astype(np.float32) / 255.0  # (N, H, W, 3)
    sat = x.max(-1) - x.min(-1)  # (N, H, W)
    bins = np.minimum((sat * 8).astype(np.int64), 7)
    planes = np.concatenate([x, x * x, np.eye(8, dtype=np.float32)[bins], (sat > 0.25)[..., None]], -1)  # (N, H, W, 15)
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]  # (N, R)

    def inside(lo, hi, size):  # (...,) -> (..., size) float indicator of [lo, hi)
        k = np.arange(size)
        return ((k >= lo[..., None]) & (k < hi[..., None])).astype(np.float32)

    area = ((x2 - x1) * (y2 - y1)).astype(np.float32)[..., None]  # (N, R, 1)
    whole = np.einsum("nrh,nhwc,nrw->nrc", inside(y1, y2, h), planes, inside(x1, x2, w), optimize=True) / area
    mean = whole[..., :3]
    std = np.sqrt(np.maximum(whole[..., 3:6] - mean ** 2, 0.0))
    k = np.arange(grid)

    def edges(lo, hi):  # (N, R) -> (N, R, g) cell starts and ends, every cell at least one pixel
        size = (hi - lo)[..., None]
        a = np.minimum(lo[..., None] + (k * size) // grid, hi[..., None] - 1)
        return a, np.maximum(lo[..., None] + ((k + 1) * size) // grid, a + 1)

    (cx1, cx2), (cy1, cy2) = edges(x1, x2), edges(y1, y2)
    cells = np.einsum("nrah,nhwc,nrbw->nrabc", inside(cy1, cy2, h), x, inside(cx1, cx2, w), optimize=True)
    cell_area = ((cy2 - cy1)[..., :, None] * (cx2 - cx1)[..., None, :]).astype(np.float32)[..., None]  # (N, R, g, g, 1)
    small = (cells / cell_area).reshape(n, r, -1)  # (N, R, g*g*3), cells row-major
    aspect = np.log((x2 - x1) / (y2 - y1)).astype(np.float32)[..., None]
    out = np.concatenate([small, mean, std, whole[..., 6:14], whole[..., 14:15], aspect], axis=-1).astype(np.float32)
    return out[0] if single else out


def simulated_soft_labels(classes: np.ndarray, rng: np.random.Generator, num_classes: int = len(REGION_CLASSES)
                          ) -> np.ndarray:
    """(R, C) smoothed one-hot class distributions with seeded noise (a detector's soft labels).

    Each row is ``(1 - s) * onehot + s * d`` with ``s ~ U(0.05, 0.3)`` and ``d ~ Dirichlet(1)``.

    Args:
        classes: (R,) int true class of each region.
        rng: the generator to draw from.
        num_classes: C.
    """
    onehot = np.eye(num_classes, dtype=np.float64)[classes]
    s = rng.uniform(0.05, 0.3, size=(len(classes), 1))
    soft = (1 - s) * onehot + s * rng.dirichlet(np.ones(num_classes), size=len(classes))
    return (soft / soft.sum(1, keepdims=True)).astype(np.float32)


def _scene_regions(pixels: np.ndarray, meta: Dict[str, Any], rng: np.random.Generator, background_boxes: int
                   ) -> Tuple[np.ndarray, Dict[str, np.ndarray], Dict[str, Any]]:
    """(R, 4) pixel boxes, region arrays but the features, and json additions for one rendered scene."""
    h, w = pixels.shape[:2]
    found = object_box(pixels, meta["color"])
    obj = found if found is not None else (0, 0, w, h)
    bw = rng.integers(max(2, w // 5), max(3, (2 * w) // 3), size=background_boxes)
    bh = rng.integers(max(2, h // 5), max(3, (2 * h) // 3), size=background_boxes)
    bx = (rng.random(background_boxes) * (w - bw + 1)).astype(np.int64)
    by = (rng.random(background_boxes) * (h - bh + 1)).astype(np.int64)
    boxes = np.concatenate([np.asarray([obj]), np.stack([bx, by, bx + bw, by + bh], 1)]).astype(np.int64)  # (R, 4)
    order = rng.permutation(len(boxes))  # a detector lists regions in no fixed role order
    boxes = boxes[order]
    shape_class = image_def.SHAPES.index(meta["shape"])
    classes = np.where(box_iou(obj, boxes) >= 0.5, shape_class, len(REGION_CLASSES) - 1)
    arrays = {"boxes.npy": xyxy_to_geometry(boxes, w, h), "soft.npy": simulated_soft_labels(classes, rng)}
    extra = {"bbox": list(obj), "bbox_found": found is not None, "num_regions": len(boxes),
             "object_region": int(np.nonzero(order == 0)[0][0]), "region_classes": classes.tolist()}
    return boxes, arrays, extra


def _build_image_text(out: Path, *, source: Path, samples_per_shard: int = 1000, seed: int = 0,
                      background_boxes: int = 3, grid: int = 4) -> str:
    """Write the embedded image-text set into ``out`` from the rendered shapes shards at ``source``; returns its size."""
    from mmm.data.stream import list_shards

    out.mkdir(parents=True, exist_ok=True)
    writers = _PairWriters(out, samples_per_shard)
    unseen = not_found = 0
    for split_id, split in enumerate(SPLITS):
        for shard in list_shards(source, split=split):
            samples = list(_raw_samples(shard))
            pixels = np.stack([np.asarray(Image.open(io.BytesIO(x["png"])).convert("RGB")) for x in samples])
            scenes = []
            for sample, px in zip(samples, pixels):
                meta = json.loads(sample["json"].decode("utf-8"))
                rng = np.random.default_rng([seed, split_id, int(sample["__key__"])])
                scenes.append((meta, *_scene_regions(px, meta, rng, background_boxes)))
            features = simulated_region_features(pixels, np.stack([sc[1] for sc in scenes]), grid)  # (N, R, F)
            for sample, (meta, _, arrays, extra), feats in zip(samples, scenes, features):
                key = sample["__key__"]
                not_found += not extra["bbox_found"]
                unseen += split == "val" and bool(meta["unseen_combo"])
                attrs = (meta["shape"], meta["color"], meta["size"], meta["position"])
                template = next(t for t in range(3) if image_def.shape_caption(*attrs, t) == meta["caption"])
                other = int(hashlib.blake2b(key.encode(), digest_size=2).hexdigest(), 16) % 2 + 1
                meta = {k: v for k, v in meta.items() if k != "caption"}
                meta.update(captions=[image_def.shape_caption(*attrs, template),
                                      image_def.shape_caption(*attrs, (template + other) % 3)], **extra)
                arrays = {"features.npy": feats.astype(np.float16), **arrays}
                writers.write_pair(split, key, "png", sample["png"], meta, arrays)
    shards = writers.close()
    splits = _split_manifest(writers, shards)
    for s in SPLITS:
        splits[s]["captions"] = writers.captions[s]
    splits["val"]["unseen_combo_samples"] = unseen
    source_manifest = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    feature_dim = 3 * grid * grid + 16
    write_manifest(out, {
        "dataset": "image_text",
        "name": EMBEDDED_IMAGE_TEXT,
        "source": image_def.EMBEDDED_SHAPES,
        "fields": list(ImageTextDatasetDef.fields),
        "image_fields": ["png"],
        "region_fields": list(REGION_FIELDS),
        "image_size": source_manifest["image_size"],
        "splits": splits,
        "shard_files": shards,
        "label_names": list(image_def.SHAPES),
        "feature_dim": feature_dim,
        "box_dim": BOX_DIM,
        "soft_dim": len(REGION_CLASSES),
        "region_classes": list(REGION_CLASSES),
        "simulated_regions": "not a detector: per scene the shape's box (pixels matching its colour) plus "
                             f"{background_boxes} seeded random boxes; features from the pixels inside each box; "
                             "soft labels = smoothed one-hot (shape if IoU >= 0.5 with the shape's box, else "
                             "background) with seeded Dirichlet noise",
        "object_box_not_found": not_found,
        "held_out_combos": source_manifest["held_out_combos"],
        "attributes": source_manifest["attributes"],
        "build_args": {"samples_per_shard": samples_per_shard, "seed": seed, "background_boxes": background_boxes,
                       "grid": grid},
        "skipped": [],
    }, ImageTextBuildError)
    return f"{writers.total} image-text samples"


def embedded_default(cache_dir: Optional[PathLike] = None) -> Path:
    """The embedded image-text set ``image-text-shapes-v1``: rendered scenes, two captions, simulated regions.

    Built from ``image-shapes-v1`` (:func:`datasets_def.image.embedded_default`: same images,
    keys, labels and splits; the six held-out (shape, colour) pairs are only in val). Per scene:

    * ``captions``: the scene's caption and the same description in another template (2 per image);
    * **simulated detector outputs, derived from the rendered pixels -- no detector was run**:
      4 regions, the shape's box (the pixels whose colour matches the scene's shape colour; the
      json's ``bbox``) and 3 seeded random background boxes, in a seeded order (json
      ``object_region``); ``features.npy`` (4, 64) float16 from the pixels inside each box
      (:func:`simulated_region_features`); ``boxes.npy`` (4, 7) UNITER geometry; ``soft.npy`` (4, 7)
      over the six shapes + background: a smoothed one-hot (the shape when the box overlaps the
      shape's box with IoU >= 0.5, else background) with seeded Dirichlet noise
      (:func:`simulated_soft_labels`).

    Deterministic; built in a few seconds at ``{cache_dir}/datasets/image-text-shapes-v1/``
    (temporary directory renamed into place, as the image sets).

    Args:
        cache_dir: cache root; default ``$MMM_CACHE_DIR`` or ``~/.cache/mmm``.

    Returns:
        The directory holding ``train-*.tar``, ``val-*.tar`` and ``manifest.json``.
    """
    source = image_def.embedded_default(cache_dir)
    return cached_build(EMBEDDED_IMAGE_TEXT, cache_dir, partial(_build_image_text, source=source), ImageTextBuildError)


# --------------------------------------------------------------------------------------------
# checking samples


def check_sample(sample: Dict[str, Any]) -> Optional[str]:
    """Say what is wrong with one raw shard sample, or None when it is sound.

    The image fields and ``json`` are checked as :func:`datasets_def.image.check_sample` does;
    ``json`` must hold ``captions`` (non-empty strings) and ``txt`` must be those captions joined
    by newlines; region fields, when present, must be ``features.npy`` with ``boxes.npy`` (and
    optional ``soft.npy``) passing :func:`mmm.modalities.image_text.pipeline.check_region_arrays`.

    Args:
        sample: ``{"<field>": bytes, ...}`` as read from a shard (``__key__`` etc. are ignored).
    """
    problems: List[str] = []
    bad_image = image_def.check_sample({k: v for k, v in sample.items() if k in (*IMAGE_FIELDS, "json")})
    if bad_image:
        problems.append(bad_image)
    meta: Dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(bytes(sample["json"]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}  # reported by the image check
        if not isinstance(meta, dict):
            meta = {}
    if "captions" not in meta:
        problems.append("field 'json' has no 'captions' list")
    else:
        try:
            caps = captions_of(sample, meta, "sample")
        except ValueError as exn:
            problems.append(str(exn).removeprefix("sample: "))
        else:
            if "txt" in sample:
                try:
                    txt = bytes(sample["txt"]).decode("utf-8")
                except UnicodeDecodeError as exn:
                    problems.append(f"field 'txt' is not UTF-8 ({exn})")
                else:
                    if txt != "\n".join(caps):
                        problems.append("field 'txt' differs from the json captions joined by newlines")
    present = [f for f in REGION_FIELDS if f in sample]
    if present:
        try:
            if "features.npy" not in sample or "boxes.npy" not in sample:
                raise RegionArrayError(f"region fields {present} without both 'features.npy' and 'boxes.npy'")
            soft = load_npy(sample["soft.npy"], "sample", "soft.npy") if "soft.npy" in sample else None
            check_region_arrays(load_npy(sample["features.npy"], "sample", "features.npy"),
                                load_npy(sample["boxes.npy"], "sample", "boxes.npy"), soft, "sample")
        except RegionArrayError as exn:
            problems.append(str(exn).removeprefix("sample: "))
    return "; ".join(problems) or None


@DATASETS.register("image_text")
class ImageTextDatasetDef:
    """The ``image_text`` dataset: one image with its captions (and optional detector regions) per sample.

    ``fields`` are in every sample; ``optional_fields`` lists the image fields (exactly one holds
    the image) and the region arrays.
    """

    name = "image_text"
    modality = "image_text"
    fields = ("json", "txt")
    image_fields = IMAGE_FIELDS
    region_fields = REGION_FIELDS
    optional_fields = (*IMAGE_FIELDS, *REGION_FIELDS)

    build_shards = staticmethod(build_shards)
    embedded_default = staticmethod(embedded_default)
    check_sample = staticmethod(check_sample)
    read_captions = staticmethod(read_captions)
    text_name = "caption"

    @staticmethod
    def texts_of(sample: Dict[str, Any], where: str) -> List[str]:
        """The captions of a raw sample, as training reads them (``mmm shards stats`` counts each one)."""
        from mmm.data.fields import sample_json
        from mmm.modalities.image_text.pipeline import captions_of

        return captions_of(sample, sample_json(sample, ValueError), where)
