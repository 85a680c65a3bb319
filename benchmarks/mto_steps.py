"""Steps to a target loss with and without masked token optimisation (MTO), several seeds.

Trains an MTO preset (``--preset``; by default ``configs/image_simmim_mto_tiny.yaml``, SimMIM + visual
tokens on the embedded shapes; ``audio_mto_tiny`` is MAM on the embedded sounds) with
``model.encoder.mto_layers`` set to 0 (the plain preset it derives from) and to the preset's value, same seeds,
data order, initialisation and steps -- equal FLOPs per step (MTO changes which keys each query may
read, not how many products are computed) -- validating every ``--val-every`` steps on the same
fixed batches. For each validation step ``s`` of the baseline it reports the baseline's mean
validation loss there and the first validation step at which each MTO run is at or below it: the
paper's claim (about half the epochs to the baselines' converged accuracy) would show as MTO
reaching the baseline's step-``s`` loss at about ``s / 2``. Also prints each run's wall time.

    nice -n 10 python benchmarks/mto_steps.py --seeds 0 1 --steps 400 --val-every 50 --out /tmp/mto
    nice -n 10 python benchmarks/mto_steps.py --preset audio_mto_tiny --seeds 0 1 --steps 150 --out /tmp/mto_audio
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET = "image_simmim_mto_tiny"
"""The default ``--preset`` (a file stem in ``configs/``)."""


def val_curve(run_dir: Path) -> Dict[int, float]:
    """``{step: val/loss}`` from a run's Lightning CSV log."""
    from mmm.demo.common import read_metrics

    logs = sorted(run_dir.glob("logs/version_*/metrics.csv"))
    series = read_metrics(logs[-1] if logs else None)
    return {step + 1: value for step, value in series.get("val/loss", [])}  # logged at step index s-1


def run_one(seed: int, steps: int, val_every: int, mto_layers: Optional[int], out: Path,
            preset: str = PRESET) -> Dict[str, object]:
    """Train one run of ``configs/<preset>.yaml``; its validation curve and wall time."""
    from mmm.config import load_config
    from mmm.train.pretrain import pretrain

    run_dir = out / f"mto{mto_layers if mto_layers is not None else 'preset'}_seed{seed}"
    overrides = {"seed": seed, "data.seed": seed, "trainer.max_steps": steps, "trainer.val_check_interval": val_every,
                 "trainer.checkpoint_every_n_steps": steps, "trainer.enable_progress_bar": False,
                 "trainer.default_root_dir": str(run_dir), "trainer.threads": 1}
    if mto_layers is not None:
        overrides["model.encoder.mto_layers"] = mto_layers
    path = REPO_ROOT / "configs" / f"{preset}.yaml"
    if not path.is_file():
        raise ValueError(f"--preset {preset!r}: no {path}")
    if not load_config(path).model.encoder.mto_layers:
        raise ValueError(f"--preset {preset!r}: model.encoder.mto_layers is 0 there; give an MTO preset")
    cfg = load_config(path, overrides)
    t0 = time.perf_counter()
    pretrain(cfg)
    return {"seed": seed, "mto_layers": cfg.model.encoder.mto_layers, "seconds": round(time.perf_counter() - t0, 1),
            "val": val_curve(run_dir)}


def steps_to(curve: Dict[int, float], target: float) -> Optional[int]:
    """First validation step whose loss is at or below ``target`` (None: never)."""
    for step in sorted(curve):
        if curve[step] <= target:
            return step
    return None


def steps_to_interpolated(curve: Dict[int, float], target: float) -> Optional[float]:
    """The step at which the loss crosses ``target``, linear between validation points (None: never)."""
    points = sorted(curve.items())
    if points and points[0][1] <= target:
        return float(points[0][0])
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v1 <= target < v0:
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("runs/mto_steps"))
    p.add_argument("--preset", default=PRESET, help="MTO preset (file stem in configs/); its baseline is mto_layers 0")
    p.add_argument("--from-logs", type=Path, nargs="+", default=None,
                   help="only summarise the JSON run lines of earlier invocations' output (e.g. one per seed)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    runs: Dict[str, List[Dict[str, object]]] = {"baseline": [], "mto": []}
    if a.from_logs:
        for log in a.from_logs:
            for line in log.read_text(encoding="utf-8").splitlines():
                if line.startswith('{"run"'):
                    r = json.loads(line)
                    r["val"] = {int(k): v for k, v in r["val"].items()}
                    runs[r.pop("run")].append(r)
    else:
        for seed in a.seeds:
            for name, layers in (("baseline", 0), ("mto", None)):
                r = run_one(seed, a.steps, a.val_every, layers, a.out, a.preset)
                runs[name].append(r)
                print(json.dumps({"run": name, **r}), flush=True)
    steps = sorted(set.intersection(*(set(r["val"]) for r in runs["baseline"])))
    layers = runs["mto"][0]["mto_layers"]
    print(f"\n{len(runs['mto'])} seeds, validation every {steps[0]} steps; MTO = mto_layers {layers}")
    print("| baseline step s | baseline val loss at s (mean ± std) | MTO val loss at s | "
          "first validation step MTO ≤ baseline's loss at s (per seed) | interpolated (per seed) |")
    print("|---|---|---|---|---|")
    for s in steps:
        base = [r["val"][s] for r in runs["baseline"]]
        mto = [r["val"].get(s, float("nan")) for r in runs["mto"]]
        target = statistics.mean(base)
        reach = [steps_to(r["val"], target) for r in runs["mto"]]
        interp = [steps_to_interpolated(r["val"], target) for r in runs["mto"]]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        print(f"| {s} | {target:.4f} ± {sd(base):.4f} | {statistics.mean(mto):.4f} ± {sd(mto):.4f} | "
              f"{', '.join('never' if x is None else str(x) for x in reach)} | "
              f"{', '.join('never' if x is None else f'{x:.0f}' for x in interp)} |")
    for name, rs in runs.items():
        print(f"{name}: wall time per run " + ", ".join(f"{r['seconds']} s" for r in rs))


if __name__ == "__main__":
    main()
