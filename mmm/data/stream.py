"""Generic WebDataset plumbing shared by every modality: shard lists, error handling, pipelines.

A pipeline reads tar shards written by a ``datasets_def`` dataset definition through
:mod:`mmm.data.tar` (the reader asset fitting and the shard tools use too) and hands raw
samples (``{"__key__": ..., "__url__": ..., "<ext>": bytes}``) to the modality's own stages.
Sample and shard errors go to one :class:`SampleErrorHandler`, which either stops with a message
naming the shard (the default) or skips, counts and reports them (``data.skip_bad: true``).
"""
from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import braceexpand
import webdataset as wds

from mmm.data.epoch import EpochCounter, EpochResampledShards, EpochSource, shuffle_samples, take_epoch_share
from mmm.data.epoch import shuffle_shards as shuffle_shards_by_epoch
from mmm.data.errors import SampleError, SampleErrorHandler  # noqa: F401  (re-exported: the pipeline's error types)
from mmm.data.tar import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_READ_TIMEOUT_S, guarded_tarfile_to_samples

logger = logging.getLogger("mmm.data")

ShardSpec = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]

BAD_IN_A_ROW_LIMIT = 100_000
"""A resampled training stream stops after this many bad samples in a row without one batch (under
``data.skip_bad``). Far above what any usable data gives: with batches of 256, more than 99.7 % of the
samples would have to be bad."""

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://")


def is_remote(url: str) -> bool:
    """Whether ``url`` is read through a command or a network protocol (``pipe:``, ``http(s)://``, ...), not a path."""
    return url.startswith(_REMOTE_PREFIXES) or "://" in url


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def local_path(spec: str) -> str:
    """``spec`` without a ``file://`` or ``file:`` prefix (a local path written as a url, which WebDataset accepts)."""
    for prefix in ("file://", "file:"):
        if spec.startswith(prefix):
            return spec[len(prefix):]
    return spec


def _expand_one(spec: str, split: Optional[str]) -> List[str]:
    """Expand one directory / brace pattern / glob / file into shard paths (sorted for dirs and globs)."""
    spec = local_path(spec)
    if is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        pattern = f"{split}-*.tar" if split is not None else "*.tar"
        return sorted(str(p) for p in path.glob(pattern) if p.is_file())
    if "{" in spec:
        urls, missing = [], []
        for one in braceexpand.braceexpand(str(path)):
            if _is_glob(one):  # dir/{train,val}-*.tar: each alternative a glob that must match
                found = sorted(p for p in glob.glob(one) if os.path.isfile(p))
                urls.extend(found)
                missing.extend([] if found else [f"{one} (matches no file)"])
            elif Path(one).is_file():
                urls.append(one)
            else:
                missing.append(one)
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise FileNotFoundError(f"shard pattern {spec!r}: missing shard file(s) {missing[:3]}{more}")
        return urls
    if _is_glob(spec):
        return sorted(p for p in glob.glob(str(path)) if os.path.isfile(p))
    if path.is_file():
        return [str(path)]
    raise FileNotFoundError(f"shard path {spec!r} does not exist (expected a directory, a .tar file or a pattern)")


def list_shards(path_or_pattern: ShardSpec, split: Optional[str] = None) -> List[str]:
    """List the tar shards a pipeline should read.

    Args:
        path_or_pattern: a directory (its ``{split}-*.tar`` files, sorted, or all ``*.tar`` when
            ``split`` is None), a brace pattern such as ``dir/train-{000000..000009}.tar``, a glob,
            a single ``.tar`` file, a remote url (passed through unchecked), or a list of these.
        split: split name used to filter directory listings (ignored for patterns and files).

    Returns:
        Shard paths/urls in a deterministic order.

    Raises:
        FileNotFoundError: nothing matched; the message names the path and the split.
    """
    specs: List[str]
    if isinstance(path_or_pattern, (str, os.PathLike)):
        specs = [os.fspath(path_or_pattern)]
    elif isinstance(path_or_pattern, Iterable):
        specs = [os.fspath(p) for p in path_or_pattern]
    else:
        raise TypeError(f"list_shards: expected a path, pattern or list of them, got {type(path_or_pattern).__name__}")
    urls: List[str] = []
    for spec in specs:
        urls.extend(_expand_one(spec, split))
    if not urls:
        what = f" for split {split!r}" if split is not None else ""
        raise FileNotFoundError(f"no tar shards found at {path_or_pattern!r}{what}")
    return urls


class WorkerErrorCounts:
    """Not a batch: a worker's running error counts, sent after its last item of a pass when errors were met
    after that item (or the worker had no item at all, e.g. its only shard was corrupt). The training
    loaders tally it (``extras["data_errors"]``, as on a batch) and hand it on to nobody."""

    def __init__(self, counts: Dict[str, Any]) -> None:
        self.extras = {"data_errors": counts}

    def __repr__(self) -> str:
        return f"WorkerErrorCounts({self.extras['data_errors']})"


def stamp_error_counts(src: Iterator[Any], handler: SampleErrorHandler) -> Iterator[Any]:
    """Put this worker's running error counts on every item that has an ``extras`` dict (a
    :class:`~mmm.batch.PackedBatch`): ``extras["data_errors"] = {"worker", "total", "by_type"}``.

    The counts are those of the worker's handler when the item is handed on, so they include the
    errors met while producing it (and every earlier item of this worker, all passes). Errors met
    after the pass's last item end the pass as a :class:`WorkerErrorCounts`, so none goes uncounted.
    A pass starts here, so the handler's ``max_errors`` counts this pass only (:meth:`SampleErrorHandler.new_pass`).
    """
    handler.new_pass()
    _, _, worker, _ = wds.utils.pytorch_worker_info()
    stamped = None
    for item in src:
        handler.progress()
        extras = getattr(item, "extras", None)
        if isinstance(extras, dict):
            extras["data_errors"] = {"worker": worker, "total": handler.total, "by_type": dict(handler.counts)}
            stamped = handler.total
        yield item
    if handler.total and handler.total != stamped:
        yield WorkerErrorCounts({"worker": worker, "total": handler.total, "by_type": dict(handler.counts)})


def _stop_if_no_shard_reads(src: Iterator[Dict[str, Any]], read: Callable[..., Iterator[Any]],
                            shards: int) -> Iterator[Any]:
    """``read`` (shard urls -> samples) over the drawn shards; stop once every one of the ``shards`` distinct
    shards was drawn and none gave a sample (all unreadable, or empty, and skipped under ``data.skip_bad``): a
    resampled stream would otherwise draw them forever. Disarmed by the first sample."""
    state: Dict[str, Any] = {"url": None, "failed": set()}

    def drawn() -> Iterator[Dict[str, Any]]:
        for source in src:
            failed = state["failed"]
            if failed is not None and state["url"] is not None:  # the previous shard is read to its end
                failed.add(state["url"])
                if len(failed) >= shards:
                    raise SampleError(f"none of the {shards} training shard(s) gave a sample: each was drawn and "
                                      f"was unreadable or empty (see the skipped errors above), e.g. "
                                      f"{sorted(failed)[:3]}; a resampled stream would draw them forever")
            state["url"] = source["url"]
            yield source

    for sample in read(drawn()):
        state["failed"] = None
        yield sample


def _report_at_end(src: Iterator[Any], handler: Optional[SampleErrorHandler]) -> Iterator[Any]:
    """Pass samples through; log the handler's summary when iteration ends or stops."""
    try:
        yield from src
    finally:
        if handler is not None:
            handler.log_summary()


def make_pipeline(
    urls: Union[str, Sequence[str]],
    *,
    stages: Sequence[Callable[..., Any]],
    shuffle_shards: bool = True,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    handler: Optional[Callable[[Exception], bool]] = None,
    resampled: bool = False,
    max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
    read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S,
    epochs: Optional[EpochCounter] = None,
    epoch_length: Optional[int] = None,
    stamp_errors: bool = False,
) -> wds.DataPipeline:
    """Build the standard shard -> sample pipeline followed by the caller's ``stages``.

    Order: shard list (``ResampledShards`` when ``resampled``) -> shard shuffle seeded by
    ``(seed, epoch)`` (same order on every node/worker) -> ``split_by_node``
    -> ``split_by_worker`` -> :func:`mmm.data.tar.guarded_tarfile_to_samples` -> sample shuffle -> ``stages`` -> an
    end-of-iteration error summary. With ``resampled`` every worker draws shards with replacement
    on its own (:class:`~mmm.data.epoch.EpochResampledShards`, seeded by seed, epoch, rank and
    worker), so the shard shuffle and the node/worker splits are left out, and the stream never
    ends unless ``epoch_length`` cuts each pass.

    Args:
        urls: shard urls, usually from :func:`list_shards` (a brace pattern string also works).
        stages: further pipeline stages, e.g. ``wds.map(fn, handler=handler)``.
        shuffle_shards: shuffle the shard order (seeded).
        shuffle_buffer: sample shuffle buffer size; 0 disables sample shuffling.
        seed: seed for both shuffles (the sample shuffle is also keyed by rank and worker).
        handler: error handler; None uses a new ``SampleErrorHandler()`` (stop with a clear error).
        resampled: sample shards with replacement forever instead of one pass.
        epoch_length: end each pass after this many items (after ``stages``: batches, usually) per
            rank, split across DataLoader workers so that the round-robin DataLoader yields exactly
            this many (:func:`~mmm.data.epoch.take_epoch_share`). None: passes end with the data.
        stamp_errors: put the worker's running error counts on every batch
            (:func:`stamp_error_counts`; needs a :class:`SampleErrorHandler`); with ``resampled``, also
            set the handler's limit of :data:`BAD_IN_A_ROW_LIMIT` bad samples in a row without a batch.
        max_member_bytes: refuse samples with a field (tar member) larger than this many bytes,
            checked from the tar header before the member is read (see
            :func:`mmm.data.tar.guarded_tarfile_to_samples`); refusals go to ``handler``.
            The default is ``data.max_member_bytes``'s (256 MiB), so evaluation, probes and demos
            are guarded as training is; None: no limit.
        read_timeout_s: a ``pipe:`` / ``http(s)://`` shard stream that delivers no data for this
            many seconds stops with :class:`~mmm.data.tar.ShardTimeout` naming the url (to
            ``handler``); None: wait forever.
        epochs: the epoch counter shared with the caller's seeded stages (e.g. masking); each pass
            over the pipeline begins its next epoch (see :mod:`mmm.data.epoch`). None: a new
            counter starting at epoch 0, so pass ``i`` in this process is epoch ``i``.
    """
    url_list = list(braceexpand.braceexpand(urls)) if isinstance(urls, str) else [os.fspath(u) for u in urls]
    if not url_list:
        raise FileNotFoundError("make_pipeline: empty shard list")
    if shuffle_buffer < 0:
        raise ValueError(f"make_pipeline: shuffle_buffer must be >= 0, got {shuffle_buffer}")
    if handler is None:
        handler = SampleErrorHandler()
    pipeline: List[Any] = []
    epochs = epochs if epochs is not None else EpochCounter()
    if epoch_length is not None and epoch_length < 0:
        raise ValueError(f"make_pipeline: epoch_length must be >= 0 or None, got {epoch_length}")
    if resampled:
        pipeline.append(EpochSource(EpochResampledShards(url_list, seed, epochs), epochs))
    else:
        pipeline.append(EpochSource(wds.SimpleShardList(url_list), epochs))
        if shuffle_shards and len(url_list) > 1:
            # same (seed, epoch) in every node/worker -> identical order before splitting (no overlap)
            pipeline.append(wds.pipelinefilter(shuffle_shards_by_epoch)(seed, epochs))
        pipeline.append(wds.split_by_node)
        pipeline.append(wds.split_by_worker)
    read = guarded_tarfile_to_samples(max_member_bytes, handler=handler, read_timeout_s=read_timeout_s)
    if resampled:  # an endless draw over shards that all fail would skip forever without a batch
        pipeline.append(wds.pipelinefilter(_stop_if_no_shard_reads)(read, len(set(url_list))))
    else:  # one pass: a pass without a batch is caught by the training loader
        pipeline.append(read)
    if shuffle_buffer > 0:  # generator keyed by (seed, epoch, rank, worker), made when a pass starts
        pipeline.append(wds.pipelinefilter(shuffle_samples)(shuffle_buffer, min(100, shuffle_buffer), seed, epochs))
    pipeline.extend(stages)
    report_handler = handler if isinstance(handler, SampleErrorHandler) else None
    if stamp_errors:
        if report_handler is None:
            raise TypeError("make_pipeline: stamp_errors needs a SampleErrorHandler as handler")
        pipeline.append(wds.pipelinefilter(stamp_error_counts)(report_handler))
        if resampled:  # endless: every sample bad would skip forever (the stamps count the batches that get out)
            report_handler.in_a_row_limit = BAD_IN_A_ROW_LIMIT
    if epoch_length is not None:
        pipeline.append(wds.pipelinefilter(take_epoch_share)(epoch_length))
    pipeline.append(wds.pipelinefilter(_report_at_end)(report_handler))
    return wds.DataPipeline(*pipeline)
