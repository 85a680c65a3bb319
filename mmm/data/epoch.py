"""Epoch numbering and per-epoch seeding for streaming pipelines.

Every random choice of a pipeline built by :func:`mmm.data.stream.make_pipeline` (shard order,
sample shuffle buffer, and the masks of :mod:`mmm.modalities.text.pipeline`) is drawn from a generator seeded by
``(seed, epoch)`` -- plus ``(rank, worker)`` where the choice is local to one worker. The epoch
comes from an :class:`EpochCounter` shared by the pipeline's stages: it starts at an explicit
value and goes up by one on every pass over the pipeline *in the process that iterates it* (a
DataLoader worker, or the main process with ``num_workers=0``). So what a pass yields depends on
the seed, the epoch, the shard list and the worker layout only -- never on how often the object
was iterated before in this process, as long as whoever builds the pipeline sets ``start``.
"""
from __future__ import annotations

import itertools
import random
from typing import Any, Iterable, Iterator, List

import webdataset as wds
from torch.utils.data import IterableDataset


class EpochCounter:
    """The epoch of the current pass over a pipeline.

    Args:
        start: epoch of the first pass; each later pass (:meth:`begin`) is one more.

    One counter object is shared by all stages of one pipeline; pickling the pipeline into a
    DataLoader worker keeps it shared there, and each worker counts its own passes (with
    persistent workers a worker makes exactly one pass per ``iter(loader)``).
    """

    def __init__(self, start: int = 0) -> None:
        if start < 0:
            raise ValueError(f"EpochCounter: start must be >= 0, got {start}")
        self.start = start
        self.passes = 0
        self.epoch = start

    def begin(self) -> int:
        """Start the next pass; returns (and sets ``epoch`` to) its epoch number."""
        self.epoch = self.start + self.passes
        self.passes += 1
        return self.epoch

    def __repr__(self) -> str:
        return f"EpochCounter(start={self.start}, passes={self.passes}, epoch={self.epoch})"


class EpochSource(IterableDataset):
    """A pipeline's first stage: begins a new epoch, eagerly, each time a pass starts.

    ``webdataset.DataPipeline`` calls ``iter()`` on its first stage when a pass is created, before
    any later (lazy, generator) stage runs, so every later stage sees the new epoch.

    Args:
        source: the shard source (e.g. ``wds.SimpleShardList``).
        epochs: the counter shared with the pipeline's seeded stages.
    """

    def __init__(self, source: Iterable[Any], epochs: EpochCounter) -> None:
        super().__init__()
        self.source, self.epochs = source, epochs

    def __iter__(self) -> Iterator[Any]:
        self.epochs.begin()
        return iter(self.source)


def epoch_rng(kind: str, seed: int, epoch: int, per_worker: bool) -> random.Random:
    """A ``random.Random`` for one kind of choice in one epoch (string-seeded: stable across processes).

    Args:
        kind: what the generator is for (``"shards"``, ``"samples"``); different kinds never share a stream.
        seed: the pipeline seed.
        epoch: the epoch of the current pass.
        per_worker: also key by (rank, DataLoader worker); False gives every worker the same stream.
    """
    rank, worker = 0, 0
    if per_worker:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return random.Random(f"mmm/{kind}/{seed}/{epoch}/{rank}/{worker}")


class EpochResampledShards(IterableDataset):
    """Shards drawn with replacement, forever, from a generator seeded by ``(seed, epoch, rank, worker)``.

    Unlike ``webdataset.ResampledShards`` (whose generator is keyed by how many passes this process
    made), the draws of epoch ``e`` are the same in a fresh process that starts at epoch ``e``: what
    exact resume needs. Every rank and worker draws on its own, so no node/worker split follows.

    Args:
        urls: shard urls to draw from.
        seed: the pipeline seed.
        epochs: the pipeline's epoch counter (its :class:`EpochSource` begins the epoch first).
    """

    def __init__(self, urls: List[str], seed: int, epochs: EpochCounter) -> None:
        super().__init__()
        if not urls:
            raise ValueError("EpochResampledShards: empty shard list")
        self.urls, self.seed, self.epochs = list(urls), seed, epochs

    def __iter__(self) -> Iterator[dict]:
        rng = epoch_rng("resampled", self.seed, self.epochs.epoch, per_worker=True)
        while True:
            yield {"url": rng.choice(self.urls)}


def worker_share(total: int) -> int:
    """How many of a rank's ``total`` items this DataLoader worker yields so that, taken round-robin
    (as the DataLoader does), the rank yields exactly ``total``: ``total // W``, plus one for the first
    ``total % W`` workers."""
    _, _, worker, num_workers = wds.utils.pytorch_worker_info()
    return total // num_workers + (1 if worker < total % num_workers else 0)


def take_epoch_share(src: Iterator[Any], total: int) -> Iterator[Any]:
    """End a pass after this worker's :func:`worker_share` of ``total`` items (for endless, resampled
    streams: every rank's epoch is then exactly ``total`` items)."""
    yield from itertools.islice(src, worker_share(total))


def shuffle_shards(src: Iterator[dict], seed: int, epochs: EpochCounter) -> Iterator[dict]:
    """Yield all shards of ``src`` in an order drawn from ``(seed, epoch)`` -- identical on every
    rank and worker, so the node/worker split that follows stays disjoint."""
    shards = list(src)
    epoch_rng("shards", seed, epochs.epoch, per_worker=False).shuffle(shards)
    yield from shards


def shuffle_samples(src: Iterator[Any], bufsize: int, initial: int, seed: int, epochs: EpochCounter) -> Iterator[Any]:
    """``webdataset``'s buffer shuffle with a generator seeded by ``(seed, epoch, rank, worker)``."""
    rng = epoch_rng("samples", seed, epochs.epoch, per_worker=True)
    yield from wds.shuffle(bufsize, initial=initial, rng=rng)(src)



def worker_rng(seed: int, epoch: int) -> "np.random.Generator":
    """NumPy generator of this (seed, rank, DataLoader worker, epoch), for per-sample choices
    (masks, augmentation) in data workers."""
    import numpy as np
    import torch

    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    return np.random.default_rng([seed, rank, worker, epoch])


class SeededMap:
    """A pipeline stage applying ``fn(sample, rng)`` with a generator keyed by (seed, rank, worker, epoch).

    The epoch is read from ``epochs`` (shared with the pipeline, which begins one epoch per pass)
    when a pass starts; without a shared counter the stage counts its own passes from epoch 0.
    ``fixed`` uses epoch 0 on every pass (validation: the same masks every time). ``fn`` may
    return None to emit nothing for a sample, or a list to emit several.

    Args:
        fn: ``fn(sample, rng) -> output | None``.
        seed: the stage's seed (different stages should use different seeds or kinds).
        fixed: same draws on every pass.
        epochs: the pipeline's epoch counter, or None.
    """

    def __init__(self, fn, seed: int, fixed: bool = False, epochs: "EpochCounter | None" = None) -> None:
        self.fn, self.seed, self.fixed = fn, seed, fixed
        self.own_counter = epochs is None
        self.epochs = epochs if epochs is not None else EpochCounter()

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        if self.own_counter:
            self.epochs.begin()
        rng = worker_rng(self.seed, 0 if self.fixed else self.epochs.epoch)
        for sample in src:
            out = self.fn(sample, rng)
            if out is not None:
                yield out
