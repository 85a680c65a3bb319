"""What a resume takes from the config and what from the checkpoint (review of 2026-12-04).

Each test resumes a copy of the session's tiny 3-step run (conftest ``ckpt``) for one more step.
"""
import copy
from pathlib import Path

import pytest
import torch

from conftest import error_line, tiny_argv
from mmm.cli import main
from mmm.config import load_config
from mmm.train.module import config_optimizer_settings, lr_lambda


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_a_resume_trains_with_the_config_s_optimizer_settings(run_copy):
    """Lightning restores the saved param groups and base_lrs; the config's lr, betas and decay must win."""
    assert main(tiny_argv(run_copy, **{"trainer.ckpt_path": "last", "trainer.max_steps": 4, "optim.lr": 0.05,
                                       "optim.weight_decay": 0.5, "optim.betas": [0.5, 0.6]})) == 0
    ck = _last(run_copy)
    groups = ck["optimizer_states"][0]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.05, 0.05] and ck["lr_schedulers"][0]["base_lrs"] == [0.05, 0.05]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert all(tuple(g["betas"]) == (0.5, 0.6) for g in groups)
    cfg = load_config(run_copy / "config.yaml")
    assert groups[0]["lr"] == pytest.approx(0.05 * lr_lambda(cfg.optim, 4)(4))


def test_unchanged_settings_leave_the_restored_values_bit_for_bit(ckpt):
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = load_config(ckpt.parents[1] / "config.yaml")
    before = copy.deepcopy((ck["optimizer_states"], ck["lr_schedulers"]))
    config_optimizer_settings(ck, cfg.optim, cfg.trainer.max_steps)
    for old, new in zip(before[0][0]["param_groups"], ck["optimizer_states"][0]["param_groups"]):
        assert {k: v for k, v in old.items()} == {k: v for k, v in new.items()}
    assert before[1] == ck["lr_schedulers"]


def test_a_resume_in_another_folder_uses_the_checkpoint_s_tokenizer(ckpt, tmp_path):
    """A tokenizer fitted afresh there would give the restored embeddings other tokens."""
    new = tmp_path / "elsewhere"
    assert main(tiny_argv(new, **{"trainer.ckpt_path": str(ckpt), "trainer.max_steps": 4})) == 0
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["mmm"]["assets"]
    assert _last(new)["mmm"]["assets"] == stored and stored["text"]
    assert not (new / "tokenizer").exists()  # nothing was fitted


def test_another_optimizer_is_refused_naming_both(run_copy, capsys):
    assert main(tiny_argv(run_copy, **{"trainer.ckpt_path": "last", "trainer.max_steps": 4, "optim.name": "lamb",
                                       "optim.args": "{}"})) == 2
    line = error_line(capsys)
    assert "holds the state of optimizer 'adamw', but optim.name is 'lamb'" in line and "model.init_from" in line


def test_ckpt_path_may_name_the_run_folder(run_copy, tmp_path, capsys):
    assert main(tiny_argv(run_copy, **{"trainer.ckpt_path": str(run_copy), "trainer.max_steps": 4})) == 0
    assert int(_last(run_copy)["global_step"]) == 4
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "checkpoints" / "step2.ckpt").write_bytes(b"")
    assert main(tiny_argv(run_copy, **{"trainer.ckpt_path": str(empty), "trainer.max_steps": 5})) == 2
    line = error_line(capsys)
    assert "is a folder without last.ckpt or checkpoints/last.ckpt (its .ckpt files: checkpoints/step2.ckpt)" in line


def test_a_fresh_run_into_a_folder_with_checkpoints_warns_and_owns_last_ckpt(run_copy, caplog):
    """Lightning would have kept the old last.ckpt and written last-v1.ckpt beside it, so ``ckpt_path: last``
    after an interrupted fresh run resumed the earlier run."""
    with caplog.at_level("WARNING", logger="mmm.train"):
        assert main(tiny_argv(run_copy, **{"trainer.max_steps": 2})) == 0
    assert "holds checkpoints of an earlier run (last.ckpt" in caplog.text and "--trainer.ckpt_path last" in caplog.text
    assert int(_last(run_copy)["global_step"]) == 2
    assert not list((run_copy / "checkpoints").glob("last-v*.ckpt"))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_the_schedule_peaks_once_and_the_last_step_trains_at_min_lr_ratio(schedule, warmup):
    """The decay ran to step max_steps, one past the last step trained: the last lr was above min_lr_ratio (0.25
    against 0.1 over 10 steps), and the peak was held for two steps (the warmup's last and the decay's first)."""
    from mmm.config import OptimConfig

    optim = OptimConfig(schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.1)
    lrs = [lr_lambda(optim, 10)(step) for step in range(10)]
    assert lrs[max(warmup - 1, 0)] == 1.0 and lrs.count(1.0) == 1
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[max(warmup - 1, 0):], lrs[max(warmup - 1, 0) + 1:]))
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])


def test_a_changed_tokenizer_setting_is_refused_on_resume_not_logged_as_taking_effect(run_copy, capsys):
    """The resume restores the checkpoint's tokenizer: model.text.vocab_size and lowercase changes were logged as
    "they take effect" while the old tokenizer was used, and the new checkpoint recorded settings its model lacks."""
    argv = tiny_argv(run_copy, **{"trainer.ckpt_path": "last", "trainer.max_steps": 4, "model.text.vocab_size": 100,
                                  "model.text.lowercase": False})
    assert main(argv) == 2
    line = error_line(capsys)
    assert "could not take effect: model.text.lowercase: True -> False; model.text.vocab_size: 500 -> 100" in line
    assert "model.init_from" in line
