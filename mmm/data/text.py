"""Text stages of the streaming pipeline: decode → tokenize (chunk, never drop) → mask → pack.

Each stage is a generator wrapped with ``webdataset.pipelinefilter`` so it composes with the
shard → sample part built by :func:`mmm.data.stream.make_pipeline`.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional

import numpy as np
import torch
import webdataset as wds

from mmm.batch import PackedBatch, pack_masked
from mmm.data.epoch import EpochCounter
from mmm.masking.base import MaskedTokens, TokenMasker
from mmm.modalities.text_tokenizer import TextTokenizer

Handler = Callable[[Exception], bool]


def _decode_text(src: Iterator[dict], handler: Handler) -> Iterator[str]:
    for sample in src:
        key = sample.get("__key__", "?")
        url = sample.get("__url__", "?")
        try:
            if "txt" not in sample:
                fields = sorted(k for k in sample if not k.startswith("__"))
                raise ValueError(f"sample {key}: no 'txt' field (has {fields})", url)
            try:
                text = sample["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"sample {key}: 'txt' is not UTF-8 ({e})", url) from None
        except ValueError as e:
            if handler(e):  # counts; raises unless skipping is configured
                continue
            raise
        yield text


def _tokenize(src: Iterator[str], tokenizer: TextTokenizer, max_len: int) -> Iterator[tuple]:
    for text in src:
        yield from tokenizer.encode_chunks(text, max_len)


def _worker_rng(seed: int, epoch: int) -> np.random.Generator:
    """Masking generator of this (seed, rank, DataLoader worker, epoch)."""
    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    return np.random.default_rng([seed, rank, worker, epoch])


class _Mask:
    """Masking stage with a generator seeded per (seed, rank, worker, epoch).

    The epoch is read from ``epochs`` (shared with the pipeline, which begins one epoch per pass)
    when a pass starts; without a shared counter the stage counts its own passes from epoch 0.
    ``fixed`` uses epoch 0 on every pass.
    """

    def __init__(self, masker: TokenMasker, seed: int, fixed: bool, epochs: Optional[EpochCounter]) -> None:
        self.masker, self.seed, self.fixed = masker, seed, fixed
        self.own_counter = epochs is None
        self.epochs = epochs if epochs is not None else EpochCounter()

    def __call__(self, src: Iterator[tuple]) -> Iterator[MaskedTokens]:
        if self.own_counter:
            self.epochs.begin()
        rng = _worker_rng(self.seed, 0 if self.fixed else self.epochs.epoch)
        for ids, word_ids in src:
            yield self.masker(ids, word_ids, rng)


def text_stages(tokenizer: TextTokenizer, masker: TokenMasker, *, max_len: int, batch_size: int, seed: int,
                handler: Handler, fixed_masking: bool = False, epochs: Optional[EpochCounter] = None) -> List:
    """Pipeline stages turning text shard samples into :class:`~mmm.batch.PackedBatch` es.

    Args:
        tokenizer: trained text tokenizer.
        masker: token masker (registry entry).
        max_len: longest sequence; longer text is split into several sequences.
        batch_size: sequences per packed batch (the last batch of a pass may be smaller).
        seed: masking seed.
        handler: bad-sample handler (counts, and skips or raises).
        fixed_masking: the same masks on every pass (validation).
        epochs: the epoch counter of the pipeline these stages go into (pass the same object to
            :func:`~mmm.data.stream.make_pipeline`) so masks are keyed by its epoch; None: the
            masking stage counts its own passes from epoch 0.
    """
    return [
        wds.pipelinefilter(_decode_text)(handler),
        wds.pipelinefilter(_tokenize)(tokenizer, max_len),
        _Mask(masker, seed, fixed_masking, epochs),
        wds.batched(batch_size, collation_fn=pack_masked, partial=True),
    ]
