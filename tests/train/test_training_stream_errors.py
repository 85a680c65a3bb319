"""Bad data in the training stream (:class:`mmm.train.loaders.ResumableLoader`): every error is counted, also
those met after a worker's last batch; ``data.max_errors`` applies to the sum over the DataLoader workers; and
a stream with no batch in a whole epoch stops instead of starting empty epochs forever."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import List

import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from mmm.data.errors import SampleError, SampleErrorHandler, decode_each
from mmm.data.stream import WorkerErrorCounts, make_pipeline
from mmm.modalities.text.codec import decode_text
from mmm.train.loaders import DataPosition, ResumableLoader


class _Batch:
    def __init__(self, samples: List[str]) -> None:
        self.samples, self.extras = samples, {}


def _good(path: Path, n: int) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            data = f"{path.stem} text {i}".encode()
            info = tarfile.TarInfo(f"{path.stem}_{i:03d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _garbage(path: Path) -> str:
    path.write_bytes(os.urandom(3000))
    return str(path)


def _loader(urls: List[str], workers: int, max_errors=None, start: DataPosition = DataPosition(0, 0),
            handler_limit: bool = True) -> ResumableLoader:
    """The training loader over ``urls`` (no shuffling: worker w reads urls w, w + workers, ...), batches of 2;
    persistent workers, as the data module's (their handlers live across epochs)."""
    def build(epoch: int) -> DataLoader:
        handler = SampleErrorHandler(skip_bad=True, max_errors=max_errors if handler_limit else None)
        stages = [wds.pipelinefilter(decode_each)(decode_text, handler), wds.batched(2, collation_fn=_Batch,
                                                                                     partial=True)]
        pipeline = make_pipeline(urls, stages=stages, shuffle_shards=False, shuffle_buffer=0, handler=handler,
                                 stamp_errors=True)
        return DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    return ResumableLoader(build, start, max_errors=max_errors)


@pytest.mark.parametrize("workers", [0, 2])
def test_errors_of_a_worker_that_yields_no_batch_are_counted(tmp_path, workers):
    urls = [_good(tmp_path / "good.tar", 5), _garbage(tmp_path / "bad.tar")]  # with 2 workers: worker 1 has no batch
    loader = _loader(urls, workers)
    batches = list(loader)
    assert sum(len(b.samples) for b in batches) == 5
    assert not any(isinstance(b, WorkerErrorCounts) for b in batches)  # the late counts are not handed on
    assert loader.data_errors() == 1


def test_max_errors_applies_to_the_sum_over_workers(tmp_path):
    """Each of the two workers meets one bad shard: no worker alone passes data.max_errors=1, both together do."""
    urls = [_good(tmp_path / "good0.tar", 4), _good(tmp_path / "good1.tar", 4),
            _garbage(tmp_path / "bad0.tar"), _garbage(tmp_path / "bad1.tar")]
    with pytest.raises(SampleError, match=r"too many bad samples in one pass over the training data: 2 > "
                                          r"data.max_errors=1, summed over the DataLoader workers "
                                          r"\(ShardReadError=2\)"):
        list(_loader(urls, 2, max_errors=1))
    loader = _loader(urls, 2, max_errors=2)
    assert sum(len(b.samples) for b in loader) == 8 and loader.data_errors() == 2
    with pytest.raises(SampleError, match="2 > data.max_errors=1"):  # the same outcome without workers
        list(_loader(urls, 0, max_errors=1))


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("handler_limit", [True, False])  # the worker's own limit, or only the loader's sum
def test_max_errors_counts_one_pass_so_a_bad_sample_met_every_epoch_does_not_stop_a_long_run(tmp_path, workers,
                                                                                               handler_limit):
    """One bad shard in the data, data.max_errors=1: every epoch meets it once. The counts summed over epochs
    stopped the run at its second epoch; a resumed run (which replays its epoch) now stops where the uninterrupted
    one would, and more bad samples than the limit in one pass still stop it."""
    urls = [_good(tmp_path / "good0.tar", 4), _garbage(tmp_path / "bad0.tar")]
    loader = _loader(urls, workers, max_errors=1, handler_limit=handler_limit)
    for epoch in range(4):
        assert sum(len(b.samples) for b in loader) == 4
        assert loader.position() == DataPosition(epoch + 1, 0)
    assert loader.data_errors() == 4  # the running count (logged as train/data_errors) goes on
    loader.close()
    resumed = _loader(urls, workers, max_errors=1, start=DataPosition(3, 1), handler_limit=handler_limit)
    assert sum(len(b.samples) for b in resumed) == 2  # replays the epoch's first batch, then its last
    resumed.close()
    two_bad = urls + [_garbage(tmp_path / "bad1.tar")]
    with pytest.raises(SampleError, match=r"too many bad samples in one pass over the (training )?data: 2 > "
                                          r"data.max_errors=1"):
        list(_loader(two_bad, workers, max_errors=1, handler_limit=handler_limit))


def test_a_stream_without_a_batch_in_a_whole_epoch_stops(tmp_path):
    only_bad = [_garbage(tmp_path / "bad.tar")]
    with pytest.raises(RuntimeError, match=r"yielded no batch in a whole epoch \(epoch 0\).*\(1 bad sample"):
        list(_loader(only_bad, 0))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(bytes(10240))  # a valid tar without a member
    with pytest.raises(RuntimeError, match="yielded no batch in a whole epoch"):
        list(_loader([str(empty)], 1))


def _blank(path: Path, n: int) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            info = tarfile.TarInfo(f"{path.stem}_{i:03d}.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b" \n "))
    return str(path)


def test_a_resampled_stream_whose_every_sample_is_bad_stops(tmp_path, monkeypatch):
    """Every shard reads, every sample fails to decode: a resampled (endless) stream would skip forever."""
    import mmm.data.stream as stream

    monkeypatch.setattr(stream, "BAD_IN_A_ROW_LIMIT", 50)

    def pipeline(urls):
        handler = SampleErrorHandler(skip_bad=True)
        stages = [wds.pipelinefilter(decode_each)(decode_text, handler), wds.batched(2, collation_fn=_Batch)]
        return make_pipeline(urls, stages=stages, resampled=True, shuffle_buffer=0, handler=handler, stamp_errors=True)

    with pytest.raises(SampleError, match=r"51 bad samples in a row without one batch \(ValueError=51\)"):
        next(iter(pipeline([_blank(tmp_path / "blank.tar", 10)])))
    # a usable shard among bad ones: batches keep coming, the count restarts with each
    it = iter(pipeline([_blank(tmp_path / "blank.tar", 10), _good(tmp_path / "good.tar", 10)]))
    assert len([next(it) for _ in range(40)]) == 40


def test_fewer_training_shards_than_processes_is_refused_naming_both_counts(tmp_path: Path) -> None:
    """Two DDP processes over one shard: the second stopped with "no batch in a whole epoch ... (0 bad samples)",
    which blamed the data instead of the shard count."""
    from mmm.config import DataConfig
    from mmm.train.datamodule import StreamDataModule
    from mmm.train.mixture import TaskData

    one = [_good(tmp_path / "train-000000.tar", 5)]
    dm = StreamDataModule(DataConfig(), [TaskData("", 1.0, one, None, lambda **kw: [], {})])
    dm.check_shards_per_process(1)
    with pytest.raises(ValueError, match=r"^1 training shard\(s\) for 2 processes \(trainer.devices x "
                                         r"trainer.num_nodes\): each process reads whole shards, so 1 would get none"):
        dm.check_shards_per_process(2)
    mixed = StreamDataModule(DataConfig(), [TaskData("a", 1.0, one * 3, None, lambda **kw: [], {}),
                                            TaskData("b", 1.0, one, None, lambda **kw: [], {})])
    with pytest.raises(ValueError, match=r"^task 'b': 1 training shard\(s\) for 3 processes"):
        mixed.check_shards_per_process(3)
    StreamDataModule(DataConfig(resampled=True, epoch_batches=4), [TaskData("", 1.0, one, None, lambda **kw: [], {})]
                     ).check_shards_per_process(8)  # resampled: every process draws from all shards
