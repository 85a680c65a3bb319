"""Training streams: numbered epochs with exact mid-epoch resume (:class:`ResumableLoader`), error tallies.

An *epoch* is one pass over the training shards. Every random choice of the training stream
(shard order, shuffle buffer, masks) is a function of ``(data.seed, epoch, rank, worker)``
(:mod:`mmm.data.epoch`), so epoch ``e`` yields the same batches in the same order in any process
that builds it with the same shards and settings. The data module saves its *data position*
``{"epoch": e, "batches_done": k}`` (``k`` = batches of epoch ``e`` already trained on) in every
checkpoint; on resume its :class:`ResumableLoader` rebuilds epoch ``e`` and discards its first ``k`` batches before handing
batches to Lightning. The fast-forward is data work only (read, tokenize, mask, pack; no model
compute): O(k) batches. That is the price of exactness by construction: skipping per worker
(each worker dropping its share of ``k``) would be cheaper but is wrong as soon as workers'
streams end at different lengths, because the DataLoader's round-robin order then depends on
when each worker ran out.

With several ranks, every rank must take the same number of batches per epoch (a rank that runs
out first would end its epoch while the others go on: desynchronised epochs, and a hang at the
end of training). Two ways hold that: ``data.resampled`` (every rank draws shards with
replacement and an epoch is exactly ``data.epoch_batches`` batches per rank), or, for one-pass
epochs, the ranks agree before each batch that all of them still have one (one tiny all-reduce
of a flag per batch, :class:`ResumableLoader`'s ``agree``): the epoch ends on every rank when the
first rank's share is used up, and the rest of the longer ranks' shares is left out of that epoch.
The cut depends only on the ranks' stream lengths, so it is the same when an epoch is replayed.

Lightning (2.6) itself restores only its counters (global step, batch index, epoch) for a train
loader without ``state_dict``/``load_state_dict`` and starts a fresh iterator: it neither skips
nor replays batches, so the skipping happens here.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from collections import Counter
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

from torch.utils.data import DataLoader

from mmm.batch import PackedBatch
from mmm.config import DataConfig
from mmm.data.errors import SampleError
from mmm.data.stream import WorkerErrorCounts
from mmm.host_reads import on_host

logger = logging.getLogger("mmm.train")


def check_resampling(cfg: DataConfig) -> None:
    """Refuse ``data.resampled`` without ``data.epoch_batches`` and the reverse (single- and multi-task runs)."""
    if cfg.resampled and cfg.epoch_batches is None:
        raise ValueError("data.resampled: true needs data.epoch_batches (batches per epoch on each rank): a "
                         "resampled stream never ends by itself")
    if not cfg.resampled and cfg.epoch_batches is not None:
        raise ValueError("data.epoch_batches applies to data.resampled: true only (without resampling an epoch "
                         "is one pass over the shards)")
    if cfg.epoch_batches is not None and cfg.epoch_batches < 1:
        raise ValueError(f"data.epoch_batches must be >= 1, got {cfg.epoch_batches}")


def shutdown_workers(loader: Optional[DataLoader]) -> None:
    """Stop a DataLoader's persistent workers now (they would otherwise live until it is collected)."""
    it = getattr(loader, "_iterator", None)
    if it is not None:
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        loader._iterator = None


class ErrorTally:
    """Bad samples/shards met by a training stream's DataLoaders so far, summed over their workers.

    Reads the running per-worker counts that :func:`mmm.data.stream.stamp_error_counts` puts on
    batches (``extras["data_errors"]``); a DataLoader's workers restart their counts, so call
    :meth:`new_loader` whenever the stream builds a new one.
    """

    def __init__(self) -> None:
        self._base = 0  # errors met by DataLoaders already closed
        self._base_types: Counter = Counter()
        self._seen: Dict[int, int] = {}  # worker -> its latest running count, current DataLoader
        self._types: Dict[int, Dict[str, int]] = {}  # worker -> its latest counts by error type
        self._pass_total, self._pass_types = 0, Counter()  # the counts when the current pass began

    @property
    def total(self) -> int:
        """Errors met so far, every pass."""
        return self._base + sum(self._seen.values())

    @property
    def in_pass(self) -> int:
        """Errors met in the current pass (since :meth:`new_pass`)."""
        return self.total - self._pass_total

    @property
    def in_pass_by_type(self) -> Counter:
        out = self.by_type
        out.subtract(self._pass_types)
        return +out

    def new_pass(self) -> None:
        """A new pass over the data (an epoch) begins; the previous pass's counts are all in (its workers' last
        counts arrive before its DataLoader iterator ends)."""
        self._pass_total, self._pass_types = self.total, self.by_type

    @property
    def by_type(self) -> Counter:
        out = Counter(self._base_types)
        for types in self._types.values():
            out.update(types)
        return out

    def add(self, batch: Any) -> None:
        """Note the worker count a batch carries (if any)."""
        extras = getattr(batch, "extras", None)
        info = extras.get("data_errors") if isinstance(extras, dict) else None
        if info is not None:
            self._seen[int(info["worker"])] = int(info["total"])
            self._types[int(info["worker"])] = dict(info.get("by_type", {}))

    def new_loader(self) -> None:
        """The stream starts a new DataLoader: keep what the old one's workers met."""
        self._base, self._base_types = self.total, self.by_type
        self._seen, self._types = {}, {}


def enforce_error_limit(tallies: Iterable[ErrorTally], max_errors: Optional[int]) -> None:
    """Stop once the bad samples/shards of every worker together exceed ``data.max_errors`` in one pass.

    Each worker's handler stops at the limit on its own count; this is the same limit on the sum over
    workers (and tasks), so the outcome does not depend on how the bad shards fall across workers. Counts
    are per pass over the data (:meth:`ErrorTally.new_pass`, an epoch; in a task mixture each task's
    current pass over its shards): the same bad sample met again in every epoch does not stop a long run,
    and a resumed run, which replays its epoch from the start, stops where the uninterrupted one would.

    Raises:
        SampleError: more than ``max_errors`` in total.
    """
    if max_errors is None:
        return
    tallies = list(tallies)
    total = sum(t.in_pass for t in tallies)
    if total > max_errors:
        by_type: Counter = Counter()
        for t in tallies:
            by_type.update(t.in_pass_by_type)
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(by_type.items())) or "none"
        raise SampleError(f"too many bad samples in one pass over the training data: {total} > data.max_errors="
                          f"{max_errors}, summed over the DataLoader workers ({kinds}); the workers' log lines "
                          f"above name them")


@dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands: ``batches_done`` batches of ``epoch`` were trained on."""

    epoch: int
    batches_done: int


class _Pass:
    """Book-keeping of one pass (epoch) of a :class:`ResumableLoader`."""

    def __init__(self, epoch: int, skipped: int, base: int) -> None:
        self.epoch, self.skipped, self.base = epoch, skipped, base
        self.yielded = 0
        self.exhausted = False


class ResumableLoader:
    """The train loader handed to Lightning: numbered epochs and a position that can be restored.

    Each ``iter()`` starts at :meth:`position`: the next epoch after a pass that was used up, or
    the same epoch again (fast-forwarded past the batches already trained on) after a pass that
    was abandoned or restored from a checkpoint. Nothing happens until the first batch is
    requested, so an ``iter()`` that is never consumed (Lightning probes iterables that way)
    costs nothing. The underlying DataLoader (and its persistent workers) is kept while epochs
    follow each other and rebuilt at the right epoch otherwise.

    Args:
        build: ``build(epoch)`` returns a DataLoader whose passes are epochs ``epoch``, ``epoch + 1``, ...
        start: where the first pass begins.
        consumed: returns a running count of batches the trainer has finished with (any origin,
            only differences are used); None counts a batch as finished once it is yielded. It
            must not count prefetched batches: Lightning fetches one batch ahead.
        strict: when a restored position lies beyond the end of its epoch, raise (True) or warn
            and go on with the next epoch (False, used when the data settings changed).
        agree: ``agree(have_batch) -> bool`` is True when every rank has a batch (a collective:
            every rank calls it once per batch it asks for, the last call of an epoch included);
            the epoch ends on every rank as soon as it is False. None: a single rank, or ranks
            whose epochs have equal lengths by construction (resampled mode).
        max_errors: ``data.max_errors`` under ``data.skip_bad`` (:func:`enforce_error_limit`); None: no limit.

    Batches that carry their worker's running error counts (``extras["data_errors"]``, see
    :func:`mmm.data.stream.stamp_error_counts`) are tallied: each yielded batch gets
    ``extras["data_errors_total"]``, the bad samples/shards this loader's DataLoaders met so far,
    summed over their workers (including batches skipped while fast-forwarding).
    """

    def __init__(self, build: Callable[[int], DataLoader], start: DataPosition,
                 consumed: Optional[Callable[[], int]] = None, strict: bool = True,
                 agree: Optional[Callable[[bool], bool]] = None, max_errors: Optional[int] = None) -> None:
        if start.epoch < 0 or start.batches_done < 0:
            raise ValueError(f"ResumableLoader: bad start position {start}")
        self._build, self._start, self._consumed, self.strict = build, start, consumed, strict
        self._agree, self._max_errors = agree, max_errors
        self._loader: Optional[DataLoader] = None
        self._loader_next_epoch = -1
        self._pass: Optional[_Pass] = None
        self._errors = ErrorTally()

    def position(self) -> DataPosition:
        """Epoch and batches of it trained on so far (a used-up epoch reads as the next one at 0)."""
        p = self._pass
        if p is None:
            return self._start
        used = p.yielded if self._consumed is None else self._consumed() - p.base
        if p.exhausted and used >= p.yielded:
            return DataPosition(p.epoch + 1, 0)
        return DataPosition(p.epoch, p.skipped + used)

    def data_errors(self) -> int:
        """Bad samples/shards met so far by this loader's DataLoaders, summed over their workers."""
        return self._errors.total

    def _tally(self, batch: Any) -> None:
        self._errors.add(batch)
        enforce_error_limit([self._errors], self._max_errors)

    def _next_batch(self, it: Iterator[Any]) -> Optional[Any]:
        """The next batch of ``it`` (tallied), or None at the end of the pass; workers' late error counts
        (:class:`~mmm.data.stream.WorkerErrorCounts`) are tallied on the way, never handed on."""
        for item in it:
            self._tally(item)
            if not isinstance(item, WorkerErrorCounts):
                return item
        return None

    def __iter__(self) -> Iterator[PackedBatch]:
        return self._run()

    def _run(self) -> Iterator[PackedBatch]:
        start = self.position()
        self._errors.new_pass()  # data.max_errors counts this pass, replayed batches included
        with on_host():  # the data pipeline is host work (here when num_workers is 0), never a device read
            it = iter(self._loader_for(start.epoch))
        skipped = 0
        if start.batches_done:
            logger.info("resuming the training stream at epoch %d: skipping %d batch(es) already trained on "
                        "(data work only)", start.epoch, start.batches_done)
        ran_out = False
        while skipped < start.batches_done:
            with on_host():
                batch = self._next_batch(it)
            if batch is None:
                ran_out = True
                msg = (f"the training data ran out while fast-forwarding: epoch {start.epoch} has {skipped} batch(es) "
                       f"but the checkpoint had trained on {start.batches_done} of it; the shards changed since the "
                       f"checkpoint was written")
                if self.strict:
                    raise RuntimeError(msg) from None
                warnings.warn(f"{msg}; continuing with epoch {start.epoch + 1}", stacklevel=2)
                break
            skipped += 1
        self._pass = p = _Pass(start.epoch, skipped, self._consumed() if self._consumed is not None else 0)
        while True:
            with on_host():
                batch = None if ran_out else self._next_batch(it)
            if self._agree is not None and not self._agree(batch is not None):
                break  # some rank has no batch left: the epoch ends on every rank
            if batch is None:
                break
            if isinstance(getattr(batch, "extras", None), dict):
                batch.extras["data_errors_total"] = self.data_errors()
            p.yielded += 1
            yield batch
        p.exhausted = True
        if start.batches_done == 0 and p.yielded == 0:  # a next epoch would be empty too: Lightning would loop forever
            raise SampleError(f"the training shards yielded no batch in a whole epoch (epoch {start.epoch}): empty "
                               f"shards, or every sample was bad and skipped ({self.data_errors()} bad sample(s) or "
                               f"shard(s) counted)")

    def _loader_for(self, epoch: int) -> DataLoader:
        if self._loader is None or self._loader_next_epoch != epoch:
            self.close()
            self._errors.new_loader()
            self._loader = self._build(epoch)
        self._loader_next_epoch = epoch + 1
        return self._loader

    def close(self) -> None:
        """Stop the DataLoader's persistent workers (the position is kept; a later ``iter()`` rebuilds)."""
        loader, self._loader = self._loader, None
        shutdown_workers(loader)
