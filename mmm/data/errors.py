"""Bad samples and shards: one handler that logs, counts and either stops or skips.

The training pipeline (:mod:`mmm.data.stream`), the tar reader (:mod:`mmm.data.tar`) and asset
fitting all report errors through a :class:`SampleErrorHandler`; its message names the shard.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional

import webdataset as wds

logger = logging.getLogger("mmm.data")


class SampleError(RuntimeError):
    """A sample or shard failed to load; the message names the shard (and key when known)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # webdataset appends context to ``args``; keep the message readable
        return self.message


def _describe(exn: BaseException) -> tuple[str, str]:
    """(location, message) for an exception raised inside a webdataset stage.

    webdataset appends context to ``exn.args``: the shard url (a str), the open stream, and
    for tar member errors ``" @ <stream name=...>"`` glued to the first argument.
    """
    args = list(getattr(exn, "args", ()) or ())
    first = str(args[0]) if args else ""
    extras = args[1:]
    urls = [a for a in extras if isinstance(a, str) and a]
    location = urls[-1] if urls else ""
    if not location and " @ " in first:
        location = first.rsplit(" @ ", 1)[1]
    message = first.rsplit(" @ ", 1)[0] if " @ " in first else first
    if not message:
        message = repr(exn)
    return location, message


class SampleErrorHandler:
    """Callable for webdataset's ``handler=``: log, count and either stop or skip bad samples.

    A shard that breaks part-way (e.g. truncated) keeps the samples read before the break; the
    rest of it is skipped. Counts live in the process that iterates the pipeline, so with a DataLoader every worker
    has its own counts (the handler is pickled into each worker); :func:`make_pipeline` logs
    a per-worker summary line when a worker's iteration ends, and with ``stamp_errors`` puts the
    worker's running counts on every batch, which the training loader sums over workers
    (:class:`~mmm.train.datamodule.ResumableLoader`, logged as ``train/data_errors``).

    Args:
        skip_bad: False (default) re-raises as :class:`SampleError` naming the shard; True
            skips the sample/shard and continues.
        max_errors: with ``skip_bad``, raise a :class:`SampleError` with the counts and the last error once more than
            this many errors were seen in one pass over the data (:meth:`new_pass`; None = unlimited).
        keep_messages: how many error messages to keep for :meth:`summary`.
        stream: which data the counts are of, named in the ``max_errors`` error (``"validation"``: its
            counts start again at each pass, :meth:`reset`).
    """

    def __init__(self, skip_bad: bool = False, max_errors: Optional[int] = None, keep_messages: int = 10,
                 stream: str = "") -> None:
        if max_errors is not None and max_errors < 0:
            raise ValueError(f"SampleErrorHandler: max_errors must be >= 0 or None, got {max_errors}")
        self.skip_bad = skip_bad
        self.max_errors = max_errors
        self.keep_messages = keep_messages
        self.stream = stream
        self.counts: Counter[str] = Counter()
        self.messages: List[str] = []
        # errors in a row without an item leaving the pipeline: a stream that never ends by itself (resampled)
        # and whose every sample is bad would otherwise skip forever; make_pipeline sets the limit there
        self.in_a_row_limit: Optional[int] = None
        self._in_a_row = 0
        self._pass_base = 0  # the running total when the current pass began

    def new_pass(self) -> None:
        """A new pass over the data begins (an epoch): ``max_errors`` applies to the errors met from here on, so the
        same bad sample met again in every epoch does not stop a long run; the running counts go on."""
        self._pass_base = self.total
        self._in_a_row = 0

    def reset(self) -> None:
        """Start counting afresh (a new pass over data read again, such as validation)."""
        self.counts.clear()
        self.messages.clear()
        self._in_a_row = 0
        self._pass_base = 0

    def progress(self) -> None:
        """An item (a batch) left the pipeline: the errors since are no longer "in a row"."""
        self._in_a_row = 0

    @property
    def total(self) -> int:
        """Number of errors seen so far in this process."""
        return sum(self.counts.values())

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, SampleError):  # already reported by an inner stage: pass it up unchanged
            raise exn
        location, message = _describe(exn)
        kind = type(exn).__name__
        self.counts[kind] += 1
        text = f"{kind} in shard {location or '(unknown shard)'}: {message}"
        if len(self.messages) < self.keep_messages:
            self.messages.append(text)
        if not self.skip_bad:
            logger.error("%s", text)
            raise SampleError(f"{text} (set data.skip_bad: true, or --data.skip_bad true, to skip and count bad samples)") from exn
        logger.warning("skipping bad sample: %s", text)
        in_pass = self.total - self._pass_base
        if self.max_errors is not None and in_pass > self.max_errors:
            where = f"the {self.stream} data" if self.stream else "the data"
            raise SampleError(f"too many bad samples in one pass over {where}: {in_pass} > "
                              f"data.max_errors={self.max_errors} (this worker's counts so far: {self._counts_text()}); "
                              f"last: {text}") from exn
        self._in_a_row += 1
        if self.in_a_row_limit is not None and self._in_a_row > self.in_a_row_limit:
            raise SampleError(f"{self._in_a_row} bad samples in a row without one batch ({self._counts_text()}): the "
                              f"training data looks unusable, and a resampled stream would skip forever; "
                              f"last: {text}") from exn
        return True

    def _counts_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"

    def summary(self) -> Dict[str, Any]:
        """Counts in this process: ``{"total", "by_type", "messages", "skip_bad", "max_errors"}``."""
        return {
            "total": self.total,
            "by_type": dict(sorted(self.counts.items())),
            "messages": list(self.messages),
            "skip_bad": self.skip_bad,
            "max_errors": self.max_errors,
        }

    def log_summary(self) -> None:
        """Log one line with the counts of skipped errors (only when ``skip_bad`` and there were some)."""
        if self.skip_bad and self.total:
            _, _, worker, num_workers = wds.utils.pytorch_worker_info()
            logger.warning(
                "data errors in worker %d/%d (pid %d): %d bad sample(s)/shard(s) skipped (%s)",
                worker, num_workers, os.getpid(), self.total, self._counts_text(),
            )


def decode_each(src: Iterator[Dict[str, Any]], decode: Callable[[Dict[str, Any]], Any],
                handler: Callable[[Exception], bool]) -> Iterator[Any]:
    """A pipeline stage: ``decode(sample)`` of each raw sample (a modality codec's decoder); a
    ``ValueError`` goes to ``handler``, which counts it and skips the sample or raises.

    Wrap it with ``webdataset.pipelinefilter``: ``pipelinefilter(decode_each)(decode, handler)``.
    """
    for sample in src:
        try:
            out = decode(sample)
        except ValueError as e:
            if handler(e):  # counts; raises unless skipping is configured
                continue
            raise
        yield out
