"""Non-finite loss policy and atomic checkpoint writes."""
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_config
from mmm.train.checkpoint_io import AtomicCheckpointIO
from mmm.train.pretrain import build_run


def _poison(run, bad_calls):
    """Make the model's loss NaN on the given (0-based) training forward calls."""
    model = run.module.model
    original = model.forward
    calls = {"n": 0}

    def forward(batch, **kwargs):
        loss, outs = original(batch, **kwargs)
        i = calls["n"]
        calls["n"] += 1
        return (loss * float("nan"), outs) if (model.training and i in bad_calls) else (loss, outs)

    model.forward = forward


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    run = build_run(tiny_config(tmp_path / "run", **{"trainer.max_steps": 6, "data.val": None}))
    _poison(run, {3})
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at global step 3, batch 3 of epoch 0"):
        run.trainer.fit(run.module, datamodule=run.datamodule)


def test_nonfinite_loss_skip_drops_and_counts(tmp_path):
    run = build_run(tiny_config(tmp_path / "run", **{"trainer.max_steps": 6, "data.val": None,
                                                     "trainer.nonfinite_loss": "skip"}))
    _poison(run, {1, 4})
    before = [p.detach().clone() for p in run.module.model.parameters()]
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.module.nonfinite_skipped == 2
    assert run.trainer.global_step == 6  # skipped batches do not count as optimizer steps
    assert all(torch.isfinite(p).all() for p in run.module.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, run.module.model.parameters()))


def test_skip_policy_is_refused_for_several_processes(tmp_path):
    with pytest.raises(ValueError, match="needs a single process"):
        build_run(tiny_config(tmp_path / "run", **{"trainer.nonfinite_loss": "skip", "trainer.devices": 2}))


def test_atomic_write_keeps_the_old_file_when_killed_mid_write(tmp_path):
    """A writer killed while saving leaves the previous checkpoint intact (no truncated file)."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.zeros(3)}, target)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from mmm.train.checkpoint_io import AtomicCheckpointIO
        real_save = torch.save
        def slow_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)  # die after the bytes are written, before the rename
        torch.save = slow_save
        AtomicCheckpointIO().save_checkpoint({{"step": 2, "w": torch.ones(3)}}, {str(target)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    ck = torch.load(target, weights_only=True)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.zeros(3))
    AtomicCheckpointIO().save_checkpoint({"step": 3}, target)
    assert torch.load(target, weights_only=True)["step"] == 3
