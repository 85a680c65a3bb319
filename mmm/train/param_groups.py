"""Optimizer parameter groups: which weights are decayed.

Decoupled weight decay (Loshchilov & Hutter 2019) pulls weights towards zero. Biases and
normalisation gains (every tensor with fewer than two dimensions) are not decayed, as in BERT,
and neither are the learned tokens and position tables that a module declares through timm's
``no_weight_decay()`` convention (MAE and ViT exclude ``cls_token``, ``mask_token`` and
``pos_embed``). A module declares names relative to itself; nothing is chosen by matching
substrings of parameter names.
"""
from __future__ import annotations

from typing import Any, Dict, List, Set

from torch import nn


def no_weight_decay_names(model: nn.Module) -> Set[str]:
    """Full names of the parameters that modules of ``model`` declare exempt from weight decay."""
    names: Set[str] = set()
    params = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if not callable(declare):
            continue
        for local in declare():
            full = f"{prefix}.{local}" if prefix else local
            if full in params:  # a declared table may be a buffer in this configuration (fixed sin-cos)
                names.add(full)
    return names


def weight_decay_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups: decayed weights, and biases/norms/declared tokens with decay 0.

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: the decay of the first group.
    """
    exempt = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
