"""Optimizers, by name (``optim.name``): AdamW (default), LAMB and Sophia. Importing this package registers them.

:func:`build_optimizer` groups the model's parameters (decayed weights / exempt biases, norms and
declared tables, :func:`~mmm.train.param_groups.weight_decay_groups`) and creates the named entry
of :data:`~mmm.registry.OPTIMIZERS` with the shared settings (``lr``, ``betas``, ``eps``) and the
entry's own ``optim.args``. Every optimizer keeps its state in ``state_dict()``, which Lightning
writes into checkpoints, so a resumed run continues exactly.
"""
from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

from mmm.config import OptimConfig
from mmm.optim import adamw, lamb, sophia  # noqa: F401  (registers "adamw", "lamb", "sophia")
from mmm.registry import OPTIMIZERS, check_kwargs
from mmm.train.param_groups import weight_decay_groups


# the keywords build_optimizer passes itself, and where their values come from (optim.args may not set them)
OPTIMIZER_SUPPLIED = {"params": "the model's parameter groups", "lr": "optim.lr", "betas": "optim.betas",
                      "eps": "optim.eps", "weight_decay": "optim.weight_decay", "model": "the model being trained"}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """The optimizer ``cfg.name`` over ``model``'s trainable parameters.

    An entry that estimates curvature from the model itself (Sophia) declares ``needs_model = True``
    and is given the model.

    Args:
        model: the model to train.
        cfg: the optimizer settings (``name``, ``lr``, ``betas``, ``eps``, ``weight_decay``, ``args``).
    """
    factory = OPTIMIZERS.get(cfg.name)
    check_kwargs(factory, dict(cfg.args), f"optim.args (optimizer {cfg.name!r})", supplied=OPTIMIZER_SUPPLIED,
                 types=True)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **cfg.args)
    if getattr(factory, "needs_model", False):
        kwargs["model"] = model
    return factory(weight_decay_groups(model, cfg.weight_decay), **kwargs)
