"""The DNA part of ``mmm demo``: a tiny DNA MLM on the synthetic genome, probed for planted motifs.

Steps: build the embedded synthetic genome (four motif classes planted at known positions plus a
motif-free background class, built locally) → pretrain ``configs/dna_mlm_tiny.yaml`` → held-out
MLM loss and masked-token accuracy of the trained model and of the same network at its
initialisation (identical masks) → linear probe for the motif class on frozen mean-pooled
features, trained vs. random init, next to the same probe on 4-mer counts → loss curve.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from mmm.config import PretrainConfig
from mmm.demo.common import bold_better, demo_part, plot_losses, report_end, table_row, train_part
from mmm.probe import linear_probe

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "dna_mlm_tiny.yaml"
PROBE_POOLING = "mean"
"""How the probe pools a window's final hidden states."""
BASELINE_K = 4
"""k of the k-mer-count baseline probe."""


def _train_and_evaluate(cfg: PretrainConfig, out_dir: Path, quick: bool) -> Dict[str, object]:
    part = train_part(cfg)
    max_train, max_test = (300, 200) if quick else (2000, 1000)
    scores = part.losses_and_probes(cfg.data.batch_size, quick, max_train=max_train, max_test=max_test,
                                    batch_size=cfg.data.batch_size, pooling=PROBE_POOLING)
    # the reference a user would otherwise pick: 4-mer counts of the same windows, same probe
    t0 = time.perf_counter()
    kmer = linear_probe(kmer_count_features(part.train_urls, BASELINE_K, max_train),
                        kmer_count_features(part.val_urls, BASELINE_K, max_test))
    scores["probe_seconds"] = round(scores["probe_seconds"] + time.perf_counter() - t0, 1)
    untrained = scores["held_out_loss"]["untrained"]
    head = next(iter(untrained), None)
    plot_losses(part.series, out_dir / "loss_curve.png", "mmm demo: tiny DNA MLM on the synthetic genome",
                "cross-entropy (nats)", [(untrained[head], "untrained model, held-out", "--")] if head else [])
    return {**part.summary(cfg), **scores, "kmer_baseline": {"k": BASELINE_K, **vars(kmer)}}


def kmer_count_features(urls: List[str], k: int = 4, max_samples: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Counts of every k-mer over A/C/G/T (case folded; k-mers with other codes skipped) and labels of
    the labelled windows of ``urls``, in shard order (the windows :func:`~mmm.probe.extract_features`
    reads, so both probes see the same samples).

    Args:
        urls: shard urls of labelled DNA windows.
        k: k-mer length (4 gives 256 features).
        max_samples: stop after this many labelled windows.
    """
    from mmm.modalities.dna.pipeline import read_dna_sample
    from mmm.data.stream import SampleErrorHandler, make_pipeline

    code = np.full(256, -1, dtype=np.int64)
    for i, base in enumerate(b"ACGT"):
        code[base] = code[base + 32] = i  # upper and soft-masked lower case
    rows, labels = [], []
    for sample in make_pipeline(urls, stages=[], shuffle_shards=False, shuffle_buffer=0, handler=SampleErrorHandler()):
        window = read_dna_sample(sample)
        if window.label < 0:
            continue
        c = code[np.frombuffer(window.seq.encode("ascii"), dtype=np.uint8)]  # (L,)
        if len(c) < k:
            rows.append(np.zeros(4 ** k))
        else:
            grams = np.lib.stride_tricks.sliding_window_view(c, k)  # (L-k+1, k)
            ok = (grams >= 0).all(axis=1)
            ids = (grams[ok] * (4 ** np.arange(k - 1, -1, -1))).sum(axis=1)
            rows.append(np.bincount(ids, minlength=4 ** k).astype(np.float64))
        labels.append(window.label)
        if max_samples is not None and len(labels) >= max_samples:
            break
    if not labels:
        raise ValueError(f"no labelled DNA windows in {urls[:3]}")
    return np.stack(rows).astype(np.float32), np.asarray(labels, dtype=np.int64)


def _report(m: Dict, cfg: PretrainConfig, folder: str) -> str:
    e, d = cfg.model.encoder, cfg.model.dna
    tok = f"{d.k}-mers ({'overlapping' if d.overlapping else 'non-overlapping'})" if d.tokenizer == "dna_kmer" else d.tokenizer
    pt, pu, kb = m["linear_probe"]["trained"], m["linear_probe"]["untrained"], m["kmer_baseline"]
    heads = list(m["held_out_loss"]["trained"])
    rows = [table_row(cells) for cells in bold_better(
        {name: [m["held_out_loss"][key][h] for h in heads] + [m["linear_probe"][key]["accuracy"]]
         for name, key in (("untrained (same init)", "untrained"), ("trained", "trained"))},
        higher_is_better=[False] * len(heads) + [True]).values()]
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
        f"| {kb['k']}-mer counts (no network) | " + " | ".join("–" for _ in heads) + f" | {kb['accuracy']:.3f} |",
        "",
        f"Probe: logistic regression on frozen {PROBE_POOLING}-pooled features of {pt['train_samples']} training "
        f"windows, scored on {pt['test_samples']} held-out windows ({pt['classes']} classes, chance "
        f"{pt['chance']:.3f}; untrained {pu['accuracy']:.3f}). The last row fits the same probe on the windows' "
        f"{kb['k']}-mer counts ({4 ** kb['k']} features), the reference a bag-of-k-mers model would give.",
        *report_end(folder, [("loss curve", "loss_curve.png")], m["checkpoint"],
                    "`mmm.load_encoder(path, modality=\"dna\")`"),
    ]
    return "\n".join(lines)


run_dna_demo = demo_part("DNA", DEFAULT_CONFIG, _train_and_evaluate, _report)
