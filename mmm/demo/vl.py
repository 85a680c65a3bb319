"""The vision-language part of ``mmm demo``: a tiny UNITER on rendered scenes, scored on unseen compositions.

Steps: build the embedded image-text set (rendered shapes with grammar captions and simulated
detector regions; six (shape, colour) pairs appear only in val) → pretrain
``configs/vl_uniter_tiny.yaml`` (task sampling over MLM, MRFR, MRC-kl, ITM + WRA, contrastive)
→ zero-shot image↔text retrieval R@1/5/10 and ITM accuracy on the held-out split, for the trained
model and the same network at its initialisation, on all val pairs and on the unseen compositions
only, each next to its chance level (:mod:`mmm.evaluate_vl`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from mmm.config import PretrainConfig
from mmm.demo.common import bold_better, demo_part, report_end, table_row, train_part
from mmm.evaluate_vl import evaluate_vl, itc_head_name, itc_task, itm_head_name
from mmm.train.tasks import scoring_val_shards

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "vl_uniter_tiny.yaml"


def unseen_predicate(shard_dir: Path) -> Optional[Callable[[str], bool]]:
    """caption → True when it names one of the held-out (shape, colour) pairs of the embedded set
    (read from its ``manifest.json``); None when the manifest lists none."""
    import json

    manifest = Path(shard_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    combos = json.loads(manifest.read_text(encoding="utf-8")).get("held_out_combos") or []
    pairs = [(shape, colour) for shape, colour in combos]
    if not pairs:
        return None

    def is_unseen(caption: str) -> bool:
        words = set(caption.lower().replace(",", " ").replace(".", " ").split())
        return any(shape in words and colour in words for shape, colour in pairs)

    return is_unseen


def plot_task_losses(series: Dict[str, list], out: Path) -> None:
    """PNG of each task's training loss (``train/<task>/<head>_loss``) and held-out loss over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted(series):
        parts = key.split("/")
        if len(parts) != 3 or parts[0] not in ("train", "val") or not parts[2].endswith("_loss"):
            continue
        steps, values = map(np.asarray, zip(*series[key]))
        if parts[0] == "train" and len(values) >= 5:  # a running mean: each task trains on a share of the steps
            values = np.convolve(values, np.ones(5) / 5, mode="valid")
            steps = steps[4:]
        style = "-" if parts[0] == "train" else "o--"
        ax.plot(steps, values, style, lw=1, label=f"{parts[0]} {parts[1]}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("mmm demo: tiny UNITER, loss per task")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _vl_task(cfg: PretrainConfig):
    task = itc_task(cfg)
    if task is not None:
        return task
    raise ValueError("the vision-language demo needs a config with an image_text task of mode itc (retrieval)")


def _train_and_evaluate(cfg: PretrainConfig, out_dir: Path, quick: bool) -> Dict[str, object]:
    part = train_part(cfg)
    task = _vl_task(cfg)
    feed = part.run.modalities.feeds[task.name]
    val_urls = scoring_val_shards(task)
    is_unseen = unseen_predicate(Path(val_urls[0]).parent)
    itm_head = itm_head_name(cfg)
    itc_head = itc_head_name(cfg, task)  # checked before training (check_part_config)

    t1 = time.perf_counter()
    scores = {name: evaluate_vl(m, feed, val_urls, itc_head=itc_head, itm_head=itm_head, is_unseen=is_unseen,
                                batch_size=64, max_batches=4 if quick else None).as_dict()
              for name, m in part.models.items()}
    eval_seconds = time.perf_counter() - t1
    plot_task_losses(part.series, out_dir / "loss_curve.png")
    return {
        **part.summary(cfg),
        "eval_seconds": round(eval_seconds, 1),
        "scores": scores,
    }


def _fmt(r: Dict, way: str) -> str:
    return " / ".join(f"{r[way][k]:.3f}" for k in sorted(r[way], key=int))


def _values(r: Dict, itm: Optional[float]) -> List[Optional[float]]:
    """One model's comparable numbers on a split: t2i R@1/5/10, i2t R@1/5/10, ITM accuracy."""
    return [r[way][k] for way in ("t2i", "i2t") for k in sorted(r[way], key=int)] + [itm]


def _itm_chance(score: Dict) -> str:
    """The majority label's share of the scored ITM pairs (what always answering it scores), or n/a without ITM."""
    return "n/a" if score.get("itm_chance") is None else f"{score['itm_chance']:.3f}"


def _itm_setting(score: Dict) -> str:
    p = score.get("itm_matching_share")
    if p is None:
        return "not scored: the config has no itm head"
    return f"{1 - p:.0%} of the captions swapped in-batch, so always answering the majority label scores {_itm_chance(score)}"


def _report(m: Dict, cfg: PretrainConfig, folder: str) -> str:
    e, vt = cfg.model.encoder, cfg.model.image_text
    tr, un = m["scores"]["trained"], m["scores"]["untrained"]
    tasks = ", ".join(f"{t.name} ({t.weight:g})" for t in cfg.tasks)
    lines = [
        "## Vision-language: UNITER-style single-stream pretraining",
        "",
        f"One encoder ({e.depth} blocks, width {e.dim}) over caption tokens followed by image {vt.image_input}, "
        f"trained {m['steps']} steps ({m['train_seconds']} s) with one task drawn per step by weight: {tasks}. "
        f"Held-out split: {tr['retrieval']['images']} images, {tr['retrieval']['texts']} captions; six (shape, colour) "
        "compositions appear only there.",
        "",
        "Zero-shot retrieval (images and captions encoded alone, contrastive projections, cosine ranking; a hit is an "
        f"item described by the same caption text) and ITM accuracy ({_itm_setting(tr)}):",
        "",
        "| model | split | text→image R@1 / 5 / 10 | image→text R@1 / 5 / 10 | ITM accuracy |",
        "|---|---|---|---|---|",
    ]
    splits = [("all val", "retrieval", "itm_accuracy")]
    if tr.get("unseen_retrieval") and un.get("unseen_retrieval"):
        splits.append(("unseen compositions", "unseen_retrieval", "unseen_itm_accuracy"))
    for split, key, itm in splits:
        values = {name: _values(s[key], s.get(itm)) for name, s in (("untrained (same init)", un), ("trained", tr))}
        k = len(tr[key]["t2i"])  # recall levels per direction
        for cells in bold_better(values, higher_is_better=[True] * (2 * k + 1)).values():
            lines.append(table_row([cells[0], split, " / ".join(cells[1:k + 1]), " / ".join(cells[k + 1:2 * k + 1]),
                                    cells[-1]]))
    r, u = tr["retrieval"], tr.get("unseen_retrieval")
    chance = _itm_chance(tr)
    lines.append(f"| chance | all val | {_fmt(r, 't2i_chance')} | {_fmt(r, 'i2t_chance')} | {chance} |")
    if u:
        unseen = tr.get("unseen_itm_chance")  # the unseen pairs' own majority share
        unseen_chance = chance if unseen is None else f"{unseen:.3f}"
        lines.append(f"| chance | unseen compositions | {_fmt(u, 't2i_chance')} | {_fmt(u, 'i2t_chance')} | "
                     f"{unseen_chance} |")
    lines += [
        "",
        "On the unseen subset, retrieval ranks only the unseen images and captions among themselves.",
        *report_end(folder, [("loss curves", "loss_curve.png")], m["checkpoint"],
                    "`mmm.load_encoder(path, modality=\"text\")` gives its text encoder"),
    ]
    return "\n".join(lines)


run_vl_demo = demo_part("vision-language", DEFAULT_CONFIG, _train_and_evaluate, _report)
