"""Tests for the audio dataset definition: windowing, resampling, labels, bad files, embedded corpus."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from datasets_def import audio as audiodef
from datasets_def.audio import (
    SYNTH_CLASSES,
    AudioBuildError,
    AudioDatasetDef,
    build_shards,
    check_sample,
    embedded_default,
    iter_clips,
    iter_waveforms,
    synthesize_clip,
)
from mmm.registry import DATASETS

SR = 16000


def write_audio(path: Path, wav: np.ndarray, sr: int, subtype: str = "PCM_16") -> np.ndarray:
    """Write (channels, samples) or (samples,); returns what a PCM_16 reader gets back as (C, N)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav.T if wav.ndim == 2 else wav, sr, subtype=subtype)
    back, _ = sf.read(str(path), dtype="float32", always_2d=True)
    return back.T


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_registered_with_fields() -> None:
    assert DATASETS.get("audio") is AudioDatasetDef
    assert AudioDatasetDef.fields == ("flac", "json") and AudioDatasetDef.name == "audio"


def test_long_clip_is_cut_into_windows_covering_every_sample(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    original = write_audio(tmp_path / "in" / "long.wav", (0.1 * rng.standard_normal(25 * SR)).astype(np.float32), SR)
    report = build_shards(tmp_path / "in", tmp_path / "out", max_seconds=10.0)
    assert report.samples == {"train": 3, "val": 0} and report.clips == {"train": 1, "val": 0}
    clips = list(iter_clips(tmp_path / "out", "train"))
    assert [c.waveform.shape[1] for c in clips] == [160000, 160000, 80000]
    assert [(c.meta["start_s"], c.meta["end_s"]) for c in clips] == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert [c.meta["window"] for c in clips] == [0, 1, 2] and {c.meta["source"] for c in clips} == {"long.wav"}
    assert tuple(clips[0].meta) == audiodef.META_KEYS
    np.testing.assert_array_equal(np.concatenate([c.waveform for c in clips], axis=1), original)  # lossless
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 3 and manifest["splits"]["train"]["seconds"] == 25.0


def test_44k_stereo_file_is_resampled_and_mixed(tmp_path: Path) -> None:
    write_audio(tmp_path / "in" / "a.flac", np.stack([tone(440, 1.0, 44100), tone(440, 1.0, 44100)]), 44100)
    report = build_shards(tmp_path / "in", tmp_path / "out")
    (clip,) = iter_clips(tmp_path / "out")
    assert clip.sample_rate == SR and clip.meta["sample_rate"] == SR and clip.waveform.shape == (1, SR)
    spectrum = np.abs(np.fft.rfft(clip.waveform[0]))
    assert abs(np.fft.rfftfreq(SR, 1 / SR)[spectrum.argmax()] - 440.0) <= 1.0  # the pitch survives
    assert json.loads((report.output_dir / "manifest.json").read_text())["resampled_files"] == 1
    build_shards(tmp_path / "in", tmp_path / "kept", mono=False)
    (kept,) = iter_clips(tmp_path / "kept")
    assert kept.waveform.shape == (2, SR) and kept.meta["channels"] == 2


def test_corrupt_file_is_named_or_skipped_and_counted(tmp_path: Path) -> None:
    src = tmp_path / "in"
    write_audio(src / "good.wav", tone(300, 0.5), SR)
    (src / "sub").mkdir()
    (src / "sub" / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(200)))
    (src / "sub" / "empty.flac").write_bytes(b"")
    write_audio(src / "nan.wav", np.array([0.0, np.nan, 0.1] * 100, np.float32), SR, subtype="FLOAT")
    with pytest.raises(AudioBuildError, match="nan.wav: .*non-finite"):
        build_shards(src, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.tar"))  # nothing half-written is left behind
    report = build_shards(src, tmp_path / "out", skip_bad=True)
    assert report.samples["train"] == 1 and report.files == 4
    assert [s for s, _ in report.skipped] == ["nan.wav", "sub/broken.wav", "sub/empty.flac"]
    assert "empty audio" in dict(report.skipped)["sub/empty.flac"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s[0] for s in manifest["skipped"]] == ["nan.wav", "sub/broken.wav", "sub/empty.flac"]
    with pytest.raises(AudioBuildError, match="overwrite=True"):
        build_shards(src, tmp_path / "out", skip_bad=True)


def test_folder_and_csv_labels(tmp_path: Path) -> None:
    src = tmp_path / "in"
    for cls, f in [("dog", 200), ("cat", 400), ("cat", 500)]:
        write_audio(src / cls / f"{f}.wav", tone(f, 0.2), SR)
    report = build_shards(src, tmp_path / "folders", labels="folders")
    assert report.classes == ["cat", "dog"]
    got = {c.meta["source"]: (c.meta["label"], c.meta["label_name"]) for c in iter_clips(tmp_path / "folders")}
    assert got == {"cat/400.wav": (0, "cat"), "cat/500.wav": (0, "cat"), "dog/200.wav": (1, "dog")}
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label,transcript\ncat/400.wav,meow,a cat\ndog/200.wav,woof,\n")
    # a file without a row was written unlabelled without a word (a typo in the CSV); the image builder refuses it
    with pytest.raises(AudioBuildError, match=r"cat/500.wav: has no row in the labels file"):
        build_shards(src, tmp_path / "norow", labels=csv_path)
    skipped = build_shards(src, tmp_path / "norow_skip", labels=csv_path, skip_bad=True)
    assert [where for where, _ in skipped.skipped] == ["cat/500.wav"]
    csv_path.write_text("path,label,transcript\ncat/400.wav,meow,a cat\ndog/200.wav,woof,\ncat/500.wav,,\n")
    build_shards(src, tmp_path / "csv", labels=csv_path)  # an empty label: unlabelled on purpose
    got = {c.meta["source"]: (c.meta["label"], c.meta["label_name"], c.meta["transcript"])
           for c in iter_clips(tmp_path / "csv")}
    assert got == {"cat/400.wav": (0, "meow", "a cat"), "cat/500.wav": (None, None, None), "dog/200.wav": (1, "woof", None)}
    csv_path.write_text("path,label\ncat/401.wav,meow\n")
    with pytest.raises(AudioBuildError, match="cat/401.wav"):
        build_shards(src, tmp_path / "typo", labels=csv_path)


def test_val_split_is_stable_and_check_shards_passes(tmp_path: Path) -> None:
    from mmm.data.shard_tools import check_shards

    for i in range(12):
        write_audio(tmp_path / "in" / f"{i:02d}.wav", tone(200 + 50 * i, 0.1), SR)
    a = build_shards(tmp_path / "in", tmp_path / "a", val_fraction=0.4, samples_per_shard=3, seed=1)
    b = build_shards(tmp_path / "in", tmp_path / "b", val_fraction=0.4, samples_per_shard=3, seed=1)
    assert a.samples == b.samples and a.samples["val"] > 0 and a.samples["train"] > 0
    assert [c.meta["source"] for c in iter_clips(tmp_path / "a", "val")] == \
        [c.meta["source"] for c in iter_clips(tmp_path / "b", "val")]
    report = check_shards(tmp_path / "a", dataset="audio")
    assert report.problems == [], report.problems
    waves = list(iter_waveforms(tmp_path / "a", "train"))
    assert len(waves) == a.samples["train"] and all(sr == SR and w.shape == (1, 1600) for w, sr in waves)


def test_check_sample_flags_bad_fields(tmp_path: Path) -> None:
    write_audio(tmp_path / "in" / "x.wav", tone(300, 0.25), SR)
    build_shards(tmp_path / "in", tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        sample = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar if m.isfile()}
    assert check_sample(sample) is None
    assert "cannot decode" in check_sample({**sample, "flac": b"fLaC garbage"})
    meta = json.loads(sample["json"])
    assert "FLAC is at 16000 Hz" in check_sample({**sample, "json": json.dumps({**meta, "sample_rate": 8000}).encode()})
    assert "the FLAC has 4000" in check_sample({**sample, "json": json.dumps({**meta, "end_s": 9.0}).encode()})
    assert "label" in check_sample({**sample, "json": json.dumps({**meta, "label": "dog"}).encode()})
    assert "not valid JSON" in check_sample({**sample, "json": b"{"})


def test_synthetic_clips_are_deterministic_and_not_separable_by_loudness() -> None:
    a, detail = synthesize_clip("minor_chord", np.random.default_rng([1, 2, 3]))
    b, _ = synthesize_clip("minor_chord", np.random.default_rng([1, 2, 3]))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape[0] == 1 and SR <= a.shape[1] <= 2 * SR and "inv" in detail
    levels = {}
    for name in SYNTH_CLASSES:
        clips = [synthesize_clip(name, np.random.default_rng([7, i]))[0] for i in range(12)]
        assert all(np.abs(c).max() < 1.0 for c in clips)
        levels[name] = np.median([10 * np.log10(np.mean(c.astype(np.float64) ** 2)) for c in clips])
    assert max(levels.values()) - min(levels.values()) < 6.0, levels  # same level distribution per class


def test_embedded_default_builds_all_classes_in_both_splits(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MMM_CACHE_DIR", str(tmp_path / "cache"))
    path = embedded_default()
    assert path == tmp_path / "cache" / "datasets" / "audio-synthetic-v1" and (path / "DONE").is_file()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["classes"] == list(SYNTH_CLASSES)
    per_split = {}
    for split in ("train", "val"):
        labels = Counter()
        for shard in sorted(path.glob(f"{split}-*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar:
                    if m.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(m).read())
                        labels[meta["label"]] += 1
                        assert meta["label_name"] == SYNTH_CLASSES[meta["label"]]
        per_split[split] = labels
        assert sum(labels.values()) == manifest["splits"][split]["samples"]
    assert set(per_split["train"]) == set(per_split["val"]) == set(range(len(SYNTH_CLASSES)))
    assert 1000 <= sum(per_split["train"].values()) + sum(per_split["val"].values()) <= 1400
    assert embedded_default() == path  # cached: the second call does not rebuild
    (first,) = [c for c, _ in zip(iter_clips(path, "val"), range(1))]
    assert first.sample_rate == audiodef.SYNTH_SAMPLE_RATE and 1.0 <= first.waveform.shape[1] / SR <= 2.0


def test_class_folders_are_written_mixed_so_the_first_clips_sample_every_class(tmp_path: Path) -> None:
    """Files were written sorted by path, so class-folder shards held one class after another, and the statistics
    and k-means codebooks (fitted on the first clips read) saw only the first class."""
    from mmm.data.tar import read_samples

    for label in ("a_low", "b_high"):
        for i in range(12):
            write_audio(tmp_path / "in" / label / f"{i:02d}.wav", tone(200 + 50 * i, 0.1), SR)
    audiodef.build_shards(tmp_path / "in", tmp_path / "out", labels="folders", sample_rate=SR, samples_per_shard=100)
    keys = [json.loads(s["json"])["label_name"] for s in read_samples(sorted(map(str, (tmp_path / "out").glob("train-*.tar"))))]
    assert sorted(keys) == ["a_low"] * 12 + ["b_high"] * 12
    assert set(keys[:8]) == {"a_low", "b_high"}, keys  # not 8 of the first folder
    again = tmp_path / "again"
    audiodef.build_shards(tmp_path / "in", again, labels="folders", sample_rate=SR, samples_per_shard=100)
    assert keys == [json.loads(s["json"])["label_name"] for s in read_samples(sorted(map(str, again.glob("train-*.tar"))))]
