"""The thin LightningModule: one ``_common_step``; objectives return their losses, it sums and logs."""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch

from mmm.batch import PackedBatch
from mmm.config import OptimConfig
from mmm.model import MaskedModel
from mmm.train.host_metrics import log_host_value, logs_this_step
from mmm.train.nonfinite import NonFiniteGuard, StepInfo
from mmm.train.phases import PhaseSchedule

log = logging.getLogger("mmm.train")


def lr_lambda(optim: OptimConfig, max_steps: int):
    """Multiplier of the peak lr at a step: linear warmup, then linear/cosine/constant decay.

    Warmup reaches the peak at step ``warmup_steps - 1`` (step 0 with no warmup); the decay runs from that step to
    the last step trained, ``max_steps - 1``, which trains at ``min_lr_ratio`` of the peak."""
    if optim.schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"optim.schedule must be linear, cosine or constant, got {optim.schedule!r}")

    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / max(1, optim.warmup_steps)
        if optim.schedule == "constant":
            return 1.0
        peak = max(optim.warmup_steps - 1, 0)  # the step warmup ends on
        progress = min(1.0, (step - peak) / max(1, max_steps - 1 - peak))
        shape = 1.0 - progress if optim.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape

    return f


def config_optimizer_settings(checkpoint: Dict[str, Any], optim: OptimConfig, max_steps: int) -> None:
    """Put the config's optimizer settings into a checkpoint about to be restored, so that a resumed run trains
    with them (``optim.lr``, ``betas``, ``eps``, ``weight_decay``, the schedule, and ``optim.args`` a group
    holds) while keeping the optimizer's state (moments, step counts) and the schedule's position.

    Lightning restores the saved ``param_groups`` and the scheduler's ``base_lrs`` after this hook; unchanged,
    they would silently keep the old run's values. With an unchanged config the values written are the ones
    saved, bit for bit (the scheduler's own ``base_lr * lambda(step)``).
    """
    states, schedulers = checkpoint.get("optimizer_states") or [], checkpoint.get("lr_schedulers") or []
    if len(states) != 1 or len(schedulers) != 1:
        return
    groups, sched = states[0].get("param_groups", []), schedulers[0]
    if len(groups) != 2 or "last_epoch" not in sched:  # not weight_decay_groups' two groups under LambdaLR
        return
    lr = optim.lr * lr_lambda(optim, max_steps)(int(sched["last_epoch"]))
    for group, decay in zip(groups, (optim.weight_decay, 0.0)):
        group.update(lr=lr, initial_lr=optim.lr, weight_decay=decay)
        for key, value in (("betas", tuple(optim.betas)), ("eps", optim.eps), *optim.args.items()):
            if key in group:
                group[key] = value
    sched["base_lrs"] = [optim.lr] * len(groups)
    if "_last_lr" in sched:
        sched["_last_lr"] = [lr] * len(groups)


def merge_val_sums(parts: List[Dict[Tuple[str, str], Dict[str, Tuple[float, int]]]]
                   ) -> Dict[Tuple[str, str], Dict[str, float]]:
    """Count-weighted means of the ranks' validation sums.

    Args:
        parts: one dict per rank, ``(prefix, head) -> metric -> (sum of mean x count, count)``.

    Returns:
        ``(prefix, head) -> metric -> sum / count`` over all ranks; a metric no rank counted anything
        for is left out (a head with no prediction in the epoch has no mean).
    """
    merged: Dict[Tuple[str, str], Dict[str, List[float]]] = {}
    for part in parts:
        for key, sums in part.items():
            for metric, (total, count) in sums.items():
                s = merged.setdefault(key, {}).setdefault(metric, [0.0, 0])
                s[0] += total
                s[1] += count
    out = {key: {m: total / count for m, (total, count) in sums.items() if count} for key, sums in merged.items()}
    return {key: means for key, means in out.items() if means}


def _world() -> Optional[Tuple[int, int]]:
    """``(rank, world size)`` of an initialised process group of several processes, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


class MaskedModelingModule(L.LightningModule):
    """Trains a :class:`~mmm.model.MaskedModel`.

    Args:
        model: the assembled model.
        optim: optimizer settings.
        max_steps: total optimizer steps (for the lr schedule).
        extra_state: plain data saved under ``checkpoint["mmm"]`` (config, tokenizer files) so a
            checkpoint is self-contained and loads with ``torch.load(weights_only=True)``.
        nonfinite: on a NaN/inf training loss, ``stop`` with a message naming the step and batch,
            or ``skip`` the batch (no optimizer step) and count it in ``train/nonfinite_skipped``.
        phases: a phased run's schedule: a training step trains only the heads of the phase of
            its global step (logged as ``train/phase``); validation scores every head.
    """

    def __init__(self, model: MaskedModel, optim: OptimConfig, max_steps: int,
                 extra_state: Optional[Dict[str, Any]] = None, nonfinite: str = "stop",
                 phases: Optional[PhaseSchedule] = None) -> None:
        super().__init__()
        self.nonfinite_guard = NonFiniteGuard(nonfinite)  # raises on a policy other than stop / skip
        self.model = model
        self.optim = optim
        self.max_steps = max_steps
        self.extra_state = extra_state or {}
        # some training batch of the current accumulation window was trained on (not skipped as non-finite): its
        # gradients are clipped and the post-step hooks run; reset after each optimizer step
        self._window_trained = False
        self.bar_keys: Dict[str, None] = {}  # training metrics the progress bar shows besides loss and tokens/s
        self._pending_logs: Dict[str, Tuple[torch.Tensor, int]] = {}  # training metrics since the last logging step
        self._itm_shortfall_warned = False
        self._val_sums: Dict[Tuple[str, str], Dict[str, list]] = {}  # (prefix, head) -> metric -> [sum, count]
        self.phases = phases
        self._phase: Optional[int] = None  # the phase of the last training step (logged when it changes)

    def transfer_batch_to_device(self, batch: PackedBatch, device: torch.device, dataloader_idx: int) -> PackedBatch:
        if torch.device(device).type != "cpu":
            heads = self._transfer_heads(batch)
            if batch.seq.cu_seqlens.device.type == "cpu":
                self.model.check_batch(batch, heads)  # value checks on the host, not in the step
            if batch.output_rows is None:
                # the final-layer subset's rows, found while the batch is still on the host (no device read later)
                batch = dataclasses.replace(batch, output_rows=self.model.output_rows(batch, heads))
        return batch.to(device)  # PackedBatch knows its own tensors; Lightning's generic walk does not

    def _transfer_heads(self, batch: PackedBatch) -> Optional[List[str]]:
        """The heads that will score a batch moved now: those of the current phase while training a phased
        run, else None (every head of the batch). Unlike :meth:`_train_heads` it logs nothing."""
        trainer = self._trainer
        if self.phases is None or trainer is None or not trainer.training:
            return None
        phase = self.phases.heads[self.phases.index_at(self.global_step)]
        return [name for name in self.model.heads_for(batch) if name in phase]

    def _train_heads(self) -> Optional[Tuple[str, ...]]:
        """The heads this training step trains: its phase's in a phased run (a function of the global
        step, so a resumed run is in the same phase), None (every head) otherwise."""
        if self.phases is None:
            return None
        index = self.phases.index_at(self.global_step)
        if index != self._phase:
            log.info("step %d: phase %d of %d trains %s", self.global_step, index, len(self.phases.ends),
                     ", ".join(self.phases.heads[index]))
            self._phase = index
        self._pending_logs["train/phase"] = (torch.tensor(float(index)), 1)  # a host number, kept on the host
        return self.phases.heads[index]

    def _common_step(self, batch: PackedBatch, stage: str) -> torch.Tensor:
        loss, outputs = self.model(batch, heads=self._train_heads() if stage == "train" else None)
        # a multi-task batch logs under its task (train/itm/loss); single-task runs keep plain keys
        prefix = f"{stage}/{batch.task}" if batch.task else stage
        if stage == "val":  # logged once per epoch, reduced over every rank's batches
            self._add_val_sums(prefix, outputs)
            return loss
        # Each step's values (with the phase and data-error count put there before the forward) wait here,
        # detached: a reference, no copy, no read. They are logged at the next step whose metrics reach the
        # logger, the latest value per key: so a multi-task run's tasks that were not drawn at that step still
        # log their latest values (mmm.train.host_metrics.logs_this_step)
        n = batch.num_sequences
        pending = self._pending_logs
        if batch.task:
            pending["train/loss"] = (loss.detach(), n)
        pending[f"{prefix}/loss"] = (loss.detach(), n)
        for name, out in outputs.items():
            pending[f"{prefix}/{name}_loss"] = (out.loss.detach(), max(1, out.count))
            for metric, value in out.metrics.items():
                pending[f"{prefix}/{name}_{metric}"] = (value.detach(), max(1, out.count))
                if metric == "acc" and not batch.task:
                    self.bar_keys.setdefault(f"{prefix}/{name}_{metric}")
        if logs_this_step(self._trainer):
            # no prog_bar: Lightning would read each such value back after every step; the progress bar reads
            # the ones it shows when it redraws its numbers (mmm.train.host_metrics)
            for key, (value, size) in pending.items():
                self.log(key, value, batch_size=size, on_step=True, on_epoch=False, add_dataloader_idx=False)
            pending.clear()
        return loss

    def _add_val_sums(self, prefix: str, outputs: Dict[str, Any]) -> None:
        """Add a validation batch's loss and metrics of each head, times its count, to this rank's sums."""
        for name, out in outputs.items():
            sums = self._val_sums.setdefault((prefix, name), {})
            for metric, value in (("loss", out.loss), *out.metrics.items()):
                s = sums.setdefault(metric, [0.0, 0])
                s[0] = s[0] + value.detach().float() * out.count  # a device tensor until the epoch ends
                s[1] += out.count

    def training_step(self, batch: PackedBatch, batch_idx: int) -> Optional[torch.Tensor]:
        errors = batch.extras.get("data_errors_total")
        if errors is not None:  # bad samples/shards this rank's data workers met so far (summed over workers)
            self._pending_logs["train/data_errors"] = (torch.tensor(float(errors)), 1)  # logged with the step's
        self._note_itm_shortfall(batch)
        loss = self._common_step(batch, "train")
        info = StepInfo(self.global_step, batch_idx, self.current_epoch, batch.num_sequences, batch.num_tokens)
        if self.nonfinite_guard.admit(loss, info):  # stop raises; on the device, always True
            self._window_trained = True
            return loss
        log_host_value(self, "train/nonfinite_skipped", self.nonfinite_skipped)
        return None  # Lightning skips backward and the optimizer step

    def _note_itm_shortfall(self, batch: PackedBatch) -> None:
        """Log ``train/[task/]itm_no_negative``: the ITM pairs drawn to be negatives that stayed positive because
        every other caption of the batch describes their image (identical captions, a batch of one); warn the first
        time, since the itm head then learns from fewer negatives than ``model.image_text.itm_negatives`` asks."""
        missing = batch.extras.get("itm_no_negative")
        if missing is None:
            return
        key = f"train/{batch.task}/itm_no_negative" if batch.task else "train/itm_no_negative"
        self._pending_logs[key] = (torch.tensor(float(missing)), 1)  # a host number, kept on the host
        if missing and not self._itm_shortfall_warned:
            self._itm_shortfall_warned = True
            log.warning("ITM%s: %d of %d pair(s) drawn as negatives stayed positive at step %d: every other caption "
                        "of the batch describes their image (identical captions, or a batch of one), so the itm "
                        "head sees fewer negatives than model.image_text.itm_negatives asks for; logged as %s",
                        f" (task {batch.task!r})" if batch.task else "", missing, len(batch.extras.get("keys", ())),
                        self.global_step, key)

    @property
    def nonfinite_skipped(self) -> int:
        """Training batches with a non-finite loss skipped so far (on the device: as of the last logging step)."""
        return self.nonfinite_guard.skipped

    def on_train_start(self) -> None:
        """Check non-finite losses on the device when the run allows it (:mod:`mmm.train.nonfinite`)."""
        trainer = self.trainer
        blockers = self.nonfinite_guard.choose(trainer.optimizers[0] if trainer.optimizers else None,
                                               trainer.precision, trainer.world_size, trainer.accumulate_grad_batches)
        if not blockers:
            log.info("non-finite loss check: on the device (the fused optimizer skips a bad step), read every %d "
                     "steps and before each checkpoint", trainer.log_every_n_steps)
        else:
            log.info("non-finite loss check: read every step (%s)", "; ".join(blockers))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """On the device, the non-finite count is read at logging steps, when Lightning reads its metrics."""
        guard = self.nonfinite_guard
        if guard.on_device and self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            before = guard.skipped
            guard.read()  # stop raises here
            if guard.skipped != before:
                log_host_value(self, "train/nonfinite_skipped", guard.skipped)

    def on_train_end(self) -> None:
        self.nonfinite_guard.read()  # the steps since the last logging step (stop raises here)

    def validation_step(self, batch: PackedBatch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._common_step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def on_validation_epoch_end(self) -> None:
        """Log every head's validation loss and metrics as count-weighted means over all ranks' batches.

        Heads' validation losses are per-batch means (no collective runs during validation, where
        ranks may hold different numbers of batches); here every rank's sums of ``mean x count`` are
        gathered once and merged, so each value is the mean over every prediction of the epoch,
        the same on every rank and as one process would compute it. ``<prefix>/loss`` is the
        weighted sum of the heads' means (the training objective), and heads that predict over a
        vocabulary also log ``<prefix>/<head>_ppl``.
        """
        local = {key: {m: (float(total), count) for m, (total, count) in sums.items()}
                 for key, sums in self._val_sums.items()}
        parts = [local]
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # ranks may have seen different heads (or no batch): merge every rank's sums, then all log the same values
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        # the values are already global and equal on every rank: no further reduction (and no Lightning sync)
        log = dict(add_dataloader_idx=False, rank_zero_only=True)
        totals: Dict[str, float] = {}
        for (prefix, name), means in sorted(merge_val_sums(parts).items()):
            for metric, value in means.items():
                self.log(f"{prefix}/{name}_{metric}", value, prog_bar=(metric == "acc" and prefix == "val"), **log)
            if "loss" in means:
                totals[prefix] = totals.get(prefix, 0.0) + self.model.weights[name] * means["loss"]
                if getattr(self.model.objectives[name], "reports_perplexity", False):
                    self.log(f"{prefix}/{name}_ppl", math.exp(min(50.0, means["loss"])), **log)
        for prefix, total in sorted(totals.items()):
            self.log(f"{prefix}/loss", total, prog_bar=prefix == "val", **log)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.nonfinite_guard.after_optimizer_step()
        # a window whose every batch was skipped for a non-finite loss changed no weight: no EMA update either; one
        # with a trained batch (also under gradient accumulation when its last batch was skipped) did step
        if self._window_trained:
            self.model.after_optimizer_step()  # heads' post-step hooks (data2vec's EMA teacher, in fp32)
        self._window_trained = False

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip ``trainer.gradient_clip_val`` without a host read, also for a fused optimizer under bf16 or fp16.

        Lightning's mixed-precision plugin refuses any clipping with a fused Adam/AdamW (such an optimizer
        unscales fp16 gradients inside its step), even under bf16, where nothing is scaled; its FSDP plugin
        refuses norm clipping, which must go through the sharded root module. So mmm clips itself:

        - with fp16's GradScaler and a fused optimizer, the scaler unscales the gradients first
          (``GradScaler.unscale_``, which records any inf for its ``step``; the fused step then takes them
          as unscaled), as PyTorch's AMP recipe for clipping does;
        - with a GradScaler and any other optimizer, Lightning has already unscaled, and its path is kept;
        - the gradients, now true, are clipped by ``FullyShardedDataParallel.clip_grad_norm_`` under FSDP,
          ``torch.nn.utils.clip_grad_norm_`` otherwise (both compute the norm and scale on the device).
        """
        if not gradient_clip_val or not self._window_trained:  # every batch of the window skipped: nothing to clip
            return  # (and unscale_ would leave fp16's GradScaler unscaled with no step to reset it)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            if not getattr(optimizer, "_step_supports_amp_scaling", False):
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
                return
            scaler.unscale_(optimizer)  # Lightning leaves a self-unscaling optimizer's gradients scaled
        if gradient_clip_algorithm == "value":  # (Lightning passes a str enum; mmm's configs clip by norm)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return
        root = self.trainer.strategy.model
        if callable(getattr(root, "clip_grad_norm_", None)):  # FSDP: the norm over every rank's shards
            root.clip_grad_norm_(gradient_clip_val)
        else:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        from mmm.optim import build_optimizer

        # optim.name from the OPTIMIZERS registry (default: fused AdamW) over weight_decay_groups
        opt = build_optimizer(self.model, self.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.nonfinite_guard.read()  # no checkpoint after an unreported bad step (stop raises: none is written)
        checkpoint["mmm"] = self.extra_state
        checkpoint["mmm_nonfinite_skipped"] = self.nonfinite_guard.skipped
        # dropout draws from torch's global generator: save it so a resumed run continues bit-for-bit. Each rank's
        # generators drift apart (a rank's dropout draws as many numbers as its batch has elements), and only rank 0
        # writes the file, so every rank's state is gathered into it (a collective: every rank saves, as Lightning's
        # save_checkpoint requires)
        state = {"torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        ranks = _world()
        if ranks is not None:
            states: List[Any] = [None] * ranks[1]
            torch.distributed.all_gather_object(states, state)
            state = {**states[0], "per_rank": states}
        checkpoint["mmm_rng"] = state

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.nonfinite_guard.skipped = int(checkpoint.get("mmm_nonfinite_skipped", 0))  # a resumed run counts on
        config_optimizer_settings(checkpoint, self.optim, self.max_steps)
        rng = checkpoint.get("mmm_rng")
        if rng:
            per_rank, ranks = rng.get("per_rank"), _world()
            if per_rank:
                rank, size = ranks if ranks is not None else (0, 1)
                if size == len(per_rank):
                    rng = per_rank[rank]
                else:
                    warnings.warn(f"the checkpoint holds the random state of {len(per_rank)} process(es), this run "
                                  f"has {size}: dropout masks will differ from an uninterrupted run's", stacklevel=2)
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
