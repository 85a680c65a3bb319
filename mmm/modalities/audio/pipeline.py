"""Audio stages of the streaming pipeline: decode → front end → split → mask → targets → pack.

A shard sample (``flac`` + ``json``) is decoded with
:func:`~mmm.modalities.audio.frontend.decode_audio` (bad samples go to the pipeline's counting
handler) and turned into normalised feature tokens by the run's fitted
:class:`~mmm.modalities.audio.frontend.AudioFrontend`. A clip longer than one sequence
(``max_seconds`` / ``max_tokens``) is cut along time into several sequences, none dropped.
Masks come from the ``time_span`` masker (wav2vec 2.0 / HuBERT spans over time columns) or the
``spec_patch`` masker (AudioMAE, over the patch grid), drawn from a generator keyed by
(seed, rank, worker, epoch). For each k-means target set (HuBERT, Hsu et al. 2021) the batch
carries ``targets[f"audio_{kind}"]``: the cluster id of every *hidden* token's acoustic features
at its stream position.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import webdataset as wds

from mmm.batch import FeatureInput, PackedBatch, TokenTargets
from mmm.core.packing import PackedSeqInfo
from mmm.data.epoch import EpochCounter, SeededMap
from mmm.data.fields import first_field, sample_json, sample_where
from mmm.modalities.audio.grid_positions import grid_position_ids
from mmm.modalities.audio.masking import SpecPatchMasker, TimeSpanMasker
from mmm.modalities.audio.frontend import AudioDecodeError, decode_audio

Handler = Callable[[Exception], bool]
AUDIO_FIELDS = ("flac", "wav")


@dataclass
class AudioSample:
    """One sequence of feature tokens (a clip, or one time segment of a long clip).

    Args:
        tokens: (T, F) float32 normalised tokens in the front end's order.
        rows: token rows of the grid (1 for time tokens, frequency patches for patch tokens).
        target_ids: target kind → (T,) int64 k-means id of every token (empty without targets).
        label: class label from the sample's json, -1 when absent.
        key: the shard sample's key.
        chunk: index of this segment within its clip (0 for clips that fit one sequence).
        mask: (T,) bool, True = hidden; None = unmasked.
    """

    tokens: np.ndarray
    rows: int
    target_ids: Dict[str, np.ndarray]
    label: int
    key: str
    chunk: int = 0
    mask: Optional[np.ndarray] = None

    @property
    def columns(self) -> int:
        return self.tokens.shape[0] // self.rows


def max_columns(frontend: Any, max_seconds: Optional[float], max_tokens: int) -> int:
    """Time columns (tokens in time mode) of one sequence: what ``max_seconds`` of audio fill,
    capped so that the sequence has at most ``max_tokens`` tokens.

    Args:
        frontend: the :class:`~mmm.modalities.audio.frontend.AudioFrontend` (its config).
        max_seconds: longest audio per sequence; None = only ``max_tokens`` limits.
        max_tokens: size of the position table.
    """
    c = frontend.config
    rows = 1 if c.token == "time" else c.n_mels // c.patch_freq
    by_tokens = max_tokens // rows
    if by_tokens < 1:
        raise ValueError(f"model.audio.max_tokens={max_tokens} is smaller than one time column of patch tokens "
                         f"({rows} frequency patches)")
    if max_seconds is None:
        return by_tokens
    frames = frontend.num_frames(int(round(max_seconds * c.sample_rate)))
    return max(1, min(by_tokens, -(-frames // c.frames_per_column)))


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one thread inside the block (restored after).

    The front end's STFTs and filterbank products are tiny; on a busy machine a multi-threaded
    torch spends ~50x longer synchronising its threads than computing them. DataLoader workers
    already run single-threaded; this keeps the main process (``num_workers: 0``, probes, asset
    fitting) as fast.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def split_columns(values: np.ndarray, rows: int, columns: int) -> List[np.ndarray]:
    """Cut a row-major ``(rows * cols, ...)`` token array into pieces of at most ``columns`` time columns.

    Each piece is row-major over its own ``(rows, cols_i)`` grid; together they cover every token.

    Args:
        values: tokens (or per-token ids) in the front end's order (index ``f * cols + t``).
        rows: grid rows (1 for time tokens).
        columns: most time columns per piece.
    """
    cols = values.shape[0] // rows
    if cols * rows != values.shape[0]:
        raise ValueError(f"split_columns: {values.shape[0]} tokens is not a multiple of {rows} rows")
    if cols <= columns:
        return [values]
    grid = values.reshape(rows, cols, *values.shape[1:])
    return [np.ascontiguousarray(grid[:, lo:lo + columns]).reshape(-1, *values.shape[1:])
            for lo in range(0, cols, columns)]


def read_audio_sample(sample: Mapping[str, Any]) -> Tuple[np.ndarray, int, Dict[str, Any]]:
    """(waveform (C, S) float32, sample rate, json metadata) of a raw shard sample; errors name shard and key."""
    wav, sr = decode_audio(sample[first_field(sample, AUDIO_FIELDS, "audio", AudioDecodeError)], sample_where(sample))
    return wav, sr, sample_json(sample, AudioDecodeError)


def _decode(src: Iterator[dict], handler: Handler) -> Iterator[Tuple[np.ndarray, int, Dict[str, Any], str, str]]:
    for sample in src:
        try:
            wav, sr, meta = read_audio_sample(sample)
        except AudioDecodeError as e:
            if handler(e):  # counts; raises unless skipping is configured
                continue
            raise
        yield wav, sr, meta, sample.get("__key__", "?"), sample.get("__url__", "?")


def _tokenize(src: Iterator[tuple], frontend: Any, codebooks: Mapping[str, Any], columns: int,
              handler: Handler) -> Iterator[AudioSample]:
    for wav, sr, meta, key, url in src:
        try:
            with single_thread():
                tokens = frontend(wav, sr)  # (T, F)
                ids = {kind: cb.assign(frontend.acoustic_features(wav, sr, kind)) for kind, cb in codebooks.items()}
        except ValueError as e:  # a waveform the front end refuses
            if handler(AudioDecodeError(f"{url}:{key}: {e}")):
                continue
            raise
        rows, _ = frontend.token_grid(tokens.shape[0])
        label = meta.get("label")
        label = int(label) if isinstance(label, int) and not isinstance(label, bool) else -1
        pieces = split_columns(tokens, rows, columns)
        id_pieces = {kind: split_columns(v, rows, columns) for kind, v in ids.items()}
        for i, piece in enumerate(pieces):
            yield AudioSample(piece, rows, {kind: v[i] for kind, v in id_pieces.items()}, label, key, i)


class _MaskAudio:
    """``AudioSample, rng -> AudioSample`` with its mask (a class, not a lambda: pipelines are pickled)."""

    def __init__(self, masker: Any) -> None:
        if masker is not None and not isinstance(masker, (TimeSpanMasker, SpecPatchMasker)):
            raise TypeError(f"audio stages need a time_span or spec_patch masker (or None), "
                            f"got {type(masker).__name__}")
        self.masker = masker

    def __call__(self, s: AudioSample, rng: np.random.Generator) -> AudioSample:
        if self.masker is None:
            return s
        if isinstance(self.masker, TimeSpanMasker):  # spans over time columns, every row of a column alike
            mask = np.tile(self.masker(s.columns, rng), s.rows)
        else:
            mask = self.masker((s.rows, s.columns), rng)
        return replace(s, mask=np.asarray(mask, dtype=bool))


def collate_audio(samples: List[AudioSample], modality: str = "audio", max_len: Optional[int] = None) -> PackedBatch:
    """Pack audio sequences into one :class:`PackedBatch` (no padding, longest first).

    Patch tokens' position ids are ``row * (max_len // rows) + col``
    (:func:`~mmm.modalities.audio.grid_positions.grid_position_ids`, as the standalone encoder computes them);
    ``max_len`` (the position table's size) is required when a sequence has several rows.
    Masked sequences carry ``targets[f"{modality}_{kind}"]``: hidden tokens' stream positions and
    k-means ids. ``extras`` holds ``labels`` (LongTensor), ``keys`` and ``chunks`` in batch order.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of audio sequences")
    samples = sorted(samples, key=lambda s: -s.tokens.shape[0])
    seq = PackedSeqInfo.from_seqlens([s.tokens.shape[0] for s in samples])
    features = torch.from_numpy(np.concatenate([s.tokens for s in samples]).astype(np.float32, copy=False))
    rows = samples[0].rows
    if any(s.rows != rows for s in samples):
        raise ValueError(f"cannot collate audio sequences of {sorted({s.rows for s in samples})} token rows in one batch")
    position_ids = seq.position_ids
    if rows > 1:
        if max_len is None:
            raise ValueError("collate_audio: patch tokens (several rows) need max_len, the position table's size")
        counts = torch.tensor(seq.lengths, dtype=torch.long)
        position_ids = grid_position_ids(seq.position_ids, counts.repeat_interleave(counts), rows, max_len)
    mask = None
    targets: Dict[str, Any] = {}
    if samples[0].mask is not None:
        mask = torch.from_numpy(np.concatenate([s.mask for s in samples]))  # (N,)
        positions = mask.nonzero()[:, 0]  # stream positions of hidden tokens
        for kind in samples[0].target_ids:
            ids = torch.from_numpy(np.concatenate([s.target_ids[kind] for s in samples]).astype(np.int64))
            targets[f"{modality}_{kind}"] = TokenTargets(positions, ids[mask])
    extras = {"labels": torch.tensor([s.label for s in samples], dtype=torch.long),
              "keys": [s.key for s in samples], "chunks": torch.tensor([s.chunk for s in samples], dtype=torch.long)}
    return PackedBatch(seq, {modality: FeatureInput(features, position_ids, mask)}, targets, extras=extras)


def audio_stages(frontend: Any, codebooks: Mapping[str, Any], masker: Optional[Any], *, columns: int, max_len: int,
                 batch_size: int, seed: int, handler: Handler, fixed_masking: bool = False,
                 epochs: Optional[EpochCounter] = None, modality: str = "audio") -> List:
    """Pipeline stages turning audio shard samples into :class:`~mmm.batch.PackedBatch` es.

    Args:
        frontend: fitted :class:`~mmm.modalities.audio.frontend.AudioFrontend` (with ``max_seconds=None``:
            cutting is done here, never dropping audio).
        codebooks: target kind (``mfcc``, ``logmel``, ``chroma``) → k-means
            :class:`~mmm.targets.kmeans.Codebook`; targets are computed only when ``masker`` is set.
        masker: ``time_span`` or ``spec_patch`` masker; None = no mask, no targets (probes).
        columns: most time columns per sequence (:func:`max_columns`).
        max_len: size of the position table (``model.audio.max_tokens``): patch tokens' position ids.
        batch_size: sequences per batch (the last batch of a pass may be smaller).
        seed: masking seed.
        handler: bad-sample handler (counts; skips or raises).
        fixed_masking: the same masks on every pass (validation).
        epochs: the pipeline's epoch counter.
        modality: the name batches key the input and targets under.
    """
    return [
        wds.pipelinefilter(_decode)(handler),
        wds.pipelinefilter(_tokenize)(frontend, dict(codebooks) if masker is not None else {}, columns, handler),
        SeededMap(_MaskAudio(masker), seed, fixed_masking, epochs),
        wds.batched(batch_size, collation_fn=partial(collate_audio, modality=modality, max_len=max_len), partial=True),
    ]
