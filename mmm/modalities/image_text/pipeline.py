"""Image-text stages of the streaming pipeline (UNITER single stream): decode → pairs → mask → pack.

UNITER (Chen et al. 2020, "UNITER: UNiversal Image-TExt Representation Learning") encodes an
image and its caption as *one* sequence -- text tokens first (``[CLS] ... [SEP]``), then the image
tokens (patches of the image embedder, [CLS] included when it has one, or detector regions) --
and pretrains it with *conditional masking*: one modality is masked while the other stays fully
visible. Each task of a run picks a ``mode``:

* ``mlm``: the caption is masked with a token masker; ``targets["text"]`` are
  :class:`~mmm.batch.TokenTargets` at the masked text positions of the stream.
* ``mrm``: image tokens are masked (patches in mask-token mode, or regions); ``targets["mrm"]``
  are :class:`~mmm.batch.RegionTargets` -- region features and detector soft labels from the
  shards, or for patches the ``(image, patch)`` index a teacher encoder fills targets for. With
  patches and the image modality's k-means codebook (``model.image.visual_tokens``), the hidden
  patches also get their visual-token ids, ``targets["image_tokens"]`` (masked visual-token
  modeling, VIOLET / E-ViLM; the same key and codes as the image modality's BEiT-style targets).
* ``itm``: nothing is masked; a fraction ``itm_negatives`` of the pairs get the caption of
  another pair of the batch that is not one of their image's captions (UNITER's ITM negatives,
  drawn from the seeded generator; two images may share a caption text); ``targets["itm"]`` are :class:`~mmm.batch.PairTargets`.
* ``itc``: CLIP-style (Radford et al. 2021): the B captions and the B images are 2B separate
  single-modality sequences; ``targets["itc"]`` are :class:`~mmm.batch.ContrastiveTargets`.

Every shard sample is one image with several captions; it becomes one pair per caption, none
dropped. Captions longer than ``max_text_len`` tokens are cut (and counted in
``extras["text_cut"]``). Images are resized, never cropped or flipped: a caption says "on the
left", so augmentation would make pairs false. Every random choice (masks, ITM negatives) is drawn
from generators keyed by (seed, epoch, rank, worker) (:class:`~mmm.data.epoch.SeededMap`), so a
resumed run sees the same batches.

Region arrays (``features.npy`` (R, F), ``boxes.npy`` (R, 7), ``soft.npy`` (R, C)) are decoded
and checked by :func:`decode_regions`; the shard builder (:mod:`datasets_def.image_text`) uses the
same checks.
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import webdataset as wds

from mmm.batch import (ContrastiveTargets, ImageInput, PackedBatch, PairTargets, RegionInput, RegionTargets,
                       TokenInput, TokenTargets)
from mmm.core.packing import PackedSeqInfo, index_ranges
from mmm.data.epoch import EpochCounter, SeededMap
from mmm.data.fields import sample_json
from mmm.modalities.image.pipeline import ImageSettings, read_image_sample, visual_token_features
from mmm.modalities.image.decode import ImageDecodeError
from mmm.modalities.image.transforms import eval_transform, normalize
from mmm.modalities.text.codec import BLANK_KINDS, is_blank

logger = logging.getLogger("mmm.data")

Handler = Callable[[Exception], bool]
MODES = ("mlm", "mrm", "itm", "itc")
IMAGE_INPUTS = ("patches", "regions")
REGION_FIELDS = ("features.npy", "boxes.npy", "soft.npy")
BOX_DIM = 7
SOFT_TOLERANCE = 1e-2  # a soft-label row may sum to 1 within this (float16 storage rounds)


class RegionArrayError(ValueError):
    """A region array is malformed; the message names the sample (or file) and the field."""


# --------------------------------------------------------------------------------------------
# region arrays


@dataclass
class Regions:
    """One image's detector regions.

    Args:
        features: (R, F) float32 region features.
        boxes: (R, G) float32 normalised box geometry.
        soft: (R, C) float32 detector class distributions, or None.
    """

    features: np.ndarray
    boxes: np.ndarray
    soft: Optional[np.ndarray] = None

    @property
    def count(self) -> int:
        return int(self.features.shape[0])


def load_npy(data: bytes, where: str, field: str) -> np.ndarray:
    """A ``.npy`` array from bytes (no pickles); errors name ``where`` and the field.

    Args:
        data: the field's bytes.
        where: shard:key or file, for messages.
        field: the field name (``features.npy``, ...).
    """
    try:
        return np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exn:
        raise RegionArrayError(f"{where}: field {field!r} is not a readable .npy array ({type(exn).__name__}: "
                               f"{exn})") from None


def xyxy_to_geometry(xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """(R, 4) pixel boxes ``x1, y1, x2, y2`` → (R, 7) UNITER geometry ``x1, y1, x2, y2, w, h, w*h`` in [0, 1].

    Args:
        xyxy: (R, 4) boxes in pixels.
        width: image width in pixels.
        height: image height in pixels.
    """
    b = np.asarray(xyxy, dtype=np.float64) / np.array([width, height, width, height], dtype=np.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return np.concatenate([b, w[:, None], h[:, None], (w * h)[:, None]], axis=1).astype(np.float32)


def _float_array(a: np.ndarray, where: str, field: str) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        raise RegionArrayError(f"{where}: field {field!r} has dtype {a.dtype}; expected float16 or float32")
    if a.ndim != 2:
        raise RegionArrayError(f"{where}: field {field!r} must be 2-D (regions, values), got shape {a.shape}")
    if not np.isfinite(a).all():
        r = int(np.nonzero(~np.isfinite(a).all(axis=1))[0][0])
        raise RegionArrayError(f"{where}: field {field!r} holds NaN or inf (first in region {r})")
    return a


def check_region_arrays(features: np.ndarray, boxes: np.ndarray, soft: Optional[np.ndarray], where: str, *,
                        feature_dim: Optional[int] = None, box_dim: int = BOX_DIM,
                        soft_dim: Optional[int] = None, max_regions: Optional[int] = None,
                        names: Tuple[str, str, str] = REGION_FIELDS) -> None:
    """Raise :class:`RegionArrayError` naming ``where`` and the field unless the arrays are sound.

    ``features`` (R, F) and ``boxes`` (R, box_dim) must be finite floats with R >= 1 equal rows;
    boxes must lie in [0, 1] with ``x1 <= x2`` and ``y1 <= y2``; ``soft`` (R, C), when given,
    non-negative rows summing to 1.

    Args:
        features: region features.
        boxes: box geometry (already normalised).
        soft: detector class distributions, or None.
        where: shard:key or file, for messages.
        feature_dim: expected F (None: any).
        box_dim: expected box size.
        soft_dim: expected C (None: any).
        max_regions: most regions allowed (None: any).
        names: how the three arrays are called in messages.
    """
    fn, bn, sn = names
    _float_array(features, where, fn)
    _float_array(boxes, where, bn)
    r = features.shape[0]
    if r < 1:
        raise RegionArrayError(f"{where}: field {fn!r} has no regions (shape {features.shape}); expected at least one")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise RegionArrayError(f"{where}: field {fn!r} has feature size {features.shape[1]}, expected {feature_dim} "
                               f"(shape {features.shape})")
    if max_regions is not None and r > max_regions:
        raise RegionArrayError(f"{where}: field {fn!r} has {r} regions, more than max_regions={max_regions}")
    if boxes.shape != (r, box_dim):
        raise RegionArrayError(f"{where}: field {bn!r} has shape {boxes.shape}, expected ({r}, {box_dim}) "
                               f"(one {box_dim}-d box per region of {fn!r})")
    if boxes.min() < -1e-3 or boxes.max() > 1 + 1e-3:
        raise RegionArrayError(f"{where}: field {bn!r} values must be normalised to [0, 1], found "
                               f"[{boxes.min():.4g}, {boxes.max():.4g}] (pixel boxes? give (R, 4) x1, y1, x2, y2 "
                               "pixels to the shard builder, which converts them)")
    if box_dim >= 4 and ((boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any()):
        bad = int(np.nonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0][0])
        raise RegionArrayError(f"{where}: field {bn!r} region {bad} has x2 < x1 or y2 < y1: {boxes[bad].tolist()}")
    if soft is not None:
        _float_array(soft, where, sn)
        if soft.shape[0] != r:
            raise RegionArrayError(f"{where}: field {sn!r} has {soft.shape[0]} rows, expected {r} (one per region)")
        if soft_dim is not None and soft.shape[1] != soft_dim:
            raise RegionArrayError(f"{where}: field {sn!r} has {soft.shape[1]} classes, expected {soft_dim}")
        if (soft < 0).any():
            raise RegionArrayError(f"{where}: field {sn!r} has negative probabilities")
        sums = soft.astype(np.float64).sum(axis=1)
        off = np.nonzero(np.abs(sums - 1.0) > SOFT_TOLERANCE)[0]
        if off.size:
            raise RegionArrayError(f"{where}: field {sn!r} row {int(off[0])} sums to {sums[off[0]]:.4g}, expected 1 "
                                   f"(a class distribution per region)")


def decode_regions(sample: Dict[str, Any], where: str, *, feature_dim: int, box_dim: int = BOX_DIM,
                   max_regions: Optional[int] = None) -> Regions:
    """The checked :class:`Regions` of a raw shard sample (``features.npy``, ``boxes.npy``, optional ``soft.npy``).

    Args:
        sample: raw ``{"<field>": bytes}`` sample.
        where: shard:key, for messages.
        feature_dim: expected feature size (``model.regions.feature_dim``).
        box_dim: expected box size (``model.regions.box_dim``).
        max_regions: most regions per image (``model.regions.max_regions``).
    """
    missing = [f for f in REGION_FIELDS[:2] if f not in sample]
    if missing:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise RegionArrayError(f"{where}: no region field(s) {missing} (has {have}); image_input: regions needs "
                               "shards built with region features")
    features = load_npy(sample["features.npy"], where, "features.npy")
    boxes = load_npy(sample["boxes.npy"], where, "boxes.npy")
    soft = load_npy(sample["soft.npy"], where, "soft.npy") if "soft.npy" in sample else None
    check_region_arrays(features, boxes, soft, where, feature_dim=feature_dim, box_dim=box_dim, max_regions=max_regions)
    return Regions(features.astype(np.float32), boxes.astype(np.float32),
                   None if soft is None else soft.astype(np.float32))


# --------------------------------------------------------------------------------------------
# decoding


@dataclass(frozen=True)
class ImageTextSettings:
    """What the image-text stages need from the config.

    Args:
        mode: ``mlm`` | ``mrm`` | ``itm`` | ``itc``.
        image_input: ``patches`` or ``regions``.
        max_text_len: longest caption in tokens, [CLS] and [SEP] included.
        itm_negatives: ITM: fraction of pairs given another pair's caption.
        image: image decoding and patch grid (patches), or None.
        feature_dim: region feature size (regions).
        box_dim: region box size (regions).
        max_regions: most regions per image (regions).
        layout: ``single`` (caption then image in one sequence, UNITER) or ``two_stream`` (caption and
            image as two sequences of the batch, paired through ``PackedBatch.partners``, LXMERT).
        codebook: the image modality's visual-token codebook (:class:`~mmm.targets.kmeans.Codebook`),
            or None; with patches, mode ``mrm`` batches then carry ``targets["image_tokens"]``.
    """

    mode: str
    image_input: str
    max_text_len: int = 40
    itm_negatives: float = 0.5
    image: Optional[ImageSettings] = None
    feature_dim: int = 2048
    box_dim: int = BOX_DIM
    max_regions: int = 100
    layout: str = "single"
    codebook: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"image_text mode must be one of {MODES}, got {self.mode!r}")
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"model.image_text.image_input must be one of {IMAGE_INPUTS}, got {self.image_input!r}")
        if self.image_input == "patches" and self.image is None:
            raise ValueError("image_input: patches needs image settings")
        if isinstance(self.max_text_len, bool) or not isinstance(self.max_text_len, int) or self.max_text_len < 3:
            raise ValueError(f"model.image_text.max_text_len must be an int >= 3 ([CLS], a token, [SEP]), got "
                             f"{self.max_text_len!r}")
        if self.layout not in ("single", "two_stream"):
            raise ValueError(f"model.image_text.layout must be single or two_stream, got {self.layout!r}")
        if not 0.0 <= float(self.itm_negatives) <= 1.0:
            raise ValueError(f"model.image_text.itm_negatives must be in [0, 1], got {self.itm_negatives!r}")

    @property
    def vision_key(self) -> str:
        """The batch input (and embedder) name of the image side: ``image`` or ``regions``."""
        return "image" if self.image_input == "patches" else "regions"

    @property
    def image_prefix(self) -> int:
        """Image tokens before the patches ([CLS] of the image embedder), 0 for regions."""
        return 1 if self.image_input == "patches" and self.image.cls_token else 0


@dataclass
class PairItem:
    """One decoded shard sample: an image (pixels or regions) with all its captions.

    Args:
        key: the sample's key.
        label: class label from the json, -1 when absent.
        captions: the captions (each non-blank).
        pixels: (3, S, S) uint8 resized image (patches), or None.
        regions: the image's regions (regions), or None.
        encoded: every caption as :func:`encode_caption` gives it, once per sample (:func:`tokenize_captions`);
            empty until then.
        keys: every caption's :func:`caption_key`, set with ``encoded``.
    """

    key: str
    label: int
    captions: List[str]
    pixels: Optional[torch.Tensor] = None
    regions: Optional[Regions] = None
    encoded: List[Tuple[np.ndarray, np.ndarray, bool]] = field(default_factory=list)
    keys: List[str] = field(default_factory=list)


def captions_of(sample: Dict[str, Any], meta: Dict[str, Any], where: str) -> List[str]:
    """The captions of a raw sample: json ``captions`` (a list of strings), else the lines of ``txt``.

    Args:
        sample: raw sample.
        meta: its decoded json.
        where: shard:key, for messages.
    """
    if "captions" in meta:
        caps = meta["captions"]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{where}: json 'captions' must be a list of strings, got {caps!r:.80}")
        field = "json 'captions'"
    elif "txt" in sample:
        try:
            caps = bytes(sample["txt"]).decode("utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: field 'txt' is not UTF-8 ({e})") from None
        caps = [c for c in caps if not is_blank(c)]
        field = "txt"
    else:
        raise ValueError(f"{where}: no captions (neither json 'captions' nor a 'txt' field)")
    blank = [i for i, c in enumerate(caps) if is_blank(c)]
    if blank:
        raise ValueError(f"{where}: {field} caption {blank[0]} is empty (only {BLANK_KINDS})")
    if not caps:
        raise ValueError(f"{where}: {field} holds no caption")
    return [c.strip() for c in caps]


def read_pair_sample(sample: Dict[str, Any], settings: ImageTextSettings) -> PairItem:
    """Decode one raw shard sample into a :class:`PairItem`; errors name the shard, key and field.

    Args:
        sample: raw ``{"__key__", "__url__", "<field>": bytes}`` sample.
        settings: the stages' settings (which image input to decode).
    """
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    where = f"{url}:{key}"
    pixels = regions = None
    if settings.image_input == "patches":
        img, meta = read_image_sample(sample, settings.image)  # decode guards: bombs, truncation, tiny images
        pixels = eval_transform(img, settings.image.image_size)  # (3, S, S) uint8
    else:
        meta = sample_json(sample, ValueError)
        regions = decode_regions(sample, where, feature_dim=settings.feature_dim, box_dim=settings.box_dim,
                                 max_regions=settings.max_regions)
    label = meta.get("label")
    return PairItem(key, int(label) if isinstance(label, int) and not isinstance(label, bool) else -1,
                    captions_of(sample, meta, where), pixels, regions)


def tokenize_captions(item: PairItem, tokenizer: Any, max_len: int, where: str = "") -> None:
    """Set ``item.encoded`` (every caption as :func:`encode_caption` gives it) and ``item.keys`` (their
    :func:`caption_key` s), once per sample: each pair reads its own and its image's other captions from them. With
    ``where``, a ``ValueError`` naming the sample and caption when a caption gives no token: one that ``is_blank``
    lets through, such as only combining accents, which a lowercasing tokenizer strips (it would train as
    [CLS] [SEP])."""
    encoded = []
    for i, caption in enumerate(item.captions):
        encoded.append(encode_caption(tokenizer, caption, max_len))
        if where and encoded[-1][0].shape[0] == 2:  # [CLS] [SEP] only
            raise ValueError(f"{where}: caption {i} ({len(caption)} character(s), e.g. {caption[:20]!r}) gave no "
                             f"token: the tokenizer's normalizer removes all of it")
    item.encoded, item.keys = encoded, [caption_key(e[0]) for e in encoded]


def _decode_pairs(src: Iterator[dict], settings: ImageTextSettings, tokenizer: Any,
                  handler: Handler) -> Iterator[Tuple[PairItem, int]]:
    """One ``(item, caption index)`` per caption of every sample: none dropped; a sample that cannot be decoded, or
    with a caption that gives no token, goes to ``handler``."""
    for sample in src:
        try:
            item = read_pair_sample(sample, settings)
            tokenize_captions(item, tokenizer, settings.max_text_len, f"{sample.get('__url__', '?')}:{item.key}")
        except (ImageDecodeError, ValueError) as e:
            if handler(e):  # counts; raises unless skipping is configured
                continue
            raise
        for i in range(len(item.captions)):
            yield item, i


# --------------------------------------------------------------------------------------------
# per pair: tokenize, cut, mask


@dataclass
class PairSample:
    """One image-caption pair, tokenized and (conditionally) masked.

    Args:
        key: the image's sample key.
        label: the image's class label (-1 when absent).
        caption: the caption text.
        ids: (T,) int64 caption ids with [CLS]/[SEP] (masked in mode mlm).
        text_positions: (M,) int64 masked positions inside ``ids`` (mode mlm), else empty.
        text_labels: (M,) int64 original ids there.
        cut: the caption was longer than ``max_text_len`` and was cut.
        pixels: (3, S, S) uint8 image (patches), or None.
        regions: the image's regions, or None.
        image_mask: (P,) or (R,) bool hidden image tokens (mode mrm), else None.
        image_captions: every caption of the image (a caption among them is never its ITM negative), as
            :func:`caption_key`s: "A Photo" and "a photo" are one caption to a lowercasing tokenizer, and so are
            two captions that differ only after ``max_text_len`` or only in words read as ``[UNK]``.
        caption_key: the caption's :func:`caption_key`.
    """

    key: str
    label: int
    caption: str
    ids: np.ndarray
    text_positions: np.ndarray
    text_labels: np.ndarray
    cut: bool
    pixels: Optional[torch.Tensor]
    regions: Optional[Regions]
    image_mask: Optional[np.ndarray]
    image_captions: FrozenSet[str] = frozenset()
    caption_key: str = ""

    @property
    def text_len(self) -> int:
        return int(self.ids.shape[0])


def encode_caption(tokenizer: Any, caption: str, max_len: int) -> Tuple[np.ndarray, np.ndarray, bool]:
    """``([CLS] ids [SEP], word ids, cut)`` of a caption, cut to ``max_len`` tokens.

    Args:
        tokenizer: a :class:`~mmm.modalities.text.tokenizer.TextTokenizer`.
        caption: the caption text.
        max_len: most tokens, [CLS] and [SEP] included (>= 3).
    """
    ids, word_ids = tokenizer.encode(caption)
    body = max_len - 2
    cut = ids.shape[0] > body
    ids, word_ids = ids[:body], word_ids[:body]
    minus1 = np.array([-1], dtype=np.int64)
    return (np.concatenate([[tokenizer.cls_id], ids, [tokenizer.sep_id]]).astype(np.int64),
            np.concatenate([minus1, word_ids, minus1]).astype(np.int64), bool(cut))


def caption_key(ids: np.ndarray) -> str:
    """A caption as the model reads it: its token ids after the cut to ``max_text_len`` (unmasked). Two captions
    with one key are the same input, so neither may be the other's image's ITM negative, and retrieval counts
    both as describing the image."""
    return " ".join(map(str, np.asarray(ids).tolist()))


class _PreparePair:
    """``(item, caption index), rng -> PairSample``: tokenize and cut the caption, then mask one modality."""

    def __init__(self, settings: ImageTextSettings, tokenizer: Any, masker: Optional[Any]) -> None:
        self.settings, self.tokenizer, self.masker = settings, tokenizer, masker
        self.cuts = 0

    def __call__(self, pair: Tuple[PairItem, int], rng: np.random.Generator) -> PairSample:
        item, index = pair
        s = self.settings
        caption = item.captions[index]
        if not item.encoded:  # an item that did not come through _decode_pairs
            tokenize_captions(item, self.tokenizer, s.max_text_len)
        ids, word_ids, cut = item.encoded[index]
        key, image_keys = item.keys[index], frozenset(item.keys)
        if cut:
            self.cuts += 1
            if self.cuts == 1 or self.cuts % 1000 == 0:
                logger.info("image_text: %d caption(s) cut to max_text_len=%d tokens so far (e.g. %s)", self.cuts,
                            s.max_text_len, item.key)
        none = np.zeros(0, dtype=np.int64)
        positions, labels, image_mask = none, none, None
        if s.mode == "mlm":
            masked = self.masker(ids, word_ids, rng)
            ids, positions, labels = masked.input_ids, masked.positions, masked.labels
        elif s.mode == "mrm":
            if s.image_input == "patches":
                image_mask = np.asarray(self.masker(s.image.grid, rng), dtype=bool)
            else:
                image_mask = np.asarray(self.masker(item.regions.count, rng), dtype=bool)
        return PairSample(item.key, item.label, caption, np.asarray(ids, dtype=np.int64),
                          np.asarray(positions, dtype=np.int64), np.asarray(labels, dtype=np.int64), cut,
                          item.pixels, item.regions, image_mask, image_keys, key)


# --------------------------------------------------------------------------------------------
# collate: one packed batch per list of pairs


def choose_itm_negatives(captions: Sequence[str], image_captions: Sequence[AbstractSet[str]], fraction: float,
                         rng: np.random.Generator) -> Tuple[np.ndarray, int]:
    """ITM negatives: for ``round(fraction * B)`` pairs, the index of another pair whose caption does not
    describe this pair's image (is none of its captions: two images may share a caption text).

    Args:
        captions: the pairs' captions.
        image_captions: per pair, every caption of its image (its own caption included).
        fraction: share of pairs made negative.
        rng: the generator to draw from.

    Returns:
        ``(source, missing)``: (B,) int64 index of the pair whose caption each pair takes (itself
        for a positive), and how many chosen pairs stayed positive because every other caption
        of the batch describes their image.
    """
    b = len(captions)
    source = np.arange(b, dtype=np.int64)
    missing = 0
    for i in rng.permutation(b)[: int(round(fraction * b))]:
        own = image_captions[i] or {captions[i]}
        others = [j for j in range(b) if captions[j] not in own]
        if not others:
            missing += 1
            continue
        source[i] = others[int(rng.integers(len(others)))]
    return source, missing


class _Collate:
    """``list of PairSample, rng -> PackedBatch`` for the stages' mode (the generator draws ITM negatives)."""

    def __init__(self, settings: ImageTextSettings) -> None:
        self.settings = settings

    def image_lengths(self, samples: Sequence[PairSample]) -> List[int]:
        s = self.settings
        if s.image_input == "patches":
            g = s.image.grid
            return [s.image_prefix + g[0] * g[1]] * len(samples)
        return [p.regions.count for p in samples]

    def image_input(self, samples: Sequence[PairSample], index: torch.Tensor) -> Any:
        s = self.settings
        masked = s.mode == "mrm"
        if s.image_input == "patches":
            pixels = normalize(torch.stack([p.pixels for p in samples]))  # (B, 3, S, S)
            mask = torch.from_numpy(np.stack([p.image_mask for p in samples])) if masked else None  # (B, P)
            return ImageInput(pixels, mask, drop_masked=False, index=index)
        feats = torch.from_numpy(np.concatenate([p.regions.features for p in samples]))  # (R, F)
        boxes = torch.from_numpy(np.concatenate([p.regions.boxes for p in samples]))  # (R, G)
        positions = index_ranges([0] * len(samples), [p.regions.count for p in samples])
        mask = torch.from_numpy(np.concatenate([p.image_mask for p in samples])) if masked else None
        return RegionInput(feats, boxes, positions, mask, index)

    def __call__(self, samples: List[PairSample], rng: np.random.Generator) -> PackedBatch:
        if not samples:
            raise ValueError("cannot collate an empty list of image-text pairs")
        s = self.settings
        b = len(samples)
        extras: Dict[str, Any] = {"labels": torch.tensor([p.label for p in samples], dtype=torch.long),
                                  "keys": [p.key for p in samples], "text_cut": sum(p.cut for p in samples)}
        texts = [p.ids for p in samples]
        captions = [p.caption for p in samples]
        keys = [p.caption_key or p.caption for p in samples]  # what compares captions: the ids the model reads
        itm_labels = torch.ones(b, dtype=torch.long)
        if s.mode == "itm":
            source, missing = choose_itm_negatives(keys, [p.image_captions for p in samples],
                                                   float(s.itm_negatives), rng)
            texts = [samples[j].ids for j in source]
            captions = [samples[j].caption for j in source]
            keys = [keys[j] for j in source]
            itm_labels = torch.from_numpy((source == np.arange(b)).astype(np.int64))
            extras["itm_no_negative"] = missing
        extras["captions"] = captions
        extras["caption_keys"] = keys  # caption_key: what relevance and negatives compare
        extras["image_captions"] = [p.image_captions for p in samples]  # keys; never negatives of their image
        t_len = [len(t) for t in texts]
        i_len = self.image_lengths(samples)
        ids = torch.from_numpy(np.concatenate(texts))  # (T,)
        text_pos = index_ranges([0] * b, t_len)  # position of each text token inside its caption
        if s.mode == "itc":
            return self._contrastive(samples, ids, text_pos, t_len, i_len, extras)
        partners = None
        if s.layout == "two_stream":  # B captions, then B images; sequence k and B + k are a pair (LXMERT)
            seq = PackedSeqInfo.from_seqlens(t_len + i_len)
            cu = seq.cu_seqlens.long().tolist()
            starts, image_starts = cu[:b], cu[b:2 * b]
            partners = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
        else:  # one sequence per pair: caption, then image (UNITER)
            seq = PackedSeqInfo.from_seqlens([t + i for t, i in zip(t_len, i_len)])
            starts = seq.cu_seqlens[:-1].long().tolist()
            image_starts = [a + t for a, t in zip(starts, t_len)]
        text_index = index_ranges(starts, t_len)
        image_index = index_ranges(image_starts, i_len)
        inputs = {"text": TokenInput(ids, text_pos, text_index),
                  s.vision_key: self.image_input(samples, image_index)}
        targets: Dict[str, Any] = {}
        if s.mode == "mlm":
            pos = np.concatenate([p.text_positions + a for p, a in zip(samples, starts)])
            lab = np.concatenate([p.text_labels for p in samples])
            targets["text"] = TokenTargets(torch.from_numpy(pos.astype(np.int64)), torch.from_numpy(lab.astype(np.int64)))
        elif s.mode == "mrm":
            targets.update(self._mrm_targets(samples, image_starts))
        else:  # itm
            inner = [t - 2 for t in t_len]  # text tokens without [CLS]/[SEP]
            patches = [i - s.image_prefix for i in i_len]
            targets["itm"] = PairTargets(
                cls_positions=torch.tensor(starts, dtype=torch.long), labels=itm_labels,
                text_positions=index_ranges([a + 1 for a in starts], inner),
                text_pair=torch.repeat_interleave(torch.arange(b), torch.tensor(inner)),
                image_positions=index_ranges([a + s.image_prefix for a in image_starts], patches),
                image_pair=torch.repeat_interleave(torch.arange(b), torch.tensor(patches)))
        return PackedBatch(seq, inputs, targets, extras=extras, partners=partners)

    def _mrm_targets(self, samples: Sequence[PairSample], image_starts: Sequence[int]) -> Dict[str, Any]:
        """``{"mrm": RegionTargets}``, plus ``"image_tokens"`` (visual-token ids) for patches with a codebook."""
        s = self.settings
        owner = np.concatenate([np.full(int(p.image_mask.sum()), i, dtype=np.int64) for i, p in enumerate(samples)])
        hidden = np.concatenate([np.nonzero(p.image_mask)[0].astype(np.int64) for p in samples])  # patch / region index
        positions = torch.from_numpy(np.asarray(image_starts, dtype=np.int64)[owner] + s.image_prefix + hidden)
        if s.image_input == "patches":
            out: Dict[str, Any] = {"mrm": RegionTargets(positions,
                                                        pixel_index=torch.from_numpy(np.stack([owner, hidden], axis=1)))}
            if s.codebook is not None:
                out["image_tokens"] = TokenTargets(positions, self._visual_tokens(samples, owner, hidden))
            return out
        feats = np.concatenate([p.regions.features[p.image_mask] for p in samples])  # (M, F)
        with_soft = [p.regions.soft is not None for p in samples]
        soft = None
        if all(with_soft):
            soft = torch.from_numpy(np.concatenate([p.regions.soft[p.image_mask] for p in samples]))  # (M, C)
        elif any(with_soft):
            have = [p.key for p, w in zip(samples, with_soft) if not w][:3]
            raise ValueError(f"image_text mrm: some samples of a batch have 'soft.npy' and some do not (without: "
                             f"{have}); a dataset carries detector soft labels for every image or for none")
        return {"mrm": RegionTargets(positions, features=torch.from_numpy(feats), soft_labels=soft)}

    def _visual_tokens(self, samples: Sequence[PairSample], owner: np.ndarray, hidden: np.ndarray) -> torch.Tensor:
        """(M,) int64 codebook ids of the hidden patches, from the original (unmasked) pixels."""
        s, cb = self.settings, self.settings.codebook
        images = torch.stack([p.pixels for p in samples])  # (B, 3, S, S) uint8, as the codebook was fitted on
        feats = visual_token_features(images, s.image.patch_size)  # (B, P, F)
        if feats.shape[-1] != cb.dim:
            raise ValueError(f"image_text mrm: the visual-token codebook has {cb.dim}-d entries but patches of "
                             f"{s.image.patch_size}x{s.image.patch_size} pixels give {feats.shape[-1]} features; "
                             "refit it for model.image.patch_size")
        return torch.from_numpy(cb.assign(feats[owner, hidden]))

    def _contrastive(self, samples: Sequence[PairSample], ids: torch.Tensor, text_pos: torch.Tensor,
                     t_len: List[int], i_len: List[int], extras: Dict[str, Any]) -> PackedBatch:
        s = self.settings
        b = len(samples)
        seq = PackedSeqInfo.from_seqlens(t_len + i_len)  # B captions, then B images
        starts = seq.cu_seqlens[:-1].long().tolist()
        n_text = sum(t_len)
        image_index = torch.arange(n_text, n_text + sum(i_len), dtype=torch.long)
        patches = [i - s.image_prefix for i in i_len]
        targets = {"itc": ContrastiveTargets(
            text_positions=torch.tensor(starts[:b], dtype=torch.long),
            image_positions=index_ranges([a + s.image_prefix for a in starts[b:]], patches),
            image_owner=torch.repeat_interleave(torch.arange(b), torch.tensor(patches)))}
        inputs = {"text": TokenInput(ids, text_pos, torch.arange(n_text, dtype=torch.long)),
                  s.vision_key: self.image_input(samples, image_index)}
        return PackedBatch(seq, inputs, targets, extras=extras)


def collate_pairs(samples: List[PairSample], settings: ImageTextSettings,
                  rng: Optional[np.random.Generator] = None) -> PackedBatch:
    """Pack image-text pairs into one :class:`PackedBatch` laid out for ``settings.mode``.

    Args:
        samples: prepared pairs (:class:`PairSample`).
        settings: mode and image input.
        rng: the generator ITM negatives are drawn from (None: a generator seeded with 0).
    """
    return _Collate(settings)(samples, rng if rng is not None else np.random.default_rng(0))


def batches_of_distinct_images(src: Iterator[Any], batch_size: int) -> Iterator[List[Any]]:
    """Group pairs into batches in which no image appears twice (none dropped, order otherwise kept).

    One pair per caption puts the same image in several pairs; in a contrastive (``itc``) or
    matching (``itm``) batch a second caption of the same image would be scored as a negative of
    it. A pair whose image is already in the batch being filled waits for the next batch (it goes
    first there); at the end of the stream the waiting pairs form the last batches.

    Args:
        src: pairs with a ``key`` naming their image.
        batch_size: pairs per batch.
    """
    waiting: List[Any] = []
    batch: List[Any] = []
    keys: set = set()

    def fill(pair: Any) -> bool:
        if pair.key in keys:
            return False
        batch.append(pair)
        keys.add(pair.key)
        return True

    for pair in src:
        if not fill(pair):
            waiting.append(pair)
        if len(batch) == batch_size:
            yield batch
            batch, keys = [], set()
            still = []
            for w in waiting:
                if len(batch) == batch_size or not fill(w):
                    still.append(w)
            waiting = still
    while waiting:
        still = []
        for w in waiting:
            if len(batch) == batch_size or not fill(w):
                still.append(w)
        if batch:
            yield batch
        batch, keys, waiting = [], set(), still
    if batch:
        yield batch


def image_text_stages(settings: ImageTextSettings, tokenizer: Any, masker: Optional[Any], *, batch_size: int,
                      seed: int, handler: Handler, fixed_masking: bool = False,
                      epochs: Optional[EpochCounter] = None) -> List:
    """Pipeline stages turning image-text shard samples into :class:`~mmm.batch.PackedBatch` es.

    Args:
        settings: mode, image input, caption length, ITM negatives, image / region limits.
        tokenizer: the trained text tokenizer.
        masker: token masker (mode mlm), patch or region masker (mode mrm); ignored by itm and itc.
        batch_size: pairs per batch (the last batch of a pass may be smaller).
        seed: seed of masks and ITM negatives.
        handler: bad-sample handler (counts; skips or raises).
        fixed_masking: the same masks and negatives on every pass (validation).
        epochs: the pipeline's epoch counter.
    """
    if settings.mode in ("mlm", "mrm") and masker is None:
        raise ValueError(f"image_text mode {settings.mode!r} needs a masker")
    return [
        wds.pipelinefilter(_decode_pairs)(settings, tokenizer, handler),
        SeededMap(_PreparePair(settings, tokenizer, masker if settings.mode in ("mlm", "mrm") else None), seed,
                  fixed_masking, epochs),
        (wds.pipelinefilter(batches_of_distinct_images)(batch_size) if settings.mode in ("itm", "itc")
         else wds.batched(batch_size, collation_fn=list, partial=True)),
        SeededMap(_Collate(settings), seed + 1_000_003, fixed_masking, epochs),  # its own stream: ITM negatives
    ]
