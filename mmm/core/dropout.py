"""Dropout (Srivastava et al. 2014) with a cheaper random mask on CPU.

``F.dropout`` on CPU draws one 32-bit Mersenne-Twister number per element (``bernoulli_``) and
then scales a float mask: about 8% of a BERT-base training step at dropout 0.1 (hidden and
attention dropout together), more than all LayerNorms and GELUs of the step. Here each 64-bit draw
of the same generator (torch's default CPU generator, so ``torch.manual_seed`` still makes runs
reproducible) gives four 16-bit uniform numbers, and an element is kept when its number is at or
above a threshold: forward and backward take about half the time. On other devices, and inside
``torch.compile``, :func:`dropout` is ``F.dropout``.

The drop probability is rounded to a multiple of 1/65536 (``p = 0.1`` drops with probability
6554/65536 = 0.1000061); kept elements are scaled by ``1 / (1 - rounded p)``, so the expectation
of every output equals its input (up to the scale's rounding in the tensor's dtype, as in
``F.dropout``). As in ``F.dropout`` on CPU, the output is the input times
a scaled float mask, which autograd keeps for backward.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

MASK_LEVELS = 1 << 16
"""Resolution of the CPU mask: each element's uniform number takes one of this many values."""


def rounded_probability(p: float) -> float:
    """The drop probability the CPU mask realises for ``p`` (``p`` rounded to a multiple of 1/65536)."""
    return round(p * MASK_LEVELS) / MASK_LEVELS


def keep_mask(shape: Tuple[int, ...], p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A CPU boolean mask of ``shape``: True (keep) with probability ``1 - rounded_probability(p)``.

    Draws ``ceil(numel / 4)`` full-range 64-bit integers from ``generator`` (default: torch's CPU
    generator) and reads them as 16-bit numbers uniform on [-32768, 32767].
    """
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64)
    words.random_(-(1 << 63), None, generator=generator)  # every 64-bit pattern equally likely
    threshold = int(rounded_probability(p) * MASK_LEVELS) - MASK_LEVELS // 2  # P(number < threshold) = rounded p
    return (words.view(torch.int16)[:numel] >= threshold).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the cheaper mask on CPU (see the module docstring)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point() or torch.compiler.is_compiling():
        return F.dropout(x, p, training)  # fused on GPU; a compiled graph generates its own mask
    rounded = rounded_probability(p)
    if rounded >= 1.0:
        return x * 0.0
    if rounded == 0.0:
        return x
    scaled = keep_mask(tuple(x.shape), p).to(x.dtype).mul_(1.0 / (1.0 - rounded))  # no grad: autograd keeps it
    return x * scaled


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the cheaper CPU mask of :func:`dropout` (same attribute ``p``, no state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
