"""Tests for the audio stages: long clips split (nothing dropped), seeded masks, targets at hidden tokens,
labels aligned, bad audio counted by the handler."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import soundfile as sf
import torch

from datasets_def.audio import build_shards, iter_clips
from mmm.config import ModelConfig
from mmm.modalities.audio.pipeline import collate_audio, max_columns, read_audio_sample, split_columns
from mmm.data.stream import SampleError, SampleErrorHandler, list_shards, make_pipeline
from mmm.modalities.audio.masking import SpecPatchMasker, TimeSpanMasker
from mmm.modalities.audio.frontend import AudioDecodeError
from mmm.modalities.audio.modality import AudioModality

SR = 16000
TINY_AUDIO = dict(n_mels=16, frames_per_token=4, max_seconds=1.0, max_tokens=64, stats_clips=10, target_clusters=4,
                  target_clips=10, targets=["mfcc"])


def write_tiny_sources(root: Path) -> Path:
    """Five labelled clips in class folders: short tones, noise, and one 2.5 s clip (longer than 1 s)."""
    rng = np.random.default_rng(0)
    t = lambda s: np.arange(int(s * SR)) / SR  # noqa: E731
    clips = {
        "low/a.wav": 0.3 * np.sin(2 * np.pi * 300 * t(0.6)),
        "low/b.wav": 0.3 * np.sin(2 * np.pi * 350 * t(0.5)),
        "high/c.wav": 0.3 * np.sin(2 * np.pi * 2000 * t(0.7)),
        "high/d.wav": 0.1 * rng.standard_normal(int(0.4 * SR)),
        "long/e.wav": 0.3 * np.sin(2 * np.pi * (200 + 400 * t(2.5)) * t(2.5)),
    }
    for name, wav in clips.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(root / name), wav.astype(np.float32), SR, subtype="PCM_16")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio_src")
    out = tmp_path_factory.mktemp("audio_shards")
    build_shards(write_tiny_sources(root), out, labels="folders", samples_per_shard=100)
    return out


@pytest.fixture(scope="module")
def modality(shards, tmp_path_factory) -> AudioModality:
    cfg = ModelConfig()
    for k, v in TINY_AUDIO.items():
        setattr(cfg.audio, k, v)
    m = AudioModality(cfg)
    m.prepare(list_shards(shards, split="train"), tmp_path_factory.mktemp("audio_run"))
    return m


def batches(modality, urls, masker, *, seed=0, handler=None, batch_size=8, fixed=False, epochs=None):
    handler = handler or SampleErrorHandler()
    stages = modality.stages(masker, batch_size=batch_size, seed=seed, handler=handler, fixed_masking=fixed,
                             epochs=epochs, train=True)
    return list(make_pipeline(urls, stages=stages, shuffle_shards=False, shuffle_buffer=0, handler=handler))


def sequences(batch) -> List[Dict]:
    """Per sequence of a batch: key, chunk, label, tokens, mask."""
    inp = batch.inputs["audio"]
    cu = batch.seq.cu_seqlens.tolist()
    out = []
    for i, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        out.append({"key": batch.extras["keys"][i], "chunk": int(batch.extras["chunks"][i]),
                    "label": int(batch.extras["labels"][i]), "tokens": inp.features[lo:hi],
                    "mask": None if inp.mask is None else inp.mask[lo:hi]})
    return out


def test_long_clip_is_split_into_sequences_keeping_every_frame(shards, modality) -> None:
    urls = list_shards(shards, split="train")
    seqs = [s for b in batches(modality, urls, None) for s in sequences(b)]
    clips = {c.key: c for c in iter_clips(shards, "train")}
    assert {s["key"] for s in seqs} == set(clips)
    cols = max_columns(modality.frontend, 1.0, 64)
    assert cols == 26  # ceil(101 frames / 4) for 1 s at a 10 ms hop
    for key, clip in clips.items():
        parts = sorted((s for s in seqs if s["key"] == key), key=lambda s: s["chunk"])
        full = torch.from_numpy(modality.frontend(clip.waveform, clip.sample_rate))
        assert [p["chunk"] for p in parts] == list(range(len(parts)))
        assert all(len(p["tokens"]) <= cols for p in parts)
        torch.testing.assert_close(torch.cat([p["tokens"] for p in parts]), full, rtol=0, atol=0)
    long_key = next(k for k, c in clips.items() if c.meta["source"] == "long/e.wav")
    assert [len(s["tokens"]) for s in seqs if s["key"] == long_key] == [26, 26, 11]  # 2.5 s = 63 tokens


def test_labels_and_keys_are_aligned_with_sequences_longest_first(shards, modality) -> None:
    labels = {c.key: c.meta["label"] for c in iter_clips(shards, "train")}
    for b in batches(modality, list_shards(shards, split="train"), TimeSpanMasker(0.2, 3), batch_size=4):
        lengths = b.seq.seqlens
        assert lengths == sorted(lengths, reverse=True)
        assert len(b.extras["keys"]) == len(b.extras["labels"]) == len(lengths) == len(b.extras["chunks"])
        for key, label in zip(b.extras["keys"], b.extras["labels"].tolist()):
            assert label == labels[key] >= 0


def test_masks_are_deterministic_under_the_seed(shards, modality) -> None:
    urls = list_shards(shards, split="train")
    masker = TimeSpanMasker(0.2, 3)
    masks = lambda bs: torch.cat([b.inputs["audio"].mask for b in bs])  # noqa: E731
    a, b, c = (masks(batches(modality, urls, masker, seed=s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 < a.float().mean() < 1


def test_targets_are_the_codebook_ids_of_hidden_tokens_only(shards, modality) -> None:
    urls = list_shards(shards, split="train")
    clips = {c.key: c for c in iter_clips(shards, "train")}
    codebook = modality.codebooks["mfcc"]
    for b in batches(modality, urls, TimeSpanMasker(0.2, 3)):
        inp, t = b.inputs["audio"], b.targets["audio_mfcc"]
        assert set(b.targets) == {"audio_mfcc"}
        assert torch.equal(t.positions, inp.mask.nonzero()[:, 0]) and t.count == int(inp.mask.sum())
        cu = b.seq.cu_seqlens.tolist()
        expected = []
        for i, key in enumerate(b.extras["keys"]):
            clip = clips[key]
            ids = codebook.assign(modality.frontend.acoustic_features(clip.waveform, clip.sample_rate, "mfcc"))
            piece = split_columns(ids, 1, 26)[int(b.extras["chunks"][i])]
            expected.append(torch.from_numpy(piece)[inp.mask[cu[i]:cu[i + 1]]])
        assert torch.equal(t.labels, torch.cat(expected))
        assert int(t.labels.max()) < codebook.k


def test_no_masker_gives_no_mask_and_no_targets(shards, modality) -> None:
    for b in batches(modality, list_shards(shards, split="train"), None):
        assert b.inputs["audio"].mask is None and b.targets == {}


def write_shard(path: Path, samples: List[Dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_bad_flac_is_counted_by_a_skipping_handler_and_raises_by_default(shards, modality, tmp_path) -> None:
    (good,) = [c for c in iter_clips(shards, "train") if c.meta["source"] == "low/b.wav"]
    buf = io.BytesIO()
    sf.write(buf, good.waveform.T, SR, format="FLAC")
    meta = json.dumps({"label": 2}).encode()
    shard = write_shard(tmp_path / "mixed-000000.tar", [
        {"__key__": "ok1", "flac": buf.getvalue(), "json": meta},
        {"__key__": "broken", "flac": b"fLaC not really a flac file", "json": meta},
        {"__key__": "ok2", "flac": buf.getvalue(), "json": meta},
    ])
    skip = SampleErrorHandler(skip_bad=True)
    got = batches(modality, [str(shard)], TimeSpanMasker(0.2, 3), handler=skip)
    assert sorted(k for b in got for k in b.extras["keys"]) == ["ok1", "ok2"]
    assert skip.total == 1 and skip.counts["AudioDecodeError"] == 1
    assert "broken" in skip.messages[0]
    with pytest.raises(SampleError, match="broken"):
        batches(modality, [str(shard)], TimeSpanMasker(0.2, 3))


def test_read_audio_sample_names_missing_fields() -> None:
    with pytest.raises(AudioDecodeError, match="x.tar:k: no audio field"):
        read_audio_sample({"__key__": "k", "__url__": "x.tar", "txt": b"hi"})


def test_split_columns_keeps_the_patch_grid_row_major() -> None:
    rows, cols = 2, 5
    tokens = np.arange(rows * cols * 3).reshape(rows * cols, 3)
    parts = split_columns(tokens, rows, 2)
    assert [len(p) for p in parts] == [4, 4, 2]
    grid = tokens.reshape(rows, cols, 3)
    np.testing.assert_array_equal(parts[1].reshape(rows, 2, 3), grid[:, 2:4])
    np.testing.assert_array_equal(split_columns(tokens, rows, 5)[0], tokens)


def test_patch_tokens_with_spec_patch_and_time_span_masks(shards, tmp_path) -> None:
    cfg = ModelConfig()
    for k, v in {**TINY_AUDIO, "token": "patch", "patch_freq": 8, "patch_time": 4, "targets": []}.items():
        setattr(cfg.audio, k, v)
    m = AudioModality(cfg)
    m.prepare(list_shards(shards, split="train"), tmp_path)
    urls = list_shards(shards, split="train")
    for b in batches(m, urls, SpecPatchMasker(0.5)):
        assert b.inputs["audio"].features.shape[1] == 8 * 4 and b.targets == {}
        assert all(n % 2 == 0 and n <= 2 * 26 for n in b.seq.seqlens)  # 2 frequency rows, <= 26 columns
    for b in batches(m, urls, TimeSpanMasker(0.3, 2)):  # spans hide whole time columns (every row)
        for s in sequences(b):
            grid = s["mask"].view(2, -1)
            assert torch.equal(grid[0], grid[1]) and grid.any()


def test_collate_refuses_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate_audio([])
