"""Held-out evaluation of masked language modeling: masked-token accuracy and perplexity.

Masks are drawn with a fixed seed, so every scorer (trained model, untrained model, unigram
frequency baseline) is graded on exactly the same hidden tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional

import numpy as np
import torch

from mmm.batch import PackedBatch
from mmm.data.stream import SampleErrorHandler, make_pipeline
from mmm.eval_mode import eval_mode
from mmm.modalities.text.pipeline import text_stages
from mmm.masking.base import TokenMasker
from mmm.model import MaskedModel
from mmm.modalities.text.tokenizer import TextTokenizer


@dataclass
class MLMScore:
    """Token-weighted held-out MLM metrics."""

    accuracy: float
    perplexity: float
    loss: float
    predictions: int
    sequences: int


def eval_batches(tokenizer: TextTokenizer, masker: TokenMasker, urls: List[str], *, max_len: int,
                 batch_size: int = 32, seed: int = 1234, max_batches: Optional[int] = None) -> Iterator[PackedBatch]:
    """The held-out batches, in shard order, with masks fixed by ``seed``."""
    stages = text_stages(tokenizer, masker, max_len=max_len, batch_size=batch_size, seed=seed,
                         handler=SampleErrorHandler(), fixed_masking=True)
    pipeline = make_pipeline(urls, stages=stages, shuffle_shards=False, shuffle_buffer=0)
    for i, batch in enumerate(pipeline):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def _score(loss_sum: float, correct: float, count: int, seqs: int, what: str) -> MLMScore:
    if count == 0:
        raise ValueError(f"no masked tokens found in {what}: nothing to evaluate")
    loss = loss_sum / count
    return MLMScore(correct / count, math.exp(min(loss, 50.0)), loss, count, seqs)


@torch.no_grad()
def evaluate_mlm(model: MaskedModel, tokenizer: TextTokenizer, masker: TokenMasker, urls: List[str], *,
                 max_len: int, batch_size: int = 32, seed: int = 1234, max_batches: Optional[int] = None,
                 objective: str = "mlm") -> MLMScore:
    """Score ``model``'s MLM head on the held-out shards ``urls``.

    Args:
        model: the masked model (put in eval mode here).
        tokenizer: its tokenizer.
        masker: which tokens to hide (drawn with ``seed``, identical across scorers).
        urls: held-out shard urls.
        max_len: sequence length used for chunking.
        batch_size: sequences per batch.
        seed: masking seed.
        max_batches: stop after this many batches (None = all).
        objective: name of the MLM objective in ``model``.
    """
    device = next(model.parameters()).device
    loss_sum, correct, count, seqs = 0.0, 0.0, 0, 0
    with eval_mode(model):
        for batch in eval_batches(tokenizer, masker, urls, max_len=max_len, batch_size=batch_size, seed=seed,
                                  max_batches=max_batches):
            _, outputs = model(batch.to(device))
            out = outputs[objective]
            loss_sum += float(out.loss) * out.count
            correct += float(out.metrics["acc"]) * out.count
            count += out.count
            seqs += batch.num_sequences
    return _score(loss_sum, correct, count, seqs, str(urls))


def unigram_log_probs(tokenizer: TextTokenizer, texts: Iterable[str], smoothing: float = 0.1) -> np.ndarray:
    """(V,) log-probabilities of each token's frequency in ``texts`` (additive smoothing)."""
    counts = np.full(tokenizer.vocab_size, smoothing)
    for text in texts:
        ids, _ = tokenizer.encode(text)
        np.add.at(counts, ids, 1)
    return np.log(counts / counts.sum())


def evaluate_unigram(log_probs: np.ndarray, tokenizer: TextTokenizer, masker: TokenMasker, urls: List[str], *,
                     max_len: int, batch_size: int = 32, seed: int = 1234,
                     max_batches: Optional[int] = None) -> MLMScore:
    """Score the context-free frequency baseline (always guess the most frequent token) on the same masks.

    A model that only learned token frequencies reaches this; beating it means context is used.

    Args:
        log_probs: (V,) unigram log-probabilities (:func:`unigram_log_probs` on the training split).
        tokenizer, masker, urls, max_len, batch_size, seed, max_batches: as :func:`evaluate_mlm`.
    """
    best = int(np.argmax(log_probs))
    loss_sum, correct, count, seqs = 0.0, 0.0, 0, 0
    for batch in eval_batches(tokenizer, masker, urls, max_len=max_len, batch_size=batch_size, seed=seed,
                              max_batches=max_batches):
        labels = batch.targets["text"].labels.numpy()
        loss_sum += float(-log_probs[labels].sum())
        correct += float((labels == best).sum())
        count += labels.size
        seqs += batch.num_sequences
    return _score(loss_sum, correct, count, seqs, str(urls))
