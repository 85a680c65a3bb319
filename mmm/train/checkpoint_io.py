"""Checkpoint writes that a kill cannot leave half-done.

Lightning's default writer streams the bytes straight into the target file, so a process
killed mid-write leaves a truncated ``last.ckpt`` that no longer loads. Here every checkpoint is
written to a temporary file in the same folder, flushed to disk, and renamed over the target:
a reader sees either the previous complete file or the new complete one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-to-temporary, fsync, then atomic rename (local paths)."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        target = Path(path)
        if "://" in str(path):  # remote filesystems: no rename semantics to rely on
            return super().save_checkpoint(checkpoint, path, storage_options)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
