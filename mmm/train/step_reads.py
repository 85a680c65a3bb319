"""The host reads of a config's training (``mmm check-syncs``): what :class:`mmm.host_reads.HostReadDetector`
records in ``training_step`` and backward for one batch per task (:func:`step_host_reads`), and, step by step,
in a short run through Lightning's loop with its logging, callbacks and optimizer (:func:`loop_host_reads`)."""
from __future__ import annotations

import dataclasses
import itertools
import shutil
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch

from mmm.host_reads import HostRead, HostReadDetector
from mmm.train.nonfinite import world_size

BY_DESIGN = {("mmm/train/nonfinite.py", "admit", "bool(tensor)"):
             "the non-finite loss check (trainer.nonfinite_loss) where it cannot run on the device (not a fused "
             "Adam/AdamW, fp16's GradScaler, several processes, gradient accumulation): one read per step, after "
             "the forward is queued",
             ("mmm/steps/hard_negatives.py", "mine", "Tensor.tolist()"):
             "ITM hard negatives: the mined pairs' layout depends on the drawn indices (one read per mining step)"}
"""Host reads a training step makes on purpose: (file, function, kind) → why."""


def by_design(read: HostRead) -> Optional[str]:
    """Why ``read`` is made on purpose (:data:`BY_DESIGN`), or None."""
    place = read.where.split(" in ", 1)
    path, func = place[0].rsplit(":", 1)[0], place[-1]
    return BY_DESIGN.get((path, func, read.what))


@dataclass
class StepReads:
    """The host reads of a config's training steps, one per task: forward (``training_step``) and backward."""

    forward: List[HostRead]
    backward: List[HostRead]
    tasks: List[str] = dataclasses.field(default_factory=list)  # the tasks whose batch was stepped ("" = single task)

    def unplanned(self) -> List[HostRead]:
        """Distinct sites not in :data:`BY_DESIGN`, in the order first met."""
        return [r for r in dict.fromkeys(self.forward + self.backward) if by_design(r) is None]

    def report(self) -> str:
        lines = [f"tasks stepped: {', '.join(t or '(single task)' for t in self.tasks)}"] if self.tasks else []
        reads = []
        for part, found in (("forward", self.forward), ("backward", self.backward)):
            for r in dict.fromkeys(found):
                why = by_design(r)
                reads.append(f"{part}: {r} ({found.count(r)}x)" + (f" [by design: {why}]" if why else ""))
        return "\n".join(lines + (reads or ["no host reads"]))


def step_host_reads(cfg, max_batches: int = 64) -> StepReads:
    """Build ``cfg``'s run on the CPU and record the host reads of one training step per task.

    A single-task run steps its first batch; a multi-task run steps the first batch of each task the
    loader draws within ``max_batches`` (an error names the tasks never drawn). Each batch goes
    through the training module's ``transfer_batch_to_device`` first, as in a run, so what that hook
    does on the host (before a GPU copy) is not counted.
    """
    from mmm.train.pretrain import build_run

    with _scratch_run(cfg) as scratch:
        run = build_run(scratch)
        run.datamodule.setup("fit")
        module = run.module.train()
        module.log = lambda *args, **kwargs: None  # no Trainer attached: logging is not what is checked
        optimizer = module.configure_optimizers()["optimizer"]
        tc = cfg.trainer  # as on_train_start decides in the run the config describes
        module.nonfinite_guard.choose(optimizer, tc.precision, world_size(tc), tc.accumulate_grad_batches)
        return _step_each_task(cfg, run, module, max_batches)


@contextmanager
def _scratch_run(cfg, accelerator: str = "cpu") -> Iterator[Any]:
    """``cfg`` run in a temporary folder (removed after), on ``accelerator``, in one process, not resuming: a
    check never touches the run folder the config names (its ``config.yaml``, checkpoints, logs)."""
    folder = tempfile.mkdtemp(prefix="mmm_check_syncs_")
    try:
        yield dataclasses.replace(cfg, trainer=dataclasses.replace(
            cfg.trainer, accelerator=accelerator, devices=1, num_nodes=1, ckpt_path=None, default_root_dir=folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


CUDA_SYNC_WARNING = "called a synchronizing CUDA operation"
"""What ``torch.cuda.set_sync_debug_mode("warn")`` warns."""


@contextmanager
def _cuda_syncs_by_step(trainer, into: Dict[int, List[str]]) -> Iterator[None]:
    """On CUDA: every synchronisation CUDA's sync debug mode reports (also those inside torch, which the
    detector does not see), filed under the trainer's step as the warning's source line."""
    before = torch.cuda.get_sync_debug_mode()
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if CUDA_SYNC_WARNING in str(message):
            into.setdefault(int(trainer.global_step), []).append(f"{filename}:{lineno}")
        else:
            shown(message, category, filename, lineno, file, line)

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters after
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _step_each_task(cfg, run, module, max_batches: int) -> "StepReads":
    wanted = {t.name for t in cfg.tasks} or {""}
    out = StepReads([], [])
    for i, batch in enumerate(itertools.islice(run.datamodule.train_dataloader(), max_batches)):
        if batch.task not in wanted or batch.task in out.tasks:
            continue
        batch = module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        with HostReadDetector() as forward:
            loss = module.training_step(batch, i)
        with HostReadDetector() as backward:
            if loss is not None:
                loss.backward()
        out.forward += forward.found
        out.backward += backward.found
        out.tasks.append(batch.task)
        if set(out.tasks) == wanted:
            return out
    raise RuntimeError(f"check-syncs: tasks {sorted(wanted - set(out.tasks))} drew no batch in the first "
                       f"{max_batches} batches; raise their weight or check their data")


@dataclass
class LoopReads:
    """The host reads of a short training run through Lightning's loop, per optimizer step.

    ``by_step[k]``: the reads made while ``trainer.global_step`` was ``k`` (the training step of batch
    ``k``, then its callbacks after the optimizer step, already counted as step ``k + 1``).
    ``logged``: the steps at which Lightning's logger and the progress bar read their values (0, half way and
    the end: :func:`loop_host_reads` sets the interval), where reads are expected.
    """

    by_step: Dict[int, List[HostRead]]
    steps: int
    logged: List[int]
    cuda_syncs: Dict[int, List[str]] = dataclasses.field(default_factory=dict)  # on CUDA: what its debug mode saw
    trained: int = 0  # the optimizer steps the run made

    def cuda_between_logging(self) -> List[str]:
        """Distinct places CUDA's sync debug mode reported at the quiet steps (on CUDA only)."""
        return list(dict.fromkeys(w for k in self.quiet_steps() for w in self.cuda_syncs.get(k, [])))

    def between_logging(self) -> List[HostRead]:
        """Distinct reads not in :data:`BY_DESIGN` at the quiet steps (:meth:`quiet_steps`)."""
        quiet = self.quiet_steps()
        return [r for r in dict.fromkeys(r for k in quiet for r in self.by_step.get(k, [])) if by_design(r) is None]

    def quiet_steps(self) -> List[int]:
        """Steps at least two away from a logging step (step 0, with the set-up, is one): Lightning's LR
        monitor reads at the start of the step before a logging step, and its logger at or right after it."""
        return [k for k in range(1, self.steps) if all(abs(k - m) > 1 for m in self.logged)]

    def report(self) -> str:
        """One line per distinct read: how often, at which steps, and why when it is planned."""
        steps: Dict[HostRead, List[int]] = {}
        for k in sorted(self.by_step):
            for r in self.by_step[k]:
                steps.setdefault(r, []).append(k)
        lines = []
        for r, at in steps.items():
            why = by_design(r)
            lines.append(f"{r}: {len(at)}x at steps {_ranges(sorted(set(at)))}" + (f" [by design: {why}]" if why else ""))
        return "\n".join(lines or ["no host reads"])


def _ranges(values: List[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2, 5, 7-8"``."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def loop_host_reads(cfg, steps: int = 12, accelerator: str = "cpu") -> LoopReads:
    """Train ``cfg`` for ``steps`` optimizer steps on the CPU through ``trainer.fit`` (Lightning's loop,
    logging, progress bar, callbacks, gradient clipping, the optimizer and the LR schedule) and record
    every host read, per step. It runs in a temporary folder (the config's run folder is not touched),
    in one process, without validation; Lightning logs at steps 0, ``steps // 2`` and ``steps``.

    Reads at and next to the logging steps are Lightning writing its logs (one read per logged tensor)
    and its LR monitor; :meth:`LoopReads.between_logging` lists the others.
    """
    from mmm.train.pretrain import build_run

    if steps < 8:
        raise ValueError(f"check-syncs --loop: give at least 8 steps (logging at the start, the middle and the end, "
                         f"and steps between), got {steps}")
    every = steps // 2  # logs at 0, steps/2 and the end: quiet windows in both halves, whatever the config's interval
    cuda: Dict[int, List[str]] = {}
    with _scratch_run(cfg, accelerator) as scratch:
        tc = dataclasses.replace(scratch.trainer, max_steps=steps, log_every_n_steps=every,
                                 checkpoint_every_n_steps=10 * steps, val_check_interval=10 * steps)
        run = build_run(dataclasses.replace(scratch, trainer=tc, data=dataclasses.replace(scratch.data, val=None)))
        with HostReadDetector(tag=lambda: run.trainer.global_step) as detector, \
                (_cuda_syncs_by_step(run.trainer, cuda) if accelerator == "cuda" else nullcontext()):
            run.trainer.fit(run.module, datamodule=run.datamodule)
        trained = int(run.trainer.global_step)
    by_step: Dict[int, List[HostRead]] = {}
    for read, step in zip(detector.found, detector.tags):
        by_step.setdefault(int(step), []).append(read)
    return LoopReads(by_step, steps, [k for k in range(steps + 1) if k % every == 0], cuda, trained)
