"""Tests for mmm.data.stream: shard listing, the error handler and the pipeline builder."""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path
from typing import List

import pytest
import webdataset as wds

from mmm.data.stream import SampleError, SampleErrorHandler, list_shards, make_pipeline


def write_shard(path: Path, keys: List[str], payload_bytes: int = 64) -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as w:
        for k in keys:
            w.write({"__key__": k, "txt": (k + " ").encode() * (payload_bytes // (len(k) + 1) + 1), "cls": k.encode()})


@pytest.fixture()
def shard_dir(tmp_path: Path) -> Path:
    for s in range(3):
        write_shard(tmp_path / f"train-{s:06d}.tar", [f"t{s}_{i:03d}" for i in range(10)])
    write_shard(tmp_path / "val-000000.tar", [f"v_{i:03d}" for i in range(5)])
    return tmp_path


def keys_of(pipeline) -> List[str]:
    return [sample["__key__"] for sample in pipeline]


def test_list_shards_directory_split_pattern_and_list(shard_dir: Path) -> None:
    train = list_shards(shard_dir, split="train")
    assert [Path(u).name for u in train] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert len(list_shards(shard_dir)) == 4
    assert list_shards(str(shard_dir / "train-{000000..000001}.tar")) == train[:2]
    assert list_shards([train[0], str(shard_dir / "val-000000.tar")]) == [train[0], str(shard_dir / "val-000000.tar")]


def test_a_run_reads_only_its_split_of_a_folder_however_the_folder_is_written(shard_dir: Path, monkeypatch) -> None:
    """``~/shards`` and ``file:shards`` skipped the split filter: training read the val shards and validation
    the train shards, silently."""
    from mmm.train.tasks import resolve_shards

    monkeypatch.setenv("HOME", str(shard_dir.parent))
    for spec in (str(shard_dir), f"~/{shard_dir.name}", f"file:{shard_dir}", f"file://{shard_dir}"):
        assert [Path(u).name for u in resolve_shards(spec, "text", "train")] == [
            "train-000000.tar", "train-000001.tar", "train-000002.tar"], spec
        assert [Path(u).name for u in resolve_shards(spec, "text", "val")] == ["val-000000.tar"], spec
    assert len(resolve_shards(str(shard_dir / "*.tar"), "text", "train")) == 4  # a pattern is taken as written


def test_list_shards_missing_names_path_and_split(shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"split 'test'"):
        list_shards(shard_dir, split="test")
    with pytest.raises(FileNotFoundError, match="nope"):
        list_shards(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"train-000003.tar.*and 4 more"):
        list_shards(str(shard_dir / "train-{000000..000009}.tar"))


def test_pipeline_reads_every_sample_once_deterministically(shard_dir: Path) -> None:
    urls = list_shards(shard_dir, split="train")
    upper = wds.map(lambda s: {**s, "cls": s["cls"].decode().upper()})
    first = keys_of(make_pipeline(urls, stages=[upper], shuffle_buffer=8, seed=3))
    again = keys_of(make_pipeline(urls, stages=[upper], shuffle_buffer=8, seed=3))
    ordered = keys_of(make_pipeline(urls, stages=[], shuffle_shards=False, shuffle_buffer=0))
    assert sorted(first) == sorted(ordered) and len(first) == 30
    assert first == again
    assert ordered == sorted(ordered)
    assert next(iter(make_pipeline(urls, stages=[upper])))["cls"].isupper()


def test_resampled_pipeline_is_endless(shard_dir: Path) -> None:
    pipe = make_pipeline(list_shards(shard_dir, split="val"), stages=[], resampled=True, shuffle_buffer=0)
    it = iter(pipe)
    assert len([next(it) for _ in range(12)]) == 12  # more than the 5 samples in the shard


def test_resampled_pipeline_over_unusable_shards_stops_instead_of_drawing_forever(shard_dir: Path) -> None:
    """Under skip_bad, a resampled stream whose every shard fails (or is empty) would skip forever: it stops once
    every distinct shard was drawn without a sample. One readable shard disarms the check."""
    (shard_dir / "train-000001.tar").write_bytes(b"this is not a tar file" * 40)
    (shard_dir / "train-000002.tar").write_bytes(bytes(10240))  # an empty tar
    bad = [str(shard_dir / "train-000001.tar"), str(shard_dir / "train-000002.tar")]
    pipe = make_pipeline(bad, stages=[], resampled=True, shuffle_buffer=0, handler=SampleErrorHandler(skip_bad=True))
    with pytest.raises(SampleError, match=r"none of the 2 training shard\(s\) gave a sample"):
        next(iter(pipe))
    mixed = make_pipeline(bad + [str(shard_dir / "train-000000.tar")], stages=[], resampled=True, shuffle_buffer=0,
                          handler=SampleErrorHandler(skip_bad=True))
    it = iter(mixed)
    assert len([next(it) for _ in range(25)]) == 25  # more than the one good shard's 10 samples


def corrupt(shard_dir: Path) -> Path:
    """Truncate train-000001.tar in the middle of a member's data."""
    bad = shard_dir / "train-000001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 100])
    return bad


def test_truncated_shard_raises_error_naming_the_shard(shard_dir: Path) -> None:
    bad = corrupt(shard_dir)
    pipe = make_pipeline(list_shards(shard_dir, split="train"), stages=[], shuffle_shards=False, shuffle_buffer=0)
    with pytest.raises(SampleError, match=bad.name) as info:
        keys_of(pipe)
    assert "skip_bad" in str(info.value)


def test_truncated_shard_skipped_and_counted(shard_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = corrupt(shard_dir)
    handler = SampleErrorHandler(skip_bad=True)
    pipe = make_pipeline(list_shards(shard_dir, split="train"), stages=[], handler=handler, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="mmm.data"):
        keys = keys_of(pipe)
    assert {k for k in keys if k.startswith(("t0_", "t2_"))} == {f"t{s}_{i:03d}" for s in (0, 2) for i in range(10)}
    summary = handler.summary()
    assert summary["total"] >= 1 and summary["by_type"]
    assert any(bad.name in m for m in summary["messages"])
    assert "data errors in worker" in caplog.text


def test_garbage_shard_and_max_errors(shard_dir: Path) -> None:
    (shard_dir / "train-000001.tar").write_bytes(b"this is not a tar file" * 40)
    (shard_dir / "train-000002.tar").write_bytes(b"")
    urls = list_shards(shard_dir, split="train")
    handler = SampleErrorHandler(skip_bad=True)
    assert len(keys_of(make_pipeline(urls, stages=[], handler=handler))) == 10
    assert handler.summary()["total"] >= 1
    with pytest.raises(RuntimeError, match="max_errors=0"):
        keys_of(make_pipeline(urls, stages=[], handler=SampleErrorHandler(skip_bad=True, max_errors=0)))


def test_map_errors_go_through_the_handler(shard_dir: Path) -> None:
    def boom(sample):
        if sample["__key__"].endswith("3"):
            raise KeyError("missing field 'json'")
        return sample

    urls = list_shards(shard_dir, split="train")
    handler = SampleErrorHandler(skip_bad=True)
    keys = keys_of(make_pipeline(urls, stages=[wds.map(boom, handler=handler)], handler=handler))
    assert len(keys) == 27 and handler.summary()["by_type"] == {"KeyError": 3}
    strict = SampleErrorHandler()
    with pytest.raises(SampleError, match="KeyError"):
        keys_of(make_pipeline(urls, stages=[wds.map(boom, handler=strict)], handler=strict))


def test_dataloader_workers_split_shards(shard_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    pipe = make_pipeline(list_shards(shard_dir, split="train"), stages=[wds.map(lambda s: s["__key__"])])
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=2)
    keys = list(loader)
    assert sorted(keys) == sorted(f"t{s}_{i:03d}" for s in range(3) for i in range(10))


def test_validation_counts_its_bad_samples_per_pass_not_summed_over_passes() -> None:
    """Two bad validation samples ended a run with max_errors 3 at its second validation (4 > 3)."""
    from mmm.train.datamodule import CountedPerPass

    handler = SampleErrorHandler(skip_bad=True, max_errors=3, stream="validation")

    class Pass:
        def __iter__(self):
            for i in range(4):
                if i in (1, 2):
                    handler(ValueError(f"sample {i} is bad"))
                    continue
                yield i

    passes = CountedPerPass(Pass(), handler)
    for _ in range(5):
        assert list(passes) == [0, 3] and handler.total == 2
    worse = SampleErrorHandler(skip_bad=True, max_errors=1, stream="validation")
    passes = CountedPerPass(iter(()), worse)
    list(passes)
    worse(ValueError("a"))
    with pytest.raises(SampleError, match=r"too many bad samples in one pass over the validation data: 2 > "
                                          r"data.max_errors=1"):
        worse(ValueError("b"))
