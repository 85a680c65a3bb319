"""Nothing a user gave is dropped without being listed (issue 13, section 4), for every shard builder.

* symlinked sub-folders are followed by every builder (text, DNA, audio, image, image-text), each
  real folder once: a symlink loop ends the walk there and is listed as skipped;
* extensions match in any case (``A.TXT``);
* shards are written as checkpoints are (temporary name, fsync, rename): an interrupted or
  disk-full build leaves no truncated shard under its final name, and the next build removes the
  temporary files a killed one left;
* audio at an extreme resampling ratio is refused (named, or skipped and listed), resampled files
  are counted in the build output; DNA bases lost to ``stride > window`` are counted in the build
  output, not only in the manifest; files a builder does not read are counted and named.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from datasets_def import audio as audiodef
from datasets_def import dna as dnadef
from datasets_def import image as imagedef
from datasets_def import image_text as imagetextdef
from datasets_def import text as textdef
from mmm.data.stream import list_shards

DOC = "A document about masked modeling, long enough to be kept as one chunk of text. "


def write_text(path: Path, i: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DOC * (2 + i % 3), encoding="utf-8")


def write_fasta(path: Path, rid: str, n: int = 120, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    seq = "".join(np.random.default_rng(seed).choice(list("ACGT"), n))
    path.write_text(f">{rid}\n{seq}\n", encoding="ascii")


def write_wav(path: Path, sr: int = 16000, seconds: float = 0.25, freq: float = 220.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    sf.write(str(path), (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)


def write_png(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 40, 90)).save(path)


def manifest(out: Path) -> Dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


# Each builder: (write one input file named `name`, file name, build(src, out, **kw) -> report, sources in the shards).
def _text_sources(out: Path) -> List[str]:
    from mmm.data.tar import read_samples

    return sorted({json.loads(s["json"])["source"] for s in read_samples(list_shards(out))})


def _dna_sources(out: Path) -> List[str]:
    return sorted({m["source"] for _, m in dnadef.iter_samples(out, "train")})


def _audio_sources(out: Path) -> List[str]:
    return sorted({c.meta["source"] for c in audiodef.iter_clips(out, "train")})


def _image_sources(out: Path) -> List[str]:
    return sorted(m["source"] for _, m in imagedef.iter_images(out, "train"))


BUILDERS: Dict[str, tuple] = {
    "text": (write_text, "doc.txt", lambda s, o, **k: textdef.build_shards(s, o, **k), _text_sources),
    "dna": (lambda p, i=0: write_fasta(p, f"r{i}", seed=i), "g.fa", lambda s, o, **k: dnadef.build_shards(s, o, window=50, **k),
            _dna_sources),
    "audio": (lambda p, i=0: write_wav(p, freq=200.0 + 50 * i), "a.wav",
              lambda s, o, **k: audiodef.build_shards(s, o, **k), _audio_sources),
    "image": (lambda p, i=0: write_png(p, 20 * i), "x.png", lambda s, o, **k: imagedef.build_shards(s, o, labels=None, **k),
              _image_sources),
}


# ------------------------------------------------------------------------------- symlinked folders


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_every_builder_follows_symlinked_folders_and_lists_a_loop(kind, tmp_path, caplog):
    write, name, build, sources = BUILDERS[kind]
    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    write(src / "own" / name, 0)
    write(elsewhere / "linked" / name, 1)
    (src / "cls").symlink_to(elsewhere / "linked", target_is_directory=True)  # a whole class kept elsewhere
    (src / "own" / "loop").symlink_to(src, target_is_directory=True)  # a symlink loop
    with caplog.at_level(logging.WARNING, logger="mmm.data"):
        report = build(src, tmp_path / "out")
    assert sources(tmp_path / "out") == [f"cls/{name}", f"own/{name}"]  # the linked folder's file is in
    (where, reason), = report.skipped
    assert where == "own/loop" and "not searched again" in reason and "symlink loop" in reason
    assert manifest(tmp_path / "out")["skipped"] == [[where, reason]]
    assert "own/loop" in caplog.text  # listed in the build output too


def test_image_text_follows_symlinked_folders(tmp_path):
    src, elsewhere = tmp_path / "img", tmp_path / "elsewhere"
    write_png(src / "a.png")
    write_png(elsewhere / "b.png", 50)
    (src / "more").symlink_to(elsewhere, target_is_directory=True)
    caps = tmp_path / "captions.csv"
    caps.write_text("path,caption\na.png,a blue square\nmore/b.png,another blue square\n")
    report = imagetextdef.build_shards(src, tmp_path / "out", captions=caps)
    assert report.total_samples == 2 and not report.skipped


def test_a_folder_reached_twice_is_read_once(tmp_path):
    src = tmp_path / "in"
    write_text(src / "a" / "doc.txt")
    (src / "b").symlink_to(src / "a", target_is_directory=True)  # the same folder under a second name
    report = textdef.build_shards(src, tmp_path / "out")
    assert report.total_documents == 1 and report.skipped[0][0] == "b" and "reached before as 'a'" in report.skipped[0][1]


# ------------------------------------------------------------------------------- extensions


@pytest.mark.parametrize("kind,name", [("text", "A.TXT"), ("text", "B.JsonL"), ("dna", "G.FA"), ("dna", "G.Fasta"),
                                       ("audio", "A.WAV"), ("image", "X.PNG")])
def test_upper_case_extensions_are_read(kind, name, tmp_path):
    write, _, build, sources = BUILDERS[kind]
    if name.lower().endswith(".jsonl"):
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / name).write_text(json.dumps({"text": DOC * 2}) + "\n")
    else:
        write(tmp_path / "in" / name)
    build(tmp_path / "in", tmp_path / "out")
    assert sources(tmp_path / "out") == [name]
    if kind != "image":  # the image builders take folders only
        build(tmp_path / "in" / name, tmp_path / "single")  # a single file too
        assert sources(tmp_path / "single") == [name]


def test_files_a_builder_does_not_read_are_counted_and_named(tmp_path, caplog):
    write_text(tmp_path / "in" / "doc.txt")
    (tmp_path / "in" / "notes.md").write_text("# not a text input")
    with caplog.at_level(logging.WARNING, logger="mmm.data"):
        report = textdef.build_shards(tmp_path / "in", tmp_path / "out")
    assert report.ignored == 1
    info = manifest(tmp_path / "out")
    assert info["ignored_files"] == 1 and info["ignored_examples"] == ["notes.md"]
    assert "ignored 1 file(s) that are not .txt or .jsonl: notes.md" in caplog.text


# ------------------------------------------------------------------------------- atomic shards


def _disk_fills_after(monkeypatch, calls: int) -> None:
    import webdataset as wds

    real = wds.TarWriter.write
    count = {"n": 0}

    def write(self, obj):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", write)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_disk_full_build_leaves_no_shard_under_its_final_name(kind, tmp_path, monkeypatch):
    write, name, build, _ = BUILDERS[kind]
    for i in range(5):
        write(tmp_path / "in" / f"d{i}" / name, i)
    _disk_fills_after(monkeypatch, 3)  # the first shard is finished and renamed, the second fails
    with pytest.raises(ValueError, match=r"cannot write shard .*train-000001\.tar: OSError: No space left on device"):
        build(tmp_path / "in", tmp_path / "out", samples_per_shard=2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no truncated shard, no temporary, no manifest


def test_a_failed_fsync_or_manifest_write_leaves_nothing(tmp_path, monkeypatch):
    for i in range(3):
        write_text(tmp_path / "in" / f"d{i}.txt", i)
    import datasets_def.building as building

    real_fsync = os.fsync
    monkeypatch.setattr(building.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(textdef.TextBuildError, match="cannot write shard"):
        textdef.build_shards(tmp_path / "in", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(building.os, "fsync", real_fsync)
    real_replace = os.replace

    def replace(a, b):
        if str(b).endswith("manifest.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(building.os, "replace", replace)
    with pytest.raises(textdef.TextBuildError, match=r"cannot write .*manifest.json: OSError: No space left on device"):
        textdef.build_shards(tmp_path / "in", tmp_path / "out2")
    assert list((tmp_path / "out2").iterdir()) == []


def test_a_killed_build_leaves_temporaries_only_and_the_next_build_removes_them(tmp_path, caplog):
    for i in range(4):
        write_text(tmp_path / "in" / f"d{i}.txt", i)
    # a build killed with SIGKILL in the middle of its second shard
    script = (
        "import os, sys, webdataset as wds\n"
        "from datasets_def import text\n"
        "real = wds.TarWriter.write\n"
        "n = [0]\n"
        "def write(self, obj):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        os.kill(os.getpid(), 9)\n"
        "    return real(self, obj)\n"
        "wds.TarWriter.write = write\n"
        f"text.build_shards({str(tmp_path / 'in')!r}, {str(tmp_path / 'out')!r}, samples_per_shard=2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(left) == 2 and left[1] == "train-000000.tar"  # complete shards under their names ...
    assert re.fullmatch(r"\.train-000001\.tar\.tmp-\d+", left[0])  # ... the one being written under a temporary one
    with caplog.at_level(logging.WARNING, logger="mmm.data"):
        report = textdef.build_shards(tmp_path / "in", tmp_path / "out", samples_per_shard=2, overwrite=True)
    assert "removed 1 temporary file(s) an interrupted build left" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "train-000000.tar",
                                                                   "train-000001.tar"]
    assert report.total_documents == 4


def test_a_temporary_of_a_running_build_is_refused(tmp_path):
    write_text(tmp_path / "in" / "d.txt")
    (tmp_path / "out").mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "out" / f".train-000000.tar.tmp-{other.pid}").write_bytes(b"partial")
        with pytest.raises(textdef.TextBuildError, match=f"being written by process {other.pid}"):
            textdef.build_shards(tmp_path / "in", tmp_path / "out")
    finally:
        other.kill()
        other.wait()
    textdef.build_shards(tmp_path / "in", tmp_path / "out")  # that process is gone: its leftover is removed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "train-000000.tar"]


# ------------------------------------------------------------------------------- counted losses


def test_an_extreme_resampling_ratio_is_refused_and_resampling_counted(tmp_path, caplog):
    write_wav(tmp_path / "in" / "ok.wav", sr=8000)
    write_wav(tmp_path / "in" / "tiny_rate.wav", sr=500)  # 32x below 16 kHz: a wrong header rate, most likely
    with pytest.raises(audiodef.AudioBuildError, match=r"tiny_rate.wav: sample rate 500 Hz is 32.0x below"):
        audiodef.build_shards(tmp_path / "in", tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="mmm.data"):
        report = audiodef.build_shards(tmp_path / "in", tmp_path / "out", skip_bad=True)
    assert [w for w, _ in report.skipped] == ["tiny_rate.wav"] and report.resampled == {8000: 1}
    info = manifest(tmp_path / "out")
    assert info["resampled_files"] == 1 and info["resampled_from"] == {"8000": 1}
    assert "resampled 1 file(s) to 16000 Hz (from 8000 Hz: 1)" in caplog.text
    assert "audio build skipped 1 input(s)" in caplog.text and "tiny_rate.wav" in caplog.text
    ok = audiodef.build_shards(tmp_path / "in", tmp_path / "wide", max_resample_ratio=40.0)
    assert ok.resampled == {500: 1, 8000: 1}
    with pytest.raises(audiodef.AudioBuildError, match="max_resample_ratio must be a number >= 1"):
        audiodef.build_shards(tmp_path / "in", tmp_path / "bad", max_resample_ratio=0.5)


def test_dna_bases_lost_to_a_stride_beyond_the_window_are_counted_in_the_output(tmp_path, caplog):
    write_fasta(tmp_path / "g.fa", "r", n=100)
    with caplog.at_level(logging.WARNING, logger="mmm.data"):
        report = dnadef.build_shards(tmp_path / "g.fa", tmp_path / "out", window=20, stride=30)
    # windows at 0, 30, 60 and the tail window 80-100: gaps 20-30, 50-60, 80-80 -> 10 + 10 bases
    assert report.bases_between_windows == 20 and manifest(tmp_path / "out")["bases_between_windows"] == 20
    assert "stride=30 > window=20: 20 base(s) (20.0% of the records' bases) in 2 gap(s)" in caplog.text
    caplog.clear()
    (tmp_path / "more.fa").write_text(">short\nACG\n>ns\n" + "N" * 40 + "\n>ok\n" + "ACGT" * 10 + "\n")
    with caplog.at_level(logging.WARNING, logger="mmm.data"):
        report = dnadef.build_shards(tmp_path / "more.fa", tmp_path / "out2", window=20, min_window=5,
                                     max_n_fraction=0.5)
    assert "1 record(s) shorter than min_window=5" in caplog.text and "2 window(s) dropped" in caplog.text
    assert report.bases_between_windows == 0 and "stride=" not in caplog.text

