"""global_mean: the plain mean on one process (multi-rank exactness is tested in tests/train/test_ddp.py)."""
import torch

from mmm.objectives.base import global_mean


def test_single_process_is_the_plain_mean():
    losses = torch.tensor([1.0, 2.0, 4.5], requires_grad=True)
    out = global_mean(losses.sum(), 3)
    assert torch.allclose(out, losses.mean())
    out.backward()
    assert torch.allclose(losses.grad, torch.full((3,), 1 / 3))


def test_no_prediction_gives_zero_not_nan():
    zero = torch.zeros((), requires_grad=True) * 0.0
    assert float(global_mean(zero, 0)) == 0.0
    assert float(global_mean(zero, 0, sync=False)) == 0.0
