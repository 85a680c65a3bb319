"""Training callbacks: real-token throughput, a progress bar in optimizer steps (neither makes a GPU step wait:
see :mod:`mmm.train.host_metrics`), and the final step's checkpoint."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from mmm.train.host_metrics import bar_metrics, log_host_value, logs_this_step


class ThroughputMonitor(L.Callback):
    """Logs ``train/tokens_per_sec`` and ``train/seqs_per_sec`` of real (packed, unpadded) tokens.

    Measured between consecutive batch ends, so data loading is included: it is what a run gets.
    """

    def __init__(self) -> None:
        self._last: Optional[float] = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None and logs_this_step(trainer):
            dt = max(now - self._last, 1e-9)  # host numbers, logged on the host (no copy to the GPU)
            log_host_value(pl_module, "train/tokens_per_sec", batch.num_tokens / dt)
            log_host_value(pl_module, "train/seqs_per_sec", batch.num_sequences / dt)
        self._last = now


class RunCheckpoint(ModelCheckpoint):
    """Lightning's :class:`ModelCheckpoint` (periodic step checkpoints and ``last.ckpt``) that also writes
    ``last.ckpt`` at the end of the step reaching ``trainer.max_steps``, inside the training loop, as the periodic
    checkpoints are written.

    Lightning otherwise writes the final ``last.ckpt`` in ``on_train_end``, with the loop's epoch already closed, so
    a run resumed from it to a larger ``max_steps`` counted one epoch more than the uninterrupted run (in its logs,
    and in the data epoch of a checkpoint without a data position). ``final_step_saved`` says which step was written,
    so :func:`mmm.train.pretrain.save_final_checkpoint` writes one only for a run that stopped otherwise.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.final_step_saved: Optional[int] = None

    @property
    def state_key(self) -> str:
        """Lightning's key of this callback's state in a checkpoint: ModelCheckpoint's, so the checkpoints written
        before this subclass (and after) restore its state alike."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if 0 < trainer.max_steps <= step and self.final_step_saved != step:
            if getattr(self, "_last_global_step_saved", None) != step:  # not already saved as a periodic one
                trainer.save_checkpoint(str(self.last_path))  # every rank calls it (it gathers the random states)
            self.final_step_saved = step

    def on_train_end(self, trainer, pl_module) -> None:
        if self.final_step_saved != trainer.global_step:
            super().on_train_end(trainer, pl_module)


class StepProgressBar(TQDMProgressBar):
    """A progress bar in optimizer steps: ``step 120/1000``, one bar for the whole run.

    Lightning's bar counts batches of the current epoch, whose length a streamed (iterable) data
    set does not know, and labels step-based runs with an epoch count; mmm runs are step-based
    (``trainer.max_steps``), so the bar shows steps done out of the total, resumed runs included.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._reset_to_steps(trainer)

    def on_train_epoch_start(self, trainer, *_) -> None:
        if self.train_progress_bar is None or self.train_progress_bar.disable:
            return
        self._reset_to_steps(trainer)

    def _reset_to_steps(self, trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.initial = 0
        bar.n = trainer.global_step
        bar.set_description("step")
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        step = trainer.global_step
        if self._should_update(step, bar.total or step):
            bar.n = step
            if step % max(1, trainer.log_every_n_steps) == 0 or step == bar.total:  # the numbers: read as the logger does
                bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer, pl_module) -> Dict[str, Any]:
        """Lightning's (the version, metrics logged with ``prog_bar``) and the training metrics of
        :data:`mmm.train.host_metrics.BAR_METRICS` and the module's ``bar_keys``, read from
        ``trainer.callback_metrics`` now."""
        keys = getattr(pl_module, "bar_keys", ())
        return {**super().get_metrics(trainer, pl_module), **bar_metrics(trainer.callback_metrics, keys)}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
