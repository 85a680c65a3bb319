"""Gradient clipping by norm: with the default fused AdamW under bf16 (which Lightning's mixed-precision
plugin refuses to clip) and in fp32, the gradients the optimizer sees have at most the configured norm."""
import pytest
import torch

from conftest import tiny_config
from mmm.train.pretrain import build_run


def _grad_norm(module):
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_gradients_are_clipped_to_the_norm(tmp_path, precision):
    clip = 1e-3  # far below the tiny model's first gradients (norm ~ 1): clipping certainly acts
    run = build_run(tiny_config(tmp_path / "run", **{"trainer.max_steps": 1, "data.val": None,
                                                     "trainer.precision": precision,
                                                     "trainer.gradient_clip_val": clip}))
    seen = []

    optimizer_step = run.module.optimizer_step

    def step(*args, **kwargs):
        out = optimizer_step(*args, **kwargs)
        seen.append(_grad_norm(run.module.model))  # the clipped gradients stay in .grad after the step
        return out

    run.module.optimizer_step = step
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 1 and run.trainer.optimizers[0].defaults["fused"]
    assert len(seen) == 1 and seen[0] == pytest.approx(clip, rel=1e-3)


def test_fp16_gradscaler_with_fused_adamw_clips_the_unscaled_gradients(tmp_path):
    """fp16 with a GradScaler and the default fused AdamW: Lightning refuses to clip there ("performs
    unscaling of gradients internally"); mmm unscales with the scaler first, then clips, and the fused
    step takes the gradients as unscaled. Lightning turns 16-mixed into bf16 on the CPU, so the fp16 plugin
    with a CPU GradScaler is put in by hand."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    clip = 1e-3
    run = build_run(tiny_config(tmp_path / "run", **{"trainer.max_steps": 2, "data.val": None,
                                                     "trainer.gradient_clip_val": clip}))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    run.trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    assert run.trainer.precision == "16-mixed"
    seen, weights = [], []
    optimizer_step = run.module.optimizer_step

    def step(*args, **kwargs):
        before = [p.detach().clone() for p in run.module.model.parameters()]
        out = optimizer_step(*args, **kwargs)
        seen.append(_grad_norm(run.module.model))
        weights.append(max(float((p.detach() - b).abs().max()) for p, b in zip(run.module.model.parameters(), before)))
        return out

    run.module.optimizer_step = step
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 2 and run.trainer.optimizers[0].defaults["fused"]
    # the gradients left in .grad are the unscaled, clipped ones (scaled ones would be ~2**10 times larger)
    assert len(seen) == 2 and all(n == pytest.approx(clip, rel=1e-3) for n in seen)
    assert all(w > 0 for w in weights)  # the fused step ran on them (no inf found: not skipped)
    assert scaler.get_scale() == 2.0 ** 10  # no step was skipped for an inf, so the scale was not cut


def test_fp16_overflow_found_by_the_unscale_skips_the_fused_step(tmp_path):
    """The inf that ``GradScaler.unscale_`` finds before clipping reaches the fused step: the weights stay as
    they were and the scale is cut, as with an unclipped fp16 step."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    run = build_run(tiny_config(tmp_path / "run", **{"trainer.max_steps": 1, "data.val": None,
                                                     "trainer.gradient_clip_val": 1.0}))
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # the scaled loss overflows fp32: every gradient is inf
    run.trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    stages, found = [], []
    unscale, step = scaler.unscale_, scaler.step

    def spying_step(optimizer, *args, **kwargs):
        state = scaler._per_optimizer_states[id(optimizer)]
        stages.append(state["stage"].name)  # UNSCALED: the step takes mmm's unscaled, clipped gradients
        found.append(float(sum(v.sum() for v in state["found_inf_per_device"].values())))
        return step(optimizer, *args, **kwargs)

    scaler.unscale_ = lambda optimizer: (stages.append("unscale_"), unscale(optimizer))[1]
    scaler.step = spying_step
    before = [p.detach().clone() for p in run.module.model.parameters()]
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert stages == ["unscale_", "UNSCALED"] and found == [1.0]  # the inf found before clipping reaches the step
    assert all(torch.equal(p.detach(), b) for p, b in zip(run.module.model.parameters(), before))
    assert scaler.get_scale() == pytest.approx(3e38 * 0.5)


@pytest.mark.parametrize("bad_batch", [0, 1])
def test_fp16_with_clipping_skips_a_non_finite_batch_and_trains_on(tmp_path, bad_batch):
    """trainer.nonfinite_loss: skip under fp16 reads the loss on the host and skips backward; clipping must not
    unscale then (the scaler would be left unscaled, or have no scale yet at the first batch)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from mmm.train.module import MaskedModelingModule

    run = build_run(tiny_config(tmp_path / "run", **{"trainer.max_steps": 3, "data.val": None,
                                                     "trainer.gradient_clip_val": 1.0,
                                                     "trainer.nonfinite_loss": "skip"}))
    run.trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu",
                                                           scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    common, seen = MaskedModelingModule._common_step, []

    def poisoned(batch, stage):
        loss = common(run.module, batch, stage)
        seen.append(stage)
        return loss * float("nan") if stage == "train" and len(seen) == bad_batch + 1 else loss

    run.module._common_step = poisoned
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 3 and run.module.nonfinite_skipped == 1
