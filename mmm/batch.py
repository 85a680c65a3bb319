"""The typed batch that crosses pipeline stages: one packed token stream, per-modality inputs, targets.

Every modality becomes a run of tokens in one flat stream of ``N`` tokens laid out by a
:class:`~mmm.core.packing.PackedSeqInfo` (``cu_seqlens``). A batch carries

* ``inputs``: modality name → that modality's raw input (:class:`TokenInput` for text and DNA
  ids, :class:`ImageInput` for pixels, :class:`FeatureInput` for audio frames,
  :class:`RegionInput` for precomputed region features). Each input knows
  how to call its embedder (:meth:`embed`) and, through ``index``, where its tokens sit in the
  stream (None = it fills the whole stream in order, the single-modality case);
* ``targets``: what the objectives predict, keyed by the name the objective reads
  (:class:`TokenTargets` for MLM-style class targets at stream positions, :class:`RegionTargets`
  for masked region modeling under ``"mrm"``, :class:`PairTargets` for image-text matching under
  ``"itm"``, :class:`ContrastiveTargets` under ``"itc"``);
* ``task``: which task of a multi-task run produced the batch (objectives of other tasks skip it).

Every dataclass here moves to a device or pinned memory with one generic walk over its fields,
so a new input type needs no extra plumbing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from mmm.core.output_rows import OutputRows
from mmm.core.packing import PackedSeqInfo, mask_positions
from mmm.host_reads import on_host
from mmm.masking.base import MaskedTokens


def _map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor inside nested dataclasses / dicts / lists (other values kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, PackedSeqInfo):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _counted_on_host(mask: Optional[torch.Tensor], given: Optional[int], what: str) -> Optional[int]:
    """How many entries ``mask`` sets: counted when the mask is on the host (checked against ``given``
    when both are there), else ``given`` (carried over from the host when a batch moved)."""
    if mask is None or mask.device.type != "cpu":
        return given
    with on_host():
        count = int(mask.sum())
    if given is not None and given != count:  # e.g. a new mask given with dataclasses.replace and an old count
        raise ValueError(f"{what}: hidden_count {given} but the mask hides {count}")
    return count


@dataclass
class TokenInput:
    """Discrete token ids (text, DNA).

    Args:
        ids: (N_m,) int64 (corrupted) token ids.
        position_ids: (N_m,) int64 position of each token inside its sequence.
        index: (N_m,) int64 positions in the flat stream; None = the whole stream in order.
    """

    ids: torch.Tensor
    position_ids: torch.Tensor
    index: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    def embed(self, embedder: nn.Module) -> torch.Tensor:
        """(N_m, d) embeddings."""
        return embedder(self.ids, self.position_ids)


@dataclass
class ImageInput:
    """Whole images plus an optional patch mask (MAE, SimMIM, BEiT).

    Args:
        pixels: (B, C, H, W) float normalised pixels.
        mask: (B, P) bool, True = hidden patch; None = nothing hidden.
        drop_masked: hidden patches are left out of the stream (MAE) instead of being replaced
            by the learned mask embedding (SimMIM / BEiT).
        index: (N_m,) stream positions; None = the whole stream in order.
        hidden_count: how many patches ``mask`` hides, a host integer; counted on construction when the
            mask is on the host (the collator), and kept when the batch moves to a GPU, so the model can
            gather hidden or visible patches there without reading the mask back. A mask already on a GPU
            is not recounted: when you build or replace one there, give its true count or None (then the
            count is read back), since a wrong count gathers the wrong rows.
    """

    pixels: torch.Tensor
    mask: Optional[torch.Tensor] = None
    drop_masked: bool = False
    index: Optional[torch.Tensor] = None
    hidden_count: Optional[int] = None

    def __post_init__(self) -> None:
        self.hidden_count = _counted_on_host(self.mask, self.hidden_count, "ImageInput")

    def hidden_positions(self) -> torch.Tensor:
        """(M,) int64 indices, into the (B * P) patches, of the hidden ones, row-major (the order of
        ``x[mask]``); with ``hidden_count`` known, no device read."""
        if self.mask is None:
            raise ValueError("this image input has no mask, so no hidden patches")
        return mask_positions(self.mask.flatten(), self.hidden_count)

    def hidden_token_rows(self, prefix: int) -> torch.Tensor:
        """(M,) rows of the hidden patches in the mask-token layout, ``prefix`` ([CLS]) tokens then the P
        patches of each image, in the order of :meth:`hidden_positions`."""
        flat, p = self.hidden_positions(), self.mask.shape[1]  # flat = image * P + patch
        return torch.div(flat, p, rounding_mode="floor") * (prefix + p) + prefix + flat % p

    @property
    def num_images(self) -> int:
        return int(self.pixels.shape[0])

    def embed(self, embedder: nn.Module) -> torch.Tensor:
        """(N_m, d) embeddings: per image, CLS (when the embedder has one) then its (visible) patches."""
        tokens, _ = embedder(self.pixels, self.mask, self.drop_masked, hidden_count=self.hidden_count)
        return tokens


class _HiddenRows:
    """What :class:`FeatureInput` and :class:`RegionInput` share: a (N_m,) ``mask`` of hidden rows whose count
    (``hidden_count``) is taken on the host while the mask is there and kept when the batch moves."""

    _rows = ("input", "rows")  # (what it is, what its rows are), for messages

    def __post_init__(self) -> None:
        self.hidden_count = _counted_on_host(self.mask, self.hidden_count, type(self).__name__)

    def hidden_positions(self) -> torch.Tensor:
        """(M,) int64 rows of this input's hidden rows, in order; with ``hidden_count`` known, no device read."""
        if self.mask is None:
            what, rows = self._rows
            raise ValueError(f"this {what} has no mask, so no hidden {rows}")
        return mask_positions(self.mask, self.hidden_count)


@dataclass
class FeatureInput(_HiddenRows):
    """Continuous feature tokens (audio frames or spectrogram patches).

    Args:
        features: (N_m, F) float features.
        position_ids: (N_m,) int64 position of each token inside its sequence.
        mask: (N_m,) bool, True = replaced by the learned mask embedding; None = nothing hidden.
        index: (N_m,) stream positions; None = the whole stream in order.
        hidden_count: how many tokens ``mask`` hides, a host integer (as :class:`ImageInput`'s).
    """

    features: torch.Tensor
    position_ids: torch.Tensor
    mask: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    hidden_count: Optional[int] = None
    _rows = ("feature input", "tokens")

    def embed(self, embedder: nn.Module) -> torch.Tensor:
        """(N_m, d) embeddings."""
        return embedder(self.features, self.position_ids, self.mask)


@dataclass
class RegionInput(_HiddenRows):
    """Precomputed image-region features (UNITER / LXMERT: a detector's region outputs).

    Args:
        features: (N_m, F) float region features (hidden regions keep their values here; the
            embedder zeroes them where ``mask`` is True, as UNITER does).
        boxes: (N_m, G) float normalised box geometry (UNITER's 7-d ``x1, y1, x2, y2, w, h, w*h``).
        position_ids: (N_m,) int64 position of each region inside its sequence.
        mask: (N_m,) bool, True = hidden region; None = nothing hidden.
        index: (N_m,) stream positions; None = the whole stream in order.
        hidden_count: how many regions ``mask`` hides, a host integer (as :class:`ImageInput`'s).
    """

    features: torch.Tensor
    boxes: torch.Tensor
    position_ids: torch.Tensor
    mask: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    hidden_count: Optional[int] = None
    _rows = ("region input", "regions")

    def embed(self, embedder: nn.Module) -> torch.Tensor:
        """(N_m, d) embeddings."""
        return embedder(self.features, self.boxes, self.mask, self.position_ids)


@dataclass
class TokenTargets:
    """Class targets at positions of the stream (MLM on text or DNA, HuBERT cluster ids, ...).

    Args:
        positions: (M,) int64 indices into the flat stream where the head predicts.
        labels: (M,) int64 target ids at those positions.
    """

    positions: torch.Tensor
    labels: torch.Tensor

    @property
    def count(self) -> int:
        return self.labels.numel()


@dataclass
class RegionTargets:
    """Masked region modeling targets (UNITER's MRFR / MRC / MRC-kl) at hidden image tokens.

    Either the shards carried the targets (region features and a detector's soft labels), or
    ``pixel_index`` says which patch of which image each hidden token is, and a frozen teacher
    image encoder computes them inside the objective.

    Args:
        positions: (M,) int64 stream positions of the hidden image tokens (regions or patches).
        features: (M, F) float regression targets (the hidden regions' original features), or None.
        soft_labels: (M, C) float class distributions (detector soft labels), or None.
        pixel_index: (M, 2) int64 ``(image in ImageInput.pixels, patch index)`` of each hidden
            patch, for teacher targets; None with region inputs.
        teacher_images: (U,) int64 the images that have a hidden patch, ascending (the teacher runs on
            these only), and teacher_slot: (M,) int64 each target's row among them; with patch_range,
            the ``(lowest, highest)`` patch index as host integers. All three are derived from
            ``pixel_index`` on construction while it is on the host and kept when the batch moves, so a
            teacher step reads nothing back from the device.
    """

    positions: torch.Tensor
    features: Optional[torch.Tensor] = None
    soft_labels: Optional[torch.Tensor] = None
    pixel_index: Optional[torch.Tensor] = None
    teacher_images: Optional[torch.Tensor] = None
    teacher_slot: Optional[torch.Tensor] = None
    patch_range: Optional[Tuple[int, int]] = None

    def __post_init__(self) -> None:
        p = self.pixel_index
        if p is None or p.device.type != "cpu" or self.teacher_images is not None or p.numel() == 0:
            return
        if p.dim() != 2 or p.shape[1] != 2:
            raise ValueError(f"RegionTargets: pixel_index must be (M, 2) (image, patch), got {tuple(p.shape)}")
        with on_host():
            self.teacher_images, self.teacher_slot = torch.unique(p[:, 0], return_inverse=True)
            self.patch_range = (int(p[:, 1].min()), int(p[:, 1].max()))

    @property
    def count(self) -> int:
        return self.positions.numel()


@dataclass
class PairTargets:
    """Image-text matching targets (UNITER ITM, with the token sets WRA aligns).

    One joint sequence per pair: text tokens first ([CLS] ... [SEP]), then image tokens.

    Args:
        cls_positions: (B,) int64 stream position of each pair's first token (text [CLS]).
        labels: (B,) int64, 1 = the caption belongs to the image, 0 = a mismatched caption.
        text_positions: (T,) int64 stream positions of the text tokens WRA aligns (no special tokens).
        text_pair: (T,) int64 pair index of each of those text tokens.
        image_positions: (R,) int64 stream positions of the image tokens (regions or patches, no CLS).
        image_pair: (R,) int64 pair index of each of those image tokens.
        longest: the most text and the most image tokens of one pair, host integers: counted on
            construction while the tensors are on the host and kept when the batch moves, so WRA pads
            its per-pair sets with no device read.
    """

    cls_positions: torch.Tensor
    labels: torch.Tensor
    text_positions: torch.Tensor
    text_pair: torch.Tensor
    image_positions: torch.Tensor
    image_pair: torch.Tensor
    longest: Optional[Tuple[int, int]] = None

    def __post_init__(self) -> None:
        if self.longest is None and self.text_pair.device.type == "cpu" and self.image_pair.device.type == "cpu":
            with on_host():
                self.longest = tuple(int(torch.bincount(p, minlength=1).max()) if p.numel() else 0
                                     for p in (self.text_pair, self.image_pair))

    @property
    def count(self) -> int:
        return self.labels.numel()


@dataclass
class ContrastiveTargets:
    """Image-text contrastive targets (CLIP): B images and their B captions, each encoded alone.

    The batch holds 2B single-modality sequences; pair ``i`` is image ``i`` with caption ``i``.

    Args:
        text_positions: (B,) int64 stream position of each caption's [CLS].
        image_positions: (R,) int64 stream positions of image tokens that are pooled (mean) into
            each image's embedding (patch tokens without CLS, or regions).
        image_owner: (R,) int64 which image (0..B-1) each of those tokens belongs to.
    """

    text_positions: torch.Tensor
    image_positions: torch.Tensor
    image_owner: torch.Tensor

    @property
    def count(self) -> int:
        return self.text_positions.numel()


def check_partners(partners: torch.Tensor, sequences: int) -> None:
    """Refuse a two-stream ``partners`` tensor that does not name, for each of ``sequences`` sequences,
    another sequence of the batch or -1 (a host tensor: checked where the batch is built, never in a step)."""
    if partners.dim() != 1 or partners.numel() != sequences:
        raise ValueError(f"PackedBatch.partners must be a (sequences,) tensor with one entry per sequence "
                         f"({sequences}), got shape {tuple(partners.shape)}")
    if partners.dtype.is_floating_point or partners.dtype == torch.bool:
        raise ValueError(f"PackedBatch.partners must hold integer sequence indices, got dtype {partners.dtype}")
    if sequences:
        with on_host():
            low, high = int(partners.min()), int(partners.max())
        if low < -1 or high >= sequences:
            bad = low if low < -1 else high
            raise ValueError(f"PackedBatch.partners names sequence {bad}, but the batch has {sequences} sequences: "
                             f"each entry must be in [0, {sequences}) or -1 for none")


@dataclass
class PackedBatch:
    """A packed, masked batch.

    Args:
        seq: layout of the flat stream (``cu_seqlens``, ``max_seqlen``, ``position_ids``).
        inputs: modality → its input (``TokenInput`` / ``ImageInput`` / ``FeatureInput``).
        targets: target name → targets (e.g. ``"text"`` → :class:`TokenTargets` for MLM).
        task: the task that produced this batch ("" in single-task runs).
        extras: plain per-batch data for evaluation (labels for probes, sample keys); not used
            by the loss.
        partners: (S,) int64, for the two-stream layout (LXMERT): the sequence each sequence is
            paired with (-1: none); the model's cross-modality layers fuse each pair. None = single stream.
        output_rows: the rows whose final hidden states the model's heads read, found on the host
            before the batch moved to its device (:meth:`~mmm.model.MaskedModel.output_rows`), for
            the final-layer subset; None = found in the forward, or none.
    """

    seq: PackedSeqInfo
    inputs: Dict[str, Any]
    targets: Dict[str, Any] = field(default_factory=dict)
    task: str = ""
    extras: Dict[str, Any] = field(default_factory=dict)
    partners: Optional[torch.Tensor] = None
    output_rows: Optional[OutputRows] = None

    def __post_init__(self) -> None:
        if self.partners is not None and self.partners.device.type == "cpu":
            check_partners(self.partners, self.seq.batch_size)

    @property
    def num_tokens(self) -> int:
        return self.seq.num_tokens

    @property
    def num_sequences(self) -> int:
        return self.seq.batch_size

    def to(self, device: torch.device | str) -> "PackedBatch":
        # non-blocking only towards the GPU (from pinned memory it overlaps; towards the host it could be read early)
        non_blocking = torch.device(device).type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return PackedBatch(self.seq.to(device), _map_tensors(self.inputs, move), _map_tensors(self.targets, move),
                           self.task, self.extras, None if self.partners is None else move(self.partners),
                           None if self.output_rows is None else self.output_rows.to(device))

    def pin_memory(self) -> "PackedBatch":
        return PackedBatch(self.seq.pin_memory(), _map_tensors(self.inputs, lambda t: t.pin_memory()),
                           _map_tensors(self.targets, lambda t: t.pin_memory()), self.task, self.extras,
                           None if self.partners is None else self.partners.pin_memory(),
                           None if self.output_rows is None else self.output_rows.pin_memory())


def pack_masked(samples: Sequence[MaskedTokens], modality: str = "text") -> PackedBatch:
    """Concatenate masked token sequences into one :class:`PackedBatch` (no padding), longest first.

    Sorting by length lets backends without a varlen kernel pad small groups of similar
    lengths (``PackedSeqInfo.pad_groups``); order within a batch is irrelevant
    to the loss.

    Args:
        samples: masked sequences, each with at least one token.
        modality: name of the token modality (``text``, ``dna``); keys both the input and the targets.
    """
    if not samples:
        raise ValueError("cannot pack an empty list of samples")
    samples = sorted(samples, key=lambda s: -len(s.input_ids))
    lengths = [len(s.input_ids) for s in samples]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ids = np.concatenate([s.input_ids for s in samples]).astype(np.int64)
    positions = np.concatenate([s.positions + off for s, off in zip(samples, offsets)]).astype(np.int64)
    labels = np.concatenate([s.labels for s in samples]).astype(np.int64)
    seq = PackedSeqInfo.from_seqlens(lengths)
    return PackedBatch(
        seq,
        {modality: TokenInput(torch.from_numpy(ids), seq.position_ids)},
        {modality: TokenTargets(torch.from_numpy(positions), torch.from_numpy(labels))},
    )
