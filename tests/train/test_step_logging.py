"""Training metrics are logged only at the steps whose metrics reach the logger (mmm.train.host_metrics.
logs_this_step), each key with its latest value since the previous logging step, and at the run's last step."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from conftest import REPO, tiny_config
from mmm.train.module import MaskedModelingModule
from mmm.train.pretrain import build_run


def _rows(run):
    with (Path(run.csv_logger.log_dir) / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_self_log_runs_at_logging_steps_and_the_last_step_only(tmp_path, monkeypatch):
    calls, losses = [], []
    log, common = MaskedModelingModule.log, MaskedModelingModule._common_step

    def counting_log(self, name, *args, **kwargs):
        calls.append((self.trainer.fit_loop.epoch_loop._batches_that_stepped, name))
        return log(self, name, *args, **kwargs)

    def keeping_loss(self, batch, stage):
        loss = common(self, batch, stage)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(MaskedModelingModule, "log", counting_log)
    monkeypatch.setattr(MaskedModelingModule, "_common_step", keeping_loss)
    run = build_run(tiny_config(tmp_path / "run", **{"trainer.max_steps": 12, "trainer.log_every_n_steps": 5,
                                                     "data.val": None}))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    steps = sorted({s for s, name in calls if name.startswith("train/")})
    assert steps == [4, 9, 11]  # (step + 1) % 5 == 0, and the last of 12
    names = {name for s, name in calls if s == 4}
    assert {"train/loss", "train/mlm_loss", "train/mlm_acc", "train/tokens_per_sec"} <= names
    logged = [(int(r["step"]), float(r["train/loss"])) for r in _rows(run) if r.get("train/loss")]
    assert logged == [(4, losses[4]), (9, losses[9])]  # what the logger writes: the logging steps' own values
    assert float(run.trainer.callback_metrics["train/loss"]) == losses[11]  # the run ends with its last step's


def test_a_multi_task_run_logs_every_task_s_latest_value_at_each_logging_step(tmp_path):
    from mmm.config import load_config

    cfg = load_config(REPO / "configs" / "vl_uniter_tiny.yaml", {
        "trainer.max_steps": 20, "trainer.log_every_n_steps": 5, "data.val": None, "data.num_workers": 0,
        "data.batch_size": 4, "trainer.enable_progress_bar": False, "trainer.default_root_dir": str(tmp_path / "run"),
        "trainer.checkpoint_every_n_steps": 1000})
    drawn = []
    run = build_run(cfg)
    common = run.module._common_step

    def keeping_task(batch, stage):
        loss = common(batch, stage)
        drawn.append((batch.task, float(loss.detach())))
        return loss

    run.module._common_step = keeping_task
    run.trainer.fit(run.module, datamodule=run.datamodule)
    rows = [r for r in _rows(run) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [4, 9, 14, 19]
    for r in rows:
        step = int(r["step"])
        for task in {t for t, _ in drawn[:step + 1]}:  # every task drawn so far, at its latest value
            latest = [loss for t, loss in drawn[:step + 1] if t == task][-1]
            assert float(r[f"train/{task}/loss"]) == torch.tensor(latest).item(), (step, task)
