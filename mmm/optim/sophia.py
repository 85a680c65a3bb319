"""Sophia (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training"), with the Hutchinson estimator of the Hessian diagonal (Sophia-H).

Every ``hessian_every`` steps the diagonal of the loss Hessian is estimated on the current batch
and folded into an exponential moving average ``h``; every step moves each weight by a clipped
Newton-like ratio of the gradient's moving average ``m`` to it (Algorithm 3 of the paper)::

    w = w * (1 - lr * weight_decay)
    m = b1 m + (1 - b1) g
    h = b2 h + (1 - b2) h_hat                        (only on estimation steps)
    w = w - lr * clip(m / max(rho * h, eps), -1, 1)

Hutchinson's estimator: ``h_hat = u * (H u)`` with ``u`` a Rademacher vector (entries +-1), whose
expectation is ``diag(H)``; ``H u`` is a Hessian-vector product (a second backward pass through
the gradient), so it needs no labels and works for every objective. It needs double backward
through the encoder: the estimation pass runs attention on PyTorch's math kernel (the flash/
memory-efficient kernels and xformers have no second derivative). The paper's other estimator,
Gauss-Newton-Bartlett, needs labels sampled from each head's output distribution, which not every
mmm objective has. Estimates are averaged over data-parallel ranks, so every rank takes the same step.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mmm.optim.closure import evaluate_closure
from mmm.registry import OPTIMIZERS

HessianFn = Callable[[Sequence[torch.Tensor]], List[torch.Tensor]]


def hutchinson_diagonal(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """One Hutchinson sample ``u * (H u)`` per parameter (Rademacher ``u`` from torch's global RNG).

    Args:
        loss: a scalar built with autograd from ``params``.
        params: the tensors whose Hessian diagonal is estimated.

    Returns:
        One tensor per parameter, its shape; zeros for a parameter the loss does not reach.
    """
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    us = [torch.randint(0, 2, params[i].shape, device=params[i].device).to(params[i].dtype) * 2 - 1 for i in used]
    hvps = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used], grad_outputs=us,
                               allow_unused=True) if used else []
    out = [torch.zeros_like(p) for p in params]
    for i, u, hv in zip(used, us, hvps):
        if hv is not None:
            out[i] = (u * hv).detach()
    return out


class HutchinsonProbe:
    """Estimates a model's loss-Hessian diagonal on the batch of its latest training forward pass.

    A forward pre-hook keeps a reference to the last batch the model saw with gradients on (the
    training step's) and the keywords it came with (a phase's ``heads``); calling the probe runs the model on it
    again, as the step did, and returns
    :func:`hutchinson_diagonal` of its loss, averaged over data-parallel ranks.

    Args:
        model: a :class:`~mmm.model.MaskedModel` (``model(batch) -> (loss, outputs)``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.batch = None
        self.kwargs: Dict[str, Any] = {}
        model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if module.training and torch.is_grad_enabled() and args:
            # the step's keywords too: a phase's ``heads`` (the probe must score the loss the step trained)
            self.batch, self.kwargs = args[0], dict(kwargs)

    def __call__(self, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if self.batch is None:
            raise RuntimeError("Sophia: no training batch went through the model yet; the Hessian estimate runs on "
                               "the step's batch, after the step's forward pass")
        encoder = getattr(self.model, "encoder", None)
        if encoder is not None and hasattr(encoder, "backend_for"):
            backend = encoder.backend_for(params[0].device)
            if backend == "xformers":
                raise ValueError("optim.name sophia estimates the Hessian with a second backward pass, which xformers "
                                 "attention does not have; set model.encoder.attention to sdpa or math")
        with _math_attention(), torch.enable_grad():
            loss, _ = self.model(self.batch, **self.kwargs)
            estimates = hutchinson_diagonal(loss, params)
        self.batch, self.kwargs = None, {}  # the next estimate uses a later step's batch; do not keep this one alive
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for e in estimates:
                dist.all_reduce(e)
                e.div_(dist.get_world_size())
        return estimates


def _math_attention():
    """PyTorch SDPA on its math kernel (twice differentiable) for the duration of the estimate."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: the default kernels, which may lack double backward
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class Sophia(torch.optim.Optimizer):
    """Sophia's update (Algorithm 3 of Liu et al. 2023) with a pluggable Hessian-diagonal estimator.

    The estimator runs on optimizer steps 1, 1 + k, 1 + 2k, ... (``k = hessian_every``), counted once per
    :meth:`step` (``param_groups[0]["sophia_step"]``; a parameter's own count skips the steps it has no
    gradient, so the first one's count drifted in task mixtures); the count, ``m`` and ``h`` live in
    ``state_dict()``, so a resumed run estimates on the same steps. The estimate's double backward runs
    multi-threaded kernels whose sums are not bit-reproducible: a resumed Sophia run matches an uninterrupted
    one exactly with ``trainer.threads: 1`` (about 1e-5 apart otherwise).

    Args:
        params: parameters or groups (a group may set its own ``weight_decay``).
        hessian_fn: ``params -> one estimate of diag(H) per param`` (e.g. a :class:`HutchinsonProbe`).
        lr: learning rate (the largest per-coordinate step: the ratio is clipped to [-1, 1]).
        betas: decay of the gradient average ``m`` and of the Hessian average ``h``.
        rho: scale of ``h`` in the denominator (the paper's gamma); tune it with the estimator.
        eps: floor of the denominator (where ``h`` is ~0 or negative the step is ``lr * sign(m)``-like).
        weight_decay: default decoupled weight decay of groups that do not set one.
        hessian_every: estimate the Hessian every this many steps (the paper's k = 10).
    """

    def __init__(self, params: Iterable[Any], hessian_fn: HessianFn, lr: float = 1e-4,
                 betas: Tuple[float, float] = (0.965, 0.99), rho: float = 0.04, eps: float = 1e-12,
                 weight_decay: float = 0.0, hessian_every: int = 10) -> None:
        if lr <= 0 or rho <= 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"Sophia: need lr > 0, rho > 0, eps > 0, 0 <= betas < 1, weight_decay >= 0; got lr={lr}, "
                             f"rho={rho}, eps={eps}, betas={betas}, weight_decay={weight_decay}")
        if hessian_every < 1:
            raise ValueError(f"Sophia: hessian_every must be >= 1, got {hessian_every}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, eps=eps, weight_decay=weight_decay))
        self.hessian_fn = hessian_fn
        self.hessian_every = hessian_every

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = evaluate_closure(closure)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        first = self.param_groups[0]
        if "sophia_step" not in first:  # a new run, or a checkpoint from before the count: its parameters' largest
            first["sophia_step"] = max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)
        done = first["sophia_step"]
        first["sophia_step"] = done + 1
        if done % self.hessian_every == 0:  # steps 1, 1 + k, ... (counted from 1)
            by_id = {id(p): e for p, e in zip(params, self.hessian_fn(params))}
            for group in self.param_groups:
                b2 = group["betas"][1]
                for p in group["params"]:
                    if id(p) in by_id:
                        self._state(p)["hessian"].mul_(b2).add_(by_id[id(p)].to(p.dtype), alpha=1 - b2)
        for group in self.param_groups:
            b1 = group["betas"][0]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                m = state["exp_avg"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                denom = (state["hessian"] * group["rho"]).clamp_min(group["eps"])
                p.add_((m / denom).clamp(-1.0, 1.0), alpha=-group["lr"])
        return loss


def _sophia(params: Iterable[Any], lr: float, betas: Tuple[float, float], eps: float, model: nn.Module,
            rho: float = 0.04, hessian_every: int = 10) -> torch.optim.Optimizer:
    """:class:`Sophia` with a :class:`HutchinsonProbe` on ``model`` (Sophia-H).

    Args:
        params: parameter groups.
        lr: peak learning rate (the schedule scales it).
        betas: decay of the gradient and Hessian averages (the paper: 0.965, 0.99).
        eps: floor of the denominator.
        model: the model whose loss the probe differentiates twice (given by the builder).
        rho: scale of the Hessian average in the denominator (optim.args).
        hessian_every: steps between Hessian estimates (optim.args; the paper's k = 10).
    """
    return Sophia(params, HutchinsonProbe(model), lr=lr, betas=betas, rho=rho, eps=eps, hessian_every=hessian_every)


_sophia.needs_model = True  # build_optimizer passes the model
OPTIMIZERS.register("sophia")(_sophia)
