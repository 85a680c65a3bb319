"""Audio front end: bytes -> waveform -> normalized log-mel -> tokens (and k-means features).

Two token layouts, chosen by :attr:`AudioFrontendConfig.token`:

* ``"time"`` -- ``frames_per_token`` consecutive log-mel frames stacked into one token, so a
  token is a short slice of time covering every mel bin (the time-patch tokens of SSAST, Gong
  et al. 2022, and of frame-level models such as HuBERT, Hsu et al. 2021). Token ``i`` holds
  frames ``i*k .. i*k+k-1``, frame-major: ``token[j*n_mels + m]`` is frame ``j``, mel bin ``m``.
* ``"patch"`` -- 2-D spectrogram patches of ``patch_freq`` mel bins x ``patch_time`` frames, as
  AudioMAE (Huang et al. 2022, "Masked Autoencoders that Listen"). Tokens are ordered row-major
  over the grid ``(freq_patches, time_patches)``: token ``f * time_patches + t``, the same flat
  order as the ``spec_patch`` masker's mask. Within a patch values are ``[bin, frame]`` row-major.

The trailing partial token (fewer frames than a token holds) is padded with the *normalized floor
value* -- what a silent frame becomes after ``log(max(mel, log_floor))`` and normalization -- and
is never dropped, so every sample of a clip reaches the model.

Normalization is per mel bin by default (``norm="bin"``: mean/std of each bin over the training
frames, i.e. cepstral-mean-and-variance style) so that every bin enters the encoder at unit scale
and the spectral tilt of speech/music does not dominate reconstruction losses; ``norm="global"``
uses one mean/std over all bins and frames, as AudioMAE. The statistics are fitted on training
data with :meth:`AudioFrontend.fit_stats` and saved with the config as JSON text
(:meth:`AudioFrontend.save` / :meth:`AudioFrontend.load`), so they travel inside checkpoints.

:meth:`AudioFrontend.acoustic_features` gives per-token features (MFCC + deltas, log-mel, or a
simple chroma as a stand-in for MERT's CQT teacher, Li et al. 2023) aligned 1:1 with the tokens;
they are the inputs of the offline k-means of :mod:`mmm.targets.kmeans` (HuBERT targets).
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch

# soundfile and torchaudio are imported where audio is decoded or transformed: every model build imports this
# module (the built-in modalities register together), and a machine without them can still train other modalities

__all__ = [
    "AudioDecodeError",
    "AudioFrontendConfig",
    "AudioFrontend",
    "decode_audio",
    "MAX_RESAMPLE_RATIO",
    "resample",
    "MAX_CHANNELS",
    "FRONTEND_FILE",
]

AUDIO_SUFFIXES = (".wav", ".flac")
"""Suffixes of the audio files read from folders (the audio shard builder, ``mmm embed``), lower case."""
MAX_CHANNELS = 64
FRONTEND_FILE = "audio_frontend.json"
_FORMAT = "mmm-audio-frontend"
_TOKEN_KINDS = ("time", "patch")
_NORM_KINDS = ("bin", "global")
_FEATURE_KINDS = ("mfcc", "logmel", "chroma")
_MIN_STD = 1e-5
PathLike = Union[str, "os.PathLike[str]"]


class AudioDecodeError(ValueError):
    """Audio bytes or a waveform cannot be used; the message names where they came from."""


# --------------------------------------------------------------------------------------------
# decoding and resampling


def decode_audio(data: bytes, where: str) -> Tuple[np.ndarray, int]:
    """Decode WAV/FLAC (anything libsndfile reads) bytes into a float32 waveform.

    Args:
        data: the encoded file.
        where: file name or shard key, used in error messages.

    Returns:
        ``(waveform, sample_rate)``: waveform float32 (channels, samples) in [-1, 1] for PCM.

    Raises:
        AudioDecodeError: empty or undecodable bytes, zero samples, more than
            :data:`MAX_CHANNELS` channels, or NaN/inf samples.
    """
    if data is None or len(data) == 0:
        raise AudioDecodeError(f"{where}: empty audio (0 bytes)")
    truncated = _wav_truncation(bytes(data[:65536]), len(data))
    if truncated:
        raise AudioDecodeError(f"{where}: truncated WAV: {truncated}")
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(bytes(data))) as fh:
            channels, sr, declared = fh.channels, fh.samplerate, fh.frames
            if channels < 1 or channels > MAX_CHANNELS:
                raise AudioDecodeError(f"{where}: {channels} channels; expected 1..{MAX_CHANNELS}")
            if sr <= 0:
                raise AudioDecodeError(f"{where}: invalid sample rate {sr}")
            wav = fh.read(dtype="float32", always_2d=True)  # (samples, channels)
    except AudioDecodeError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError) as exn:
        raise AudioDecodeError(f"{where}: cannot decode audio ({len(data)} bytes): {exn}") from exn
    if 0 < wav.shape[0] < declared < (1 << 62):  # a FLAC stream cut short of its STREAMINFO count (not unknown lengths)
        raise AudioDecodeError(f"{where}: truncated audio: {wav.shape[0]} of the {declared} samples its header "
                               f"declares could be read")
    if wav.shape[0] == 0:
        raise AudioDecodeError(f"{where}: zero-length audio (0 samples at {sr} Hz)")
    bad = int(wav.size - np.count_nonzero(np.isfinite(wav)))
    if bad:
        raise AudioDecodeError(f"{where}: {bad} non-finite (NaN/inf) sample(s) of {wav.size}")
    return np.ascontiguousarray(wav.T), int(sr)


def _wav_truncation(head: bytes, size: int) -> Optional[str]:
    """What is missing from a RIFF/WAVE file whose ``data`` chunk declares more bytes than the file holds, or None.

    libsndfile reads such a file without complaint, as a shorter clip (it lowers the frame count to the
    bytes present), so a shard member cut short would train as a different clip. A declared size of 0 or
    0xFFFFFFFF (written by streaming encoders that do not know the length) is not checked.

    Args:
        head: the file's first bytes (the chunk headers before ``data``; 64 KiB is plenty).
        size: the whole file's length in bytes.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    at = 12
    while at + 8 <= len(head):
        chunk, length = head[at:at + 4], int.from_bytes(head[at + 4:at + 8], "little")
        if chunk == b"data":
            present = size - (at + 8)
            if length not in (0, 0xFFFFFFFF) and present < length:
                return f"its data chunk declares {length} bytes, {present} are present ({size} bytes in all)"
            return None
        at += 8 + length + (length & 1)  # chunks are padded to an even length
    return None


MAX_RESAMPLE_RATIO = 16.0
"""A clip whose sample rate differs from the front end's (or a build's) by more than this factor is refused."""


def resample(waveform: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited (windowed-sinc) resampling with ``torchaudio.functional.resample``.

    Args:
        waveform: float (channels, samples) or (samples,).
        orig_sr: its sample rate (Hz).
        new_sr: the wanted rate (Hz).

    Returns:
        float32 array of the same rank, ``ceil(samples * new_sr / orig_sr)`` samples long.
    """
    for name, value in (("orig_sr", orig_sr), ("new_sr", new_sr)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"resample: {name} must be a positive int, got {value!r}")
    x = np.asarray(waveform, dtype=np.float32)
    if orig_sr == new_sr:
        return x
    import torchaudio

    y = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(x)), int(orig_sr), int(new_sr))
    return y.numpy()


# --------------------------------------------------------------------------------------------
# config


@dataclass
class AudioFrontendConfig:
    """How waveforms become tokens.

    Args:
        sample_rate: every clip is resampled to this rate (Hz).
        n_mels: mel bins per frame.
        win_ms: STFT window length (ms).
        hop_ms: frame step (ms); 10 ms gives 100 frames per second.
        n_fft: FFT size; None = the next power of two >= the window.
        f_min: lowest mel filter edge (Hz).
        f_max: highest mel filter edge (Hz); None = Nyquist.
        token: ``"time"`` (stacked frames) or ``"patch"`` (2-D freq x time patches).
        frames_per_token: frames stacked per token in ``"time"`` mode.
        patch_freq: mel bins per patch in ``"patch"`` mode; must divide ``n_mels``.
        patch_time: frames per patch in ``"patch"`` mode.
        max_seconds: longer clips are cut to their first ``max_seconds``; None = no cap.
        log_floor: mel power floor before the log (silence maps to ``log(log_floor)``).
        norm: ``"bin"`` (per-mel-bin mean/std) or ``"global"`` (one mean/std, AudioMAE).
    """

    sample_rate: int = 16000
    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: Optional[int] = None
    f_min: float = 0.0
    f_max: Optional[float] = None
    token: str = "time"
    frames_per_token: int = 4
    patch_freq: int = 16
    patch_time: int = 4
    max_seconds: Optional[float] = 10.0
    log_floor: float = 1e-6
    norm: str = "bin"

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"AudioFrontendConfig.{name} must be an int >= 1, got {v!r}")

        def positive_float(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"AudioFrontendConfig.{name} must be a positive number, got {v!r}")

        for name in ("sample_rate", "n_mels", "frames_per_token", "patch_freq", "patch_time"):
            positive_int(name)
        for name in ("win_ms", "hop_ms", "log_floor"):
            positive_float(name)
        if self.max_seconds is not None:
            positive_float("max_seconds")
        if self.token not in _TOKEN_KINDS:
            raise ValueError(f"AudioFrontendConfig.token must be one of {_TOKEN_KINDS}, got {self.token!r}")
        if self.norm not in _NORM_KINDS:
            raise ValueError(f"AudioFrontendConfig.norm must be one of {_NORM_KINDS}, got {self.norm!r}")
        if self.token == "patch" and self.n_mels % self.patch_freq:
            raise ValueError(f"AudioFrontendConfig.patch_freq={self.patch_freq} must divide n_mels={self.n_mels}")
        if self.win_length < 2 or self.hop_length < 1:
            raise ValueError(
                f"AudioFrontendConfig: win_ms={self.win_ms} / hop_ms={self.hop_ms} give {self.win_length} / "
                f"{self.hop_length} samples at {self.sample_rate} Hz; need a window >= 2 and a hop >= 1 sample"
            )
        if self.n_fft is not None:
            positive_int("n_fft")
            if self.n_fft < self.win_length:
                raise ValueError(f"AudioFrontendConfig.n_fft={self.n_fft} is shorter than the window ({self.win_length} samples)")
        nyquist = self.sample_rate / 2
        f_max = nyquist if self.f_max is None else self.f_max
        if not 0.0 <= self.f_min < f_max <= nyquist:
            raise ValueError(f"AudioFrontendConfig: need 0 <= f_min < f_max <= {nyquist} Hz, got f_min={self.f_min}, f_max={self.f_max}")

    @property
    def win_length(self) -> int:
        """Window length in samples."""
        return int(round(self.sample_rate * self.win_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        """Frame step in samples."""
        return int(round(self.sample_rate * self.hop_ms / 1000.0))

    @property
    def fft_size(self) -> int:
        """``n_fft`` or the next power of two >= the window."""
        return self.n_fft if self.n_fft is not None else 1 << (self.win_length - 1).bit_length()

    @property
    def token_dim(self) -> int:
        """Values per token: ``frames_per_token * n_mels`` or ``patch_freq * patch_time``."""
        return self.frames_per_token * self.n_mels if self.token == "time" else self.patch_freq * self.patch_time

    @property
    def frames_per_column(self) -> int:
        """Frames one token (time mode) or one grid column (patch mode) covers."""
        return self.frames_per_token if self.token == "time" else self.patch_time

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AudioFrontendConfig":
        """Build from a dict, naming unknown keys instead of ignoring them.

        Args:
            d: keys are field names.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AudioFrontendConfig: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# front end


def _pool_frames(x: np.ndarray, k: int) -> np.ndarray:
    """(T, D) -> (ceil(T / k), D): mean over each group of ``k`` frames (the last over its real frames)."""
    t, d = x.shape
    n = -(-t // k)
    padded = np.zeros((n * k, d), dtype=np.float64)
    padded[:t] = x
    counts = np.minimum(k, t - np.arange(n) * k).astype(np.float64)
    return (padded.reshape(n, k, d).sum(axis=1) / counts[:, None]).astype(np.float32)


class AudioFrontend:
    """Waveform -> (T_tokens, F) float32 tokens, with normalization statistics fitted on data.

    Args:
        config: the front-end settings; default :class:`AudioFrontendConfig()`.
        mean: fitted log-mel mean, (n_mels,) for ``norm="bin"`` or (1,) for ``"global"``.
        std: fitted log-mel std, same shape as ``mean``.
    """

    def __init__(self, config: Optional[AudioFrontendConfig] = None, *, mean: Optional[np.ndarray] = None,
                 std: Optional[np.ndarray] = None) -> None:
        self.config = config if config is not None else AudioFrontendConfig()
        if not isinstance(self.config, AudioFrontendConfig):
            raise TypeError(f"config must be an AudioFrontendConfig, got {type(self.config).__name__}")
        c = self.config
        import torchaudio

        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=c.sample_rate, n_fft=c.fft_size, win_length=c.win_length, hop_length=c.hop_length,
            f_min=c.f_min, f_max=c.f_max, n_mels=c.n_mels, power=2.0, center=True, pad_mode="constant",
        )
        self._chroma_spec: Optional[torch.nn.Module] = None
        self._chroma_map: Optional[torch.Tensor] = None
        self.mean: Optional[np.ndarray] = None
        self.std: Optional[np.ndarray] = None
        if (mean is None) != (std is None):
            raise ValueError("AudioFrontend: give both mean and std, or neither")
        if mean is not None:
            self.set_stats(mean, std)

    # ------------------------------------------------------------------ statistics
    @property
    def stats_shape(self) -> Tuple[int]:
        """Shape of ``mean``/``std``: (n_mels,) per bin or (1,) global."""
        return (self.config.n_mels,) if self.config.norm == "bin" else (1,)

    @property
    def fitted(self) -> bool:
        """Whether normalization statistics are set."""
        return self.mean is not None

    def set_stats(self, mean: Any, std: Any) -> None:
        """Set normalization statistics (checked for shape, finiteness and std > 0).

        Args:
            mean: array of :attr:`stats_shape`.
            std: array of :attr:`stats_shape`.
        """
        m = np.asarray(mean, dtype=np.float32).reshape(-1)
        s = np.asarray(std, dtype=np.float32).reshape(-1)
        if m.shape != self.stats_shape or s.shape != self.stats_shape:
            raise ValueError(f"AudioFrontend: mean/std must have shape {self.stats_shape} (norm={self.config.norm!r}), "
                             f"got {m.shape} and {s.shape}")
        if not (np.isfinite(m).all() and np.isfinite(s).all()) or (s <= 0).any():
            raise ValueError("AudioFrontend: mean/std must be finite with std > 0")
        self.mean, self.std = m, s

    def fit_stats(self, waveforms: Iterable[Any], max_clips: Optional[int] = None) -> "AudioFrontend":
        """Fit the log-mel mean/std on training clips (float64 running sums over every frame).

        Args:
            waveforms: items ``(waveform, sample_rate)`` or bare waveforms at ``config.sample_rate``;
                a waveform is (samples,) or (channels, samples).
            max_clips: stop after this many clips (None = all).

        Returns:
            ``self``, with :attr:`mean` and :attr:`std` set.
        """
        n_mels = self.config.n_mels
        total = np.zeros(n_mels, dtype=np.float64)
        total_sq = np.zeros(n_mels, dtype=np.float64)
        frames = 0
        clips = 0
        for item in waveforms:
            if max_clips is not None and clips >= max_clips:
                break
            wav, sr = item if isinstance(item, tuple) else (item, self.config.sample_rate)
            x = self.log_mel(wav, sr).astype(np.float64)  # (T, n_mels)
            total += x.sum(axis=0)
            total_sq += (x * x).sum(axis=0)
            frames += x.shape[0]
            clips += 1
        if frames == 0:
            raise ValueError("AudioFrontend.fit_stats: no waveforms given")
        if self.config.norm == "global":
            total, total_sq, count = total.sum(keepdims=True), total_sq.sum(keepdims=True), frames * n_mels
        else:
            count = frames
        mean = total / count
        var = np.maximum(total_sq / count - mean * mean, 0.0)
        self.set_stats(mean, np.maximum(np.sqrt(var), _MIN_STD))
        return self

    def _require_stats(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.std is None:
            raise RuntimeError("AudioFrontend: normalization statistics are not set; call fit_stats(training clips), "
                               "set_stats(mean, std) or AudioFrontend.load(dir)")
        return self.mean, self.std

    @property
    def pad_value(self) -> np.ndarray:
        """(n_mels,) normalized value of a silent frame, used to pad the last token."""
        mean, std = self._require_stats()
        v = (math.log(self.config.log_floor) - mean) / std
        return np.broadcast_to(v, (self.config.n_mels,)).astype(np.float32)

    # ------------------------------------------------------------------ signal -> frames
    def prepare(self, waveform: Any, sr: int) -> torch.Tensor:
        """Mono float32 (samples,) tensor at ``config.sample_rate``, cut to ``max_seconds``.

        Args:
            waveform: (samples,) or (channels, samples), NumPy or torch; channels are averaged.
            sr: its sample rate (Hz).
        """
        mono = self.checked_mono(waveform, sr)
        c = self.config
        if c.max_seconds is not None:  # cut before resampling, keeping a margin for the sinc filter
            margin = 8 * int(math.ceil(sr / min(sr, c.sample_rate))) + 8
            keep = int(math.ceil(c.max_seconds * sr)) + margin
            mono = mono[:keep]
        mono = resample(mono, int(sr), c.sample_rate)
        if c.max_seconds is not None:
            mono = mono[: max(1, int(round(c.max_seconds * c.sample_rate)))]
        return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))

    def checked_mono(self, waveform: Any, sr: int) -> np.ndarray:
        """The clip as mono float32 samples at its own rate, or a ``ValueError`` saying why the front end refuses it
        (shape, channels, no samples, dtype, NaN/inf, a sample rate more than :data:`MAX_RESAMPLE_RATIO` off).

        Args:
            waveform: (samples,) or (channels, samples), NumPy or torch; channels are averaged.
            sr: its sample rate (Hz).
        """
        if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
            raise ValueError(f"AudioFrontend: sr must be a positive int, got {sr!r}")
        x = waveform.detach().cpu().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2:
            raise ValueError(f"AudioFrontend: waveform must be (samples,) or (channels, samples), got shape {x.shape}")
        if x.shape[0] > MAX_CHANNELS:
            raise ValueError(f"AudioFrontend: waveform has {x.shape[0]} channels (> {MAX_CHANNELS}); "
                             "expected (channels, samples) -- transposed?")
        if x.shape[1] == 0:
            raise ValueError("AudioFrontend: waveform has zero samples")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"AudioFrontend: waveform must be floating point, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError("AudioFrontend: waveform has non-finite (NaN/inf) samples")
        mono = x.astype(np.float32).mean(axis=0)  # (N,)
        c = self.config
        ratio = max(sr, c.sample_rate) / min(sr, c.sample_rate)
        if ratio > MAX_RESAMPLE_RATIO:  # the builder's rule, at training time too: a wrong header, most likely
            raise ValueError(f"AudioFrontend: sample rate {sr} Hz is more than {MAX_RESAMPLE_RATIO:g} times off the "
                             f"model's {c.sample_rate} Hz (a wrong header, most likely: the clip would be stretched "
                             f"or squeezed)")
        return mono

    def num_frames(self, num_samples: int) -> int:
        """Frames for a clip of ``num_samples`` samples at ``config.sample_rate``: ``1 + n // hop``.

        Args:
            num_samples: samples after resampling and the ``max_seconds`` cut.
        """
        return 1 + int(num_samples) // self.config.hop_length

    def log_mel(self, waveform: Any, sr: int) -> np.ndarray:
        """Un-normalized ``log(max(mel power, log_floor))``, (T_frames, n_mels) float32.

        Args:
            waveform: (samples,) or (channels, samples).
            sr: its sample rate (Hz).
        """
        x = self.prepare(waveform, sr)
        with torch.no_grad():
            mel = self._mel(x)  # (n_mels, T)
        return torch.log(mel.clamp_min(self.config.log_floor)).T.contiguous().numpy()

    def frames(self, waveform: Any, sr: int) -> np.ndarray:
        """Normalized log-mel frames, (T_frames, n_mels) float32.

        Args:
            waveform: (samples,) or (channels, samples).
            sr: its sample rate (Hz).
        """
        mean, std = self._require_stats()
        return ((self.log_mel(waveform, sr) - mean) / std).astype(np.float32)

    # ------------------------------------------------------------------ frames -> tokens
    def num_tokens(self, num_frames: int) -> int:
        """Tokens for ``num_frames`` frames (the partial last token counts).

        Args:
            num_frames: frames of the clip.
        """
        cols = -(-int(num_frames) // self.config.frames_per_column)
        return cols if self.config.token == "time" else cols * (self.config.n_mels // self.config.patch_freq)

    def token_grid(self, num_tokens: int) -> Tuple[int, int]:
        """``(freq_patches, time_patches)`` of a token sequence; ``(1, num_tokens)`` in time mode.

        Args:
            num_tokens: length of the sequence returned by ``__call__``.
        """
        rows = 1 if self.config.token == "time" else self.config.n_mels // self.config.patch_freq
        if num_tokens < 1 or num_tokens % rows:
            raise ValueError(f"AudioFrontend.token_grid: {num_tokens} tokens is not a positive multiple of {rows} rows")
        return rows, num_tokens // rows

    def tokenize_frames(self, frames: np.ndarray, pad_value: Any) -> np.ndarray:
        """Group (T_frames, n_mels) into (T_tokens, F) tokens, padding the last with ``pad_value``.

        Args:
            frames: (T_frames, n_mels) frames.
            pad_value: scalar or (n_mels,) value of the padding frames.
        """
        c = self.config
        t, n_mels = frames.shape
        k = c.frames_per_column
        cols = -(-t // k)
        padded = np.empty((cols * k, n_mels), dtype=np.float32)
        padded[:t] = frames
        padded[t:] = pad_value
        if c.token == "time":
            return padded.reshape(cols, k * n_mels)  # (T_tokens, k * n_mels), frame-major
        rows = n_mels // c.patch_freq
        # (cols*k, n_mels) -> (cols, k, rows, pf) -> (rows, cols, pf, k) -> (rows*cols, pf*k)
        p = padded.reshape(cols, k, rows, c.patch_freq).transpose(2, 0, 3, 1)
        return np.ascontiguousarray(p).reshape(rows * cols, c.patch_freq * k)

    def __call__(self, waveform: Any, sr: int) -> np.ndarray:
        """Waveform -> normalized tokens, (T_tokens, F) float32 (F = :attr:`token_dim`).

        Args:
            waveform: (samples,) or (channels, samples), any sample rate.
            sr: its sample rate (Hz).
        """
        return self.tokenize_frames(self.frames(waveform, sr), self.pad_value)

    @property
    def token_dim(self) -> int:
        """F, the values per token."""
        return self.config.token_dim

    # ------------------------------------------------------------------ k-means features
    def _chroma(self, x: torch.Tensor) -> np.ndarray:
        """(T_frames, 12) pitch-class energy profile from a long-window STFT (same hop, same frames)."""
        c = self.config
        if self._chroma_spec is None:
            import torchaudio

            n_fft = max(2048, c.fft_size)
            self._chroma_spec = torchaudio.transforms.Spectrogram(
                n_fft=n_fft, win_length=n_fft, hop_length=c.hop_length, power=2.0, center=True, pad_mode="constant"
            )
            freqs = np.linspace(0.0, c.sample_rate / 2, n_fft // 2 + 1)
            ok = (freqs >= 55.0) & (freqs <= min(5000.0, c.sample_rate / 2))
            midi = 69.0 + 12.0 * np.log2(np.where(ok, freqs, 440.0) / 440.0)
            pitch_class = np.round(midi).astype(np.int64) % 12  # 0 = C
            fmap = np.zeros((12, freqs.size), dtype=np.float32)
            fmap[pitch_class[ok], np.flatnonzero(ok)] = 1.0
            self._chroma_map = torch.from_numpy(fmap)
        assert self._chroma_map is not None
        with torch.no_grad():
            power = self._chroma_spec(x)  # (n_freqs, T)
            chroma = self._chroma_map @ power  # (12, T)
            chroma = chroma / (chroma.sum(dim=0, keepdim=True) + 1e-8)
        return chroma.T.contiguous().numpy()

    def acoustic_features(self, waveform: Any, sr: int, kind: str = "mfcc", n_mfcc: int = 13) -> np.ndarray:
        """Per-token features for k-means targets, aligned 1:1 with ``__call__``'s tokens.

        Frame features (no fitted statistics needed; :class:`mmm.targets.kmeans.Codebook`
        standardizes its inputs):

        * ``"mfcc"``: ``n_mfcc`` cepstral coefficients (DCT of the log-mel) + deltas + delta-deltas,
          the 39-dim input of HuBERT's first clustering (Hsu et al. 2021).
        * ``"logmel"``: the log-mel frame.
        * ``"chroma"``: a 12-bin pitch-class profile (a simple stand-in for MERT's CQT teacher).

        In time mode a token's feature is the mean of its frames' features (the last token's mean
        over its real frames). In patch mode ``"logmel"`` is the patch's own flattened log-mel values
        (padded like the tokens, with ``log(log_floor)``); ``"mfcc"``/``"chroma"`` describe a whole
        time column, so the patches of one column share the column's mean feature.

        Args:
            waveform: (samples,) or (channels, samples).
            sr: its sample rate (Hz).
            kind: ``"mfcc"``, ``"logmel"`` or ``"chroma"``.
            n_mfcc: cepstral coefficients for ``"mfcc"`` (<= n_mels).

        Returns:
            (T_tokens, F') float32.
        """
        c = self.config
        if kind not in _FEATURE_KINDS:
            raise ValueError(f"acoustic_features: kind must be one of {_FEATURE_KINDS}, got {kind!r}")
        if isinstance(n_mfcc, bool) or not isinstance(n_mfcc, int) or not 1 <= n_mfcc <= c.n_mels:
            raise ValueError(f"acoustic_features: n_mfcc must be an int in [1, {c.n_mels}], got {n_mfcc!r}")
        x = self.prepare(waveform, sr)
        with torch.no_grad():
            log_mel = torch.log(self._mel(x).clamp_min(c.log_floor))  # (n_mels, T)
        if kind == "logmel" and c.token == "patch":
            return self.tokenize_frames(log_mel.T.numpy(), math.log(c.log_floor))
        if kind == "mfcc":
            import torchaudio

            dct = torchaudio.functional.create_dct(n_mfcc, c.n_mels, norm="ortho")  # (n_mels, n_mfcc)
            cep = (log_mel.T @ dct).T  # (n_mfcc, T)
            d1 = torchaudio.functional.compute_deltas(cep[None])[0]
            d2 = torchaudio.functional.compute_deltas(d1[None])[0]
            feats = torch.cat([cep, d1, d2], dim=0).T.numpy()  # (T, 3 * n_mfcc)
        elif kind == "chroma":
            feats = self._chroma(x)  # (T, 12)
        else:
            feats = log_mel.T.numpy()  # (T, n_mels)
        per_column = _pool_frames(np.asarray(feats, dtype=np.float32), c.frames_per_column)  # (cols, D)
        if c.token == "time":
            return per_column
        rows = c.n_mels // c.patch_freq
        return np.ascontiguousarray(np.tile(per_column, (rows, 1)))  # (rows * cols, D), freq-major

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready ``{"format", "version", "config", "stats"}`` (stats None when not fitted)."""
        stats = None
        if self.mean is not None and self.std is not None:
            stats = {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}
        return {"format": _FORMAT, "version": 1, "config": asdict(self.config), "stats": stats}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AudioFrontend":
        """Inverse of :meth:`to_dict`.

        Args:
            d: a dict written by :meth:`to_dict`.
        """
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not an mmm audio front-end description (expected format {_FORMAT!r})")
        if d.get("version") != 1:
            raise ValueError(f"unsupported audio front-end version {d.get('version')!r} (this code reads 1)")
        frontend = cls(AudioFrontendConfig.from_dict(d.get("config") or {}))
        stats = d.get("stats")
        if stats is not None:
            frontend.set_stats(stats["mean"], stats["std"])
        return frontend

    def save(self, directory: PathLike) -> Path:
        """Write ``{directory}/audio_frontend.json`` (config + statistics, plain text).

        Args:
            directory: created if missing.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / FRONTEND_FILE
        tmp = path.with_name(f".{FRONTEND_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: PathLike) -> "AudioFrontend":
        """Read a front end written by :meth:`save`.

        Args:
            path: the directory given to :meth:`save`, or the JSON file itself.
        """
        p = Path(path)
        if p.is_dir():
            p = p / FRONTEND_FILE
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exn:
            raise ValueError(f"cannot read audio front end {p}: {type(exn).__name__}: {exn}") from exn
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError, KeyError) as exn:
            raise ValueError(f"{p}: {exn}") from exn

    def __repr__(self) -> str:
        return f"AudioFrontend({self.config}, fitted={self.fitted})"
