"""Assemble and run a pretraining job from a :class:`~mmm.config.PretrainConfig`.

Order: the run's tasks (:mod:`mmm.train.tasks`; one implicit task for a single-dataset config)
→ resolve their shards (``embedded`` builds the built-in data) → the modalities they feed prepare
their assets (tokenizers, statistics or codebooks: loaded, reused from the run folder on resume,
or fitted on the training shards) → one masker per task → model (one embedder per modality, one
shared encoder, the heads) → Lightning module, data module (a task mixture when there are
several tasks, :mod:`mmm.train.mixture`) and trainer.
The run folder holds ``config.yaml``, the modality's assets (e.g. ``tokenizer/``),
``checkpoints/`` (``last.ckpt``) and ``logs/version_N/`` (CSV, and TensorBoard when installed; a
resumed run writes a new version).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from mmm.config import ConfigError, PretrainConfig, TaskConfig, dump_config, to_dict
from mmm.errors import CheckpointError
from mmm.modalities.base import Modality
from mmm.model import build_model
from mmm.train.batch_check import CheckBatches
from mmm.train.callbacks import RunCheckpoint, StepProgressBar, ThroughputMonitor
from mmm.train.checkpoint_io import AtomicCheckpointIO, read_resume_checkpoint
from mmm.train.datamodule import StreamDataModule
from mmm.train.mixture import MixtureMonitor, TagTask, TaskData
from mmm.train.gathered_batches import FullContrastiveBatches
from mmm.train.module import MaskedModelingModule
from mmm.train.phases import build_schedule
from mmm.train.settings_check import check_settings
from mmm.train.tasks import (RunModalities, build_maskers, build_modalities, check_before_fit,  # noqa: F401
                             check_masking_args, modalities_from_checkpoint, modality_of, prepare_modalities,
                             resolve_shards, resolve_val_shards, task_configs)

logger = logging.getLogger("mmm.train")
# The module moves PackedBatch itself (it works with any loader, not only our DataModule).
warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device`.*")

@dataclass
class PretrainRun:
    """Everything a run is made of (returned so tests and the demo can inspect it)."""

    cfg: PretrainConfig
    run_dir: Path
    modalities: RunModalities
    maskers: Dict[str, Any]
    module: MaskedModelingModule
    datamodule: Any
    trainer: L.Trainer
    csv_logger: CSVLogger

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def modality(self) -> Modality:
        """The modality of a single-task run (the one its dataset feeds)."""
        if len(self.modalities.feeds) != 1:
            raise AttributeError(f"a multi-task run has several modalities: use run.modalities "
                                 f"(tasks: {list(self.modalities.feeds)})")
        return next(iter(self.modalities.feeds.values()))

    @property
    def masker(self) -> Any:
        """The masker of a single-task run."""
        return next(iter(self.maskers.values())) if len(self.maskers) == 1 else None

    @property
    def tokenizer(self) -> Any:
        """The text (or DNA) tokenizer of the run's modality, if it has one."""
        text = self.modalities.base.get("text")
        if len(self.modalities.feeds) == 1:
            return getattr(self.modality, "tokenizer", None) or getattr(text, "tokenizer", None)
        return getattr(text, "tokenizer", None)


ASSETS_READY = ".assets_ready"
ASSET_WAIT_SECONDS = 3600.0


def global_rank_from_env() -> int:
    """This process's global rank as launchers set it (torchrun ``RANK``, SLURM ``SLURM_PROCID``,
    Lightning's DDP subprocesses ``LOCAL_RANK`` on one node); 0 when none is set."""
    for key in ("RANK", "SLURM_PROCID", "PMI_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    node, local = os.environ.get("NODE_RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    if local.isdigit() and node == "0":
        return int(local)
    return 0


def _assets_marker(run_dir: Path) -> Path:
    return run_dir / ASSETS_READY


def _config_digest(config_text: str) -> str:
    return hashlib.sha1(config_text.encode("utf-8")).hexdigest()


def wait_for_assets(run_dir: Path, digest: str, rank: int, timeout: float = ASSET_WAIT_SECONDS) -> None:
    """Block until rank 0 has prepared the run's assets for this exact config (its marker file holds
    the config's digest); the folder must be shared storage that every rank sees."""
    marker, start, said = _assets_marker(run_dir), time.monotonic(), 0.0
    while True:
        if marker.is_file() and marker.read_text(encoding="utf-8").strip() == digest:
            return
        waited = time.monotonic() - start
        if waited > timeout:
            raise TimeoutError(f"rank {rank}: rank 0 did not prepare the modality assets in {run_dir} within "
                               f"{timeout:.0f} s (no {marker.name} for this config); trainer.default_root_dir must "
                               f"be on storage every node sees")
        if waited - said >= 60:
            logger.info("rank %d: waiting for rank 0 to prepare the assets in %s (%.0f s)", rank, run_dir, waited)
            said = waited
        time.sleep(1.0)


def _strategy(cfg: PretrainConfig, multi_task: bool) -> Any:
    """``trainer.strategy`` as the Trainer takes it.

    * DDP of a multi-task or phased run (``multi_task``) must allow unused parameters (one task's
      or phase's heads and embedders idle at each step);
    * ``fsdp`` shards every Transformer block as its own FSDP unit (without a wrap policy the whole
      model would be one unit, gathered whole at every step). Under ``bf16-mixed`` / ``16-mixed`` it gathers
      weights in half precision but reduces gradients and keeps buffers in fp32 (:func:`fsdp_mixed_precision`).
    """
    s = cfg.trainer.strategy
    if multi_task and s == "ddp":
        logger.info("multi-task or phased run: using ddp_find_unused_parameters_true (each step trains some heads)")
        return "ddp_find_unused_parameters_true"
    if s == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from mmm.core.encoder import EncoderBlock

        return FSDPStrategy(auto_wrap_policy={EncoderBlock}, use_orig_params=multi_task,
                            mixed_precision=fsdp_mixed_precision(cfg.trainer.precision))
    return s


def fsdp_mixed_precision(precision: str) -> Any:
    """FSDP's ``MixedPrecision`` for a mixed ``trainer.precision``, else None (Lightning's own).

    Lightning's ``bf16-mixed`` plugin gives FSDP bf16 for parameters, gradient reduction *and* buffers: gradients
    summed across ranks in bf16, and floating buffers such as rotary ``inv_freq`` and ALiBi slopes cast to bf16 (a
    bf16 ``inv_freq`` moves attention scores by 0.04 on average at distance 512, 0.18 at 2048, against a score std
    of 1). Here weights are gathered in half precision (autocast computes in it anyway), gradients are reduced
    and buffers kept in fp32, as the non-FSDP ``bf16-mixed`` path computes them.
    """
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    if half is None:
        return None
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=half, reduce_dtype=torch.float32, buffer_dtype=torch.float32)


def read_resume_checkpoint_for(cfg: PretrainConfig, path: Optional[str]) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``path`` (``trainer.ckpt_path`` resolved by :func:`resolve_ckpt_path`) that the run resumes
    from (memory-mapped), checked to be readable and to leave steps to train; None when the run starts fresh."""
    if path is None:
        return None
    ckpt = read_resume_checkpoint(Path(path))
    step = int(ckpt["global_step"])
    if step >= cfg.trainer.max_steps:
        raise ConfigError(f"trainer.max_steps {cfg.trainer.max_steps} leaves nothing to train: the checkpoint {path} "
                          f"is already at step {step}; set --trainer.max_steps above {step} to train further")
    data_state = ckpt.get(StreamDataModule.__qualname__)  # Lightning keeps the data module's state under its name
    if isinstance(data_state, dict):  # refused here, before the run folder's config.yaml is rewritten
        saved_multi, multi = data_state.get("kind") == "mixture", len(cfg.tasks) > 1
        if saved_multi != multi:
            what = {False: "single-task", True: "multi-task (tasks:)"}
            raise ConfigError(f"trainer.ckpt_path: {path} was written by a {what[saved_multi]} run, and this config "
                              f"is a {what[multi]} run; resume it with the config it was trained with")
    return ckpt


def restore_assets(mods: RunModalities, stored: Dict[str, Dict[str, str]], path: str) -> None:
    """A resumed run's assets (tokenizers, statistics, codebooks) are those its checkpoint carries, whichever
    run folder it continues in: its weights were trained with them (a tokenizer fitted afresh in another
    folder would give the same ids other meanings)."""
    for name, m in {**mods.base, **mods.composites}.items():
        m.load_assets(stored.get(name, {}), path)
    logger.info("resuming with the assets stored in %s (%s)", path, ", ".join(sorted(n for n in stored if stored[n])))


def _flatten(data: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"model": {"encoder": {"dim": 64}}}`` → ``{"model.encoder.dim": 64}`` (list entries by index)."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return {prefix: list(data) if isinstance(data, tuple) else data}
    out: Dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class _Absent:
    """A setting one of two configs lacks (printed as ``'(absent)'``)."""

    def __repr__(self) -> str:
        return "'(absent)'"


ABSENT = _Absent()


def config_differences(stored: Dict[str, Any], cfg: PretrainConfig) -> Dict[str, Tuple[Any, Any]]:
    """``key → (stored, new)`` for every setting of ``cfg`` that differs from a checkpoint's stored config, in key
    order, :data:`ABSENT` for a side that lacks it (``trainer.ckpt_path`` left out: it always differs)."""
    old, new = _flatten(stored), _flatten(to_dict(cfg))
    return {k: (old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
            if k != "trainer.ckpt_path" and old.get(k, ABSENT) != new.get(k, ABSENT)}


def _listed(diffs: Dict[str, Tuple[Any, Any]]) -> List[str]:
    """``key: stored -> new`` lines of :func:`config_differences`."""
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in diffs.items()]


def check_checkpoint_fits(module: MaskedModelingModule, ckpt: Dict[str, Any], cfg: PretrainConfig, path: str,
                          asset_keys: Sequence[str] = ()) -> None:
    """Refuse a checkpoint whose weights do not fit the model ``cfg`` builds, listing the settings that
    differ from the checkpoint's stored config; when it fits, log those settings (they take effect).

    ``asset_keys``: the dotted settings that shape the modalities' fitted assets (``Modality.asset_settings``). A
    resume restores the assets from the checkpoint, so a change to one of them would be logged as taking effect
    while the old tokenizer or codebook is used: it is refused instead."""
    saved, own = ckpt["state_dict"], module.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    reshaped = [f"{k} {tuple(saved[k].shape)} -> {tuple(v.shape)}" for k, v in own.items()
                if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    stored = (ckpt.get("mmm") or {}).get("config")
    changed = config_differences(stored, cfg) if isinstance(stored, dict) else {}
    diffs = _listed(changed)
    old_optim = ((stored or {}).get("optim") or {}).get("name") if isinstance(stored, dict) else None
    if old_optim is not None and old_optim != cfg.optim.name:
        raise CheckpointError(f"trainer.ckpt_path: {path} holds the state of optimizer {old_optim!r}, but optim.name is "
                              f"{cfg.optim.name!r}; resume with optim.name: {old_optim}, or start a new run from its "
                              f"weights with model.init_from: {path} (a new trainer.default_root_dir, no ckpt_path)")
    # a key the stored config lacks (a checkpoint from before the setting existed) is not a change the user made
    ignored = _listed({k: v for k, v in changed.items() if k in set(asset_keys) and v[0] is not ABSENT})
    if ignored:
        raise CheckpointError(f"trainer.ckpt_path: resuming {path} keeps the tokenizers, statistics and codebooks "
                              f"stored in it, so these changed settings could not take effect: {'; '.join(ignored)}. "
                              f"Resume with the checkpoint's values, or start a new run from its weights with "
                              f"model.init_from: {path} (a new trainer.default_root_dir, no ckpt_path)")
    if not (missing or unexpected or reshaped):
        if diffs:
            logger.warning("resuming from %s with settings that differ from its config (they take effect): %s",
                           path, "; ".join(diffs))
        old_steps = ((stored or {}).get("trainer") or {}).get("max_steps") if isinstance(stored, dict) else None
        if cfg.phases and old_steps is not None and old_steps != cfg.trainer.max_steps:
            logger.warning("phases are fractions of trainer.max_steps: resuming with %d instead of %d moves every "
                           "phase boundary, so the run may go back to an earlier phase (step %d of %d); keep "
                           "trainer.max_steps to continue exactly", cfg.trainer.max_steps, old_steps,
                           int(ckpt.get("global_step", 0)), cfg.trainer.max_steps)
        return
    examples = (reshaped + [f"{k} not in the checkpoint" for k in missing] +
                [f"{k} only in the checkpoint" for k in unexpected])
    count = len(reshaped) + len(missing) + len(unexpected)
    what = (f"settings that differ from the checkpoint's config: {'; '.join(diffs[:12])}"
            + (f" (and {len(diffs) - 12} more)" if len(diffs) > 12 else "") if diffs else
            "the checkpoint stores no config to compare with" if stored is None else
            "its stored config equals this one (the model code or assets changed)")
    raise CheckpointError(f"trainer.ckpt_path: {path} does not fit the model this config builds ({count} parameter "
                          f"tensor(s) differ, e.g. {examples[0]}); {what}. Resume with the checkpoint's settings, or "
                          f"train into a new trainer.default_root_dir without ckpt_path")


def build_run(cfg: PretrainConfig) -> PretrainRun:
    """Build the modalities' assets, model, data and trainer for ``cfg`` (nothing is trained yet).

    Settings and the checkpoint to resume from are checked before the run folder's ``config.yaml``
    is written, so a refused resume leaves the folder as it was.
    """
    run_dir = Path(cfg.trainer.default_root_dir)
    check_settings(cfg)
    warn_of_a_fresh_run_over_checkpoints(cfg, run_dir)
    phases = build_schedule(cfg)  # checked before anything is written
    ckpt_path = resolve_ckpt_path(cfg, run_dir)
    resume = read_resume_checkpoint_for(cfg, ckpt_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = dump_config(cfg) + "\n"
    rank = global_rank_from_env()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.threads is not None:
        torch.set_num_threads(cfg.trainer.threads)

    tasks = task_configs(cfg)
    train_urls = {t.name: resolve_shards(t.train, t.dataset, "train") for t in tasks}
    val_urls = {t.name: resolve_val_shards(t) for t in tasks}
    for t in tasks:
        if val_urls[t.name]:
            logger.info("%s validates on %d shard(s): %s", f"task {t.name!r}" if t.name else "the run",
                        len(val_urls[t.name]), ", ".join(val_urls[t.name][:3]) + (" ..." if len(val_urls[t.name]) > 3 else ""))
    mods = build_modalities(cfg, tasks, train_urls)
    check_before_fit(cfg, tasks, mods)  # maskers, heads' arguments, modalities' objective checks
    warm_tokenizers = None
    if cfg.model.init_from and resume is None:  # the source's token ids must mean what they mean here
        from mmm.warm_start import source_tokenizers

        warm_tokenizers = source_tokenizers(cfg.model.init_from, mods.base)
        warm_tokenizers.check_given(mods.base, run_dir)
    stored_assets = (resume.get("mmm") or {}).get("assets") if resume is not None else None
    if stored_assets:  # the weights were trained with these: never a tokenizer fitted afresh (another folder)
        restore_assets(mods, stored_assets, ckpt_path)
    elif rank == 0:
        prepare_modalities(mods, run_dir)  # fits tokenizers / statistics / codebooks, saved in the run folder
        _assets_marker(run_dir).write_text(_config_digest(config_text), encoding="utf-8")
    else:  # every rank must use rank 0's assets (tokenizer training is not bit-reproducible across processes)
        wait_for_assets(run_dir, _config_digest(config_text), rank)
        prepare_modalities(mods, run_dir)  # loads what rank 0 saved
    if warm_tokenizers is not None:
        warm_tokenizers.check_fitted(mods.base, run_dir)
    maskers = build_maskers(tasks, mods.feeds)
    model = build_model_for(cfg, mods)
    if cfg.model.init_from and resume is None:  # a resumed run continues from its checkpoint instead
        from mmm.warm_start import warm_start

        warm_start(model, cfg.model.init_from)
    if cfg.trainer.compile:
        # per block, dynamic shapes: packed batches change N every step (layout lookups graph-break)
        for block in model.encoder.blocks:
            block.compile(dynamic=True)
    extra = {"format": "mmm-pretrain-v1", "config": to_dict(cfg), "assets": mods.assets(),
             "modalities": list(mods.base)}
    module = MaskedModelingModule(model, cfg.optim, cfg.trainer.max_steps, extra, nonfinite=cfg.trainer.nonfinite_loss,
                                  phases=phases)
    if resume is not None:
        check_checkpoint_fits(module, resume, cfg, ckpt_path,
                              [f"model.{name}.{f}" for name, m in mods.base.items() for f in m.asset_settings])
        del resume
    if rank == 0:  # only now: a refused resume must not overwrite the run's config
        (run_dir / "config.yaml").write_text(config_text, encoding="utf-8")

    def stages_of(t: TaskConfig):
        feed, tag = mods.feeds[t.name], [TagTask(t.name)] if t.name else []
        batch_size = t.batch_size or cfg.data.batch_size
        check = CheckBatches(t.name, feed.name, list(mods.base))  # a plug-in's stages, named when they go wrong

        def make(ranks: int = 1, **kw):
            full = [FullContrastiveBatches(batch_size, t.name)] if ranks > 1 and kw.get("train") else []
            return feed.stages(maskers[t.name], batch_size=batch_size, options=t.options or None, **kw) + [check] + tag + full

        return make

    multi = len(tasks) > 1

    def settings_of(t: TaskConfig) -> Dict[str, Any]:  # what a resume compares (a single task: its feed's settings)
        task = {"batch_size": t.batch_size or cfg.data.batch_size, "dataset": t.dataset, "masking": to_dict(t.masking),
                "options": dict(t.options)} if multi else {}
        return {**task, **mods.feeds[t.name].settings()}

    # a single-task run is a mixture of one: one data module either way
    datamodule = StreamDataModule(cfg.data, [TaskData(t.name, t.weight, train_urls[t.name], val_urls[t.name],
                                                      stages_of(t), settings_of(t)) for t in tasks])
    tc = cfg.trainer
    has_val = any(val_urls.values())
    # logs/version_N: a resumed run starts a new version instead of overwriting the earlier metrics.csv
    csv_logger = CSVLogger(str(run_dir), name="logs")
    loggers = [csv_logger]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(str(run_dir), name="logs", version=f"{csv_logger.version}_tensorboard"))
    callbacks = [
        RunCheckpoint(dirpath=str(run_dir / "checkpoints"), every_n_train_steps=tc.checkpoint_every_n_steps,
                      save_last=True, save_top_k=1, filename="step{step}", auto_insert_metric_name=False,
                      enable_version_counter=False),  # one last.ckpt, the newest run's (never last-v1.ckpt)
        LearningRateMonitor(logging_interval="step"),
        ThroughputMonitor(),
    ]
    if multi:
        callbacks.append(MixtureMonitor(tc.log_every_n_steps))
    if tc.enable_progress_bar:
        callbacks.append(StepProgressBar())
    trainer = L.Trainer(
        max_steps=tc.max_steps, accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
        strategy=_strategy(cfg, multi or phases is not None), precision=tc.precision,
        gradient_clip_val=tc.gradient_clip_val, accumulate_grad_batches=tc.accumulate_grad_batches,
        log_every_n_steps=tc.log_every_n_steps, val_check_interval=tc.val_check_interval if has_val else None,
        check_val_every_n_epoch=None, limit_val_batches=tc.limit_val_batches if has_val else 0,
        num_sanity_val_steps=0, default_root_dir=str(run_dir), enable_progress_bar=tc.enable_progress_bar,
        logger=loggers, callbacks=callbacks, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
    )
    return PretrainRun(cfg, run_dir, mods, maskers, module, datamodule, trainer, csv_logger)


def build_model_for(cfg: PretrainConfig, modalities: Union[Modality, RunModalities]):
    """A freshly initialised :class:`~mmm.model.MaskedModel` for ``cfg`` with the embedders of
    ``modalities`` (a run's :class:`~mmm.train.tasks.RunModalities`, or the one modality of a
    single-task run; assets prepared or loaded)."""
    if isinstance(modalities, RunModalities):
        base = modalities.base
    elif set(modalities.uses()) == {modalities.name}:
        base = {modalities.name: modalities}
    else:
        raise ValueError(f"modality {modalities.name!r} is a composite: pass the run's RunModalities")
    for m in base.values():  # e.g. image refuses visual-token targets in MAE mode, before any data is read
        m.check_objectives(cfg.objectives)
    embedders = {name: m.build_embedder(cfg.model.encoder) for name, m in base.items()}
    tasks = {t.name: list(t.objectives) for t in cfg.tasks}
    return build_model(cfg.model, cfg.objectives, embedders, tasks or None)


def modality_from_checkpoint(contents: Any) -> Modality:
    """The modality of a single-task run with its assets restored from a read checkpoint
    (:class:`~mmm.encoders.CheckpointContents`); multi-task runs: :func:`modalities_from_checkpoint`."""
    mods = modalities_from_checkpoint(contents)
    if len(mods.feeds) != 1:
        raise ValueError(f"{contents.path} is a multi-task checkpoint (tasks {list(mods.feeds)}): use "
                         f"modalities_from_checkpoint")
    return next(iter(mods.feeds.values()))


def resolve_ckpt_path(cfg: PretrainConfig, run_dir: Path) -> Optional[str]:
    """``trainer.ckpt_path`` with ``last`` mapped to the run's ``checkpoints/last.ckpt``, and a run folder or its
    ``checkpoints`` folder to the ``last.ckpt`` inside."""
    p = cfg.trainer.ckpt_path
    if p is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if p == "last" else Path(p)
    if path.is_dir():
        inside = [c for c in (path / "last.ckpt", path / "checkpoints" / "last.ckpt") if c.is_file()]
        if not inside:
            found = sorted(str(c.relative_to(path)) for c in [*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")])
            raise FileNotFoundError(f"trainer.ckpt_path: {path} is a folder without last.ckpt or checkpoints/last.ckpt "
                                    f"(its .ckpt files: {', '.join(found) or 'none'}); give a checkpoint file")
        path = inside[0]
    if not path.is_file():
        raise FileNotFoundError(f"trainer.ckpt_path: checkpoint {path} does not exist")
    return str(path)


def warn_of_a_fresh_run_over_checkpoints(cfg: PretrainConfig, run_dir: Path) -> None:
    """A run without ``trainer.ckpt_path`` into a folder holding checkpoints replaces them as it saves its own
    (one ``last.ckpt``, the newest run's, so ``ckpt_path: last`` resumes that run); say so before it starts."""
    if cfg.trainer.ckpt_path is not None:
        return
    found = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    if found:
        logger.warning("trainer.default_root_dir %s holds checkpoints of an earlier run (%s): this fresh run writes "
                       "its own last.ckpt and step checkpoints over them, and the earlier run's other step checkpoints "
                       "stay beside them (they are not this run's); to continue that run instead, stop and pass "
                       "--trainer.ckpt_path last",
                       run_dir, ", ".join(found[:5]) + (" ..." if len(found) > 5 else ""))


def pretrain(cfg: PretrainConfig) -> PretrainRun:
    """Build and train; returns the run (its folder has checkpoints, logs and the tokenizer)."""
    run = build_run(cfg)
    torch.set_float32_matmul_precision("high")
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=resolve_ckpt_path(cfg, run.run_dir))
    save_final_checkpoint(run)
    return run


def save_final_checkpoint(run: PretrainRun) -> None:
    """Write ``last.ckpt`` for the final step unless :class:`~mmm.train.callbacks.RunCheckpoint` wrote it inside the
    loop (it does at ``max_steps``; a run that stopped otherwise: periodic checkpoints may have stopped short of it).

    The trainer's :class:`~mmm.train.checkpoint_io.AtomicCheckpointIO` makes the write atomic.
    """
    saver = [c for c in run.trainer.callbacks if isinstance(c, RunCheckpoint)]
    if saver and saver[0].final_step_saved == run.trainer.global_step and saver[0].last_path == run.last_checkpoint:
        return
    run.trainer.save_checkpoint(str(run.last_checkpoint))
