"""AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay -- mmm's default optimizer.

PyTorch's fused implementation: one kernel per step on CPU and CUDA instead of several small ops
per tensor.
"""
from __future__ import annotations

from typing import Any, Iterable, Tuple

import torch

from mmm.registry import OPTIMIZERS


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable[Any], lr: float, betas: Tuple[float, float], eps: float,
          fused: bool = True) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` over parameter groups that carry their own ``weight_decay``.

    Args:
        params: parameter groups.
        lr: peak learning rate (the schedule scales it).
        betas: moment decay rates.
        eps: denominator epsilon.
        fused: the fused kernel (optim.args; false = PyTorch's per-tensor loop).
    """
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, fused=fused)
