"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes").

Adam's bias-corrected direction plus decoupled weight decay, rescaled per tensor by a trust ratio
``||w|| / ||update||``, so every layer moves by a fraction of its own norm whatever the gradient
scale -- what lets BERT train at batch 32k/64k. The trust ratio is 1 where either norm is 0
(a zero-initialised bias, a zero update), and, as in NVIDIA's apex ``FusedLAMB``, timm's ``Lamb`` and
Google's ``exclude_from_layer_adaptation``, for the parameters without weight decay (biases, LayerNorm,
position tables): those take Adam's step. Applied to them, a zero-initialised bias got a trust of about
``lr`` from its second step on and stopped moving. ``always_adapt`` applies it to every tensor (the
paper's Algorithm 2 read literally). Parameter groups carry their own ``weight_decay``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Tuple

import torch

from mmm.optim.closure import evaluate_closure
from mmm.registry import OPTIMIZERS


class Lamb(torch.optim.Optimizer):
    """Layer-wise adaptive moments (LAMB, Algorithm 2 of You et al. 2020, with Adam's bias correction).

    Per tensor ``w`` with gradient ``g`` at step ``t``::

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        w = w - lr * (||w|| / ||r||) * r

    Args:
        params: parameters or groups (a group may set its own ``weight_decay``).
        lr: learning rate.
        betas: moment decay rates.
        eps: denominator epsilon.
        weight_decay: default decoupled weight decay of groups that do not set one.
        always_adapt: the trust ratio for every tensor; False (apex, timm): only where weight decay applies.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, always_adapt: bool = False) -> None:
        if lr <= 0 or eps < 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"Lamb: need lr > 0, eps >= 0, 0 <= betas < 1, weight_decay >= 0; got lr={lr}, "
                             f"eps={eps}, betas={betas}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      always_adapt=bool(always_adapt)))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                g = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + group["eps"])  # (same shape as p)
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                if not (group["weight_decay"] or group.get("always_adapt", False)):  # biases, LayerNorm: Adam's step
                    p.add_((update * -group["lr"]).to(p.dtype))
                    continue
                w_norm, u_norm = p.float().norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_((update * (-group["lr"] * trust)).to(p.dtype))
        return loss


@OPTIMIZERS.register("lamb")
def lamb(params: Iterable[Any], lr: float, betas: Tuple[float, float], eps: float,
         always_adapt: bool = False) -> torch.optim.Optimizer:
    """:class:`Lamb` over parameter groups that carry their own ``weight_decay``.

    Args:
        params: parameter groups.
        lr: peak learning rate (the schedule scales it); LAMB recipes use larger rates than Adam.
        betas: moment decay rates.
        eps: denominator epsilon.
        always_adapt: the trust ratio for the parameters without weight decay too (``optim.args``).
    """
    return Lamb(params, lr=lr, betas=betas, eps=eps, always_adapt=always_adapt)
