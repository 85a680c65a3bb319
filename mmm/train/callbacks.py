"""Training callbacks: real-token throughput, a progress bar in optimizer steps."""
from __future__ import annotations

import time
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


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
        if self._last is not None:
            dt = max(now - self._last, 1e-9)
            pl_module.log("train/tokens_per_sec", batch.num_tokens / dt, on_step=True, batch_size=1, prog_bar=True)
            pl_module.log("train/seqs_per_sec", batch.num_sequences / dt, on_step=True, batch_size=1)
        self._last = now


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
        if self._should_update(trainer.global_step, bar.total or trainer.global_step):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
