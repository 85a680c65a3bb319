"""The optimizer registry: each update rule against a hand computation on a tiny tensor, the
Hutchinson Hessian-diagonal estimate, and exact resume through `mmm pretrain`'s checkpoints."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mmm.config import OptimConfig
from mmm.optim import build_optimizer
from mmm.optim.lamb import Lamb
from mmm.optim.sophia import Sophia, hutchinson_diagonal
from mmm.registry import OPTIMIZERS, RegistryError


def test_registry_lists_the_optimizers_and_rejects_unknown_names_and_args():
    assert OPTIMIZERS.list() == ["adamw", "lamb", "sophia"]
    model = nn.Linear(3, 2)
    with pytest.raises(RegistryError, match="unknown optimizer 'adam'.*adamw, lamb, sophia"):
        build_optimizer(model, OptimConfig(name="adam"))
    with pytest.raises(RegistryError, match=r"optim.args \(optimizer 'lamb'\) got unknown argument\(s\) \['rho'\]; "
                                             r"accepted: \['always_adapt'\]"):
        build_optimizer(model, OptimConfig(name="lamb", args={"rho": 0.1}))
    with pytest.raises(RegistryError, match=r"optim.args \(optimizer 'sophia'\): 'lr' is set by mmm itself \(from optim.lr\)"):
        build_optimizer(model, OptimConfig(name="sophia", args={"lr": 0.1}))


def test_build_uses_the_weight_decay_groups():
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    opt = build_optimizer(model, OptimConfig(name="lamb", weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([2, 3])] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    assert isinstance(build_optimizer(model, OptimConfig()), torch.optim.AdamW)


def test_adamw_first_step_by_hand():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = OPTIMIZERS.create("adamw", params=[{"params": [w], "weight_decay": 0.5}], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    w.grad = torch.tensor([0.3, -4.0])
    opt.step()
    # decay w *= 1 - lr * wd, then m_hat / (sqrt(v_hat) + eps) = sign(g) on the first step
    expected = torch.tensor([1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1])
    assert torch.allclose(w.detach(), expected, atol=1e-6)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lamb_first_step_by_hand(wd):
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    opt = Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=wd, always_adapt=True)
    w.grad = torch.tensor([1.0, 2.0])
    opt.step()
    # first step: m_hat = g, v_hat = g^2, so the Adam direction is sign(g) = (1, 1)
    r = [1 + wd * 3.0, 1 + wd * 4.0]
    trust = 5.0 / math.hypot(*r)
    expected = torch.tensor([3.0 - 0.1 * trust * r[0], 4.0 - 0.1 * trust * r[1]])
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_lamb_second_step_by_hand_and_zero_weights_use_trust_one():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = Lamb([w], lr=0.1, betas=(0.5, 0.5), eps=0.0, always_adapt=True)
    w.grad = torch.tensor([1.0, 2.0])
    opt.step()
    w1 = w.detach().clone()
    w.grad = torch.tensor([3.0, -2.0])
    opt.step()
    m = (0.25 * torch.tensor([1.0, 2.0]) + 0.5 * torch.tensor([3.0, -2.0])) / 0.75  # (m after 2 steps) / (1 - b1^2)
    v = (0.25 * torch.tensor([1.0, 4.0]) + 0.5 * torch.tensor([9.0, 4.0])) / 0.75
    r = m / v.sqrt()
    expected = w1 - 0.1 * (w1.norm() / r.norm()) * r
    assert torch.allclose(w.detach(), expected, atol=1e-6)

    b = nn.Parameter(torch.zeros(2))  # a zero-initialised bias: trust ratio 1, the plain Adam step
    opt = Lamb([b], lr=0.1, eps=0.0)
    b.grad = torch.tensor([2.0, -1.0])
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([-0.1, 0.1]))


def test_lamb_gives_parameters_without_weight_decay_adams_step():
    """apex FusedLAMB / timm Lamb / Google's exclude_from_layer_adaptation: no trust ratio without weight decay.
    With it, a zero-initialised bias got a trust of about lr from its second step and stopped moving."""
    def moved(always_adapt: bool) -> float:
        b = nn.Parameter(torch.zeros(3))
        opt = Lamb([{"params": [b], "weight_decay": 0.0}], lr=0.01, eps=1e-8, always_adapt=always_adapt)
        after_one = None
        for step in range(50):
            b.grad = torch.tensor([1.0, -0.5, 0.25])
            opt.step()
            if step == 0:
                after_one = b.detach().clone()
        return float((b.detach() - after_one).abs().max())

    assert moved(False) == pytest.approx(49 * 0.01, rel=1e-4)  # Adam: sign(g) * lr per step on a constant gradient
    assert moved(True) < 0.02  # the trust ratio ||b|| / ||r|| ~ lr: it barely moves after step 1
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # with weight decay: the trust ratio, as before
    opt = Lamb([{"params": [w], "weight_decay": 0.1}], lr=0.1, eps=0.0)
    w.grad = torch.tensor([1.0, 2.0])
    opt.step()
    r = torch.tensor([1 + 0.3, 1 + 0.4])
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * (5.0 / r.norm()) * r, atol=1e-6)


def test_sophia_refreshes_its_hessian_by_optimizer_steps_not_by_the_first_parameters_count():
    """The refresh read the first parameter's own step count, which skips the steps it has no gradient (a task
    mixture): with k = 3 and that parameter used on even steps only, estimates came at steps 1, 2, 7, 8."""
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    at, step = [], [0]

    def hessian(params):
        at.append(step[0])
        return [torch.ones_like(p) for p in params]

    opt = Sophia([a, b], hessian, lr=0.01, hessian_every=3)
    for step[0] in range(1, 11):
        a.grad = torch.ones(2) if step[0] % 2 == 0 else None
        b.grad = torch.ones(2)
        opt.step()
    assert at == [1, 4, 7, 10]


def test_sophia_steps_by_hand_with_a_given_hessian():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    calls = []

    def hessian(params):
        calls.append(1)
        return [torch.tensor([1.0, 0.5, -3.0])]

    opt = Sophia([w], hessian, lr=0.1, betas=(0.9, 0.99), rho=1.0, eps=1e-3, weight_decay=0.0, hessian_every=2)
    w.grad = torch.tensor([0.05, -1.0, 0.001])
    opt.step()
    # m = 0.1 g = (0.005, -0.1, 1e-4); h = 0.01 h_hat = (0.01, 0.005, -0.03)
    # ratio = m / max(rho h, eps) = (0.5, -20 -> -1, 1e-4 / 1e-3 = 0.1)
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.05, -2.0 + 0.1, 3.0 - 0.01]), atol=1e-6)
    assert len(calls) == 1
    w.grad = torch.tensor([0.0, 0.0, 0.0])
    opt.step()  # step 2: no new estimate (every 2 steps: steps 1, 3, ...); m decays to 0.9 m
    assert len(calls) == 1
    assert torch.allclose(w.detach(), torch.tensor([0.95 - 0.045, -1.9 + 0.1, 2.99 - 0.009]), atol=1e-6)
    opt.step()
    assert len(calls) == 2
    assert torch.allclose(opt.state[w]["hessian"], 0.99 * torch.tensor([0.01, 0.005, -0.03])
                          + 0.01 * torch.tensor([1.0, 0.5, -3.0]))


def test_sophia_decoupled_weight_decay():
    w = nn.Parameter(torch.tensor([2.0]))
    opt = Sophia([{"params": [w], "weight_decay": 0.5}], lambda ps: [torch.zeros(1)], lr=0.1, rho=1.0, eps=1.0)
    w.grad = torch.tensor([0.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([2.0 * 0.95]))


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    a = torch.tensor([1.0, -2.0, 3.0])
    x = torch.tensor([0.5, 1.0, -1.0], requires_grad=True)
    torch.manual_seed(0)
    (h,) = hutchinson_diagonal(0.5 * (a * x * x).sum() + x.sum(), [x])
    assert torch.allclose(h, a)  # u * (diag(a) u) = a for u in {-1, 1}
    hess = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    y = torch.tensor([0.3, -0.7], requires_grad=True)
    est = torch.stack([hutchinson_diagonal(0.5 * y @ hess @ y, [y])[0] for _ in range(4000)]).mean(0)
    assert torch.allclose(est, hess.diagonal(), atol=0.1)
    unused = torch.ones(2, requires_grad=True)
    assert torch.equal(hutchinson_diagonal((x * x).sum(), [x, unused])[1], torch.zeros(2))


@pytest.mark.slow
@pytest.mark.parametrize("name,args", [("adamw", {}), ("lamb", {}), ("sophia", {"hessian_every": 2})])
def test_four_steps_equal_two_then_resume_two(tmp_path: Path, name, args):
    from conftest import tiny_config

    from mmm.encoders import read_checkpoint
    from mmm.train.pretrain import pretrain

    common = {"optim.name": name, "optim.args": args, "data.val": None, "model.encoder.attention": "sdpa",
              "model.encoder.dropout": 0.1, "model.encoder.attn_dropout": 0.1}
    first = pretrain(tiny_config(tmp_path / "first", **common, **{"trainer.max_steps": 2}))
    common["model.text.tokenizer_path"] = str(first.run_dir / "tokenizer")  # tokenizer training is not bit-reproducible
    straight = pretrain(tiny_config(tmp_path / "straight", **common, **{"trainer.max_steps": 4}))
    resumed = pretrain(tiny_config(tmp_path / "resumed", **common, **{
        "trainer.max_steps": 4, "trainer.ckpt_path": str(first.last_checkpoint)}))
    a, b = read_checkpoint(straight.last_checkpoint).state_dict, read_checkpoint(resumed.last_checkpoint).state_dict
    start = read_checkpoint(first.last_checkpoint).state_dict
    assert any(not torch.equal(start[k], a[k]) for k in a)  # steps 3 and 4 changed the weights
    for k in a:
        assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"
    opt_state = torch.load(resumed.last_checkpoint, map_location="cpu", weights_only=True)["optimizer_states"][0]
    key = {"adamw": "exp_avg_sq", "lamb": "exp_avg_sq", "sophia": "hessian"}[name]
    assert all(key in s for s in opt_state["state"].values())


def test_the_hutchinson_probe_reruns_the_step_with_its_keywords():
    """In a phased run the training step scores a phase's heads (model(batch, heads=...)); the probe re-ran the
    model without them, so the curvature of the MLM phase also took the idle CLM head's loss."""
    from mmm.optim.sophia import HutchinsonProbe

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 2.0]))

        def forward(self, x, heads=("a", "b")):
            losses = {"a": (self.w[0] * x) ** 2, "b": (self.w[1] * x) ** 3}
            return sum(losses[h] for h in heads), {}

    model = TwoHeads().train()
    probe = HutchinsonProbe(model)
    model(torch.tensor(3.0), heads=("a",)).__getitem__(0).backward()
    torch.manual_seed(0)
    (estimate,) = probe([model.w])
    # d2/dw0^2 of (w0 x)^2 = 2 x^2 = 18; w1 is not in the step's loss, so its curvature is 0
    assert estimate.tolist() == pytest.approx([18.0, 0.0])
