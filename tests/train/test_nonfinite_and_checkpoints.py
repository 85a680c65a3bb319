"""Non-finite loss policy and atomic checkpoint writes."""
import signal
import subprocess
import sys
import textwrap

import lightning as L
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


READ_EVERY_STEP = {"optim.args": {"fused": False}}  # PyTorch's per-tensor AdamW: no found_inf, the loss is read


@pytest.mark.parametrize("where", ["device", "host"])
def test_nonfinite_loss_stops_naming_the_step(tmp_path, where):
    """On the device the stop comes at the next logging step (here the end of the 6 steps, before step 10);
    the message names the step, batch and loss either way."""
    run = build_run(tiny_config(tmp_path / "run", **{"trainer.max_steps": 6, "data.val": None,
                                                     **(READ_EVERY_STEP if where == "host" else {})}))
    _poison(run, {3})
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at global step 3, batch 3 of epoch 0 "
                                                 r"\(8 sequences, \d+ tokens\)"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.module.nonfinite_guard.on_device == (where == "device")


def test_nonfinite_loss_skip_drops_and_counts_reading_every_step(tmp_path):
    run = build_run(tiny_config(tmp_path / "run", **{"trainer.max_steps": 6, "data.val": None,
                                                     "trainer.nonfinite_loss": "skip", **READ_EVERY_STEP}))
    _poison(run, {1, 4})
    before = [p.detach().clone() for p in run.module.model.parameters()]
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert not run.module.nonfinite_guard.on_device
    assert run.module.nonfinite_skipped == 2
    assert run.trainer.global_step == 6  # a skipped batch's step finds no gradient: it counts, changing nothing
    assert all(torch.isfinite(p).all() for p in run.module.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, run.module.model.parameters()))


def test_nonfinite_loss_skip_on_the_device_leaves_weights_and_moments_as_they_were(tmp_path):
    """Fused AdamW skips the bad steps' updates itself (found_inf); they count as steps that changed nothing, and
    the host reads the count at logging steps (every 3 here) and at the end."""
    run = build_run(tiny_config(tmp_path / "run", **{"trainer.max_steps": 8, "data.val": None,
                                                     "trainer.nonfinite_loss": "skip", "trainer.log_every_n_steps": 3}))
    _poison(run, {1, 4, 7})
    seen = []
    read = run.module.nonfinite_guard.read

    def counted():
        out = read()
        seen.append((run.trainer.global_step, run.module.nonfinite_guard.skipped))
        return out

    run.module.nonfinite_guard.read = counted
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.module.nonfinite_guard.on_device
    assert seen[:2] == [(3, 1), (6, 2)]  # logging steps 3 and 6
    assert set(seen[2:]) == {(8, 3)} and len(seen) == 4  # the end: before the last checkpoint, and on_train_end
    assert run.module.nonfinite_skipped == 3 and run.trainer.global_step == 8
    opt = run.trainer.optimizers[0]
    steps = {float(opt.state[p]["step"]) for p in run.module.model.parameters() if p in opt.state}
    assert steps == {5.0}  # 8 optimizer steps, 3 of them skipped by the kernel
    assert all(torch.isfinite(p).all() for p in run.module.model.parameters())
    assert all(torch.isfinite(opt.state[p]["exp_avg_sq"]).all() for p in opt.state)


def test_a_skipped_step_on_the_device_changes_nothing(tmp_path, ckpt):
    """Three steps whose last loss is NaN end with exactly the weights and moments of two clean steps."""
    tokenizer = str(ckpt.parent.parent / "tokenizer")  # one tokenizer for both runs (training one twice may differ)

    def train(steps, bad):
        run = build_run(tiny_config(tmp_path / f"run{steps}", **{
            "trainer.max_steps": steps, "data.val": None, "trainer.nonfinite_loss": "skip",
            "model.text.tokenizer_path": tokenizer,
            "optim.schedule": "constant", "optim.warmup_steps": 0}))  # the same lr at every step of both runs
        _poison(run, bad)
        run.trainer.fit(run.module, datamodule=run.datamodule)
        assert run.module.nonfinite_guard.on_device and run.module.nonfinite_skipped == len(bad)
        opt = run.trainer.optimizers[0]
        return [[p.detach().clone()] + [opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "step")]
                for p in run.module.model.parameters() if p in opt.state]

    clean, poisoned = train(2, set()), train(3, {2})
    assert len(clean) == len(poisoned) > 0
    for a, b in zip(clean, poisoned):  # weight, both moments and Adam's step count
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_on_the_device_stop_writes_no_checkpoint_after_the_bad_step_and_skip_counts_across_a_resume(tmp_path):
    """The count is read before every checkpoint: stop raises there (nothing written at or after the bad step),
    and with skip the count travels in the checkpoint."""
    run = build_run(tiny_config(tmp_path / "stop", **{"trainer.max_steps": 6, "data.val": None,
                                                      "trainer.checkpoint_every_n_steps": 2}))
    _poison(run, {2})
    with pytest.raises(FloatingPointError, match="at global step 2, batch 2"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    ckpts = tmp_path / "stop" / "checkpoints"  # written at step 2, before the bad batch; the one due at step 4 was not
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step2.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2

    skip = {"data.val": None, "trainer.nonfinite_loss": "skip"}
    first = build_run(tiny_config(tmp_path / "skip", **{"trainer.max_steps": 3, **skip}))
    _poison(first, {1})
    first.trainer.fit(first.module, datamodule=first.datamodule)
    assert first.module.nonfinite_skipped == 1
    again = build_run(tiny_config(tmp_path / "skip", **{"trainer.max_steps": 5, "trainer.ckpt_path": "last", **skip}))
    _poison(again, {0})
    again.trainer.fit(again.module, datamodule=again.datamodule, ckpt_path=str(tmp_path / "skip/checkpoints/last.ckpt"))
    assert again.module.nonfinite_skipped == 2


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


def _flip_bytes_inside_largest_entry(path):
    """Overwrite 64 bytes of the largest zip entry's data, as a bad disk or a broken copy would."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        fh.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        chunk = fh.read(64)
        fh.seek(-len(chunk), 1)
        fh.write(bytes(b ^ 0xFF for b in chunk))
    return info.filename


def test_a_checkpoint_whose_bytes_were_damaged_is_refused_by_every_reader(tmp_path):
    """torch.load does not check the zip CRCs: overwritten tensor bytes loaded without an error, as garbage weights,
    through read_checkpoint, load_encoder and the resume check."""
    import torch

    from mmm.checkpoint import safe_torch_load
    from mmm.errors import CheckpointError
    from mmm.train.checkpoint_io import read_resume_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "global_step": 3}, path)
    assert read_resume_checkpoint(path)["global_step"] == 3 and "state_dict" in safe_torch_load(path)
    entry = _flip_bytes_inside_largest_entry(path)
    with pytest.raises(ValueError, match=rf"last.ckpt is corrupt: the bytes of its entry '{entry}' do not match"):
        safe_torch_load(path)
    with pytest.raises(CheckpointError, match=r"trainer.ckpt_path: .*last.ckpt is corrupt: .*CRC-32"):
        read_resume_checkpoint(path)


def test_with_accumulation_a_window_whose_last_batch_is_skipped_is_still_clipped(tmp_path):
    """The window's step goes on with its other batch's gradients; they went unclipped (1,400x the limit here) and
    without the post-step hooks, since only the window's last batch was looked at."""
    clip = 1e-3
    run = build_run(tiny_config(tmp_path / "run", **{
        "trainer.max_steps": 2, "data.val": None, "trainer.nonfinite_loss": "skip", "optim.warmup_steps": 0,
        "trainer.accumulate_grad_batches": 2, "trainer.gradient_clip_val": clip}))
    _poison(run, {1})  # the second forward: the last batch of the first window
    hooks = []
    original_hook = run.module.model.after_optimizer_step
    run.module.model.after_optimizer_step = lambda: (hooks.append(1), original_hook())[1]
    norms = []

    class GradNorms(L.Callback):  # the gradients the optimizer's step sees (after clipping)
        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            step = opt.step

            def seen(closure=None, **kwargs):
                loss = closure() if closure is not None else None
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([x.norm() for x in grads]))))
                step(**kwargs)
                return loss

            opt.step = seen

    run.trainer.callbacks.append(GradNorms())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.module.nonfinite_skipped == 1 and len(norms) == 2 and len(hooks) == 2
    assert all(n <= clip * 1.0001 for n in norms), norms


def test_a_checkpoint_written_without_crcs_is_not_refused(tmp_path):
    """torch can save without CRC-32s (compute_crc32 = False): nothing to check, so nothing to refuse."""
    import torch

    from mmm.checkpoint import damaged_entry, safe_torch_load

    config = torch.utils.serialization.config.save
    before = config.compute_crc32
    config.compute_crc32 = False
    try:
        torch.save({"w": torch.randn(8, 8)}, tmp_path / "nocrc.pt")
    finally:
        config.compute_crc32 = before
    assert damaged_entry(tmp_path / "nocrc.pt") is None and "w" in safe_torch_load(tmp_path / "nocrc.pt")
