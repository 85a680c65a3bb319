"""Training callbacks: real-token throughput."""
from __future__ import annotations

import time
from typing import Optional

import lightning as L


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
