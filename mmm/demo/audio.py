"""The audio part of ``mmm demo``: a tiny HuBERT-style masked acoustic model on the embedded sounds.

Steps: build the embedded audio set (synthetic tones, chords, noise, chirps; built locally) →
pretrain ``configs/audio_mam_tiny.yaml`` on CPU (k-means MFCC targets at span-masked tokens,
HuBERT, Hsu et al. 2021) → held-out loss of the trained model and of the same network at its
initialisation (identical masks) → linear probe for the sound class on frozen mean-pooled
features, trained vs. random init → the loss curve.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict

import numpy as np

import mmm.modalities.audio.modality  # noqa: F401  (registers the "audio" modality and embedder)
import mmm.objectives.feature_regression  # noqa: F401  (registers "masked_features")
from mmm.config import PretrainConfig
from mmm.demo.common import bold_better, demo_part, plot_losses, report_end, table_row, train_part
from mmm.model import head_name

logger = logging.getLogger("mmm.demo")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "audio_mam_tiny.yaml"


def _train_and_evaluate(cfg: PretrainConfig, out_dir: Path, quick: bool) -> Dict[str, object]:
    part = train_part(cfg)
    scores = part.losses_and_probes(cfg.data.batch_size, quick)  # quick: 3 held-out batches, as the other parts
    untrained_total = sum(o.weight * scores["held_out_loss"]["untrained"][head_name(o)] for o in cfg.objectives)
    plot_losses(part.series, out_dir / "loss_curve.png", "mmm demo: tiny masked acoustic model on embedded sounds",
                "weighted sum of the objectives' losses", [(untrained_total, "untrained model, held-out", "--")])
    per_sec = [v for _, v in part.series.get("train/seqs_per_sec", [])]
    return {
        **part.summary(cfg),
        **scores,
        "median_sequences_per_sec": float(np.median(per_sec)) if per_sec else None,
    }


def _report(m: Dict, cfg: PretrainConfig, folder: str) -> str:
    e, a = cfg.model.encoder, cfg.model.audio
    pt, pu = m["linear_probe"]["trained"], m["linear_probe"]["untrained"]
    heads = [head_name(o) for o in cfg.objectives]
    tok = (f"{a.frames_per_token} x {a.hop_ms:g} ms frames of {a.n_mels} mel bins per token" if a.token == "time"
           else f"{a.patch_freq} mel bins x {a.patch_time} frames per patch token")
    lines = [
        "## Audio: masked acoustic modeling (HuBERT-style)",
        "",
        f"Tiny encoder ({e.depth} blocks, width {e.dim}; {tok}) pretrained for {m['steps']} steps "
        f"({m['train_seconds']} s) on the embedded synthetic sounds, `{cfg.masking.name}` {cfg.masking.args}; hidden "
        f"tokens are replaced by a learned mask embedding and the heads predict, at hidden tokens, "
        f"k-means ids of {', '.join(a.targets)} features ({a.target_clusters} clusters, uniform guess "
        f"ln {a.target_clusters} = {math.log(a.target_clusters):.2f}) and/or the tokens' log-mel values.",
        "",
        "| model | " + " | ".join(f"held-out `{h}` loss" for h in heads) + " | linear-probe accuracy (sound class) |",
        "|---|" + "---|" * len(heads) + "---|",
        *(table_row(cells) for cells in bold_better(
            {name: [m["held_out_loss"][key][h] for h in heads] + [m["linear_probe"][key]["accuracy"]]
             for name, key in (("untrained (same init)", "untrained"), ("trained", "trained"))},
            higher_is_better=[False] * len(heads) + [True]).values()),
        "",
        f"Probe: logistic regression on frozen mean-pooled features of {pt['train_samples']} training clips, scored "
        f"on {pt['test_samples']} held-out clips ({pt['classes']} classes, majority-class chance {pt['chance']:.3f}).",
        *report_end(folder, [("loss curve", "loss_curve.png")], m["checkpoint"],
                    "`mmm.load_encoder(path, modality=\"audio\")`; "
                    "`mmm.save_encoder(enc, folder)` keeps the weights and the fitted front end together"),
    ]
    return "\n".join(lines)


run_audio_demo = demo_part("audio", DEFAULT_CONFIG, _train_and_evaluate, _report)
