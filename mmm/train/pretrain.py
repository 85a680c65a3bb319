"""Assemble and run a pretraining job from a :class:`~mmm.config.PretrainConfig`.

Order: resolve shards (``embedded`` builds the built-in corpus) → tokenizer (loaded, reused from
the run folder on resume, or trained on the training shards) → masker → model → Lightning
module, data module and trainer. The run folder holds ``config.yaml``, ``tokenizer/``,
``checkpoints/`` (``last.ckpt``) and ``logs/version_N/`` (CSV, and TensorBoard when installed; a
resumed run writes a new version).
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import datasets_def  # noqa: F401  (registers dataset definitions)
import mmm.masking  # noqa: F401  (registers maskers)
from mmm.config import PretrainConfig, dump_config, to_dict
from mmm.data.stream import list_shards
from mmm.modalities.text_tokenizer import TextTokenizer
from mmm.model import build_model
from mmm.registry import DATASETS, MASKERS, TOKENIZERS
from mmm.train.callbacks import ThroughputMonitor
from mmm.train.checkpoint_io import AtomicCheckpointIO
from mmm.train.datamodule import TextDataModule
from mmm.train.module import MaskedModelingModule

logger = logging.getLogger("mmm.train")
# The module moves PackedBatch itself (it works with any loader, not only our DataModule).
warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device`.*")

TOKENIZER_DIR = "tokenizer"


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


def tokenizer_files(directory: Path) -> Dict[str, str]:
    """The text files of a saved tokenizer (embedded in checkpoints so they are self-contained)."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.iterdir()) if p.is_file()}


def prepare_tokenizer(cfg: PretrainConfig, train_urls: List[str], run_dir: Path) -> TextTokenizer:
    """Load the configured tokenizer, reuse the run's own, or train one on the training shards."""
    t = cfg.model.text
    own = run_dir / TOKENIZER_DIR
    if t.tokenizer_path:
        tok = TextTokenizer.load(t.tokenizer_path)
    elif (own / "tokenizer.json").is_file():
        tok = TextTokenizer.load(own)
    else:
        from datasets_def.text import iter_texts

        logger.info("training a %s tokenizer (vocab %d) on up to %d documents", t.tokenizer, t.vocab_size, t.tokenizer_train_docs)
        texts = itertools.islice(iter_texts(train_urls), t.tokenizer_train_docs)
        tok = TOKENIZERS.create(t.tokenizer, texts=texts, vocab_size=t.vocab_size, lowercase=t.lowercase)
    if not (own / "tokenizer.json").is_file():
        tok.save(own)
    return tok


@dataclass
class PretrainRun:
    """Everything a run is made of (returned so tests and the demo can inspect it)."""

    cfg: PretrainConfig
    run_dir: Path
    tokenizer: TextTokenizer
    module: MaskedModelingModule
    datamodule: TextDataModule
    trainer: L.Trainer
    csv_logger: CSVLogger

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"


def build_run(cfg: PretrainConfig) -> PretrainRun:
    """Build tokenizer, model, data and trainer for ``cfg`` (nothing is trained yet)."""
    run_dir = Path(cfg.trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg) + "\n", encoding="utf-8")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    train_urls = resolve_shards(cfg.data.train, cfg.data.dataset, "train")
    val_urls = resolve_shards(cfg.data.val, cfg.data.dataset, "val") if cfg.data.val else None
    tokenizer = prepare_tokenizer(cfg, train_urls, run_dir)
    masker = MASKERS.create(cfg.masking.name, vocab=tokenizer.vocab(), **cfg.masking.args)
    model = build_model(cfg.model, cfg.objectives, tokenizer.vocab_size, tokenizer.pad_id)
    if cfg.trainer.compile:
        # per block, dynamic shapes: packed batches change N every step (layout lookups graph-break)
        for block in model.encoder.blocks:
            block.compile(dynamic=True)
    extra = {"format": "mmm-pretrain-v1", "config": to_dict(cfg), "tokenizer": tokenizer_files(run_dir / TOKENIZER_DIR)}
    if cfg.trainer.nonfinite_loss not in ("stop", "skip"):
        raise ValueError(f"trainer.nonfinite_loss must be 'stop' or 'skip', got {cfg.trainer.nonfinite_loss!r}")
    if cfg.trainer.nonfinite_loss == "skip" and cfg.trainer.devices not in (1, "1"):
        raise ValueError("trainer.nonfinite_loss: skip needs a single process (ranks would disagree on which "
                         "batches step); use stop with several devices")
    module = MaskedModelingModule(model, cfg.optim, cfg.trainer.max_steps, extra, nonfinite=cfg.trainer.nonfinite_loss)
    datamodule = TextDataModule(cfg.data, train_urls, val_urls, tokenizer, masker, cfg.model.text.max_len)

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
    return PretrainRun(cfg, run_dir, tokenizer, module, datamodule, trainer, csv_logger)


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
