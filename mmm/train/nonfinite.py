"""The non-finite training loss policy (``trainer.nonfinite_loss``: ``stop`` or ``skip``), checked
without a per-step host read where the optimizer can skip an update on the device.

Reading the loss back to decide (``bool(torch.isfinite(loss))``) makes the host wait for every
step's forward on a GPU. PyTorch's fused Adam/AdamW kernels take a ``found_inf`` tensor (the one
``torch.amp.GradScaler`` hands them, Micikevicius et al. 2018, "Mixed Precision Training"): when it is
non-zero the kernel leaves the weights, moments and step count as they were. So here, when

* the optimizer is a fused Adam/AdamW (it supports ``found_inf``),
* no ``GradScaler`` manages ``found_inf`` itself (precision is not ``16-mixed``),
* one process trains (ranks would not agree on a rank-local loss), and
* gradients are not accumulated (the kernel skips a whole optimizer step; reading drops one batch),

each step only queues ``found_inf = not isfinite(loss)`` for the optimizer and counts it on the device;
the host reads the count at logging steps (``trainer.log_every_n_steps``, when Lightning reads its
metrics anyway), before every checkpoint is written (so a checkpoint never follows an unreported bad
step, and ``stop`` writes none after it) and at the end of training. ``stop`` then raises, naming the first bad step and its
batch (kept on the host for the steps since the last read); ``skip`` logs the count. A bad step is an
optimizer step that changed nothing: it counts in ``global_step`` and the LR schedule, as a step
``GradScaler`` skips does, and the heads' post-step hooks run as after any step (data2vec's EMA
teacher averages the student's unchanged weights once more; ITC's smoothing schedule advances).
Otherwise the loss is read every step as before: the batch is dropped before backward, and Lightning still
calls the optimizer step, which finds no gradient and changes nothing but counts in ``global_step`` and the
LR schedule; no post-step hook runs. Under gradient accumulation the window's step goes on with its other
batches' gradients, clipped, and with its post-step hooks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

log = logging.getLogger("mmm.train")


MAX_PENDING = 4096
"""Most steps between two reads of the device count (their descriptions are kept on the host until then)."""


@dataclass(frozen=True)
class StepInfo:
    """What an error message says about a training step: host values, kept until the next check."""

    step: int
    batch_idx: int
    epoch: int
    sequences: int
    tokens: int

    def describe(self, value: str) -> str:
        return (f"non-finite training loss ({value}) at global step {self.step}, batch {self.batch_idx} of epoch "
                f"{self.epoch} ({self.sequences} sequences, {self.tokens} tokens)")


def world_size(trainer_cfg: Any) -> int:
    """Processes a run of ``trainer_cfg`` (:class:`mmm.config.TrainerConfig`) trains in; ``auto`` devices count as
    one (what it means on a CPU; on a machine with several GPUs the run itself decides, in ``on_train_start``)."""
    from mmm.config import ConfigError, data_parallel_size

    try:
        return data_parallel_size(trainer_cfg)
    except ConfigError:
        return int(trainer_cfg.num_nodes)


def device_skip_blockers(optimizer: Any, precision: str, world_size: int, accumulate: int = 1) -> List[str]:
    """Why the check cannot be made on the device for this run (empty: it can)."""
    out = []
    fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))
    if not fused:
        out.append(f"the optimizer ({type(optimizer).__name__}) is not a fused Adam/AdamW, which can skip an update "
                   f"on the device")
    if str(precision) in ("16", "16-mixed"):
        out.append(f"precision {precision} uses a GradScaler, which sets the optimizer's found_inf itself")
    if world_size > 1:
        out.append(f"{world_size} processes: each would decide on its own loss")
    if accumulate > 1:
        out.append(f"gradients are accumulated over {accumulate} batches: a bad one would cost the whole step its "
                   f"good ones, where reading drops only the bad batch")
    return out


class NonFiniteGuard:
    """Applies ``trainer.nonfinite_loss`` to each training loss (see the module docstring).

    Args:
        policy: ``stop`` or ``skip``.
    """

    def __init__(self, policy: str) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.optimizer: Optional[torch.optim.Optimizer] = None  # set: the check runs on the device
        self.skipped = 0  # bad steps found so far (host count)
        self._bad: Optional[torch.Tensor] = None  # device: bad steps of this process so far
        self._seen = 0  # _bad's value at the last read (skipped may start higher: a resumed run's count)
        self._first: Optional[torch.Tensor] = None  # device: the earliest unreported bad step's index in _pending
        self._first_loss: Optional[torch.Tensor] = None  # device: that step's loss
        self._pending: List[StepInfo] = []  # the steps since the last read

    def use_device(self, optimizer: torch.optim.Optimizer) -> None:
        """Check on the device from now on, through ``optimizer``'s ``found_inf``."""
        self.optimizer = optimizer

    def choose(self, optimizer: Any, precision: str, world_size: int, accumulate: int = 1) -> List[str]:
        """Check on the device when this run allows it (:func:`device_skip_blockers`); returns why not (empty:
        it does)."""
        blockers = device_skip_blockers(optimizer, precision, world_size, accumulate)
        if not blockers:
            self.use_device(optimizer)
        return blockers

    @property
    def on_device(self) -> bool:
        return self.optimizer is not None

    def admit(self, loss: torch.Tensor, info: StepInfo) -> bool:
        """Whether to train on this loss: on the device, always (a bad step is skipped by the optimizer);
        otherwise read now: True if finite, else raise (``stop``) or count it and return False (``skip``)."""
        if self.on_device:
            self._queue(loss, info)
            return True
        if bool(torch.isfinite(loss)):
            return True
        where = info.describe(str(float(loss.detach())))
        if self.policy == "stop":
            raise FloatingPointError(f"{where}; lower optim.lr or set trainer.nonfinite_loss: skip to drop such batches")
        self.skipped += 1
        log.warning("%s: skipped (no optimizer step); %d skipped so far", where, self.skipped)
        return False

    def _queue(self, loss: torch.Tensor, info: StepInfo) -> None:
        if len(self._pending) >= MAX_PENDING:  # no logging step or checkpoint for that long: read now
            self.read()
        bad = ~torch.isfinite(loss.detach())  # 0-d bool on the loss's device: nothing read
        index = len(self._pending)
        self._pending.append(info)
        if self._bad is None:
            self._bad = torch.zeros((), dtype=torch.int64, device=bad.device)
            self._first = torch.full((), -1, dtype=torch.int64, device=bad.device)
            self._first_loss = torch.zeros((), dtype=torch.float32, device=bad.device)
        first = bad & (self._first < 0)
        self._first = torch.where(first, torch.full_like(self._first, index), self._first)
        self._first_loss = torch.where(first, loss.detach().float(), self._first_loss)
        self._bad = self._bad + bad.long()
        self.optimizer.found_inf = bad.float()  # read by the fused kernel inside this optimizer step

    def after_optimizer_step(self) -> None:
        """The flag served its optimizer step."""
        if self.optimizer is not None and hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf

    def read(self) -> Optional[str]:
        """At a logging step or the end: read the device count (one read). Returns a description of the first
        bad step since the last read, or None; ``stop`` raises with it."""
        if not self.on_device or self._bad is None:
            return None
        total, first, value = torch.stack([self._bad.double(), self._first.double(), self._first_loss.double()]).tolist()
        total, first = int(total), int(first)  # one read of the three
        pending, self._pending = self._pending, []
        self._first = torch.full_like(self._first, -1)
        new, self._seen = total - self._seen, total
        if new == 0:
            return None
        self.skipped += new
        where = pending[first].describe(str(value)) if 0 <= first < len(pending) else "non-finite training loss"
        if self.policy == "stop":
            raise FloatingPointError(f"{where}; its update was skipped on the device; lower optim.lr or set "
                                     f"trainer.nonfinite_loss: skip to go on past such batches")
        log.warning("%s: skipped on the device (an optimizer step that changed nothing); %d such step(s) since the "
                    "last logging step, %d in all", where, new, self.skipped)
        return where
