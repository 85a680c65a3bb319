"""Audio dataset definition: folders of WAV/FLAC files -> windowed FLAC clips in WebDataset shards.

Each shard sample is ``{"__key__", "flac": FLAC bytes, "json": metadata}`` with metadata
``{"source", "window", "start_s", "end_s", "sample_rate", "channels", "label", "label_name",
"transcript"}`` (``label``, ``label_name`` and ``transcript`` are null when unknown).

Build decisions:

* Every file is resampled to the build ``sample_rate`` (band-limited sinc, torchaudio) and, with
  ``mono=True`` (the default), mixed down to one channel by averaging; ``mono=False`` keeps the
  original channels (at most 8, FLAC's limit). Clips are stored as 16-bit FLAC; samples outside
  [-1, 1) are clipped and counted in the manifest.
* Files longer than ``max_seconds`` are cut into consecutive windows of exactly ``max_seconds``;
  the tail becomes a shorter last window, so no sample is dropped. ``start_s``/``end_s`` locate a
  window in its file.
* A transcript belongs to a whole file: it is stored only on files that fit in one window (a cut
  file's windows get ``transcript: null``, since no alignment is known).
* Files go to train/val by a stable hash of their path, so a file's windows never straddle splits.
* Labels come from class subfolders (``labels="folders"``) or a CSV with columns ``path,label``
  (and optionally ``transcript``); label ids are the sorted class names' indices, listed in
  ``manifest.json`` under ``classes``.

:func:`embedded_default` synthesizes a small labelled corpus (tones, harmonic tones, major and
minor chords, coloured noise, chirps, amplitude-modulated tones) so the audio modality works with
no download.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from mmm.data.tar import ReadOptions
from mmm.modalities.audio.frontend import AUDIO_SUFFIXES, MAX_RESAMPLE_RATIO  # the default threshold: training refuses the same
from mmm.registry import DATASETS
from datasets_def.building import (BuildReport, SPLITS, ShardWriters, build_args, cached_build, check_build_args, find_inputs,
                                   finish_build, has_suffix, ignored_manifest, log_ignored, prepare_output,
                                   hash_order, read_file, read_split, stable_split)
from datasets_def.skipper import BadInputSkipper

logger = logging.getLogger("mmm.data")

EMBEDDED_NAME = "audio-synthetic-v1"
FLAC_MAX_CHANNELS = 8
META_KEYS = ("source", "window", "start_s", "end_s", "sample_rate", "channels", "label", "label_name", "transcript")
PathLike = Union[str, "os.PathLike[str]"]


class AudioBuildError(ValueError):
    """Bad input or output for an audio shard build; the message names the file."""


# --------------------------------------------------------------------------------------------
# report and bad-input policy


@dataclass(kw_only=True)
class AudioBuildReport(BuildReport):
    """What :func:`build_shards` wrote (:class:`datasets_def.building.BuildReport`; a sample is a window).

    Args:
        clips: files written per split.
        seconds: audio seconds per split.
        classes: class names; a sample's ``label`` indexes this list.
        resampled: source sample rate -> files resampled from it to the build rate.
    """

    clips: Dict[str, int]
    seconds: Dict[str, float]
    classes: List[str] = field(default_factory=list)
    resampled: Dict[int, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# inputs and labels


def _find_inputs(input_path: Path, skipper: BadInputSkipper) -> Tuple[List[Tuple[Path, str]], List[str]]:
    """((file, source name) pairs of .wav/.flac files sorted by relative posix path, ignored files);
    see :func:`datasets_def.building.find_inputs`."""
    return find_inputs(input_path, lambda name: has_suffix(name, AUDIO_SUFFIXES), "audio", "a .wav or .flac file",
                       ".wav or .flac files", skipper, AudioBuildError)


@dataclass
class _Labels:
    """Per-source class name and transcript, and the sorted class list."""

    names: Dict[str, Optional[str]]
    transcripts: Dict[str, Optional[str]]
    classes: List[str]
    table: Optional[Path] = None  # a labels CSV with a label column: every input needs its row

    def missing_row(self, source: str) -> Optional[str]:
        """Why ``source`` cannot be labelled (the labels CSV has no row for it), else None."""
        if self.table is not None and source not in self.names:
            return f"has no row in the labels file {self.table} (a row with an empty label keeps it unlabelled)"
        return None

    def of(self, source: str) -> Tuple[Optional[int], Optional[str], Optional[str]]:
        name = self.names.get(source)
        label = self.classes.index(name) if name is not None else None
        return label, name, self.transcripts.get(source)


def _read_labels(labels: Optional[PathLike], input_path: Path, sources: List[str]) -> _Labels:
    """Labels from class subfolders (``"folders"``), a CSV file, or none."""
    if labels is None:
        return _Labels({}, {}, [])
    if isinstance(labels, str) and labels == "folders":
        if input_path.is_file():
            raise AudioBuildError(f"labels='folders' needs a folder of class subfolders, got the file {input_path}")
        loose = [s for s in sources if "/" not in s]
        if loose:
            raise AudioBuildError(f"labels='folders': {len(loose)} file(s) are not in a class subfolder, e.g. {loose[0]!r}")
        names = {s: s.split("/", 1)[0] for s in sources}
        return _Labels(dict(names), {}, sorted(set(names.values())))
    path = Path(labels).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"labels: expected 'folders' or a CSV file with columns path,label; {path} is not a file")
    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except OSError as exn:
        raise AudioBuildError(f"{path}: cannot read the labels file ({type(exn).__name__}: {exn.strerror or exn})") from None
    with fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "path" not in cols or ("label" not in cols and "transcript" not in cols):
            raise AudioBuildError(f"{path}: the CSV header must have a 'path' column and 'label' and/or 'transcript', got {cols}")
        names: Dict[str, Optional[str]] = {}
        transcripts: Dict[str, Optional[str]] = {}
        for lineno, row in enumerate(reader, start=2):
            src = (row.get("path") or "").strip().replace("\\", "/")
            if not src:
                raise AudioBuildError(f"{path}:{lineno}: empty 'path'")
            if src in names:
                raise AudioBuildError(f"{path}:{lineno}: {src!r} is listed twice")
            names[src] = (row.get("label") or "").strip() or None
            transcripts[src] = (row.get("transcript") or "").strip() or None
    unknown = sorted(set(names) - set(sources))
    if unknown:
        raise AudioBuildError(f"{path}: {len(unknown)} listed path(s) match no input file (paths are relative to "
                              f"{input_path}), e.g. {unknown[:3]}")
    return _Labels(names, transcripts, sorted({n for n in names.values() if n is not None}),
                   path if "label" in cols else None)


# --------------------------------------------------------------------------------------------
# writing clips


def encode_flac(waveform: np.ndarray, sample_rate: int) -> Tuple[bytes, int]:
    """16-bit FLAC bytes of a float (channels, samples) waveform, and how many samples were clipped.

    Args:
        waveform: float (channels, samples), nominally in [-1, 1).
        sample_rate: its rate (Hz).
    """
    import soundfile as sf

    x = np.asarray(waveform, dtype=np.float32)
    hi = 32767.0 / 32768.0
    clipped = int(np.count_nonzero((x < -1.0) | (x > hi)))
    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, hi).T, int(sample_rate), format="FLAC", subtype="PCM_16")
    return buf.getvalue(), clipped


class _ClipWriter(ShardWriters):
    """Cuts clips into windows and writes them to the split shards (:class:`datasets_def.building.ShardWriters`:
    written atomically, deleted by ``abort``), counting clips and audio as it goes."""

    def __init__(self, out: Path, sample_rate: int, max_seconds: float, samples_per_shard: int) -> None:
        super().__init__(out, samples_per_shard, AudioBuildError)
        self.sample_rate = sample_rate
        self.window = max(1, int(round(max_seconds * sample_rate)))
        self.clips = {s: 0 for s in SPLITS}
        self.frames = {s: 0 for s in SPLITS}
        self.clipped = 0
        self.ordinal = 0

    def write_clip(self, split: str, source: str, waveform: np.ndarray, label: Optional[int],
                   label_name: Optional[str], transcript: Optional[str]) -> int:
        """Write one clip (float (channels, samples) at the build rate) as windows; returns their count."""
        n = waveform.shape[1]
        starts = range(0, n, self.window)
        whole = len(starts) == 1
        for i, lo in enumerate(starts):
            hi = min(lo + self.window, n)
            data, clipped = encode_flac(waveform[:, lo:hi], self.sample_rate)
            self.clipped += clipped
            meta = {
                "source": source, "window": i, "start_s": lo / self.sample_rate, "end_s": hi / self.sample_rate,
                "sample_rate": self.sample_rate, "channels": int(waveform.shape[0]), "label": label,
                "label_name": label_name, "transcript": transcript if whole else None,
            }
            self.write(split, {
                "__key__": f"{self.ordinal:09d}_{i:05d}",
                "flac": data,
                "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
            })
        self.clips[split] += 1
        self.frames[split] += n
        self.ordinal += 1
        return len(starts)

    def finish(self, files: int, classes: List[str], skipped: List[Tuple[str, str]], args: Dict[str, Any],
               extra: Optional[Dict[str, Any]] = None) -> AudioBuildReport:
        """Close the shards and write ``manifest.json`` (:func:`datasets_def.building.finish_build`)."""
        shards = self.close()
        seconds = {s: self.frames[s] / self.sample_rate for s in SPLITS}
        samples = {s: self.samples[s] for s in SPLITS}
        manifest = {
            "dataset": "audio",
            "fields": list(AudioDatasetDef.fields),
            "files": files,
            "sample_rate": self.sample_rate,
            "classes": classes,
            "splits": {
                s: {"clips": self.clips[s], "samples": samples[s], "shards": len(shards[s]), "seconds": seconds[s]}
                for s in SPLITS
            },
            "shard_files": shards,
            "clipped_samples": self.clipped,
            "build_args": {**args, "samples_per_shard": self.samples_per_shard},
            **(extra or {}),
        }
        finish_build("audio", self, manifest, skipped, AudioBuildError)
        return AudioBuildReport(output_dir=self.out, files=files, samples=samples, shards=shards, skipped=skipped,
                                clips=dict(self.clips), seconds=seconds, classes=classes)


# --------------------------------------------------------------------------------------------
# building shards


def _check_build_args(sample_rate: int, max_seconds: float, samples_per_shard: int, val_fraction: float) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
        raise AudioBuildError(f"sample_rate must be a positive int, got {sample_rate!r}")
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not math.isfinite(max_seconds) \
            or max_seconds * sample_rate < 1:
        raise AudioBuildError(f"max_seconds must be a positive number (at least one sample), got {max_seconds!r}")
    check_build_args(samples_per_shard, val_fraction, AudioBuildError)


def build_shards(
    input_path: PathLike,
    output_dir: PathLike,
    *,
    sample_rate: int = 16000,
    max_seconds: float = 10.0,
    labels: Optional[PathLike] = None,
    mono: bool = True,
    samples_per_shard: int = 1000,
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
    max_resample_ratio: float = MAX_RESAMPLE_RATIO,
) -> AudioBuildReport:
    """Window .wav / .flac files into ``{output_dir}/{split}-{index:06d}.tar`` shards of FLAC clips.

    Also writes ``{output_dir}/manifest.json`` (counts, classes, skipped files, resampled files
    per source rate, build arguments). Inputs, the output folder and the shards follow the rules
    of :mod:`datasets_def.building` (symlinked folders followed, each folder once; extensions in
    any case; shards written atomically). The build output counts the files resampled from each
    rate.

    Args:
        input_path: a folder (searched recursively, sorted) or a single .wav / .flac file.
        output_dir: where shards go; must hold no shards/manifest unless ``overwrite``.
        sample_rate: every clip is resampled to this rate (Hz).
        max_seconds: longest window; longer files are cut into consecutive windows, the tail kept.
        labels: None, ``"folders"`` (first-level subfolder = class name) or a CSV file with columns
            ``path`` (relative to ``input_path``) and ``label`` and/or ``transcript``.
        mono: average channels into one (True) or keep them (False, at most 8).
        samples_per_shard: windows per tar shard.
        val_fraction: fraction of files (by stable hash of their path) put in the val split.
        seed: salt of the split hash and of the write order (files are written in a seeded hash order, not
            sorted by path, so every shard mixes the classes of class folders).
        skip_bad: skip (and report) unreadable, corrupt, empty or NaN files instead of raising.
        overwrite: delete existing ``*.tar`` and manifest in ``output_dir`` first.
        max_resample_ratio: a file whose sample rate differs from ``sample_rate`` by more than
            this factor (either way) is bad input, not resampled: such a ratio usually means a
            wrong rate in the file's header, and the clip would be stretched or squeezed.
    """
    from mmm.modalities.audio.frontend import AudioDecodeError, decode_audio, resample

    _check_build_args(sample_rate, max_seconds, samples_per_shard, val_fraction)
    if isinstance(max_resample_ratio, bool) or not isinstance(max_resample_ratio, (int, float)) \
            or not max_resample_ratio >= 1.0:
        raise AudioBuildError(f"max_resample_ratio must be a number >= 1, got {max_resample_ratio!r}")
    src = Path(input_path).expanduser()
    out = Path(output_dir).expanduser()
    skipper = BadInputSkipper(skip_bad, AudioBuildError)
    inputs, ignored = _find_inputs(src, skipper)
    label_table = _read_labels(labels, src, [s for _, s in inputs])
    inputs = hash_order(inputs, seed, key=lambda item: item[1])  # every shard mixes classes / speakers
    prepare_output(out, overwrite, AudioBuildError)
    log_ignored("audio", ignored, ".wav or .flac")

    resampled: Dict[int, int] = {}
    with _ClipWriter(out, sample_rate, float(max_seconds), samples_per_shard) as writer:
        for path, source in inputs:
            why = label_table.missing_row(source)
            if why is not None:  # left unlabelled, a typo in the CSV would go unnoticed
                skipper.bad(source, why)
                continue
            data = read_file(path, source, skipper)
            if data is None:
                continue
            try:
                wav, sr = decode_audio(data, source)  # (C, N)
            except AudioDecodeError as exn:
                skipper.bad(source, str(exn).removeprefix(f"{source}: "))
                continue
            if mono:
                wav = wav.mean(axis=0, keepdims=True)
            elif wav.shape[0] > FLAC_MAX_CHANNELS:
                skipper.bad(source, f"{wav.shape[0]} channels; FLAC stores at most {FLAC_MAX_CHANNELS} (use mono=True)")
                continue
            if sr != sample_rate:
                ratio = max(sr / sample_rate, sample_rate / sr)
                if ratio > max_resample_ratio:
                    skipper.bad(source, f"sample rate {sr} Hz is {ratio:.1f}x {'above' if sr > sample_rate else 'below'} "
                                        f"the build's {sample_rate} Hz, beyond max_resample_ratio={max_resample_ratio:g} "
                                        "(a wrong rate in the header? resampling would stretch or squeeze the clip)")
                    continue
                wav = resample(wav, sr, sample_rate)
                resampled[sr] = resampled.get(sr, 0) + 1
            label, label_name, transcript = label_table.of(source)
            writer.write_clip(stable_split(val_fraction, seed, source), source, wav, label, label_name, transcript)
        if writer.ordinal == 0:
            raise AudioBuildError(f"no audio written from {src} ({len(skipper.skipped)} skipped file(s): "
                                  f"{skipper.skipped[:3]})")
        args = build_args(src, samples_per_shard, val_fraction, seed, skip_bad, sample_rate=sample_rate,
                          max_seconds=max_seconds, labels=None if labels is None else str(labels), mono=mono,
                          max_resample_ratio=max_resample_ratio)
        extra = {"resampled_files": sum(resampled.values()),
                 "resampled_from": {str(r): n for r, n in sorted(resampled.items())}, **ignored_manifest(ignored)}
        report = writer.finish(len(inputs), label_table.classes, skipper.skipped, args, extra)
    report.resampled, report.ignored = dict(sorted(resampled.items())), len(ignored)
    if resampled:
        logger.info("audio build: resampled %d file(s) to %d Hz (%s)", sum(resampled.values()), sample_rate,
                    ", ".join(f"from {r} Hz: {n}" for r, n in sorted(resampled.items())))
    return report


# --------------------------------------------------------------------------------------------
# embedded default corpus: synthesized labelled sounds

SYNTH_CLASSES = ("pure_tone", "harmonic_tone", "major_chord", "minor_chord", "noise", "chirp", "am_tone")
SYNTH_SAMPLE_RATE = 16000
SYNTH_CLIPS_PER_CLASS = 170
SYNTH_VAL_PER_CLASS = 26
SYNTH_SEED = 20240601


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _sin(cycles: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """``sin(2 pi cycles + offset)`` in float32; the phase is wrapped in float64 first, so precision
    does not decay over long clips (float32 sines are several times faster than float64 ones)."""
    return np.sin((2 * np.pi * (cycles - np.floor(cycles)) + offset).astype(np.float32))


def _harmonic(t: np.ndarray, f0: float, amps: np.ndarray, phases: np.ndarray, sr: int) -> np.ndarray:
    """Sum of harmonics ``h * f0`` (h = 1..len(amps)) below 0.45 * sr; (N,) float32.

    ``sin(h w t + phi)`` is the imaginary part of ``z ** h * exp(i phi)`` with ``z = exp(i w t)``;
    powers by repeated (real-arithmetic) complex multiplication cost far less than a sine each.
    """
    cycles = f0 * t
    zr, zi = _sin(cycles, np.pi / 2), _sin(cycles)  # cos, sin of the fundamental's phase
    hr, hi = zr, zi
    out = np.zeros(t.size, dtype=np.float32)
    for h in range(1, amps.size + 1):
        if h * f0 >= 0.45 * sr:
            break
        if h > 1:
            hr, hi = hr * zr - hi * zi, hr * zi + hi * zr
        out += np.float32(amps[h - 1] * np.cos(phases[h - 1])) * hi + np.float32(amps[h - 1] * np.sin(phases[h - 1])) * hr
    return out


def _timbre(rng: np.random.Generator, n: int) -> np.ndarray:
    """Amplitudes of ``n`` harmonics: a random spectral slope, jittered, sometimes with weak even harmonics."""
    h = np.arange(1, n + 1, dtype=np.float64)
    amps = h ** -rng.uniform(0.6, 2.0) * rng.uniform(0.5, 1.0, size=n)
    if rng.random() < 0.3:  # hollow, clarinet-like timbre
        amps[1::2] *= 0.05
    return amps


def _synth_clip(name: str, rng: np.random.Generator, sr: int) -> Tuple[np.ndarray, str]:
    """One clip of class ``name``: (N,) float32 at unit RMS (before level and noise) and a short detail."""
    n = int(rng.uniform(1.0, 2.0) * sr)
    t = np.arange(n) / sr
    if name == "pure_tone":
        f = _log_uniform(rng, 150.0, 2000.0)
        x, detail = _sin(f * t, rng.uniform(0, 2 * np.pi)), f"{f:.0f}Hz"
    elif name == "harmonic_tone":
        f0, k = _log_uniform(rng, 110.0, 880.0), int(rng.integers(5, 13))
        x, detail = _harmonic(t, f0, _timbre(rng, k), rng.uniform(0, 2 * np.pi, k), sr), f"{f0:.0f}Hz-{k}h"
    elif name in ("major_chord", "minor_chord"):
        root = _log_uniform(rng, 110.0, 440.0)
        steps = np.array([0, 4 if name == "major_chord" else 3, 7])
        inversion = int(rng.integers(0, 3))
        steps[:inversion] += 12  # first/second inversion: the lowest notes go up an octave
        k = int(rng.integers(3, 7))
        amps = _timbre(rng, k)
        x = sum(_harmonic(t, root * 2 ** (s / 12), amps, rng.uniform(0, 2 * np.pi, k), sr) for s in steps)
        detail = f"{root:.0f}Hz-inv{inversion}"
    elif name == "noise":
        color = ("white", "pink", "brown")[int(rng.integers(0, 3))]
        m = 1 << (n - 1).bit_length()  # a power-of-two FFT, cut to n afterwards
        spec = np.fft.rfft(rng.standard_normal(m, dtype=np.float32))
        f = np.maximum(np.fft.rfftfreq(m, 1 / sr), 20.0)
        x = np.fft.irfft(spec * f ** -{"white": 0.0, "pink": 0.5, "brown": 1.0}[color], m)[:n]
        detail = color
    elif name == "chirp":
        f_a, f_b = _log_uniform(rng, 150.0, 3000.0), _log_uniform(rng, 150.0, 3000.0)
        while max(f_a, f_b) / min(f_a, f_b) < 2.0:
            f_b = _log_uniform(rng, 150.0, 3000.0)
        dur = n / sr
        ratio = f_b / f_a  # exponential sweep: f(t) = f_a * ratio ** (t / dur)
        cycles = f_a * dur / np.log(ratio) * (ratio ** (t / dur) - 1.0)
        x, detail = _sin(cycles), f"{f_a:.0f}-{f_b:.0f}Hz"
    elif name == "am_tone":
        fc, fm, depth = _log_uniform(rng, 150.0, 2000.0), rng.uniform(3.0, 12.0), rng.uniform(0.6, 1.0)
        x = (1.0 + depth * _sin(fm * t, rng.uniform(0, 2 * np.pi))) * _sin(fc * t)
        detail = f"{fc:.0f}Hz-am{fm:.1f}Hz"
    else:  # pragma: no cover - SYNTH_CLASSES is fixed
        raise ValueError(f"unknown synthetic class {name!r}")
    x = np.asarray(x, dtype=np.float32)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return x / np.float32(rms + 1e-12), detail


def synthesize_clip(name: str, rng: np.random.Generator, sr: int = SYNTH_SAMPLE_RATE) -> Tuple[np.ndarray, str]:
    """A finished synthetic clip: random level (-35..-15 dBFS RMS, the same for every class, so
    loudness says nothing about the class), 10-20 ms fades, white noise at 25-40 dB SNR.

    Args:
        name: one of :data:`SYNTH_CLASSES`.
        rng: generator to draw from.
        sr: sample rate (Hz).

    Returns:
        ``(waveform float32 (1, N), detail)``.
    """
    x, detail = _synth_clip(name, rng, sr)
    fade = int(rng.uniform(0.010, 0.020) * sr)
    ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, fade))).astype(np.float32)
    x[:fade] *= ramp
    x[-fade:] *= ramp[::-1]
    level = 10 ** (rng.uniform(-35.0, -15.0) / 20)
    noise_level = level * 10 ** (-rng.uniform(25.0, 40.0) / 20)
    hiss = rng.random(x.size, dtype=np.float32) - np.float32(0.5)  # white, variance 1/12 (cheaper than Gaussian)
    y = x * np.float32(level) + hiss * np.float32(noise_level * np.sqrt(12.0))
    return np.clip(y, -0.99, 0.99)[None, :], detail


def _write_synthetic(out: Path, clips_per_class: int = SYNTH_CLIPS_PER_CLASS, val_per_class: int = SYNTH_VAL_PER_CLASS,
                     samples_per_shard: int = 256) -> str:
    """Synthesize the corpus into ``out`` (round-robin over classes, so every shard mixes them); returns its size."""
    with _ClipWriter(out, SYNTH_SAMPLE_RATE, 10.0, samples_per_shard) as writer:
        for i in range(clips_per_class):
            for label, name in enumerate(SYNTH_CLASSES):
                rng = np.random.default_rng([SYNTH_SEED, label, i])
                wav, detail = synthesize_clip(name, rng)
                split = "val" if i < val_per_class else "train"
                writer.write_clip(split, f"synthetic/{name}/{i:04d}-{detail}", wav, label, name, None)
        args = {"synthetic": EMBEDDED_NAME, "seed": SYNTH_SEED, "clips_per_class": clips_per_class,
                "val_per_class": val_per_class, "sample_rate": SYNTH_SAMPLE_RATE}
        report = writer.finish(clips_per_class * len(SYNTH_CLASSES), list(SYNTH_CLASSES), [], args)
    return f"{report.total_samples} clips, {sum(report.seconds.values()):.0f} s of audio"


def embedded_default(cache_dir: Optional[PathLike] = None) -> Path:
    """The embedded default audio corpus, synthesized once (a few seconds), cached, no download.

    Seven classes (:data:`SYNTH_CLASSES`), 170 clips each of 1-2 s at 16 kHz with randomized
    pitch, timbre, duration and level plus light noise; 26 clips per class in ``val``, the rest in
    ``train``; deterministic (fixed seeds; bit-identical for one NumPy build and CPU kind, since
    vectorized float sines may differ in the last bit across SIMD paths). Built at ``{cache_dir}/datasets/audio-synthetic-v1/`` in
    a temporary directory renamed into place once complete (a ``DONE`` marker is written last).

    Args:
        cache_dir: cache root; default ``$MMM_CACHE_DIR`` or ``~/.cache/mmm``.

    Returns:
        The directory holding ``train-*.tar``, ``val-*.tar`` and ``manifest.json``.
    """
    return cached_build(EMBEDDED_NAME, cache_dir, _write_synthetic, AudioBuildError)


# --------------------------------------------------------------------------------------------
# reading shards back


class AudioClip(NamedTuple):
    """One shard sample, decoded: key, float32 (channels, samples) waveform, rate and metadata."""

    key: str
    waveform: np.ndarray
    sample_rate: int
    meta: Dict[str, Any]


def iter_clips(shard_dir: PathLike, split: str = "train", *, options: Optional[ReadOptions] = None) -> Iterator[AudioClip]:
    """Stream the decoded clips of one split (in shard order), with no extraction to disk.

    Args:
        shard_dir, split, options: as :func:`datasets_def.building.read_split` reads them.
    """
    from mmm.modalities.audio.frontend import decode_audio

    def fields(sample: Dict[str, Any]) -> Optional[str]:
        return None if "flac" in sample else "lacks the 'flac' field"

    for sample, where, meta in read_split(shard_dir, split, options, fields, AudioBuildError):
        wav, sr = decode_audio(sample["flac"], where)
        yield AudioClip(sample["__key__"], wav, sr, meta)


def iter_waveforms(shard_dir: PathLike, split: str = "train", *,
                   options: Optional[ReadOptions] = None) -> Iterator[Tuple[np.ndarray, int]]:
    """``(waveform (channels, samples), sample_rate)`` of every clip of one split, e.g. for
    ``AudioFrontend.fit_stats`` or for k-means features.

    Args:
        shard_dir: directory of shards.
        split: ``"train"`` or ``"val"``.
        options: read settings (see :func:`iter_clips`).
    """
    for clip in iter_clips(shard_dir, split, options=options):
        yield clip.waveform, clip.sample_rate


def _check_meta(record: Any) -> List[str]:
    if not isinstance(record, dict):
        return [f"field 'json' must be a JSON object, got {type(record).__name__}"]
    problems: List[str] = []
    missing = [k for k in ("source", "start_s", "end_s", "sample_rate") if k not in record]
    if missing:
        problems.append(f"field 'json' lacks key(s) {missing}")
    number = (int, float)
    checks: List[Tuple[str, Callable[[Any], bool], str]] = [
        ("source", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        ("start_s", lambda v: isinstance(v, number) and not isinstance(v, bool) and v >= 0, "a number >= 0"),
        ("end_s", lambda v: isinstance(v, number) and not isinstance(v, bool), "a number"),
        ("sample_rate", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive int"),
        ("label", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0), "null or an int >= 0"),
        ("label_name", lambda v: v is None or isinstance(v, str), "null or a string"),
        ("transcript", lambda v: v is None or isinstance(v, str), "null or a string"),
    ]
    for key, ok, want in checks:
        if key in record and not ok(record[key]):
            problems.append(f"json {key!r} must be {want}, got {record[key]!r}")
    start, end = record.get("start_s"), record.get("end_s")
    if isinstance(start, number) and isinstance(end, number) and not end > start:
        problems.append(f"json end_s={end} must be > start_s={start}")
    return problems


def check_sample(sample: Dict[str, Any]) -> Optional[str]:
    """Say what is wrong with one raw shard sample's fields, or None when they decode.

    ``flac`` must decode to a non-empty, finite waveform; ``json`` must be a UTF-8 JSON object with
    ``source``, ``start_s`` < ``end_s`` and ``sample_rate`` (equal to the FLAC's rate, and the
    window's duration matching the decoded length). Absent fields are not checked here.

    Args:
        sample: ``{"<field>": bytes, ...}`` as read from a shard (``__key__`` etc. are ignored).
    """
    from mmm.modalities.audio.frontend import AudioDecodeError, decode_audio

    problems: List[str] = []
    decoded: Optional[Tuple[np.ndarray, int]] = None
    if sample.get("flac") is not None:
        try:
            decoded = decode_audio(bytes(sample["flac"]), "field 'flac'")
        except AudioDecodeError as exn:
            problems.append(str(exn))
    record: Any = None
    if sample.get("json") is not None:
        try:
            record = json.loads(bytes(sample["json"]).decode("utf-8"))
        except UnicodeDecodeError as exn:
            problems.append(f"field 'json' is not valid UTF-8 at byte offset {exn.start} ({exn.reason})")
        except json.JSONDecodeError as exn:
            problems.append(f"field 'json' is not valid JSON ({exn.msg} at line {exn.lineno} column {exn.colno})")
        else:
            meta_problems = _check_meta(record)
            problems.extend(meta_problems)
            if decoded is not None and not meta_problems:
                wav, sr = decoded
                if record["sample_rate"] != sr:
                    problems.append(f"json sample_rate={record['sample_rate']} but the FLAC is at {sr} Hz")
                else:
                    want = (record["end_s"] - record["start_s"]) * sr
                    if abs(want - wav.shape[1]) > 1.0:
                        problems.append(f"json window {record['start_s']}..{record['end_s']} s is {want:.0f} samples, "
                                        f"the FLAC has {wav.shape[1]}")
    return "; ".join(problems) or None


@DATASETS.register("audio")
class AudioDatasetDef:
    """The ``audio`` dataset: windowed FLAC clips in WebDataset shards (fields ``flac`` and ``json``)."""

    name = "audio"
    fields = ("flac", "json")

    build_shards = staticmethod(build_shards)
    embedded_default = staticmethod(embedded_default)
    check_sample = staticmethod(check_sample)
    iter_clips = staticmethod(iter_clips)
    iter_waveforms = staticmethod(iter_waveforms)
    synthesize_clip = staticmethod(synthesize_clip)
