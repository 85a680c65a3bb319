"""The data module of every run: WebDataset shards → packed, masked batches, with exact resume.

A run trains on one or more *tasks* (:class:`~mmm.train.mixture.TaskData`: shards, stages, weight);
a single-task run is a mixture of one. Everything that does not depend on the number of tasks is
built once, here, for every task alike: the DataLoaders (workers, prefetching, pinned memory, a
private generator, each batch handed over from its worker as one message: :mod:`mmm.data.wire`), the
training and validation pipelines, the fingerprint of the shards that a checkpoint's position is
valid for, and shutting the workers down.

What the training stream is differs with the number of tasks:

* **one task**: numbered epochs, each one pass over the shards (or ``data.epoch_batches``
  batches with ``data.resampled``), restored to the exact batch on resume
  (:class:`~mmm.train.loaders.ResumableLoader`; position ``{"epoch", "batches_done"}``); with
  several ranks a one-pass epoch ends on all of them when the first rank's share runs out;
* **several tasks**: one endless stream per task and a seeded task draw per global batch
  (:class:`~mmm.train.mixture.MixtureLoader`; position ``{"kind": "mixture", "batches_done"}``),
  validated per task.

The checkpoint key is the class name, ``StreamDataModule``. Resuming with changed data settings
(shards, seed, batch size, workers, world size, ...) still resumes at the saved position, with a
warning that the batches are no longer those of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from mmm.config import DataConfig
from mmm.data.epoch import EpochCounter
from mmm.data.stream import SampleErrorHandler, make_pipeline
from mmm.data.wire import to_wire
from mmm.train.loaders import (DataPosition, ErrorTally, ResumableLoader, check_resampling,  # noqa: F401
                               shutdown_workers)
from mmm.train.mixture import MixtureLoader, TaskData, TaskSampler, TaskStream

STATE_VERSION = 1


def shards_fingerprint(urls: List[str]) -> str:
    """SHA-1 of the shards' names and local file sizes (-1 for remote urls): what a saved position is valid for."""
    digest = hashlib.sha1()
    for url in urls:
        size = os.path.getsize(url) if os.path.isfile(url) else -1
        digest.update(f"{os.path.basename(url)}\0{size}\n".encode())
    return digest.hexdigest()


class CountedPerPass(IterableDataset):
    """A pipeline read again and again (validation) whose bad samples count per pass, not summed over passes:
    the same bad sample met at every validation would otherwise end a long run at pass ``max_errors + 1``."""

    def __init__(self, pipeline: Any, handler: SampleErrorHandler) -> None:
        super().__init__()
        self.pipeline, self.handler = pipeline, handler

    def __iter__(self):
        self.handler.reset()
        yield from self.pipeline


class StreamDataModule(L.LightningDataModule):
    """Train/val loaders over the tasks' WebDataset shards (see the module docstring); each task's
    stages (decode, tokenize, mask, pack) run in its DataLoader workers.

    Args:
        cfg: data settings (seed, workers, shuffling, error policy, resampling).
        tasks: the run's tasks; one for a single-task run. A task's ``make_stages(seed=, handler=,
            fixed_masking=, epochs=, train=)`` returns the stages from raw samples to
            :class:`~mmm.batch.PackedBatch`; its ``settings`` (e.g. ``max_len``) are compared on resume.
    """

    def __init__(self, cfg: DataConfig, tasks: Sequence[TaskData]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("StreamDataModule needs at least one task")
        check_resampling(cfg)
        self.cfg, self.tasks = cfg, list(tasks)
        self.sampler = TaskSampler([t.weight for t in self.tasks], cfg.seed) if len(self.tasks) > 1 else None
        self._start: Union[DataPosition, int] = 0 if self.sampler is not None else DataPosition(0, 0)
        self._restored = False
        self._strict = True
        self._train: Optional[Union[ResumableLoader, MixtureLoader]] = None
        self.val_task_names: List[str] = []

    @property
    def train_workers(self) -> int:
        """DataLoader workers of the (first) task's training stream."""
        return self._workers(self.tasks[0].train_urls)

    def _workers(self, urls: List[str]) -> int:
        """Training workers of a stream (one-pass epochs: never more than shards, so none is idle)."""
        if self.cfg.resampled:  # every worker draws from all shards
            return self.cfg.num_workers
        return min(self.cfg.num_workers, len(urls))

    # ------------------------------------------------------------------ loaders

    def _data_loader(self, pipeline: Any, workers: int) -> DataLoader:
        if workers > 0:  # last stage: each batch leaves its worker as one message (mmm.data.wire)
            pipeline.append(to_wire)
        # own generator: creating worker iterators must not draw from torch's global RNG (dropout)
        return DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          prefetch_factor=4 if workers > 0 else None,
                          pin_memory=torch.cuda.is_available(),  # PackedBatch.pin_memory: non-blocking copies to the GPU
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    def _train_loader(self, task: TaskData, start_epoch: int, epoch_length: Optional[int]) -> DataLoader:
        """A DataLoader over ``task``'s training shards whose passes are epochs ``start_epoch``, ``start_epoch + 1``, ..."""
        c = self.cfg
        epochs = EpochCounter(start_epoch)
        handler = SampleErrorHandler(skip_bad=c.skip_bad, max_errors=c.max_errors)
        ranks = self.trainer.world_size if self.trainer is not None else 1
        stages = task.make_stages(seed=c.seed, handler=handler, fixed_masking=False, epochs=epochs, train=True,
                                  **({"ranks": ranks} if ranks > 1 else {}))  # several ranks: equal itc batches
        pipeline = make_pipeline(task.train_urls, stages=stages, shuffle_shards=c.shuffle_shards,
                                 shuffle_buffer=c.shuffle_buffer, seed=c.seed, handler=handler,
                                 max_member_bytes=c.max_member_bytes, read_timeout_s=c.read_timeout_s,
                                 epochs=epochs, resampled=c.resampled, epoch_length=epoch_length, stamp_errors=True)
        return self._data_loader(pipeline, self._workers(task.train_urls))

    def task_loader(self, task: int = 0, epoch: int = 0) -> DataLoader:
        """The DataLoader the training stream reads for task number ``task`` from ``epoch`` on (e.g. to time it alone)."""
        c = self.cfg
        return self._train_loader(self.tasks[task], epoch, c.epoch_batches if c.resampled and self.sampler is None else None)

    def _val_loader(self, task: TaskData) -> DataLoader:
        """Validation batches of ``task``: one worker-free pass, no shuffling, the same masks every time."""
        c = self.cfg
        handler = SampleErrorHandler(skip_bad=c.skip_bad, max_errors=c.max_errors, stream="validation")
        stages = task.make_stages(seed=c.seed + 10_000, handler=handler, fixed_masking=True, epochs=None, train=False)
        pipeline = make_pipeline(task.val_urls, stages=stages, shuffle_shards=False, shuffle_buffer=0, seed=c.seed,
                                 handler=handler, max_member_bytes=c.max_member_bytes, read_timeout_s=c.read_timeout_s)
        return self._data_loader(CountedPerPass(pipeline, handler), 0)

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

    def train_dataloader(self) -> Union[ResumableLoader, MixtureLoader]:
        """The training stream, starting where the previous loader or the restored checkpoint left off."""
        trainer = self.trainer
        self.check_shards_per_process(trainer.world_size if trainer is not None else 1)
        consumed = self._trained_batches if trainer is not None else None
        if self._train is not None:  # asked again (e.g. reload_dataloaders_every_n_epochs): continue
            self._start = self._train.position()
            self._train.close()
        elif trainer is not None and trainer.ckpt_path and not self._restored:
            self._start = 0 if self.sampler is not None else DataPosition(trainer.current_epoch, 0)
            where = "the first batch" if self.sampler is not None else f"the beginning of epoch {trainer.current_epoch}"
            warnings.warn(f"checkpoint {trainer.ckpt_path} holds no data position (written before exact resume "
                          f"existed, or by another data module): training data restarts at {where}", stacklevel=2)
        max_errors = self.cfg.max_errors if self.cfg.skip_bad else None  # summed over workers and tasks
        if self.sampler is None:
            self._train = ResumableLoader(lambda epoch: self.task_loader(0, epoch), self._start, consumed=consumed,
                                          strict=self._strict, agree=self._ranks_agree(), max_errors=max_errors)
        else:
            streams = [TaskStream(t.name, lambda t=t: self._train_loader(t, 0, None)) for t in self.tasks]
            self._train = MixtureLoader(streams, [t.name for t in self.tasks], self.sampler, self._start,
                                        consumed=consumed, epoch_batches=self.cfg.epoch_batches, max_errors=max_errors)
        return self._train

    def check_shards_per_process(self, world_size: int) -> None:
        """One-pass epochs hand each process whole training shards: refuse fewer shards than processes (the
        processes left without one would stop with "no batch in a whole epoch", blaming the data)."""
        if self.cfg.resampled or world_size <= 1:
            return
        for t in self.tasks:
            if len(t.train_urls) < world_size:
                name = f"task {t.name!r}: " if t.name else ""
                raise ValueError(f"{name}{len(t.train_urls)} training shard(s) for {world_size} processes "
                                 f"(trainer.devices x trainer.num_nodes): each process reads whole shards, so "
                                 f"{world_size - len(t.train_urls)} would get none. Write at least {world_size} shards "
                                 f"(mmm shards build --samples_per_shard smaller), or set data.resampled: true")

    def val_dataloader(self) -> Union[DataLoader, List[DataLoader]]:
        """One validation loader per task that has validation shards (a single-task run: that loader itself)."""
        with_val = [t for t in self.tasks if t.val_urls]
        self.val_task_names = [t.name for t in with_val] if self.sampler is not None else []
        loaders = [self._val_loader(t) for t in with_val]
        if self.sampler is None:
            return loaders[0] if loaders else []
        return loaders

    def teardown(self, stage: str) -> None:
        """Stop the training workers when fitting ends (the position stays available for a final checkpoint)."""
        if self._train is not None:
            self._train.close()

    def source_counts(self) -> Dict[str, Dict[str, int]]:
        """Per task of a multi-task run: batches trained (exact) and samples drawn from its stream."""
        if self.sampler is None:
            raise ValueError("source_counts: a single-task run has no task mixture")
        if self._train is None:
            return {t.name: {"batches": int(b), "samples": 0}
                    for t, b in zip(self.tasks, self.sampler.counts(int(self._start)))}
        return self._train.source_counts()

    # ------------------------------------------------------------------ checkpoint state

    def data_settings(self) -> Dict[str, Any]:
        """Everything the training stream depends on besides the position (compared on resume)."""
        c = self.cfg
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.sampler is None:
            task = self.tasks[0]
            out = {"shards": len(task.train_urls), "shards_sha1": shards_fingerprint(task.train_urls), "seed": c.seed,
                   "batch_size": c.batch_size, **task.settings, "shuffle_buffer": c.shuffle_buffer,
                   "shuffle_shards": c.shuffle_shards, "num_workers": self.train_workers, "world_size": world_size}
        else:
            out = {"seed": c.seed, "shuffle_buffer": c.shuffle_buffer, "shuffle_shards": c.shuffle_shards,
                   "world_size": world_size}
        if c.resampled:  # only then: checkpoints of one-pass runs keep the settings they always had
            out.update(resampled=True, epoch_batches=c.epoch_batches)
        if self.sampler is not None:
            for t in self.tasks:
                out[f"task/{t.name}"] = {"weight": t.weight, "shards": len(t.train_urls),
                                         "shards_sha1": shards_fingerprint(t.train_urls),
                                         "num_workers": self._workers(t.train_urls), **t.settings}
        return out

    def position(self) -> Union[DataPosition, int]:
        """The current training position (what :meth:`state_dict` saves): a :class:`DataPosition`
        for one task, the number of batches trained for several."""
        return self._train.position() if self._train is not None else self._start

    def state_dict(self) -> Dict[str, Any]:
        """Plain data saved in every checkpoint: the position and the settings it is valid for."""
        pos = self.position()
        if self.sampler is None:
            return {"version": STATE_VERSION, "epoch": pos.epoch, "batches_done": pos.batches_done,
                    "settings": self.data_settings()}
        return {"version": STATE_VERSION, "kind": "mixture", "batches_done": pos, "settings": self.data_settings()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the position (Lightning calls this before it asks for the train loader)."""
        kind = "mixture" if self.sampler is not None else None
        if state_dict.get("version") != STATE_VERSION or state_dict.get("kind") != kind:
            what = {None: "single-task", "mixture": "task-mixture"}
            raise ValueError(f"StreamDataModule: the checkpoint's data state is not a {what[kind]} state of version "
                             f"{STATE_VERSION} (got kind={state_dict.get('kind')!r}, version="
                             f"{state_dict.get('version')!r}); was it written by a "
                             f"{'single-task' if kind else 'multi-task'} run?")
        saved, now = state_dict["settings"], self.data_settings()
        changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
        self._start = (int(state_dict["batches_done"]) if self.sampler is not None
                       else DataPosition(int(state_dict["epoch"]), int(state_dict["batches_done"])))
        self._restored = True
        self._strict = not changed
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" if self.sampler is None else k for k, (a, b) in changed.items())
            where = (f"batch {self._start}" if self.sampler is not None
                     else f"epoch {self._start.epoch} after skipping {self._start.batches_done} batch(es)")
            warnings.warn(f"resuming with different data settings ({diff}): training continues at {where}, but the "
                          f"batches are no longer those an uninterrupted run would have seen", stacklevel=2)

