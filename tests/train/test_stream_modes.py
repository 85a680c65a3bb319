"""Training-stream modes of the StreamDataModule: resampled epochs of a fixed length (and their exact
replay on resume), ranks agreeing to end one-pass epochs together, and bad-sample counts summed
over DataLoader workers and logged by the trainer."""
from __future__ import annotations

import csv
import dataclasses
import io
import tarfile
from pathlib import Path
from typing import List

import numpy as np
import pytest

from conftest import tiny_config
from datasets_def.text import build_shards
from mmm.train.datamodule import DataPosition, ResumableLoader, StreamDataModule
from mmm.train.pretrain import build_run, resolve_ckpt_path

WORDS = "streams of shards drawn with replacement still replay exactly when seeded by their epoch".split()
BAD = 3  # undecodable samples in the corrupt shard


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    rng = np.random.default_rng(2)
    src = tmp_path_factory.mktemp("mode_docs")
    for i in range(24):
        (src / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, int(rng.integers(8, 30)))) + ".",
                                             encoding="utf-8")
    out = tmp_path_factory.mktemp("mode_shards")
    build_shards(src, out, max_chars=200, samples_per_shard=8, seed=0)
    return out


@pytest.fixture(scope="module")
def run(shard_dir, tmp_path_factory):
    """A built (untrained) tiny run; its datamodule's stages are reused with other data settings."""
    return build_run(tiny_config(tmp_path_factory.mktemp("mode_run"), **{
        "data.train": str(shard_dir), "data.val": None, "data.batch_size": 4, "data.seed": 7}))


def _dm(run, **data) -> StreamDataModule:
    base = run.datamodule
    return StreamDataModule(dataclasses.replace(run.cfg.data, **data), [dataclasses.replace(base.tasks[0], val_urls=None)])


def _fp(batch) -> tuple:
    """A batch's identity: its (masked) ids and targets."""
    t = batch.targets["text"]
    return (tuple(batch.inputs["text"].ids.tolist()), tuple(t.positions.tolist()), tuple(t.labels.tolist()))


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_epochs_have_a_fixed_length_and_depend_only_on_their_number(run, workers, monkeypatch):
    dm = _dm(run, resampled=True, epoch_batches=5, num_workers=workers, shuffle_buffer=8)
    loader = dm.train_dataloader()
    e0, e1 = [[_fp(b) for b in loader] for _ in range(2)]
    assert len(e0) == len(e1) == 5 and e0 != e1
    assert all(len(fp[0]) > 0 for fp in e0)
    assert loader.position() == DataPosition(2, 0)
    assert [_fp(b) for b in dm.task_loader(epoch=1)] == e1  # a fresh process at epoch 1 draws the same
    loader.close()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    other_rank = [_fp(b) for b in _dm(run, resampled=True, epoch_batches=5, num_workers=workers,
                                      shuffle_buffer=8).task_loader()]
    assert len(other_rank) == 5 and other_rank != e0  # every rank draws its own stream, same length


def test_resampled_resume_replays_the_rest_of_the_epoch(run):
    settings = dict(resampled=True, epoch_batches=6, num_workers=2, shuffle_buffer=8)
    dm = _dm(run, **settings)
    loader = dm.train_dataloader()
    first = [_fp(b) for b in loader]
    it = iter(loader)
    before = [_fp(next(it)) for _ in range(2)]
    state = dm.state_dict()
    assert (state["epoch"], state["batches_done"]) == (1, 2) and state["settings"]["resampled"] is True
    rest = [_fp(b) for b in it]
    loader.close()
    resumed = _dm(run, **settings)
    resumed.load_state_dict(state)  # no warning: same settings
    again = resumed.train_dataloader()
    assert [_fp(b) for b in again] == rest and len(before + rest) == 6 and before + rest != first
    again.close()


def test_resampled_settings_are_checked(run):
    with pytest.raises(ValueError, match="needs data.epoch_batches"):
        _dm(run, resampled=True)
    with pytest.raises(ValueError, match="applies to data.resampled"):
        _dm(run, epoch_batches=4)
    with pytest.raises(ValueError, match=">= 1"):
        _dm(run, resampled=True, epoch_batches=0)
    # one-pass checkpoints keep the settings they always had (no new keys to differ on resume)
    assert "resampled" not in _dm(run).data_settings()


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_agreeing_end_a_one_pass_epoch_when_the_shortest_share_ends(run, workers):
    dm = _dm(run, num_workers=workers)
    full = [[_fp(b) for b in dm.task_loader(epoch=e)] for e in (0, 1)]
    other_rank_batches = 3  # the other rank has 3 batches in each epoch
    assert all(len(f) > other_rank_batches for f in full)
    calls: List[bool] = []

    class OtherRank:
        def __init__(self) -> None:
            self.left = other_rank_batches

        def __call__(self, have: bool) -> bool:
            calls.append(have)
            self.left -= 1
            ok = have and self.left >= 0
            if not ok:
                self.left = other_rank_batches  # its next epoch
            return ok

    loader = ResumableLoader(lambda e: dm.task_loader(epoch=e), DataPosition(0, 0), agree=OtherRank())
    e0 = [_fp(b) for b in loader]
    assert e0 == full[0][:other_rank_batches] and loader.position() == DataPosition(1, 0)
    assert calls == [True] * (other_rank_batches + 1)  # one agreement per batch asked for, the last one ends it
    e1 = [_fp(b) for b in loader]  # the cut epoch's workers are reused: epoch 1 starts fresh, from its beginning
    assert e1 == full[1][:other_rank_batches] and loader.position() == DataPosition(2, 0)
    loader.close()


# ------------------------------------------------------------------------------------------ errors


def _add_corrupt_shard(shard_dir: Path, out: Path) -> Path:
    """A copy of ``shard_dir`` plus a shard whose first samples are not UTF-8 text."""
    out.mkdir()
    for p in shard_dir.glob("train-*.tar"):
        (out / p.name).write_bytes(p.read_bytes())
    with tarfile.open(out / "train-000099.tar", "w") as tar:
        members = [(f"bad{i}", b"\xff\xfe\xfa not text") for i in range(BAD)]
        members += [(f"good{i}", " ".join(WORDS[i:i + 6]).encode()) for i in range(6)]
        for key, data in members:
            info = tarfile.TarInfo(f"{key}.txt")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_sample_counts_are_summed_over_workers(run, shard_dir, tmp_path, workers):
    shards = _add_corrupt_shard(shard_dir, tmp_path / "shards")
    from mmm.data.stream import list_shards

    base = run.datamodule
    dm = StreamDataModule(dataclasses.replace(run.cfg.data, num_workers=workers, skip_bad=True),
                          [dataclasses.replace(base.tasks[0], train_urls=list_shards(shards, "train"), val_urls=None)])
    loader = dm.train_dataloader()
    batches = list(loader)
    per_worker = {}
    for b in batches:
        info = b.extras["data_errors"]
        per_worker[info["worker"]] = info["total"]
        assert b.extras["data_errors_total"] >= info["total"]
    assert sum(per_worker.values()) == BAD == batches[-1].extras["data_errors_total"] == loader.data_errors()
    assert set(per_worker) == set(range(workers))
    assert max(b.extras["data_errors"]["by_type"].get("ValueError", 0) for b in batches) == BAD
    second = list(loader)  # a new pass of the same workers: their running counts go on
    assert second[-1].extras["data_errors_total"] == 2 * BAD
    loader.close()


def test_trainer_logs_data_errors(shard_dir, tmp_path, run):
    shards = _add_corrupt_shard(shard_dir, tmp_path / "shards")
    cfg = tiny_config(tmp_path / "fit", **{
        "data.train": str(shards), "data.val": None, "data.batch_size": 4, "data.num_workers": 2,
        "data.skip_bad": True, "trainer.max_steps": 12, "trainer.log_every_n_steps": 1,
        "model.text.tokenizer_path": str(run.run_dir / "tokenizer")})
    fit = build_run(cfg)
    fit.trainer.fit(fit.module, datamodule=fit.datamodule, ckpt_path=resolve_ckpt_path(cfg, fit.run_dir))
    with open(Path(fit.csv_logger.log_dir) / "metrics.csv") as fh:
        logged = [float(r["train/data_errors"]) for r in csv.DictReader(fh) if r.get("train/data_errors")]
    # running totals over both workers: each pass over the shards meets the corrupt samples again
    assert logged == sorted(logged) and BAD in logged and set(logged) <= {0.0, BAD, 2.0 * BAD, 3.0 * BAD}
