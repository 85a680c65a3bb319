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
