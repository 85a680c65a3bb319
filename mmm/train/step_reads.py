"""The host reads of one training step of a config (``mmm check-syncs``): what
:class:`mmm.host_reads.HostReadDetector` records in ``training_step`` and in backward, on the CPU."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch

from mmm.host_reads import HostRead, HostReadDetector

BY_DESIGN = {("mmm/train/module.py", "training_step"):
             "the non-finite loss check (trainer.nonfinite_loss): one read per step, after the forward is queued"}
"""Host reads a training step makes on purpose: (file, function) → why."""


def by_design(read: HostRead) -> Optional[str]:
    """Why ``read`` is made on purpose (:data:`BY_DESIGN`), or None."""
    place = read.where.split(" in ", 1)
    path, func = place[0].rsplit(":", 1)[0], place[-1]
    return BY_DESIGN.get((path, func))


@dataclass
class StepReads:
    """The host reads of one training step of a config: forward (``training_step``) and backward."""

    forward: List[HostRead]
    backward: List[HostRead]

    def unplanned(self) -> List[HostRead]:
        """Distinct sites not in :data:`BY_DESIGN`, in the order first met."""
        return [r for r in dict.fromkeys(self.forward + self.backward) if by_design(r) is None]

    def report(self) -> str:
        lines = []
        for part, reads in (("forward", self.forward), ("backward", self.backward)):
            for r in dict.fromkeys(reads):
                why = by_design(r)
                lines.append(f"{part}: {r} ({reads.count(r)}x)" + (f" [by design: {why}]" if why else ""))
        return "\n".join(lines) if lines else "no host reads"


def step_host_reads(cfg) -> StepReads:
    """Build ``cfg``'s run on the CPU and record the host reads of one training step on its first batch.

    The batch goes through the training module's ``transfer_batch_to_device`` first, as in a run, so
    what that hook does on the host (before a GPU copy) is not counted.
    """
    from mmm.train.pretrain import build_run

    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, accelerator="cpu"))
    run = build_run(cfg)
    run.datamodule.setup("fit")
    batch = next(iter(run.datamodule.train_dataloader()))
    module = run.module.train()
    batch = module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    module.log = lambda *args, **kwargs: None  # no Trainer attached: logging is not what is checked
    with HostReadDetector() as forward:
        loss = module.training_step(batch, 0)
    with HostReadDetector() as backward:
        if loss is not None:
            loss.backward()
    return StepReads(forward.found, backward.found)
