"""Phased runs (``phases:``): the schedule, its config checks, and a CLM → MLM run that switches
heads at the planned step, logs the phase, and resumes into the same phase bit for bit."""
import csv
from pathlib import Path

import pytest
import torch

from mmm.config import ConfigError, PhaseConfig, load_config
from mmm.train.phases import PhaseSchedule, build_schedule, check_phases

PRESET = Path(__file__).resolve().parents[2] / "configs" / "text_clm_mlm_tiny.yaml"


def _cfg(phases, max_steps=10, **overrides):
    return load_config(PRESET, {"trainer.max_steps": max_steps, "phases": phases, **overrides})


def test_the_phase_of_a_step_follows_the_fractions():
    schedule = build_schedule(_cfg([{"objectives": ["clm"], "fraction": 0.4}, {"objectives": ["mlm"], "fraction": 0.6}]))
    assert schedule == PhaseSchedule((("clm",), ("mlm",)), (4, 10))
    assert [schedule.index_at(s) for s in range(11)] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert schedule.heads_at(3) == ("clm",) and schedule.heads_at(4) == ("mlm",)
    thirds = build_schedule(_cfg([{"objectives": ["clm"], "fraction": 1 / 3}, {"objectives": ["clm", "mlm"],
                                  "fraction": 1 / 3}, {"objectives": ["mlm"], "fraction": 1 / 3}]))
    assert thirds.ends == (3, 7, 10) and thirds.all_heads == ["clm", "mlm"]
    assert build_schedule(_cfg([])) is None


def test_the_preset_trains_clm_for_the_first_40_percent():
    cfg = load_config(PRESET)
    schedule = build_schedule(cfg)
    assert schedule.heads == (("clm",), ("mlm",)) and schedule.ends == (round(0.4 * cfg.trainer.max_steps),
                                                                         cfg.trainer.max_steps)


@pytest.mark.parametrize("phases,match", [
    ([{"objectives": ["clm"], "fraction": 0.4}, {"objectives": ["mlm"], "fraction": 0.5}],
     r"phases: the fractions must sum to 1 .* 0.4 \+ 0.5 = 0.9"),
    ([{"objectives": ["clm"], "fraction": 0.4}, {"objectives": ["mln"], "fraction": 0.6}],
     r"phases\[1\].objectives: 'mln' is not a head of this run; .*\['clm', 'mlm'\]"),
    ([{"objectives": [], "fraction": 0.4}, {"objectives": ["mlm", "clm"], "fraction": 0.6}],
     r"phases\[0\].objectives is empty"),
    ([{"objectives": ["clm", "clm"], "fraction": 0.4}, {"objectives": ["mlm"], "fraction": 0.6}],
     r"phases\[0\].objectives lists a head twice"),
    ([{"objectives": ["clm"], "fraction": 1.0}], r"head\(s\) \['mlm'\] are in config.objectives but in no phase"),
    ([{"objectives": ["clm"], "fraction": 0.01}, {"objectives": ["mlm"], "fraction": 0.99}],
     r"phases\[0\] \(fraction 0.01\) gets no step of trainer.max_steps 10"),
])
def test_bad_phases_are_refused_naming_the_entry(phases, match):
    with pytest.raises(ConfigError, match=match):
        build_schedule(_cfg(phases))


def test_a_fraction_out_of_range_is_refused_when_loading():
    with pytest.raises(ConfigError, match=r"phases.*fraction must be > 0"):
        _cfg([{"objectives": ["clm"], "fraction": 0.0}, {"objectives": ["mlm"], "fraction": 1.0}])


def test_phases_and_tasks_are_refused_together():
    with pytest.raises(ConfigError, match="a phased run has one task"):
        check_phases([PhaseConfig(["mlm"], 1.0)], ["mlm"], multi_task=True)


# ---------------------------------------------------------------------------- a phased run


class StopAt:
    """Stops training after ``step`` optimizer steps (an interrupted run of a longer schedule)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _overrides(run_dir: Path, **extra):
    from conftest import TINY_OVERRIDES

    return {**TINY_OVERRIDES, "trainer.default_root_dir": str(run_dir), "trainer.max_steps": 4, "data.val": None,
            "trainer.log_every_n_steps": 1, "phases": [{"objectives": ["clm"], "fraction": 0.5},
                                                     {"objectives": ["mlm"], "fraction": 0.5}], **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run stopped after 2 of 4 steps, the same run straight to 4, and the first one resumed to 4."""
    from lightning.pytorch.callbacks import Callback

    from mmm.train.pretrain import build_run, pretrain, save_final_checkpoint

    root = tmp_path_factory.mktemp("phases")
    interrupted = build_run(load_config(PRESET, _overrides(root / "first")))
    interrupted.trainer.callbacks.append(type("Stop", (StopAt, Callback), {})(2))
    interrupted.trainer.fit(interrupted.module, datamodule=interrupted.datamodule)
    save_final_checkpoint(interrupted)
    tokenizer = {"model.text.tokenizer_path": str(interrupted.run_dir / "tokenizer")}  # tokenizer training varies
    straight = pretrain(load_config(PRESET, _overrides(root / "straight", **tokenizer)))
    resumed = pretrain(load_config(PRESET, _overrides(root / "resumed", **tokenizer,
                                                      **{"trainer.ckpt_path": str(interrupted.last_checkpoint)})))
    return interrupted, straight, resumed


def _rows(run):
    with (Path(run.csv_logger.log_dir) / "metrics.csv").open() as fh:
        return [r for r in csv.DictReader(fh) if r.get("train/phase")]


def test_each_step_trains_its_phases_heads_and_logs_the_phase(runs):
    _, straight, _ = runs
    rows = sorted(_rows(straight), key=lambda r: int(r["step"]))
    assert [float(r["train/phase"]) for r in rows] == [0.0, 0.0, 1.0, 1.0]
    # the step's loss is its phase's head's (Lightning repeats a head's last value in later rows, so
    # train/clm_loss still shows step 1's value at steps 2 and 3)
    assert [r["train/loss"] == r["train/clm_loss"] for r in rows] == [True, True, False, False]
    assert [r["train/loss"] == r["train/mlm_loss"] for r in rows] == [False, False, True, True]


def test_resuming_mid_run_continues_in_the_same_phase_bit_for_bit(runs):
    from mmm.encoders import read_checkpoint

    interrupted, straight, resumed = runs
    first = read_checkpoint(interrupted.last_checkpoint)
    assert int(torch.load(interrupted.last_checkpoint, map_location="cpu", weights_only=True)["global_step"]) == 2
    assert [float(r["train/phase"]) for r in _rows(resumed)] == [1.0, 1.0]
    a = read_checkpoint(straight.last_checkpoint).state_dict
    b = read_checkpoint(resumed.last_checkpoint).state_dict
    start = first.state_dict
    assert any(not torch.equal(start[k], a[k]) for k in a)  # steps 3 and 4 trained
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_resuming_with_another_max_steps_warns_that_the_phase_boundaries_move(runs, tmp_path, caplog):
    """Phase ends are fractions of trainer.max_steps: a resume with more steps went back to an earlier phase,
    with only the generic "settings that differ" line to show for it."""
    import logging

    from mmm.train.pretrain import build_run

    interrupted, _, _ = runs
    tokenizer = {"model.text.tokenizer_path": str(interrupted.run_dir / "tokenizer")}
    with caplog.at_level(logging.WARNING, logger="mmm.train"):
        build_run(load_config(PRESET, _overrides(tmp_path / "longer", **tokenizer, **{
            "trainer.max_steps": 8, "trainer.ckpt_path": str(interrupted.last_checkpoint)})))
    assert "phases are fractions of trainer.max_steps: resuming with 8 instead of 4 moves every phase boundary" \
        in caplog.text


def test_a_resume_across_single_and_multi_task_is_refused_before_the_config_is_rewritten(runs, tmp_path):
    """The data module refused it inside fit, after build_run had rewritten the run folder's config.yaml."""
    from mmm.config import ConfigError, TaskConfig
    from mmm.train.pretrain import read_resume_checkpoint_for

    interrupted, _, _ = runs
    cfg = load_config(PRESET, _overrides(tmp_path / "multi", phases=[]))
    cfg.tasks = [TaskConfig(name="a"), TaskConfig(name="b")]
    with pytest.raises(ConfigError, match=r"was written by a single-task run, and this config is a multi-task"):
        read_resume_checkpoint_for(cfg, str(interrupted.last_checkpoint))
