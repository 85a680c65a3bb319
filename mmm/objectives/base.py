"""What every objective head returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch


@dataclass
class ObjectiveOutput:
    """One objective's result for a batch.

    Args:
        loss: scalar loss (mean over this objective's predictions).
        metrics: extra scalars to log (e.g. ``acc``), detached.
        count: number of predictions the loss averages over (for exact aggregation).
    """

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0
