"""Streaming DataModule: WebDataset shards → packed, masked batches, with exact mid-epoch resume.

An *epoch* is one pass over the training shards. Every random choice of the training stream
(shard order, shuffle buffer, masks) is a function of ``(data.seed, epoch, rank, worker)``
(:mod:`mmm.data.epoch`), so epoch ``e`` yields the same batches in the same order in any process
that builds it with the same shards and settings. The DataModule saves its *data position*
``{"epoch": e, "batches_done": k}`` (``k`` = batches of epoch ``e`` already trained on) in every
checkpoint; on resume it rebuilds epoch ``e`` and discards its first ``k`` batches before handing
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

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmm.batch import PackedBatch
from mmm.config import DataConfig
from mmm.data.epoch import EpochCounter
from mmm.data.stream import SampleErrorHandler, make_pipeline

logger = logging.getLogger("mmm.train")

STATE_VERSION = 1


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


class ErrorTally:
    """Bad samples/shards met by a training stream's DataLoaders so far, summed over their workers.

    Reads the running per-worker counts that :func:`mmm.data.stream.stamp_error_counts` puts on
    batches (``extras["data_errors"]``); a DataLoader's workers restart their counts, so call
    :meth:`new_loader` whenever the stream builds a new one.
    """

    def __init__(self) -> None:
        self._base = 0  # errors met by DataLoaders already closed
        self._seen: Dict[int, int] = {}  # worker -> its latest running count, current DataLoader

    @property
    def total(self) -> int:
        return self._base + sum(self._seen.values())

    def add(self, batch: Any) -> None:
        """Note the worker count a batch carries (if any)."""
        extras = getattr(batch, "extras", None)
        info = extras.get("data_errors") if isinstance(extras, dict) else None
        if info is not None:
            self._seen[int(info["worker"])] = int(info["total"])

    def new_loader(self) -> None:
        """The stream starts a new DataLoader: keep what the old one's workers met."""
        self._base, self._seen = self.total, {}


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

    Batches that carry their worker's running error counts (``extras["data_errors"]``, see
    :func:`mmm.data.stream.stamp_error_counts`) are tallied: each yielded batch gets
    ``extras["data_errors_total"]``, the bad samples/shards this loader's DataLoaders met so far,
    summed over their workers (including batches skipped while fast-forwarding).
    """

    def __init__(self, build: Callable[[int], DataLoader], start: DataPosition,
                 consumed: Optional[Callable[[], int]] = None, strict: bool = True,
                 agree: Optional[Callable[[bool], bool]] = None) -> None:
        if start.epoch < 0 or start.batches_done < 0:
            raise ValueError(f"ResumableLoader: bad start position {start}")
        self._build, self._start, self._consumed, self.strict = build, start, consumed, strict
        self._agree = agree
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

    def __iter__(self) -> Iterator[PackedBatch]:
        return self._run()

    def _run(self) -> Iterator[PackedBatch]:
        start = self.position()
        it = iter(self._loader_for(start.epoch))
        skipped = 0
        if start.batches_done:
            logger.info("resuming the training stream at epoch %d: skipping %d batch(es) already trained on "
                        "(data work only)", start.epoch, start.batches_done)
        ran_out = False
        while skipped < start.batches_done:
            try:
                self._tally(next(it))
            except StopIteration:
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
            batch = None if ran_out else next(it, None)
            if self._agree is not None and not self._agree(batch is not None):
                break  # some rank has no batch left: the epoch ends on every rank
            if batch is None:
                break
            self._tally(batch)
            if isinstance(getattr(batch, "extras", None), dict):
                batch.extras["data_errors_total"] = self.data_errors()
            p.yielded += 1
            yield batch
        p.exhausted = True

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
        it = getattr(loader, "_iterator", None)
        if it is not None:
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            loader._iterator = None


class StreamDataModule(L.LightningDataModule):
    """Train/val loaders over WebDataset shards; the modality's stages (decode, tokenize, mask,
    pack) run in the DataLoader workers.

    The training position is saved in checkpoints (:meth:`state_dict`) and restored exactly
    (:meth:`load_state_dict`) provided the shards (names and local file sizes), ``data.seed``,
    batch size, sequence length, shuffle settings, the number of train workers and the world size
    are unchanged; if any differ the run still resumes at the saved epoch and batch count, with a
    warning that the batches are no longer those of an uninterrupted run.

    With ``data.resampled`` the training shards are drawn with replacement, forever, by every rank
    and worker on its own (seeded by ``(data.seed, epoch, rank, worker)``), and an epoch is
    exactly ``data.epoch_batches`` batches per rank. Otherwise an epoch is one pass, and with
    several ranks it ends on all of them when the first rank's share runs out (see the module
    docstring).

    Args:
        cfg: data settings.
        train_urls: training shard urls.
        val_urls: validation shard urls (None = no validation).
        make_stages: ``make_stages(seed=, handler=, fixed_masking=, epochs=, train=)`` returns the
            stages from raw samples to :class:`~mmm.batch.PackedBatch` (e.g. a bound
            :meth:`~mmm.modalities.base.Modality.stages` with its masker and batch size).
        settings: extra settings the stream depends on (e.g. ``max_len``), compared on resume.
    """

    def __init__(self, cfg: DataConfig, train_urls: List[str], val_urls: Optional[List[str]],
                 make_stages: Callable[..., List], settings: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        check_resampling(cfg)
        self.cfg, self.train_urls, self.val_urls = cfg, train_urls, val_urls
        self.make_stages = make_stages
        self.extra_settings = dict(settings or {})
        self._start = DataPosition(0, 0)
        self._restored = False
        self._strict = True
        self._train: Optional[ResumableLoader] = None

    @property
    def train_workers(self) -> int:
        """DataLoader workers for training (one-pass epochs: never more than shards, so none is idle)."""
        if self.cfg.resampled:  # every worker draws from all shards
            return self.cfg.num_workers
        return min(self.cfg.num_workers, len(self.train_urls))

    # ------------------------------------------------------------------ loaders

    def _train_loader(self, start_epoch: int) -> DataLoader:
        """A DataLoader whose passes are epochs ``start_epoch``, ``start_epoch + 1``, ..."""
        c = self.cfg
        epochs = EpochCounter(start_epoch)
        handler = SampleErrorHandler(skip_bad=c.skip_bad, max_errors=c.max_errors)
        stages = self.make_stages(seed=c.seed, handler=handler, fixed_masking=False, epochs=epochs, train=True)
        pipeline = make_pipeline(self.train_urls, stages=stages, shuffle_shards=c.shuffle_shards,
                                 shuffle_buffer=c.shuffle_buffer, seed=c.seed, handler=handler,
                                 max_member_bytes=c.max_member_bytes, read_timeout_s=c.read_timeout_s,
                                 epochs=epochs, resampled=c.resampled,
                                 epoch_length=c.epoch_batches if c.resampled else None, stamp_errors=True)
        return self._data_loader(pipeline, self.train_workers)

    def _data_loader(self, pipeline: Any, workers: int) -> DataLoader:
        # own generator: creating worker iterators must not draw from torch's global RNG (dropout)
        return DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          prefetch_factor=4 if workers > 0 else None,
                          pin_memory=torch.cuda.is_available(),  # PackedBatch.pin_memory: non-blocking copies to the GPU
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def _trained_batches(self) -> int:
        # batches whose training step ran (not the one Lightning prefetched); restored on resume
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _ranks_agree(self) -> Optional[Callable[[bool], bool]]:
        """With several ranks and one-pass epochs: ``agree(have_batch)``, True while every rank has one."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1 or self.cfg.resampled:
            return None
        strategy = trainer.strategy
        return lambda have: strategy.reduce_boolean_decision(have, all=True)

    def train_dataloader(self) -> ResumableLoader:
        """The training stream, starting where the previous loader or the restored checkpoint left off."""
        trainer = self.trainer
        if self._train is not None:  # asked again (e.g. reload_dataloaders_every_n_epochs): continue
            self._start = self._train.position()
            self._train.close()
        elif trainer is not None and trainer.ckpt_path and not self._restored:
            self._start = DataPosition(trainer.current_epoch, 0)
            warnings.warn(f"checkpoint {trainer.ckpt_path} holds no data position (written before exact resume "
                          f"existed): training data restarts at the beginning of epoch {self._start.epoch}",
                          stacklevel=2)
        self._train = ResumableLoader(self._train_loader, self._start,
                                      consumed=self._trained_batches if trainer is not None else None,
                                      strict=self._strict, agree=self._ranks_agree())
        return self._train

    def val_dataloader(self) -> DataLoader:
        """Validation batches: one worker-free pass, no shuffling, the same masks every time."""
        if not self.val_urls:
            return []
        c = self.cfg
        handler = SampleErrorHandler(skip_bad=c.skip_bad, max_errors=c.max_errors)
        stages = self.make_stages(seed=c.seed + 10_000, handler=handler, fixed_masking=True, epochs=None, train=False)
        pipeline = make_pipeline(self.val_urls, stages=stages, shuffle_shards=False, shuffle_buffer=0,
                                 seed=c.seed, handler=handler, max_member_bytes=c.max_member_bytes,
                                 read_timeout_s=c.read_timeout_s)
        return self._data_loader(pipeline, 0)

    def teardown(self, stage: str) -> None:
        """Stop the training workers when fitting ends (the position stays available for a final checkpoint)."""
        if self._train is not None:
            self._train.close()

    # ------------------------------------------------------------------ checkpoint state

    def data_settings(self) -> Dict[str, Any]:
        """Everything the training stream depends on besides the position (compared on resume)."""
        c = self.cfg
        digest = hashlib.sha1()
        for url in self.train_urls:
            size = os.path.getsize(url) if os.path.isfile(url) else -1
            digest.update(f"{os.path.basename(url)}\0{size}\n".encode())
        settings = {
            "shards": len(self.train_urls), "shards_sha1": digest.hexdigest(), "seed": c.seed,
            "batch_size": c.batch_size, **self.extra_settings, "shuffle_buffer": c.shuffle_buffer,
            "shuffle_shards": c.shuffle_shards, "num_workers": self.train_workers,
            "world_size": self.trainer.world_size if self.trainer is not None else 1,
        }
        if c.resampled:  # only then: checkpoints of one-pass runs keep the settings they always had
            settings.update(resampled=True, epoch_batches=c.epoch_batches)
        return settings

    def position(self) -> DataPosition:
        """The current training position (what :meth:`state_dict` saves)."""
        return self._train.position() if self._train is not None else self._start

    def state_dict(self) -> Dict[str, Any]:
        """Plain data saved in every checkpoint: the position and the settings it is valid for."""
        pos = self.position()
        return {"version": STATE_VERSION, "epoch": pos.epoch, "batches_done": pos.batches_done,
                "settings": self.data_settings()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the position (Lightning calls this before it asks for the train loader)."""
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"StreamDataModule: checkpoint data state has version {state_dict.get('version')!r}, "
                             f"this mmm reads version {STATE_VERSION}")
        saved, now = state_dict["settings"], self.data_settings()
        changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        self._start = DataPosition(int(state_dict["epoch"]), int(state_dict["batches_done"]))
        self._restored = True
        self._strict = not changed
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            warnings.warn(f"resuming with different data settings ({diff}): training continues at epoch "
                          f"{self._start.epoch} after skipping {self._start.batches_done} batch(es), but the batches "
                          f"are no longer those an uninterrupted run would have seen", stacklevel=2)
