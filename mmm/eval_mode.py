"""``eval_mode(model)``: run a block in eval mode and give the model back in the mode it came in.

Evaluations called during training (validation probes, retrieval scores, held-out perplexity) must
not leave dropout switched off for the steps that follow, also when they raise.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; its previous ``training`` flag restored after, even on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
