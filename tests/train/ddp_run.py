"""A real Lightning DDP run on CPU (gloo) that records what every rank trains on; driven by test_ddp.py.

    python tests/train/ddp_run.py OUT SHARDS TOKENIZER DEVICES BATCH STEPS

Lightning's DDP launcher starts ranks 1.. by running this script again (with ``LOCAL_RANK`` set).
Each rank writes ``OUT/rank{R}.pt``: the initial weights, and per training step its epoch, loss
and packed batch; for the first step also the gradients after DDP's all-reduce; and from the one
validation after the last step, the weights it ran with, its number of batches and the logged
``val/*`` values.
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[2]


class Recorder(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: list = []
        self.initial: dict = {}
        self.grads: dict = {}
        self.val_weights: dict = {}
        self.val_batches = 0
        self.val_metrics: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:  # DDP has averaged the gradients over the ranks by now
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                          if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t_in, t_out = batch.inputs["text"], batch.targets["text"]
        self.steps.append({"epoch": trainer.current_epoch, "loss": float(outputs["loss"]),
                           "ids": t_in.ids.clone(), "cu_seqlens": batch.seq.cu_seqlens.clone(),
                           "positions": t_out.positions.clone(), "labels": t_out.labels.clone()})

    def on_validation_start(self, trainer, pl_module) -> None:
        self.val_weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.val_batches = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_batches += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"world_size": trainer.world_size, "initial": self.initial, "grads": self.grads,
                    "steps": self.steps, "val_weights": self.val_weights, "val_batches": self.val_batches,
                    "val_metrics": self.val_metrics}, self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path, shards: str, tokenizer: str, devices: int, batch: int, steps: int) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_OVERRIDES
    from mmm.config import load_config
    from mmm.train.pretrain import build_run

    cfg = load_config(REPO / "configs" / "text_mlm_tiny.yaml", {
        **TINY_OVERRIDES, "trainer.default_root_dir": str(out / "run"), "data.train": shards,  # shared by the ranks, as on a cluster
        "data.val": shards, "data.batch_size": batch, "data.num_workers": 0, "data.shuffle_buffer": 0,
        "data.seed": 3, "model.text.tokenizer_path": tokenizer, "trainer.max_steps": steps,
        "optim.warmup_steps": 1})
    run = build_run(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=steps,
                        check_val_every_n_epoch=None,
                        gradient_clip_val=None, callbacks=[Recorder(out)])
    trainer.fit(run.module, datamodule=run.datamodule)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(Path(a[0]), a[1], a[2], int(a[3]), int(a[4]), int(a[5]))
