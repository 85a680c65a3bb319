"""Multi-task training data: one stream per task, a seeded task draw per step, exact resume
(the data module of every run is :class:`mmm.train.datamodule.StreamDataModule`; this module
holds the mixture's parts).

UNITER (Chen et al. 2020) trains several objectives by sampling one task per mini-batch with fixed
ratios (itm:mlm:mrfr:mrc-kl = 2:2:1:1); mixtures across modalities (text, images, audio, DNA
and image-text pairs into one shared encoder) work the same way. Here:

* every task has its own WebDataset stream (its shards, stages, batch size and DataLoader
  workers), cycled forever: when one epoch of a task's shards ends, its next epoch begins (each
  epoch seeded by ``(data.seed, epoch, rank, worker)`` as in a single-task run); with
  ``data.resampled`` every task's stream draws its shards with replacement instead, on every
  rank and worker on its own (as a resampled single-task stream), and never ends;
* the task of global batch ``i`` is a pure function of ``(data.seed, i)`` and the weights
  (:class:`TaskSampler`), identical on every rank, so all ranks train the same heads at a step;
* the data position is the number of batches trained, ``k``. Resuming recomputes how many of
  them each task had (``TaskSampler.counts(k)``), fast-forwards every task's stream by its count
  (data work only, no model compute) and continues with batch ``k``: the batches after a resume
  are exactly those of an uninterrupted run, provided the shards and settings are unchanged.

Without ``data.resampled`` a mixture has no epochs of its own: it runs for ``trainer.max_steps``.
With it, an epoch is ``data.epoch_batches`` mixture batches per rank (global batches ``[e·n, (e+1)·n)``),
so every rank ends its epochs together. Per-task batch and sample counts are logged
(``train/task_batches/<task>``, ``train/task_samples/<task>``), and the bad samples/shards every
task's workers met, summed, as ``train/data_errors`` (``batch.extras["data_errors_total"]``, as in
a single-task run).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from mmm.batch import PackedBatch
from mmm.data.stream import SampleError, WorkerErrorCounts
from mmm.host_reads import on_host
from mmm.train.host_metrics import log_host_value
from mmm.train.loaders import ErrorTally, enforce_error_limit, shutdown_workers

logger = logging.getLogger("mmm.train")

_BLOCK = 4096


class TagTask:
    """A pipeline stage setting ``batch.task`` on every batch (a class: pipelines are pickled into workers)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, src: Iterator[PackedBatch]) -> Iterator[PackedBatch]:
        for batch in src:
            batch.task = self.name
            yield batch


class TaskSampler:
    """Draws the task of each global batch index from ``(seed, index)``: random access, no state.

    Args:
        weights: sampling weight per task (> 0); task ``j`` is drawn with probability
            ``weights[j] / sum(weights)``.
        seed: the data seed.
    """

    def __init__(self, weights: Sequence[float], seed: int) -> None:
        if not weights or any(not w > 0 for w in weights):
            raise ValueError(f"TaskSampler: weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        self.cumulative = np.cumsum(np.asarray(weights, dtype=np.float64) / total)
        self.cumulative[-1] = 1.0
        self.seed = seed
        self._cache: Dict[int, np.ndarray] = {}

    def _block(self, b: int) -> np.ndarray:
        if b not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            u = np.random.default_rng([self.seed, 0x6D6978, b]).random(_BLOCK)
            self._cache[b] = np.searchsorted(self.cumulative, u, side="right").clip(max=len(self.cumulative) - 1)
        return self._cache[b]

    def __call__(self, index: int) -> int:
        """The task (0-based) of global batch ``index``."""
        return int(self._block(index // _BLOCK)[index % _BLOCK])

    def counts(self, n: int) -> np.ndarray:
        """How many of the first ``n`` batches each task had."""
        out = np.zeros(len(self.cumulative), dtype=np.int64)
        full, rest = divmod(n, _BLOCK)
        for b in range(full):
            out += np.bincount(self._block(b), minlength=len(out))
        if rest:
            out += np.bincount(self._block(full)[:rest], minlength=len(out))
        return out


@dataclass
class TaskData:
    """One task's data in a mixture.

    Args:
        name: task name (batches are tagged with it).
        weight: sampling weight.
        train_urls: training shards.
        val_urls: validation shards, or None.
        make_stages: ``make_stages(seed=, handler=, fixed_masking=, epochs=, train=)`` → stages to
            :class:`~mmm.batch.PackedBatch` (tagging included); with several ranks the training stream also passes
            ``ranks=`` (partial contrastive batches are then dropped: :mod:`mmm.train.gathered_batches`).
        settings: what the task's stream depends on besides shards and seeds (compared on resume).
    """

    name: str
    weight: float
    train_urls: List[str]
    val_urls: Optional[List[str]]
    make_stages: Callable[..., List]
    settings: Dict[str, Any]


class TaskStream:
    """A task's training batches, epoch after epoch, forever.

    Args:
        name: task name (for messages).
        build: returns a DataLoader whose passes are epochs 0, 1, 2, ...
    """

    def __init__(self, name: str, build: Callable[[], DataLoader]) -> None:
        self.name, self._build = name, build
        self._loader: Optional[DataLoader] = None
        self.samples_drawn = 0
        self.errors = ErrorTally()  # bad samples/shards its DataLoaders' workers met

    def batches(self, skip: int = 0) -> Iterator[PackedBatch]:
        """Batches from epoch 0 on, the first ``skip`` of them read but not yielded (resume)."""
        self.close()
        self._loader = loader = self._build()
        self.errors.new_loader()
        produced = 0
        while True:
            in_epoch = 0
            self.errors.new_pass()  # data.max_errors counts each pass over the task's shards
            for batch in loader:
                self.errors.add(batch)
                if isinstance(batch, WorkerErrorCounts):  # a worker's late error counts, not a batch
                    continue
                in_epoch += 1
                produced += 1
                self.samples_drawn += batch.num_sequences
                if produced > skip:
                    yield batch
            if in_epoch == 0:
                raise SampleError(f"task {self.name!r}: its training shards yielded no batch in a whole epoch "
                                   f"(empty shards, or every sample was bad and skipped)")

    def close(self) -> None:
        """Stop the DataLoader's persistent workers."""
        loader, self._loader = self._loader, None
        shutdown_workers(loader)


class MixtureLoader:
    """The train loader of a multi-task run: task ``sampler(i)``'s next batch at global batch ``i``.

    Args:
        streams: one :class:`TaskStream` per task.
        names: task names (same order).
        sampler: the task draw.
        start: batches already trained (restored from a checkpoint, or 0).
        consumed: running count of batches the trainer finished (not the prefetched one); None =
            count yielded batches.
        epoch_batches: end each ``iter()`` at the next multiple of this many global batches (an
            epoch); None = never end.

    Every batch gets ``extras["data_errors_total"]``: the bad samples/shards all task streams met so far.
    """

    def __init__(self, streams: List[TaskStream], names: List[str], sampler: TaskSampler, start: int,
                 consumed: Optional[Callable[[], int]] = None, epoch_batches: Optional[int] = None,
                 max_errors: Optional[int] = None) -> None:
        self.streams, self.names, self.sampler = streams, names, sampler
        self.max_errors = max_errors  # data.max_errors over every task's workers together (enforce_error_limit)
        self._start, self._consumed, self.epoch_batches = start, consumed, epoch_batches
        self._base: Optional[int] = None
        self._yielded = 0
        self._iterators: Optional[List[Iterator[PackedBatch]]] = None
        self._next = -1  # the global batch the live task iterators continue with

    def position(self) -> int:
        """Batches trained so far."""
        if self._base is None:
            return self._start
        used = self._yielded if self._consumed is None else self._consumed() - self._base
        return self._start + used

    def data_errors(self) -> int:
        """Bad samples/shards met so far by every task stream's DataLoader workers."""
        return sum(s.errors.total for s in self.streams)

    def __iter__(self) -> Iterator[PackedBatch]:
        start = self.position()
        if self._iterators is None or self._next != start:  # first pass, or batches were left unused: rebuild
            counts = self.sampler.counts(start)
            if start:
                logger.info("resuming the task mixture at batch %d: fast-forwarding %s (data work only)", start,
                            ", ".join(f"{n}: {int(c)}" for n, c in zip(self.names, counts)))
            self._iterators = [s.batches(skip=int(c)) for s, c in zip(self.streams, counts)]
        iterators = self._iterators  # after a used-up epoch the streams simply continue
        self._start, self._yielded = start, 0
        self._base = self._consumed() if self._consumed is not None else 0
        end = None if self.epoch_batches is None else (start // self.epoch_batches + 1) * self.epoch_batches
        i = self._next = start
        while end is None or i < end:
            t = self.sampler(i)
            with on_host():  # the data pipeline is host work (here when num_workers is 0), never a device read
                batch = next(iterators[t])
            enforce_error_limit([s.errors for s in self.streams], self.max_errors)
            batch.extras["data_errors_total"] = self.data_errors()
            self._yielded += 1
            i = self._next = i + 1
            yield batch

    def source_counts(self) -> Dict[str, Dict[str, int]]:
        """Per task: batches trained (exact) and samples drawn from its stream (incl. prefetched)."""
        batches = self.sampler.counts(self.position())
        return {n: {"batches": int(b), "samples": s.samples_drawn}
                for n, b, s in zip(self.names, batches, self.streams)}

    def close(self) -> None:
        self._iterators = None
        for s in self.streams:
            s.close()


class MixtureMonitor(L.Callback):
    """Logs per-task batch and sample counts of a multi-task run's data module every ``every`` steps."""

    def __init__(self, every: int = 10) -> None:
        self.every = max(1, every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        if getattr(dm, "sampler", None) is None or (trainer.global_step % self.every):
            return
        for name, c in dm.source_counts().items():
            log_host_value(pl_module, f"train/task_batches/{name}", c["batches"])
            log_host_value(pl_module, f"train/task_samples/{name}", c["samples"])
