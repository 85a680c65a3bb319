"""Held-out evaluation of masked language modeling: masked-token accuracy and perplexity.

Masks are drawn with a fixed seed, so two models (e.g. trained vs. untrained) are scored on
exactly the same hidden tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from mmm.data.stream import SampleErrorHandler, make_pipeline
from mmm.data.text import text_stages
from mmm.masking.base import TokenMasker
from mmm.model import MaskedModel
from mmm.modalities.text_tokenizer import TextTokenizer


@dataclass
class MLMScore:
    """Token-weighted held-out MLM metrics."""

    accuracy: float
    perplexity: float
    loss: float
    predictions: int
    sequences: int


@torch.no_grad()
def evaluate_mlm(model: MaskedModel, tokenizer: TextTokenizer, masker: TokenMasker, urls: List[str], *,
                 max_len: int, batch_size: int = 32, seed: int = 1234, max_batches: Optional[int] = None,
                 objective: str = "mlm") -> MLMScore:
    """Score ``model``'s MLM head on every sequence of the shards in ``urls``.

    Args:
        model: the masked model (put in eval mode here).
        tokenizer: its tokenizer.
        masker: which tokens to hide (drawn with ``seed``, identical across models).
        urls: held-out shard urls.
        max_len: sequence length used for chunking.
        batch_size: sequences per batch.
        seed: masking seed.
        max_batches: stop after this many batches (None = all).
        objective: name of the MLM objective in ``model``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stages = text_stages(tokenizer, masker, max_len=max_len, batch_size=batch_size, seed=seed,
                         handler=SampleErrorHandler(), fixed_masking=True)
    pipeline = make_pipeline(urls, stages=stages, shuffle_shards=False, shuffle_buffer=0)
    loss_sum, correct, count, seqs = 0.0, 0.0, 0, 0
    for i, batch in enumerate(pipeline):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        _, outputs = model(batch)
        out = outputs[objective]
        loss_sum += float(out.loss) * out.count
        correct += float(out.metrics["acc"]) * out.count
        count += out.count
        seqs += batch.num_sequences
    model.train(was_training)
    if count == 0:
        raise ValueError(f"no masked tokens found in {urls}: nothing to evaluate")
    loss = loss_sum / count
    return MLMScore(correct / count, math.exp(min(loss, 50.0)), loss, count, seqs)
