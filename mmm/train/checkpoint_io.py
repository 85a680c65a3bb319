"""Checkpoint writes that a kill cannot leave half-done, and checked reads for resuming.

Lightning's default writer streams the bytes straight into the target file, so a process
killed mid-write leaves a truncated ``last.ckpt`` that no longer loads. Here every checkpoint is
written to a temporary file in the same folder, flushed to disk, and renamed over the target:
a reader sees either the previous complete file or the new complete one. A write that fails (a
full disk, a read-only folder) raises an ``OSError`` naming the checkpoint, not the temporary file.

:func:`read_resume_checkpoint` opens a checkpoint to resume from the way Lightning will, but
first and with errors a user can act on: a truncated or foreign file, or one whose pickle carries
code (refused by ``torch.load(weights_only=True)`` before any of it runs), is named as such.
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmm.errors import CheckpointError


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        return "free space unknown"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-to-temporary, fsync, then atomic rename (local paths)."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        target = Path(path)
        if "://" in str(path):  # remote filesystems: no rename semantics to rely on
            return super().save_checkpoint(checkpoint, path, storage_options)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as e:
            code = e.errno if e.errno is not None else errno.EIO
            reason = "no space left on device" if code == errno.ENOSPC else (e.strerror or str(e))
            raise OSError(code, f"cannot write checkpoint ({reason}; {_free_space(target.parent)})",
                          str(target)) from e
        finally:
            if tmp.exists():
                tmp.unlink()


def read_resume_checkpoint(path: Path) -> Dict[str, Any]:
    """The checkpoint at ``path``, memory-mapped (tensors are not read), for checks before resuming.

    Raises :class:`~mmm.errors.CheckpointError` naming ``path`` when the file is truncated or not
    a PyTorch checkpoint, when its pickle references anything beyond tensors and plain data
    (``weights_only`` refuses it before it runs), or when it is not a Lightning checkpoint.

    Args:
        path: the checkpoint file (``trainer.ckpt_path``, resolved).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if lines and lines[0].startswith("Weights only load failed"):
            detail = next((ln.split("WeightsUnpickler error:", 1)[-1].strip() for ln in lines[1:]
                           if "global" in ln.lower() or "WeightsUnpickler" in ln), lines[1] if len(lines) > 1 else "")
            raise CheckpointError(f"trainer.ckpt_path: refusing to load {path}: it holds pickled objects other than "
                                  f"tensors and plain data (code could run), and mmm loads checkpoints with "
                                  f"torch.load(weights_only=True): {detail}") from None
        raise CheckpointError(f"trainer.ckpt_path: {path} is truncated or corrupt, not a PyTorch checkpoint "
                              f"({lines[0] if lines else 'unpickling failed'})") from None
    except (RuntimeError, ValueError, EOFError) as e:  # zip reader failures, a non-zip legacy or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "mmap can only be used" in first:
            first = "not a zip-format torch.save file"
        raise CheckpointError(f"trainer.ckpt_path: {path} is truncated or corrupt, not a complete PyTorch "
                              f"checkpoint ({first}); resume from an earlier checkpoint in its folder") from None
    from mmm.checkpoint import damaged_entry

    bad = damaged_entry(path)
    if bad is not None:
        raise CheckpointError(f"trainer.ckpt_path: {path} is corrupt: the bytes of its entry {bad!r} do not match "
                              f"their CRC-32 (damaged on disk or in a copy); resume from an earlier checkpoint in its "
                              f"folder")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"trainer.ckpt_path: {path} is not a Lightning training checkpoint (no state_dict and "
                              f"global_step; found {found})")
    return ckpt
