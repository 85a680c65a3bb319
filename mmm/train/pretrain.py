"""Assemble and run a pretraining job from a :class:`~mmm.config.PretrainConfig`.

Order: resolve shards (``embedded`` builds the built-in data) → the dataset's modality prepares
its assets (a tokenizer, statistics or codebooks: loaded, reused from the run folder on resume,
or fitted on the training shards) → masker → model → Lightning module, data module and trainer.
The run folder holds ``config.yaml``, the modality's assets (e.g. ``tokenizer/``),
``checkpoints/`` (``last.ckpt``) and ``logs/version_N/`` (CSV, and TensorBoard when installed; a
resumed run writes a new version).
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from functools import partial
from typing import Any, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import datasets_def  # noqa: F401  (registers dataset definitions)
import mmm.masking  # noqa: F401  (registers maskers)
import mmm.modalities  # noqa: F401  (registers modalities)
from mmm.config import PretrainConfig, dump_config, to_dict
from mmm.data.stream import list_shards
from mmm.modalities.base import Modality
from mmm.model import build_model
from mmm.registry import DATASETS, MODALITIES
from mmm.train.callbacks import ThroughputMonitor
from mmm.train.checkpoint_io import AtomicCheckpointIO
from mmm.train.datamodule import StreamDataModule
from mmm.train.module import MaskedModelingModule

logger = logging.getLogger("mmm.train")
# The module moves PackedBatch itself (it works with any loader, not only our DataModule).
warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device`.*")

def resolve_shards(spec: str, dataset: str, split: str) -> List[str]:
    """Shard urls for a data spec: ``embedded`` (the dataset's built-in default), a folder, or a pattern.

    Args:
        spec: ``embedded``, a directory, a brace pattern or a single shard path.
        dataset: dataset definition name (for ``embedded``).
        split: ``train`` or ``val``.
    """
    if spec == "embedded":
        spec = str(DATASETS.create(dataset).embedded_default())
    return list_shards(spec, split=split if Path(spec).is_dir() else None)


def modality_of(dataset: str) -> str:
    """The modality a dataset definition feeds (its ``modality`` attribute, else its name)."""
    return getattr(DATASETS.get(dataset), "modality", dataset)


def build_modality(cfg: PretrainConfig) -> Modality:
    """The :class:`~mmm.modalities.base.Modality` the run's dataset feeds."""
    name = modality_of(cfg.data.dataset)
    if name not in MODALITIES:
        raise ValueError(f"data.dataset {cfg.data.dataset!r} feeds modality {name!r}, which has no Modality "
                         f"registered; known: {MODALITIES.list()}")
    return MODALITIES.create(name, model_cfg=cfg.model)


@dataclass
class PretrainRun:
    """Everything a run is made of (returned so tests and the demo can inspect it)."""

    cfg: PretrainConfig
    run_dir: Path
    modality: Modality
    masker: Any
    module: MaskedModelingModule
    datamodule: StreamDataModule
    trainer: L.Trainer
    csv_logger: CSVLogger

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def tokenizer(self) -> Any:
        """The text (or DNA) tokenizer of the run's modality, if it has one."""
        return getattr(self.modality, "tokenizer", None)


def build_run(cfg: PretrainConfig) -> PretrainRun:
    """Build the modality's assets, model, data and trainer for ``cfg`` (nothing is trained yet)."""
    run_dir = Path(cfg.trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg) + "\n", encoding="utf-8")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    train_urls = resolve_shards(cfg.data.train, cfg.data.dataset, "train")
    val_urls = resolve_shards(cfg.data.val, cfg.data.dataset, "val") if cfg.data.val else None
    modality = build_modality(cfg)
    modality.prepare(train_urls, run_dir)
    masker = modality.build_masker(cfg.masking)
    model = build_model_for(cfg, modality)
    if cfg.trainer.compile:
        # per block, dynamic shapes: packed batches change N every step (layout lookups graph-break)
        for block in model.encoder.blocks:
            block.compile(dynamic=True)
    extra = {"format": "mmm-pretrain-v1", "config": to_dict(cfg), "assets": {modality.name: modality.assets()}}
    if cfg.trainer.nonfinite_loss not in ("stop", "skip"):
        raise ValueError(f"trainer.nonfinite_loss must be 'stop' or 'skip', got {cfg.trainer.nonfinite_loss!r}")
    if cfg.trainer.nonfinite_loss == "skip" and cfg.trainer.devices not in (1, "1"):
        raise ValueError("trainer.nonfinite_loss: skip needs a single process (ranks would disagree on which "
                         "batches step); use stop with several devices")
    module = MaskedModelingModule(model, cfg.optim, cfg.trainer.max_steps, extra, nonfinite=cfg.trainer.nonfinite_loss)
    make_stages = partial(modality.stages, masker, batch_size=cfg.data.batch_size)
    datamodule = StreamDataModule(cfg.data, train_urls, val_urls, make_stages, modality.settings())
    tc = cfg.trainer
    # logs/version_N: a resumed run starts a new version instead of overwriting the earlier metrics.csv
    csv_logger = CSVLogger(str(run_dir), name="logs")
    loggers = [csv_logger]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(str(run_dir), name="logs", version=f"{csv_logger.version}_tensorboard"))
    callbacks = [
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), every_n_train_steps=tc.checkpoint_every_n_steps,
                        save_last=True, save_top_k=1, filename="step{step}", auto_insert_metric_name=False),
        LearningRateMonitor(logging_interval="step"),
        ThroughputMonitor(),
    ]
    trainer = L.Trainer(
        max_steps=tc.max_steps, accelerator=tc.accelerator, devices=tc.devices, precision=tc.precision,
        gradient_clip_val=tc.gradient_clip_val, accumulate_grad_batches=tc.accumulate_grad_batches,
        log_every_n_steps=tc.log_every_n_steps, val_check_interval=tc.val_check_interval if val_urls else None,
        check_val_every_n_epoch=None, limit_val_batches=tc.limit_val_batches if val_urls else 0,
        num_sanity_val_steps=0, default_root_dir=str(run_dir), enable_progress_bar=tc.enable_progress_bar,
        logger=loggers, callbacks=callbacks, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
    )
    return PretrainRun(cfg, run_dir, modality, masker, module, datamodule, trainer, csv_logger)


def build_model_for(cfg: PretrainConfig, modality: Modality):
    """A freshly initialised :class:`~mmm.model.MaskedModel` for ``cfg`` with ``modality``'s embedder
    (its assets must be prepared or loaded)."""
    return build_model(cfg.model, cfg.objectives, {modality.name: modality.build_embedder(cfg.model.encoder)})


def modality_from_checkpoint(contents: Any) -> Modality:
    """The run's modality with its assets restored from a read checkpoint
    (:class:`~mmm.encoders.CheckpointContents`)."""
    modality = build_modality(contents.config)
    modality.load_assets(contents.assets.get(modality.name, {}), str(contents.path))
    return modality


def resolve_ckpt_path(cfg: PretrainConfig, run_dir: Path) -> Optional[str]:
    """``trainer.ckpt_path`` with ``last`` mapped to the run's ``checkpoints/last.ckpt``."""
    p = cfg.trainer.ckpt_path
    if p is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if p == "last" else Path(p)
    if not path.is_file():
        raise FileNotFoundError(f"trainer.ckpt_path: checkpoint {path} does not exist")
    return str(path)


def pretrain(cfg: PretrainConfig) -> PretrainRun:
    """Build and train; returns the run (its folder has checkpoints, logs and the tokenizer)."""
    run = build_run(cfg)
    torch.set_float32_matmul_precision("high")
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=resolve_ckpt_path(cfg, run.run_dir))
    save_final_checkpoint(run)
    return run


def save_final_checkpoint(run: PretrainRun) -> None:
    """Write ``last.ckpt`` for the final step (periodic checkpoints may have stopped short of it).

    The trainer's :class:`~mmm.train.checkpoint_io.AtomicCheckpointIO` makes the write atomic.
    """
    run.trainer.save_checkpoint(str(run.last_checkpoint))
