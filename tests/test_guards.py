"""A guard applies on every path (issue 13, section 3), seen from the command line.

* ``data.max_member_bytes`` protects asset fitting (the tokenizer is fitted before training starts)
  as it protects training: an oversized member is refused unread, naming shard and member;
* a ``pipe:`` shard whose command never writes stops after ``data.read_timeout_s`` with an error
  naming the url, instead of waiting forever.

The reader itself is tested in ``tests/data/test_tar_reader.py``.
"""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest

from mmm.cli import main

REPO = Path(__file__).resolve().parents[1]


def _prepare(tmp_path: Path, train: str, *more: str) -> list:
    return ["prepare", "--config", str(REPO / "configs" / "text_mlm_tiny.yaml"), "--data.train", train,
            "--data.val", "null", "--model.text.vocab_size", "60", "--trainer.default_root_dir", str(tmp_path / "run"),
            *more]


def test_mmm_prepare_refuses_an_oversized_member_before_reading_it(tmp_path, capsys):
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.json", b"{}"), ("a.txt", b"some words to fit a tokenizer on"),
                           ("big.json", b"{}"), ("big.txt", b"x" * 50_000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert main(_prepare(tmp_path, str(shard), "--data.max_member_bytes", "4096")) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for part in (str(shard), "'big.txt'", "50000 bytes", "max_member_bytes=4096", "not read"):
        assert part in err
    assert not (tmp_path / "run" / "tokenizer").exists()


def _claims_300_mib(path: Path) -> Path:
    """A shard whose second sample's header claims a 300 MiB ``txt`` (the bytes are not there: never read)."""
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.json", b"{}"), ("a.txt", b"a few words"), ("huge.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("huge.txt")
        info.size = 300 * 2**20
        tar.addfile(info)  # header only
    return path


def test_the_default_limit_guards_asset_fitting_and_every_pipeline(tmp_path, capsys):
    shard = _claims_300_mib(tmp_path / "train-000000.tar")
    start = time.monotonic()
    assert main(_prepare(tmp_path, str(shard))) != 0  # data.max_member_bytes left at its default (256 MiB)
    err = capsys.readouterr().err
    assert "'huge.txt'" in err and "314572800 bytes, over max_member_bytes=268435456" in err
    from mmm.data.stream import SampleError, make_pipeline

    with pytest.raises(SampleError, match="'huge.txt', not read"):  # evaluation, probes, demos: the same default
        list(make_pipeline([str(shard)], stages=[], shuffle_buffer=0))
    assert time.monotonic() - start < 30


def test_mmm_prepare_stops_on_a_stalled_pipe_naming_the_url(tmp_path, capsys):
    start = time.monotonic()
    assert main(_prepare(tmp_path, "pipe:sleep 30", "--data.read_timeout_s", "1")) != 0
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no data from pipe:sleep 30 for 1 s" in err
