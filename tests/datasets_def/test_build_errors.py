"""Shard builders: an unreadable input is a clear error naming it, or skipped and listed with ``skip_bad`` (every
builder alike); an output path under a regular file is a clear error; no raw OSError reaches the user."""
from __future__ import annotations

import errno
import json
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from datasets_def import audio as audiodef
from datasets_def import dna as dnadef
from datasets_def import image as imagedef
from datasets_def import text as textdef
from mmm.cli import main

SECRET = "secret"  # inputs whose name starts with this cannot be read


def _write(kind: str, path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        path.write_text(f"Document {i} about masked modeling, long enough to keep. " * 3)
    elif kind == "dna":
        path.write_text(f">r{i}\n" + "".join(np.random.default_rng(i).choice(list("ACGT"), 80)) + "\n")
    elif kind == "audio":
        sf.write(str(path), np.full(400, 0.1 * (i + 1), np.float32), 16000)
    else:
        Image.new("RGB", (6, 6), (30 * i, 0, 0)).save(path)


KINDS = {
    "text": ("doc.txt", textdef.build_shards, textdef.TextBuildError, {}),
    "dna": ("g.fa", dnadef.build_shards, dnadef.DNABuildError, {"window": 40}),
    "audio": ("a.wav", audiodef.build_shards, audiodef.AudioBuildError, {}),
    "image": ("x.png", imagedef.build_shards, imagedef.ImageBuildError, {"labels": None}),
}


@pytest.fixture()
def unreadable(monkeypatch):
    """Reading a file named ``secret*`` fails with PermissionError (as a chmod 000 file does for a non-root user)."""
    def denied(path) -> OSError:
        return PermissionError(errno.EACCES, "Permission denied", str(path))

    real_read_bytes, real_open = pathlib.Path.read_bytes, pathlib.Path.open
    real_open_text = dnadef._open_text

    def read_bytes(self):
        if self.name.startswith(SECRET):
            raise denied(self)
        return real_read_bytes(self)

    def path_open(self, *a, **k):
        mode = a[0] if a else k.get("mode", "r")
        if self.name.startswith(SECRET) and "r" in mode:
            raise denied(self)
        return real_open(self, *a, **k)

    def open_text(path):
        if Path(path).name.startswith(SECRET):
            raise denied(path)
        return real_open_text(path)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    monkeypatch.setattr(pathlib.Path, "open", path_open)
    monkeypatch.setattr(dnadef, "_open_text", open_text)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_unreadable_file_is_named_or_skipped_and_listed(kind, tmp_path, unreadable):
    name, build, error, kw = KINDS[kind]
    src = tmp_path / "in"
    _write(kind, src / name, 0)
    _write(kind, src / f"{SECRET}_{name}", 1)
    with pytest.raises(error, match=rf"{SECRET}_{name}: cannot read.*PermissionError: Permission denied"):
        build(src, tmp_path / "out", **kw)
    assert not list((tmp_path / "out").glob("*.tar"))
    report = build(src, tmp_path / "out", skip_bad=True, **kw)
    assert [w for w, _ in report.skipped] == [f"{SECRET}_{name}"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [w for w, _ in manifest["skipped"]] == [f"{SECRET}_{name}"]


def test_the_cli_gives_one_line_for_an_unreadable_txt_and_skip_bad_skips_it(tmp_path, unreadable, capsys):
    src = tmp_path / "in"
    _write("text", src / "doc.txt", 0)
    _write("text", src / f"{SECRET}.txt", 1)
    assert main(["shards", "build", str(src), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{SECRET}.txt" in err and "Permission denied" in err and "--skip_bad" in err
    assert main(["shards", "build", str(src), str(tmp_path / "out"), "--skip_bad"]) == 0
    assert "skipped 1 bad input(s)" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod 000 files; the fixture above simulates it")
def test_a_real_chmod_000_file(tmp_path):
    src = tmp_path / "in"
    _write("text", src / "doc.txt", 0)
    _write("text", src / "locked.txt", 1)
    (src / "locked.txt").chmod(0)
    try:
        with pytest.raises(textdef.TextBuildError, match="locked.txt: cannot read"):
            textdef.build_shards(src, tmp_path / "out")
    finally:
        (src / "locked.txt").chmod(0o644)


def test_an_unlistable_folder_and_a_dangling_link_are_named(tmp_path, monkeypatch):
    src = tmp_path / "in"
    _write("text", src / "doc.txt", 0)
    _write("text", src / "closed" / "inner.txt", 1)
    (src / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(textdef.TextBuildError, match=r"gone.txt: symbolic link to .*nowhere.txt' cannot be followed"):
        textdef.build_shards(src, tmp_path / "out")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "closed":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = textdef.build_shards(src, tmp_path / "out", skip_bad=True)
    assert sorted(w for w, _ in report.skipped) == ["closed", "gone.txt"]
    assert "cannot list folder (PermissionError: Permission denied)" in dict(report.skipped)["closed"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_output_path_under_a_regular_file_is_a_clear_error(kind, tmp_path):
    name, build, error, kw = KINDS[kind]
    _write(kind, tmp_path / "in" / name, 0)
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(error, match=r"output_dir .*taken/out/deeper lies under .*taken, which is a file, not a folder"):
        build(tmp_path / "in", tmp_path / "taken" / "out" / "deeper", **kw)
    with pytest.raises(error, match="exists and is not a directory"):
        build(tmp_path / "in", tmp_path / "taken", **kw)


def test_the_cli_names_an_output_under_a_file_in_one_line(tmp_path, capsys):
    _write("text", tmp_path / "in" / "doc.txt", 0)
    (tmp_path / "taken").write_text("x")
    assert main(["shards", "build", str(tmp_path / "in"), str(tmp_path / "taken" / "out")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "which is a file, not a folder" in err and len(err.strip().splitlines()) == 1


def test_unreadable_labels_and_captions_files_are_named(tmp_path, unreadable):
    _write("image", tmp_path / "img" / "x.png", 0)
    (tmp_path / f"{SECRET}.csv").write_text("path,label\nx.png,1\n")
    with pytest.raises(imagedef.ImageBuildError, match=rf"{SECRET}.csv: cannot read the labels file"):
        imagedef.build_shards(tmp_path / "img", tmp_path / "out", labels=tmp_path / f"{SECRET}.csv")
    from datasets_def import image_text as imagetextdef

    with pytest.raises(imagetextdef.ImageTextBuildError, match=rf"{SECRET}.csv: cannot read the captions file"):
        imagetextdef.build_shards(tmp_path / "img", tmp_path / "out", captions=tmp_path / f"{SECRET}.csv")
    _write("audio", tmp_path / "wav" / "a.wav", 0)
    with pytest.raises(audiodef.AudioBuildError, match=rf"{SECRET}.csv: cannot read the labels file"):
        audiodef.build_shards(tmp_path / "wav", tmp_path / "out", labels=tmp_path / f"{SECRET}.csv")
