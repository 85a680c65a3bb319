"""Exact mid-epoch resume: a resumed run trains on the same batches, in the same order, as an uninterrupted one.

Each training step is recorded as (global step, epoch, fingerprint of the batch, loss). The shard
set is small (a few batches per epoch) so runs cross several epoch boundaries in seconds.
"""
import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from conftest import REPO, TINY_OVERRIDES, tiny_config
from datasets_def.text import build_shards
from mmm.data.epoch import EpochCounter
from mmm.data.stream import list_shards, make_pipeline
from mmm.train.datamodule import DataPosition
from mmm.train.pretrain import build_run, resolve_ckpt_path, save_final_checkpoint

LOSS_TOL = 1e-5
WORDS = ("the quick brown fox jumps over a lazy dog while masked models predict hidden tokens from "
         "their context and every shard is read once per epoch in a seeded order").split()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """3 train shards of unequal size (about 6 batches of 8 at max_len 64 per epoch) and 1 val shard."""
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("docs")
    for i in range(24):
        words = rng.choice(WORDS, int(rng.integers(20, 90)))
        (src / f"doc{i:02d}.txt").write_text(" ".join(words) + ".", encoding="utf-8")
    out = tmp_path_factory.mktemp("shards")
    build_shards(src, out, max_chars=200, samples_per_shard=13, val_fraction=0.15, seed=0)
    assert len(list(out.glob("train-*.tar"))) >= 3 and list(out.glob("val-*.tar"))
    return out


def _key(sample: dict) -> str:
    return sample["__key__"]


def _epoch_keys(shard_dir: Path, workers: int, start: int, passes: int) -> List[List[str]]:
    """Sample keys of ``passes`` consecutive passes of one DataLoader whose first pass is epoch ``start``."""
    pipe = make_pipeline(list_shards(shard_dir, "train"), stages=[wds.map(_key)], shuffle_buffer=8, seed=5,
                         epochs=EpochCounter(start))
    loader = DataLoader(pipe, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    return [list(loader) for _ in range(passes)]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_depends_on_its_number_not_on_earlier_passes(shard_dir, workers):
    e0, e1 = _epoch_keys(shard_dir, workers, start=0, passes=2)
    (fresh_e1,) = _epoch_keys(shard_dir, workers, start=1, passes=1)
    assert fresh_e1 == e1 and e0 != e1
    for keys in (e0, e1):  # the workers' shares are disjoint and cover every sample once
        assert len(keys) == len(set(keys)) == len(set(e0))


@dataclass
class Step:
    step: int
    epoch: int
    fingerprint: str
    loss: float


class Recorder(Callback):
    """Record every training step; optionally save a checkpoint after each one (as ModelCheckpoint does)."""

    def __init__(self, save_dir: Optional[Path] = None) -> None:
        self.steps: List[Step] = []
        self.save_dir = save_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        h = hashlib.sha1()
        t_in, t_out = batch.inputs["text"], batch.targets["text"]
        for t in (t_in.ids, t_out.positions, t_out.labels, batch.seq.cu_seqlens):
            h.update(t.cpu().numpy().tobytes())
        self.steps.append(Step(trainer.global_step, trainer.current_epoch, h.hexdigest(), float(outputs["loss"])))
        if self.save_dir is not None:
            trainer.save_checkpoint(str(self.save_dir / f"step{trainer.global_step}.ckpt"))


def _config(run_dir: Path, shard_dir: Path, workers: int, max_steps: int, **extra):
    return tiny_config(run_dir, **{
        "data.train": str(shard_dir), "data.val": str(shard_dir), "data.num_workers": workers,
        "data.shuffle_buffer": 16, "data.seed": 3, "trainer.max_steps": max_steps, "trainer.val_check_interval": 4,
        "trainer.limit_val_batches": 1, "trainer.checkpoint_every_n_steps": 1000, "trainer.log_every_n_steps": 1,
        "optim.warmup_steps": 2, **extra})


def _fit(cfg, recorder: Recorder):
    run = build_run(cfg)
    run.trainer.callbacks.append(recorder)
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=resolve_ckpt_path(cfg, run.run_dir))
    return run


def _data_state(ckpt: Path) -> dict:
    states = [v for k, v in torch.load(ckpt, map_location="cpu", weights_only=True).items() if k == "StreamDataModule"]
    assert states, f"{ckpt} holds no StreamDataModule state"
    return states[0]


def _assert_same_steps(resumed: List[Step], reference: List[Step]) -> float:
    assert [s.step for s in resumed] == [s.step for s in reference]
    assert [s.epoch for s in resumed] == [s.epoch for s in reference]
    for a, b in zip(resumed, reference):
        assert a.fingerprint == b.fingerprint, f"step {a.step}: the resumed run trained on a different batch"
    diffs = [abs(a.loss - b.loss) for a, b in zip(resumed, reference)]
    assert max(diffs) <= LOSS_TOL, f"loss differs after resume: {diffs}"
    return max(diffs)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_and_at_epoch_end_replays_the_same_batches(shard_dir, tmp_path, workers):
    n = 15
    # with workers, dropout is on too: the global torch RNG must be restored from the checkpoint
    dropout = {"model.encoder.dropout": 0.1, "model.encoder.attn_dropout": 0.1} if workers else {}
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    ref = Recorder(save_dir=ckpts)
    ref_run = _fit(_config(tmp_path / "ref", shard_dir, workers, n, **dropout), ref)
    epochs = [s.epoch for s in ref.steps]
    assert len(ref.steps) == n and epochs[-1] >= 2, f"the reference run should cross two epoch boundaries: {epochs}"
    # every epoch is new data order and masks, every batch of an epoch is distinct
    per_epoch = [[s.fingerprint for s in ref.steps if s.epoch == e] for e in (0, 1)]
    assert len(set(per_epoch[0])) == len(per_epoch[0]) and not set(per_epoch[0]) & set(per_epoch[1])

    end_of_epoch0 = max(s.step for s in ref.steps if s.epoch == 0)
    epoch1 = [s.step for s in ref.steps if s.epoch == 1]
    mid_epoch1 = epoch1[len(epoch1) // 2]
    assert mid_epoch1 != epoch1[-1]
    assert _data_state(ckpts / f"step{end_of_epoch0}.ckpt")["epoch"] == 1
    assert _data_state(ckpts / f"step{end_of_epoch0}.ckpt")["batches_done"] == 0
    state = _data_state(ckpts / f"step{mid_epoch1}.ckpt")
    assert DataPosition(state["epoch"], state["batches_done"]) == DataPosition(1, mid_epoch1 - epoch1[0] + 1)

    tok = str(ref_run.run_dir / "tokenizer")
    for m in (mid_epoch1, end_of_epoch0):
        resumed = Recorder()
        cfg = _config(tmp_path / f"resumed{m}", shard_dir, workers, n, **dropout, **{
            "trainer.ckpt_path": str(ckpts / f"step{m}.ckpt"), "model.text.tokenizer_path": tok})
        run = _fit(cfg, resumed)
        assert run.trainer.global_step == n
        worst = _assert_same_steps(resumed.steps, ref.steps[m:])
        print(f"workers={workers} resumed after step {m} (epochs {epochs}): max loss diff {worst:.3g}")


@pytest.mark.parametrize("extend_at", ["mid_epoch", "validation_step"])
def test_a_finished_run_extended_from_its_last_checkpoint_counts_epochs_as_the_uninterrupted_run(
        shard_dir, tmp_path, extend_at):
    """A run that ended at ``max_steps`` and is resumed from its ``last.ckpt`` to a larger ``max_steps`` continues
    Lightning's epoch where it stopped. ``last.ckpt`` was written after ``fit`` returned, when Lightning had closed
    the epoch, so the resumed run logged (and, without a data position, would have read) one epoch too many."""
    n, same_lr = 15, {"optim.schedule": "constant"}  # the learning rate of a step does not depend on max_steps
    ref = Recorder()
    ref_run = _fit(_config(tmp_path / "ref", shard_dir, 0, n, **same_lr), ref)
    epoch1 = [s.step for s in ref.steps if s.epoch == 1]
    m = 8 if extend_at == "validation_step" else next(x for x in epoch1[1:-1] if x % 4)  # val_check_interval 4
    assert m in epoch1[:-1], (m, epoch1)
    tok = {"model.text.tokenizer_path": str(ref_run.run_dir / "tokenizer"), **same_lr}
    first = build_run(_config(tmp_path / "run", shard_dir, 0, m, **tok))
    first.trainer.fit(first.module, datamodule=first.datamodule)
    save_final_checkpoint(first)
    assert torch.load(first.last_checkpoint, map_location="cpu", weights_only=False)["epoch"] == 1
    resumed = Recorder()
    _fit(_config(tmp_path / "run", shard_dir, 0, n, **tok, **{"trainer.ckpt_path": "last"}), resumed)
    _assert_same_steps(resumed.steps, ref.steps[m:])


def test_loader_restarts_an_abandoned_epoch_where_it_stopped(shard_dir, tmp_path):
    """Without a trainer a batch counts as used once yielded; a new pass resumes the unfinished epoch."""
    cfg = _config(tmp_path / "run", shard_dir, 2, 1, **{"data.val": None})
    run = build_run(cfg)
    dm = run.datamodule
    assert dm.trainer is None
    loader = dm.train_dataloader()
    first = [b.inputs["text"].ids.sum().item() for b in loader]
    assert loader.position() == DataPosition(1, 0)
    it = iter(loader)
    partial = [next(it).inputs["text"].ids.sum().item() for _ in range(2)]
    assert loader.position() == DataPosition(1, 2)
    rest = [b.inputs["text"].ids.sum().item() for b in loader]
    whole_epoch1 = [b.inputs["text"].ids.sum().item() for b in dm.task_loader(epoch=1)]
    assert partial + rest == whole_epoch1 and whole_epoch1 != first
    loader.close()


def test_changed_data_settings_warn_and_unknown_state_version_raises(shard_dir, tmp_path):
    run = build_run(_config(tmp_path / "run", shard_dir, 0, 1, **{"data.val": None}))
    dm = run.datamodule
    state = dm.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 0
    state = {**state, "epoch": 2, "batches_done": 3, "settings": {**state["settings"], "num_workers": 4}}
    with pytest.warns(UserWarning, match=r"num_workers: 4 -> 0.*no longer those"):
        dm.load_state_dict(state)
    assert dm.position() == DataPosition(2, 3)
    with pytest.raises(ValueError, match="version"):
        dm.load_state_dict({**state, "version": 99})


# ------------------------------------------------------------------------------------------ kill


def _cli(run_dir: Path, shard_dir: Path, max_steps: int, *extra: str) -> List[str]:
    overrides = {**TINY_OVERRIDES, "trainer.default_root_dir": str(run_dir), "data.train": str(shard_dir),
                 "data.val": "null", "data.num_workers": 2, "data.shuffle_buffer": 16, "data.seed": 3,
                 "trainer.max_steps": max_steps, "trainer.checkpoint_every_n_steps": 4,
                 "trainer.log_every_n_steps": 1, "optim.warmup_steps": 2}
    args = [sys.executable, "-m", "mmm.cli", "pretrain", "--config", str(REPO / "configs" / "text_mlm_tiny.yaml")]
    for k, v in overrides.items():
        args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return args + list(extra)


def _losses(metrics_csv: Path) -> dict:
    with metrics_csv.open() as fh:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")}


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(shard_dir, tmp_path):
    n = 60
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cli(ref_dir, shard_dir, n), check=True, env=env, capture_output=True, cwd=REPO, timeout=300)
    reference = _losses(ref_dir / "logs" / "version_0" / "metrics.csv")
    assert sorted(reference) == list(range(n))

    # the same tokenizer for both runs (training one is not bit-reproducible across processes)
    tok = ("--model.text.tokenizer_path", str(ref_dir / "tokenizer"))
    proc = subprocess.Popen(_cli(run_dir, shard_dir, n, *tok), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file():  # kill right after a checkpoint that lies inside an epoch after the first
                state = _data_state(last)  # checkpoint writes are atomic: never a half-written file
                if state["epoch"] >= 1 and state["batches_done"] > 0:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished (or died) before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ck = torch.load(last, map_location="cpu", weights_only=True)  # the file the kill left behind is whole
    k = ck["global_step"]
    assert 0 < k < n

    done = subprocess.run(_cli(run_dir, shard_dir, n, *tok, "--trainer.ckpt_path", "last"), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    versions = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    resumed = _losses(versions[-1])
    assert sorted(resumed) == list(range(k, n)), "the resumed run must log every step after the checkpoint once"
    diffs = [abs(resumed[s] - reference[s]) for s in resumed]
    assert max(diffs) <= LOSS_TOL, f"resumed losses differ from the uninterrupted run: max {max(diffs)}"
    print(f"killed after checkpoint step {k} (epoch {ck['StreamDataModule']['epoch']}, batch "
          f"{ck['StreamDataModule']['batches_done']}): max loss diff {max(diffs):.3g} over {len(diffs)} steps")


def test_every_ranks_random_state_is_saved_and_each_rank_resumes_with_its_own(monkeypatch):
    """Only rank 0 writes the checkpoint: every rank used to resume with rank 0's generator, so dropout masks
    differed from the uninterrupted DDP run from the first resumed step (ranks' generators drift apart)."""
    import types
    import warnings

    import torch.distributed as dist

    import mmm.train.module as module_mod
    from mmm.train.module import MaskedModelingModule

    states = []
    for seed in (1, 2):  # what rank 0 and rank 1 hold when the checkpoint is written
        torch.manual_seed(seed)
        states.append({"torch": torch.get_rng_state(), "cuda": []})
    guard = types.SimpleNamespace(read=lambda: None, skipped=0)
    fake = types.SimpleNamespace(nonfinite_guard=guard, extra_state={}, optim=None, max_steps=1)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(slice(None), states))
    monkeypatch.setattr(module_mod, "config_optimizer_settings", lambda *a, **k: None)
    ckpt = {}
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    MaskedModelingModule.on_save_checkpoint(fake, ckpt)
    assert len(ckpt["mmm_rng"]["per_rank"]) == 2
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, r=rank: r)
        torch.manual_seed(99)
        MaskedModelingModule.on_load_checkpoint(fake, ckpt)
        assert torch.equal(torch.get_rng_state(), states[rank]["torch"])
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)  # another world size: said, not silent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MaskedModelingModule.on_load_checkpoint(fake, ckpt)
    assert any("random state of 2 process(es), this run has 4" in str(w.message) for w in caught)
