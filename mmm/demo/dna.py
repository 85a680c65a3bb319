"""The DNA part of ``mmm demo``: a tiny DNA MLM on the synthetic genome, probed for planted motifs.

Steps: build the embedded synthetic genome (four motif classes planted at known positions plus a
motif-free background class, built locally) → pretrain ``configs/dna_mlm_tiny.yaml`` → held-out
MLM loss and masked-token accuracy of the trained model and of the same network at its
initialisation (identical masks) → linear probe for the motif class on frozen mean-pooled
features, trained vs. random init → loss curve.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

import lightning as L

from mmm.config import PretrainConfig, load_config
from mmm.demo.common import held_out_loss, plot_losses, probe_models, read_metrics
from mmm.train.pretrain import build_model_for, pretrain, resolve_shards

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "dna_mlm_tiny.yaml"


def run_dna_demo(out_dir: Path, config: Optional[Path] = None, max_steps: Optional[int] = None,
                 progress_bar: bool = True, quick: bool = False) -> Dict[str, object]:
    """Run the DNA part in ``out_dir``; returns its metrics (``report`` holds its markdown section).

    Args:
        out_dir: folder for the run, the figure and the metrics.
        config: pretraining config (default ``configs/dna_mlm_tiny.yaml``).
        max_steps: override ``trainer.max_steps``.
        progress_bar: show Lightning's progress bar.
        quick: a small probe and held-out set, for smoke tests.
    """
    config = Path(config) if config else DEFAULT_CONFIG
    overrides = {"trainer.default_root_dir": str(out_dir / "run"), "trainer.enable_progress_bar": progress_bar}
    if max_steps is not None:
        overrides["trainer.max_steps"] = max_steps
    cfg: PretrainConfig = load_config(config, overrides)
    t0 = time.perf_counter()
    run = pretrain(cfg)
    train_seconds = time.perf_counter() - t0

    trained = run.module.model.cpu().eval()
    L.seed_everything(cfg.seed, verbose=False)
    untrained = build_model_for(cfg, run.modality).eval()
    train_urls = resolve_shards(cfg.data.train, cfg.data.dataset, "train")
    val_urls = resolve_shards(cfg.data.val or "embedded", cfg.data.dataset, "val")
    models = {"trained": trained, "untrained": untrained}
    losses = {name: held_out_loss(m, run.modality, run.masker, val_urls, batch_size=cfg.data.batch_size,
                                  max_batches=3 if quick else 20) for name, m in models.items()}
    t1 = time.perf_counter()
    probes = probe_models(models, run.modality, train_urls, val_urls, max_train=300 if quick else 2000,
                          max_test=200 if quick else 1000, batch_size=cfg.data.batch_size)
    probe_seconds = time.perf_counter() - t1
    series = read_metrics(run.csv_logger.log_dir and Path(run.csv_logger.log_dir) / "metrics.csv")
    head = next(iter(losses["untrained"]), None)
    plot_losses(series, out_dir / "loss_curve.png", "mmm demo: tiny DNA MLM on the synthetic genome",
                "cross-entropy (nats)", [(losses["untrained"][head], "untrained model, held-out", "--")] if head else [])
    metrics = {
        "config": str(config),
        "steps": cfg.trainer.max_steps,
        "train_seconds": round(train_seconds, 1),
        "probe_seconds": round(probe_seconds, 1),
        "held_out_loss": losses,
        "linear_probe": {k: vars(v) for k, v in probes.items()},
        "checkpoint": str(run.last_checkpoint),
    }
    metrics["report"] = _report(metrics, cfg, out_dir.name)
    return metrics


def _report(m: Dict, cfg: PretrainConfig, folder: str) -> str:
    e, d = cfg.model.encoder, cfg.model.dna
    tok = f"{d.k}-mers ({'overlapping' if d.overlapping else 'non-overlapping'})" if d.tokenizer == "dna_kmer" else d.tokenizer
    pt, pu = m["linear_probe"]["trained"], m["linear_probe"]["untrained"]
    rows = [f"| {name} | " + " | ".join(f"{v:.3f}" for v in m["held_out_loss"][key].values())
            + f" | {m['linear_probe'][key]['accuracy']:.3f} |" for name, key in
            (("untrained (same init)", "untrained"), ("**trained**", "trained"))]
    heads = list(m["held_out_loss"]["trained"])
    lines = [
        "## DNA: masked language modeling on a synthetic genome",
        "",
        f"Tiny encoder ({e.depth} blocks, width {e.dim}) on {tok} tokens, pretrained for {m['steps']} steps "
        f"({m['train_seconds']} s) with `{cfg.masking.name}` {cfg.masking.args} on the embedded genome "
        "(256 bp windows; four classes of planted motifs and a motif-free background).",
        "",
        "| model | " + " | ".join(f"held-out {h} loss" for h in heads) + " | linear-probe accuracy (motif class) |",
        "|---|" + "---|" * len(heads) + "---|",
        *rows,
        "",
        f"Probe: logistic regression on frozen mean-pooled features of {pt['train_samples']} training windows, "
        f"scored on {pt['test_samples']} held-out windows ({pt['classes']} classes, chance {pt['chance']:.3f}; "
        f"untrained {pu['accuracy']:.3f}).",
        "",
        f"![loss curve]({folder}/loss_curve.png)",
        "",
        f"Checkpoint: `{m['checkpoint']}` (`mmm.load_encoder(path, modality=\"dna\")`).",
        "",
    ]
    return "\n".join(lines)
