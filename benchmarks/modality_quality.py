"""Train a (multi-task) config, then score every modality it trains against its initialisation.

For each task of the run, through the one shared encoder, on the held-out (``val``) split:

* ``text`` (and any token task with an ``mlm`` head): held-out MLM loss of the task's head, masks
  fixed by a seed (:func:`mmm.demo.common.held_out_loss`);
* ``image``, ``audio``, ``dna``: linear-probe accuracy on frozen mean-pooled features, 2000
  training / 1000 held-out labelled samples at most (the demo parts' probe, :mod:`mmm.probe`);
* ``image_text`` (its ``itc`` task): zero-shot text→image / image→text R@1/5/10 and ITM accuracy
  (:func:`mmm.evaluate_vl.evaluate_vl`).

The untrained model is the same network built with the run's seed (the trained model's
initialisation). Results go to a JSON file; the per-task step counts come from the run.

Usage::

    python -m benchmarks.modality_quality --config configs/multimodal_tiny.yaml --out runs/mq.json
        [--set trainer.max_steps=300 --set seed=1 ...] [--quick]
    python -m benchmarks.modality_quality --checkpoint RUN/checkpoints/last.ckpt --out runs/mq.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import lightning as L
import yaml

from mmm.config import PretrainConfig, load_config
from mmm.demo.common import held_out_loss, probe_models, torch_threads
from mmm.evaluate_vl import evaluate_vl, itc_head_name, itm_head_name
from mmm.train.pretrain import build_model_for, pretrain
from mmm.train.tasks import resolve_shards, scoring_val_shards

PROBED = ("image", "audio", "dna")


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """``["a.b=1", "c=x"]`` → ``{"a.b": 1, "c": "x"}`` (values read as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def evaluate_run(cfg: PretrainConfig, modalities: Any, trained: Any, counts: Dict[str, Any],
                 quick: bool = False) -> Dict[str, Any]:
    """Scores of the trained model and of its initialisation, per task (see the module docstring).

    Args:
        cfg: the run's configuration.
        modalities: its :class:`~mmm.train.tasks.RunModalities` (assets prepared or loaded).
        trained: the trained :class:`~mmm.model.MaskedModel`.
        counts: task → ``{"batches": n, ...}`` (steps each task trained), or empty.
        quick: small probes and held-out sets.
    """
    trained = trained.cpu().eval()
    L.seed_everything(cfg.seed, verbose=False)
    untrained = build_model_for(cfg, modalities).eval()
    models = {"trained": trained, "untrained": untrained}
    out: Dict[str, Any] = {}
    seen = set()
    for task in cfg.tasks:
        feed = modalities.feeds[task.name]
        val = scoring_val_shards(task)
        entry: Dict[str, Any] = {"dataset": task.dataset, "steps": counts.get(task.name, {}).get("batches")}
        mode = task.options.get("mode")
        if task.dataset == "image_text":
            if mode != "itc":
                out[task.name] = entry
                continue
            itm = itm_head_name(cfg)
            entry.update({name: evaluate_vl(m, feed, val, itc_head=itc_head_name(cfg, task), itm_head=itm, batch_size=64,
                                            max_batches=2 if quick else None).as_dict()
                          for name, m in models.items()})
        elif task.dataset in PROBED and task.dataset not in seen:
            seen.add(task.dataset)
            train = resolve_shards(task.train, task.dataset, "train")
            n_train, n_test = (300, 200) if quick else (2000, 1000)
            probes = probe_models(models, feed, train, val, max_train=n_train, max_test=n_test,
                                  batch_size=cfg.data.batch_size)
            entry.update({name: {"probe": vars(p)} for name, p in probes.items()})
        masker = feed.build_masker(task.masking) if task.dataset != "image_text" else None
        if masker is not None:
            for name, m in models.items():
                losses = held_out_loss(m, feed, masker, val, batch_size=cfg.data.batch_size,
                                       max_batches=3 if quick else 20, task=task.name)
                entry.setdefault(name, {})["held_out_loss"] = losses
        out[task.name] = entry
    return out


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, help="config to train and then score")
    p.add_argument("--checkpoint", type=Path, help="score this checkpoint of a run instead of training (its config)")
    p.add_argument("--set", action="append", default=[], help="config override key=value (YAML value); repeatable")
    p.add_argument("--out", required=True, type=Path, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="small probes and held-out sets (smoke tests)")
    args = p.parse_args(argv)
    if (args.config is None) == (args.checkpoint is None):
        raise SystemExit("give --config (train, then score) or --checkpoint (score a saved run)")
    over = {"trainer.enable_progress_bar": False, **parse_overrides(args.set)}
    t0 = time.perf_counter()
    if args.checkpoint is not None:
        from mmm.checkpoint import read_checkpoint
        from mmm.train.tasks import modalities_from_checkpoint

        contents = read_checkpoint(args.checkpoint)
        cfg = contents.config
        mods = modalities_from_checkpoint(contents)
        trained = build_model_for(cfg, mods)
        trained.load_state_dict(contents.state_dict)
        with torch_threads(cfg.trainer.threads):
            scores = evaluate_run(cfg, mods, trained, {}, args.quick)
        train_s = 0.0
    else:
        cfg = load_config(args.config, over)
        with torch_threads(cfg.trainer.threads):
            run = pretrain(cfg)
            train_s = time.perf_counter() - t0
            scores = evaluate_run(cfg, run.modalities, run.module.model, run.datamodule.source_counts(), args.quick)
    result = {"config": str(args.config or args.checkpoint), "overrides": over, "steps": cfg.trainer.max_steps,
              "train_seconds": round(train_s, 1), "eval_seconds": round(time.perf_counter() - t0 - train_s, 1),
              "load_average": os.getloadavg(), "scores": scores}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "scores"}, default=str))


if __name__ == "__main__":
    main()
