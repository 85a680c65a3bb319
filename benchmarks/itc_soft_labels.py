"""Zero-shot retrieval with and without LightCLIP's soft contrastive targets, several seeds.

Trains ``configs/vl_itc_soft_tiny.yaml`` (itc only, on the embedded image-text set) twice per
seed -- as written (duplicate-caption positives + progressively softened negatives) and as CLIP's
one-hot baseline (both options off), same steps, data order and initialisation, so equal compute
(the soft targets add a (B, B) comparison, nothing to the network) -- then scores each trained
model's text→image and image→text R@1/5/10 on the held-out split (:func:`mmm.evaluate_vl.evaluate_vl`,
relevance = same caption text) and prints mean ± std over seeds.

    nice -n 10 python benchmarks/itc_soft_labels.py --seeds 0 1 2 --steps 300 --out /tmp/itc_soft
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET = REPO_ROOT / "configs" / "vl_itc_soft_tiny.yaml"
VARIANTS = {"one-hot (CLIP)": {"duplicate_captions": False, "label_smoothing": 0.0},
            "soft (LightCLIP)": {}}


def run_one(seed: int, steps: int, variant: str, out: Path, max_batches=None) -> Dict[str, float]:
    """Train one variant with one seed; its held-out retrieval recalls (``t2i@1`` ... ``i2t@10``)."""
    from mmm.config import load_config
    from mmm.evaluate_vl import evaluate_vl
    from mmm.train.pretrain import pretrain
    from mmm.train.tasks import scoring_val_shards

    cfg = load_config(PRESET, {"seed": seed, "data.seed": seed, "trainer.max_steps": steps,
                               "trainer.enable_progress_bar": False,
                               "trainer.default_root_dir": str(out / f"{variant.split()[0]}_{seed}")})
    cfg.objectives[0].args.update(VARIANTS[variant])
    run = pretrain(cfg)
    task = cfg.tasks[0]
    urls = scoring_val_shards(task)
    model = run.module.model.cpu().eval()
    score = evaluate_vl(model, run.modalities.feeds[task.name], urls, itc_head="itc", itm_head=None,
                        max_batches=max_batches)
    r = score.retrieval
    return {**{f"t2i@{k}": v for k, v in r.t2i.items()}, **{f"i2t@{k}": v for k, v in r.i2t.items()},
            **{f"chance t2i@{k}": v for k, v in r.t2i_chance.items()}}


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("runs/itc_soft_labels"))
    p.add_argument("--max-batches", type=int, default=None, help="cap on held-out batches (quick checks)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results: Dict[str, List[Dict[str, float]]] = {v: [] for v in VARIANTS}
    for seed in a.seeds:
        for variant in VARIANTS:
            results[variant].append(run_one(seed, a.steps, variant, a.out, a.max_batches))
            print(json.dumps({"seed": seed, "variant": variant, **results[variant][-1]}), flush=True)
    keys = [k for k in results[next(iter(VARIANTS))][0] if not k.startswith("chance")]
    print(f"\n{len(a.seeds)} seeds x {a.steps} steps; held-out retrieval, mean ± std")
    print("| targets | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for variant, rows in results.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rows]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    chance = results[next(iter(VARIANTS))][0]
    print("chance: " + ", ".join(f"{k[7:]}={v:.3f}" for k, v in chance.items() if k.startswith("chance")))


if __name__ == "__main__":
    main()
