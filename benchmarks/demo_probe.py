"""A demo part's probe margin with another preset, at the demo's own training compute, several seeds.

Issue 17's learning-quality targets are stated "at the demo's training budget": the image part's
linear-probe margin over initialisation (trained minus untrained, same architecture and seed), or
the DNA part's probe against the bag-of-4-mers. This script trains the part's default preset and
a candidate preset through the demo's own code (:func:`mmm.demo.common.train_part`,
``losses_and_probes`` with the part's probe split), at **equal training FLOPs**: the candidate
trains ``round(demo steps × demo FLOPs per step / candidate FLOPs per step)`` steps (counted by
:func:`benchmarks.recipe_budget.measure_recipe` over real batches), its warm-up at the same
fraction of the run as in its preset. Every seed trains both; the report is mean ± std of the
margin per preset.

    python -m benchmarks.demo_probe --part image --candidate configs/image_mp3_tiny.yaml --seeds 0 1 2 --out runs/dp
    python -m benchmarks.demo_probe --part image --only candidate ...   # one preset per process (own --out each)
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
PARTS: Dict[str, Dict[str, Any]] = {
    "image": {"default": REPO_ROOT / "configs" / "image_mae_tiny.yaml", "probe": {"max_train": 2000, "max_test": 1000}},
    "dna": {"default": REPO_ROOT / "configs" / "dna_mlm_tiny.yaml",
            "probe": {"max_train": 2000, "max_test": 1000, "pooling": "mean"}},
}
"""Demo parts this script knows: their default preset and the demo's probe arguments (see ``mmm/demo/<part>.py``)."""


def planned_steps(default_cfg: Any, candidate_cfg: Any, batches: int = 2) -> Dict[str, Any]:
    """The candidate's steps for the default's compute (``trainer.max_steps`` × FLOPs per step)."""
    from benchmarks.recipe_budget import measure_recipe

    costs = {}
    for name, cfg in (("default", default_cfg), ("candidate", candidate_cfg)):
        c = measure_recipe(name, cfg, batches)
        costs[name] = c.flops_per_step
        c.release()
    budget = costs["default"] * default_cfg.trainer.max_steps
    steps = max(1, round(budget / costs["candidate"]))
    return {"gflop_per_step": {k: v / 1e9 for k, v in costs.items()}, "budget_tflop": budget / 1e12,
            "steps": {"default": default_cfg.trainer.max_steps, "candidate": steps}}


def run_one(part: str, config: Path, steps: int, warmup: int, seed: int, out: Path, quick: bool) -> Dict[str, float]:
    """Train ``config`` for ``steps`` with ``seed`` through the demo's code; probe accuracy trained and untrained."""
    from mmm.demo.common import part_config, torch_threads, train_part

    spec = PARTS[part]
    cfg = part_config(config, spec["default"], out, steps, False,
                      {"seed": seed, "data.seed": seed, "data.val": None, "optim.warmup_steps": warmup,
                       "trainer.checkpoint_every_n_steps": steps})
    with torch_threads(cfg.trainer.threads):
        trained = train_part(cfg)
        probe = dict(spec["probe"], **({"max_train": 200, "max_test": 100} if quick else {}))
        scores = trained.losses_and_probes(cfg.data.batch_size, quick, **probe)["linear_probe"]
    acc = {name: float(s["accuracy"]) for name, s in scores.items()}
    return {"trained": acc["trained"], "untrained": acc["untrained"], "margin": acc["trained"] - acc["untrained"],
            "train_seconds": round(trained.train_seconds, 1)}


def summary(rows: List[Dict[str, float]]) -> Dict[str, str]:
    def ms(k: str) -> str:
        v = [r[k] for r in rows]
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"

    return {k: ms(k) for k in ("trained", "untrained", "margin")}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=sorted(PARTS), required=True)
    p.add_argument("--candidate", type=Path, required=True, help="the preset compared with the part's default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", choices=["default", "candidate"], default=None, help="train one of the two presets")
    p.add_argument("--max_steps", type=int, default=None, help="the default's steps (default: its preset's, the demo's)")
    p.add_argument("--quick", action="store_true", help="smoke size: a small probe split")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    from benchmarks.recipes import scaled_warmup
    from mmm.config import load_config

    if not a.candidate.is_file():
        p.error(f"--candidate {a.candidate}: no such file")
    spec = PARTS[a.part]
    default_cfg = load_config(spec["default"], {"trainer.max_steps": a.max_steps} if a.max_steps else {})
    candidate_cfg = load_config(a.candidate, {})
    plan = planned_steps(default_cfg, candidate_cfg)
    print(f"plan: {json.dumps(plan)}", flush=True)
    configs = {"default": (spec["default"], default_cfg), "candidate": (a.candidate, candidate_cfg)}
    results: Dict[str, List[Dict[str, float]]] = {}
    for seed in a.seeds:
        for name, (path, cfg) in configs.items():
            if a.only and name != a.only:
                continue
            steps = plan["steps"][name]
            r = run_one(a.part, path, steps, scaled_warmup(cfg, steps), seed, a.out / name / f"seed{seed}", a.quick)
            print(f"{name} ({path.name}) seed {seed}, {steps} steps: {json.dumps(r)}", flush=True)
            results.setdefault(name, []).append(r)
    report = {"part": a.part, "candidate": str(a.candidate), "plan": plan, "seeds": a.seeds, "results": results,
              "summary": {k: summary(v) for k, v in results.items()}}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "demo_probe.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name, s in report["summary"].items():
        print(f"{name}: probe trained {s['trained']}, untrained {s['untrained']}, margin {s['margin']}")
    return report


if __name__ == "__main__":
    main()
