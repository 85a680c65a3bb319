"""The closure of ``Optimizer.step(closure)`` (PyTorch's contract), evaluated the same way by every optimizer here."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def evaluate_closure(closure: Optional[Callable[[], torch.Tensor]]) -> Optional[torch.Tensor]:
    """The loss ``closure()`` returns, computed with gradients enabled (``step`` itself runs under ``no_grad``);
    None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
