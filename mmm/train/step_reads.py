"""The host reads of one training step of a config (``mmm check-syncs``): what
:class:`mmm.host_reads.HostReadDetector` records in ``training_step`` and in backward, on the CPU."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import List, Optional

import torch

from mmm.host_reads import HostRead, HostReadDetector

BY_DESIGN = {("mmm/train/module.py", "training_step", "bool(tensor)"):
             "the non-finite loss check (trainer.nonfinite_loss): one read per step, after the forward is queued",
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

    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, accelerator="cpu"))
    run = build_run(cfg)
    run.datamodule.setup("fit")
    module = run.module.train()
    module.log = lambda *args, **kwargs: None  # no Trainer attached: logging is not what is checked
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
