"""Tests for the audio front end: decoding, log-mel tokens, normalization, features, persistence."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmm.modalities.audio.frontend import (
    AudioDecodeError,
    AudioFrontend,
    AudioFrontendConfig,
    decode_audio,
    resample,
)

SR = 16000


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(wav: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav.T if wav.ndim == 2 else wav, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def fitted(config: AudioFrontendConfig = AudioFrontendConfig()) -> AudioFrontend:
    rng = np.random.default_rng(0)
    clips = [(tone(f, 0.5) + 0.01 * rng.standard_normal(SR // 2).astype(np.float32), SR) for f in (220, 440, 1000, 3000)]
    return AudioFrontend(config).fit_stats(clips)


# ------------------------------------------------------------------ decoding
@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_decode_audio_round_trip_keeps_channels_and_rate(fmt: str) -> None:
    stereo = np.stack([tone(440, 0.1, 22050), tone(660, 0.1, 22050)])
    wav, sr = decode_audio(encode(stereo, 22050, fmt), "clip")
    assert sr == 22050 and wav.shape == stereo.shape and wav.dtype == np.float32
    np.testing.assert_allclose(wav, stereo, atol=1e-4)


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"", "empty audio"),
        (b"RIFF\x00\x00garbage that is not audio at all" * 3, "cannot decode"),
        (encode(np.zeros(0, dtype=np.float32), SR), "zero-length"),
        (encode(np.array([0.1, np.nan, 0.2, np.inf], dtype=np.float32), SR, subtype="FLOAT"), "non-finite"),
    ],
    ids=["empty", "corrupt", "zero-length", "nan"],
)
def test_decode_audio_bad_bytes_name_the_source(data: bytes, needle: str) -> None:
    with pytest.raises(AudioDecodeError, match=needle) as info:
        decode_audio(data, "shard-0/key-7")
    assert "shard-0/key-7" in str(info.value)


def test_decode_audio_cut_header_is_an_error() -> None:
    data = encode(tone(440, 0.5), SR, "FLAC")
    with pytest.raises(AudioDecodeError, match="where.flac"):
        decode_audio(data[:20], "where.flac")  # the header itself is cut


def test_decode_audio_refuses_a_wav_cut_inside_its_data() -> None:
    """libsndfile reads a WAV cut short as a shorter clip; its data chunk's declared size gives it away."""
    data = encode(tone(440, 1.0), SR)  # 16-bit PCM: 2 bytes per sample
    assert decode_audio(data, "whole.wav")[0].shape == (1, SR)
    with pytest.raises(AudioDecodeError, match=r"cut.wav: truncated WAV: its data chunk declares 32000 bytes, 15"):
        decode_audio(data[:len(data) // 2], "cut.wav")
    # a streaming writer's unknown length (0xFFFFFFFF) is not a truncation
    at = data.index(b"data") + 4
    unknown = data[:at] + b"\xff\xff\xff\xff" + data[at + 4:]
    assert decode_audio(unknown, "stream.wav")[0].shape == (1, SR)


# ------------------------------------------------------------------ shapes and layout
def test_time_tokens_shape_and_tail_padding() -> None:
    fe = fitted()
    wav = tone(440, 1.0)  # 16000 samples -> 1 + 16000 // 160 = 101 frames -> 26 tokens of 4 frames
    frames = fe.frames(wav, SR)
    tokens = fe(wav, SR)
    assert frames.shape == (101, 64) and fe.num_frames(16000) == 101
    assert tokens.shape == (26, 4 * 64) and tokens.dtype == np.float32 and fe.num_tokens(101) == 26
    assert fe.token_grid(26) == (1, 26)
    stacked = tokens.reshape(26 * 4, 64)
    np.testing.assert_array_equal(stacked[:101], frames)  # frame-major stacking, nothing dropped
    np.testing.assert_array_equal(stacked[101:], np.broadcast_to(fe.pad_value, (3, 64)))
    silent = fe.frames(np.zeros(SR, dtype=np.float32), SR)
    np.testing.assert_allclose(silent, np.broadcast_to(fe.pad_value, silent.shape), atol=1e-5)


def test_patch_tokens_follow_the_grid_layout() -> None:
    cfg = AudioFrontendConfig(token="patch", patch_freq=16, patch_time=4)
    fe = fitted(cfg)
    wav = tone(700, 0.3)  # 4800 samples -> 31 frames -> 8 time patches x 4 freq patches
    frames = fe.frames(wav, SR)
    tokens = fe(wav, SR)
    assert tokens.shape == (4 * 8, 16 * 4) and fe.token_grid(32) == (4, 8)
    padded = np.concatenate([frames, np.broadcast_to(fe.pad_value, (1, 64))])  # (32, 64)
    for f in range(4):
        for t in range(8):
            want = padded[t * 4 : t * 4 + 4, f * 16 : f * 16 + 16].T.reshape(-1)  # [bin, frame]
            np.testing.assert_array_equal(tokens[f * 8 + t], want)
    with pytest.raises(ValueError, match="multiple of 4"):
        fe.token_grid(30)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="patch_freq=12 must divide n_mels=64"):
        AudioFrontendConfig(token="patch", patch_freq=12)
    with pytest.raises(ValueError, match="token must be one of"):
        AudioFrontendConfig(token="frames")
    with pytest.raises(ValueError, match="frames_per_token"):
        AudioFrontendConfig(frames_per_token=0)
    with pytest.raises(ValueError, match="unknown key"):
        AudioFrontendConfig.from_dict({"sample_rate": 16000, "n_mel": 80})


# ------------------------------------------------------------------ normalization
def test_fit_stats_normalizes_training_frames_per_bin_and_globally() -> None:
    rng = np.random.default_rng(1)
    clips = [(tone(f, 0.4) + 0.02 * rng.standard_normal(6400).astype(np.float32)) for f in (300, 900, 2500)]
    per_bin = AudioFrontend().fit_stats(clips)
    frames = np.concatenate([per_bin.frames(c, SR) for c in clips]).astype(np.float64)
    np.testing.assert_allclose(frames.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(frames.std(axis=0), 1.0, atol=1e-3)
    glob = AudioFrontend(AudioFrontendConfig(norm="global")).fit_stats((c, SR) for c in clips)
    assert glob.mean.shape == (1,)
    g = np.concatenate([glob.frames(c, SR) for c in clips]).astype(np.float64)
    assert abs(g.mean()) < 1e-3 and abs(g.std() - 1.0) < 1e-3


def test_unfitted_front_end_says_how_to_fit() -> None:
    with pytest.raises(RuntimeError, match="fit_stats"):
        AudioFrontend()(tone(440, 0.1), SR)
    with pytest.raises(ValueError, match="no waveforms"):
        AudioFrontend().fit_stats([])


def test_save_load_round_trip_is_json_text(tmp_path) -> None:
    fe = fitted(AudioFrontendConfig(n_mels=32, frames_per_token=2, max_seconds=3.0))
    path = fe.save(tmp_path / "ckpt")
    d = json.loads(path.read_text())
    assert d["config"]["n_mels"] == 32 and len(d["stats"]["mean"]) == 32
    back = AudioFrontend.load(tmp_path / "ckpt")
    assert back.config == fe.config
    wav = tone(523, 0.25)
    np.testing.assert_array_equal(back(wav, SR), fe(wav, SR))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="bad.json"):
        AudioFrontend.load(tmp_path / "bad.json")


# ------------------------------------------------------------------ resampling, mixing, cut
def test_resampled_input_matches_native_rate() -> None:
    fe = fitted()
    native = fe.frames(tone(1000, 1.0, SR), SR)
    from44k = fe.frames(tone(1000, 1.0, 44100), 44100)
    assert from44k.shape == native.shape == (101, 64)
    # same spectrum away from the edges (the sinc filter rings a little at the ends)
    np.testing.assert_allclose(from44k[5:-5], native[5:-5], atol=0.05)
    assert resample(np.zeros((2, 44100), np.float32), 44100, 16000).shape == (2, 16000)


def test_channels_are_averaged_to_mono() -> None:
    fe = fitted()
    x = tone(440, 0.3)
    np.testing.assert_allclose(fe(np.stack([x, x]), SR), fe(x, SR), atol=1e-5)
    cancelled = fe(np.stack([x, -x]), SR)  # opposite phases mix to silence
    np.testing.assert_allclose(cancelled, np.broadcast_to(np.tile(fe.pad_value, 4), cancelled.shape), atol=1e-5)


def test_max_seconds_cuts_long_clips_and_bad_waveforms_are_refused() -> None:
    fe = fitted(AudioFrontendConfig(max_seconds=1.0))
    assert fe.frames(tone(440, 3.0), SR).shape == (101, 64)
    assert fe.frames(tone(440, 3.0, 8000), 8000).shape == (101, 64)
    with pytest.raises(ValueError, match="transposed"):
        fe(np.zeros((1000, 2), np.float32), SR)
    with pytest.raises(ValueError, match="non-finite"):
        fe(np.array([0.0, np.nan] * 100, np.float32), SR)
    with pytest.raises(ValueError, match="zero samples"):
        fe(np.zeros(0, np.float32), SR)


def test_a_sample_rate_far_off_the_models_is_refused_at_training_time_as_by_the_builder() -> None:
    """The builder refuses rates more than 16 times off; shards written by other tools reached training, and a
    1 kHz header on 16 kHz audio was stretched sixteenfold without a word."""
    fe = fitted()
    assert fe.frames(tone(440, 1.0, 1000), 1000).shape[1] == 64  # exactly 16 times off: resampled
    for sr in (999, 16000 * 17):
        with pytest.raises(ValueError, match=rf"sample rate {sr} Hz is more than 16 times off the model's 16000 Hz"):
            fe(np.zeros(sr // 10, np.float32), sr)


# ------------------------------------------------------------------ k-means features
@pytest.mark.parametrize("token", ["time", "patch"])
@pytest.mark.parametrize("kind, dim", [("mfcc", 39), ("logmel", None), ("chroma", 12)])
def test_acoustic_features_align_with_tokens(token: str, kind: str, dim) -> None:
    cfg = AudioFrontendConfig(token=token)
    fe = fitted(cfg)
    wav = tone(330, 0.55)
    feats = fe.acoustic_features(wav, SR, kind=kind)
    assert feats.shape[0] == fe(wav, SR).shape[0] and feats.dtype == np.float32 and np.isfinite(feats).all()
    if dim is None:
        dim = 64 if token == "time" else 16 * 4
    assert feats.shape[1] == dim


def test_chroma_peaks_at_the_pitch_class() -> None:
    fe = AudioFrontend()  # features need no fitted statistics
    chroma = fe.acoustic_features(tone(440.0, 0.5), SR, kind="chroma")  # A4
    assert (chroma[1:-1].argmax(axis=1) == 9).all()  # 0 = C, 9 = A
    c_major = fe.acoustic_features(sum(tone(261.63 * 2 ** (s / 12), 0.5) for s in (0, 4, 7)), SR, kind="chroma")
    assert set(np.argsort(c_major[3])[-3:]) == {0, 4, 7}
    with pytest.raises(ValueError, match="kind must be one of"):
        fe.acoustic_features(tone(440.0, 0.1), SR, kind="cqt")
    assert math.isclose(float(chroma[3].sum()), 1.0, rel_tol=1e-4)


def test_the_built_in_modalities_register_without_soundfile_and_torchaudio():
    """Every model build imports the audio front end (the built-in modalities register together), which imported
    soundfile and torchaudio at the top: a machine without them (the GPU check's) could build no model at all."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['soundfile'] = None; sys.modules['torchaudio'] = None\n"
            "from mmm.registry import MODALITIES\nMODALITIES.load_plugins()\n"
            "import mmm.modalities.audio.frontend\nprint(MODALITIES.list())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and "'audio'" in done.stdout and "'text'" in done.stdout, done.stderr[-2000:]
