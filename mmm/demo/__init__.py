"""``mmm demo``: pretrain a tiny model per modality on the embedded data and report what each learned.

Each part trains one modality's tiny config on its embedded default data (built locally, no
download) and compares the trained encoder with the same network at its initialisation:

* ``text``: BERT MLM on standard-library docstrings (held-out masked-token accuracy, perplexity);
* ``image``: MAE on rendered shapes (held-out reconstruction loss, linear probe, reconstructions);
* ``dna``: MLM on a synthetic genome with planted motifs (linear probe for the motif class);
* ``audio``: HuBERT-style masked prediction on synthesized sounds (linear probe for the sound class);
* ``vl``: UNITER-style image-text pretraining on rendered scenes (zero-shot retrieval R@K and ITM
  accuracy on held-out and unseen compositions).

Every part writes into ``out/<part>/``; ``out/report.md`` and ``out/metrics.json`` gather them.
By default each part trains its preset's short schedule (the whole demo in about 12 minutes on 2
CPU cores); ``full=True`` (``mmm demo --full``) applies the longer schedules of :data:`FULL_SCHEDULES`.
"""
from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mmm.config import ConfigError

logger = logging.getLogger("mmm.demo")

PARTS: Dict[str, str] = {
    "text": "mmm.demo.text:run_text_demo",
    "image": "mmm.demo.image:run_image_demo",
    "dna": "mmm.demo.dna:run_dna_demo",
    "audio": "mmm.demo.audio:run_audio_demo",
    "vl": "mmm.demo.vl:run_vl_demo",
}
"""Demo part → ``module:function`` running it (``fn(out_dir, config, max_steps, progress_bar, quick, schedule)
-> metrics``)."""


PART_NEEDS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "text": ("text", ("mlm",)), "image": ("image", ("mae",)), "dna": ("dna", ()), "audio": ("audio", ()),
    "vl": ("image_text", ()),
}
"""Demo part → (the modality its config must train, the heads its evaluation reads). A ``--config`` that
does not fit is refused before training (it trained, then failed in the evaluation)."""


FULL_SCHEDULES: Dict[str, Dict[str, Any]] = {
    "text": {"trainer.max_steps": 1000, "optim.warmup_steps": 100, "trainer.val_check_interval": 250,
             "trainer.checkpoint_every_n_steps": 250},
    "image": {"trainer.max_steps": 2000, "trainer.val_check_interval": 500},
    "dna": {"model.encoder.dim": 128, "model.encoder.depth": 4, "model.encoder.heads": 4,
            "model.encoder.mlp_hidden": 512, "optim.lr": 1.5e-3, "trainer.max_steps": 800,
            "trainer.val_check_interval": 400, "trainer.checkpoint_every_n_steps": 400},
    "audio": {"trainer.max_steps": 500, "optim.warmup_steps": 100, "trainer.val_check_interval": 250,
              "trainer.checkpoint_every_n_steps": 500},
    "vl": {"trainer.max_steps": 1200, "optim.warmup_steps": 100, "trainer.val_check_interval": 400,
           "trainer.checkpoint_every_n_steps": 400},
}
"""``mmm demo --full``: each part's longer schedule, as overrides of its preset (``configs/*_tiny.yaml``
holds the fast default that fits the whole demo in about 12 minutes on 2 CPU cores; these bring
back the earlier, longer recipes, half an hour or more in all, for larger gains; the image part
trains 2000 steps). ``--max_steps`` still applies on top."""


def available_parts() -> List[str]:
    """The parts whose module is installed, in report order."""
    return [p for p, target in PARTS.items() if importlib.util.find_spec(target.split(":")[0]) is not None]


def _runner(part: str) -> Callable[..., Dict[str, object]]:
    module, fn = PARTS[part].split(":")
    return getattr(importlib.import_module(module), fn)


def check_demo_args(parts: Optional[Sequence[str]], max_steps: Optional[int], config: Optional[Path],
                    full: bool = False) -> None:
    """Refuse demo arguments that would be ignored or misread, before anything runs.

    Args:
        parts: the parts asked for (None = all; an empty list names none and is an error).
        max_steps: ``trainer.max_steps`` for every part (None = each part's own), at least 1.
        config: a config replacing one part's (only with exactly one part).
        full: the longer schedules of :data:`FULL_SCHEDULES` (they override the part presets, so not with ``config``).
    """
    known = available_parts()
    if parts is not None:
        if not parts:
            raise ConfigError(f"--parts names no part; choose from {', '.join(known)} (or leave "
                              f"--parts out to run them all)")
        unknown = [p for p in parts if p not in known]
        if unknown:
            raise ConfigError(f"unknown part(s) {', '.join(map(repr, unknown))} in --parts; valid parts: "
                              f"{', '.join(known)}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"--max_steps must be >= 1 (trainer.max_steps of every part), got {max_steps!r}")
    if full and config is not None:
        raise ConfigError("--full applies the longer schedules to the demo's own presets; with --config, set the "
                          "schedule in that config instead")
    if config is not None and (parts is None or len(parts) != 1):
        raise ConfigError(f"--config replaces one part's config; choose that part with --parts "
                          f"(got {'all parts' if parts is None else list(parts)})")
    if config is not None:
        check_part_config(parts[0], Path(config))


def check_part_config(part: str, config: Path) -> None:
    """Refuse a ``--config`` the part could train but not score: another modality, or a missing head."""
    from mmm.config import load_config
    from mmm.evaluate_vl import itc_head_name, itc_task
    from mmm.model import head_name
    from mmm.train.tasks import modality_of, task_configs

    cfg = load_config(config)
    modality, heads = PART_NEEDS[part]
    trains = sorted({modality_of(t.dataset) for t in task_configs(cfg)})
    if trains != [modality]:
        raise ConfigError(f"--config {config}: the {part} part trains and scores the {modality} modality, but this "
                          f"config trains {', '.join(trains)} (data.dataset or tasks[].dataset); give a {modality} "
                          f"config")
    missing = [h for h in heads if h not in {head_name(o) for o in cfg.objectives}]
    if missing:
        raise ConfigError(f"--config {config}: the {part} part scores the {missing[0]!r} head, which this config "
                          f"lacks (objectives: {[head_name(o) for o in cfg.objectives]})")
    if part == "vl" and itc_task(cfg) is None:
        raise ConfigError(f"--config {config}: the vl part ranks images and captions with the head of an image_text "
                          f"task of mode itc (options: {{mode: itc}}), which this config lacks")
    if part == "vl" and itc_head_name(cfg, itc_task(cfg)) is None:
        task = itc_task(cfg)
        raise ConfigError(f"--config {config}: the vl part ranks images and captions with a contrastive head (itc) of "
                          f"the itc task {task.name!r}, whose objectives {list(task.objectives)} have none")


def run_demo(out_dir: Path, parts: Optional[Sequence[str]] = None, max_steps: Optional[int] = None,
             progress_bar: bool = True, config: Optional[Path] = None, quick: bool = False,
             full: bool = False) -> Dict[str, object]:
    """Run the demo parts; returns the metrics written to ``metrics.json`` (``{"parts": {part: metrics}}``).

    Args:
        out_dir: output folder.
        parts: which parts (None: every available one; an empty list is an error).
        max_steps: override ``trainer.max_steps`` of every part.
        progress_bar: show Lightning's progress bar.
        config: a config replacing the part's default (only with a single part).
        quick: smaller evaluations (probe and held-out sets), for smoke tests.
        full: each part's longer schedule (:data:`FULL_SCHEDULES`) instead of its fast preset.
    """
    out_dir = Path(out_dir)
    check_demo_args(None if parts is None else list(parts), max_steps, config, full)
    parts = available_parts() if parts is None else list(parts)
    results: Dict[str, Dict[str, object]] = {}
    sections = ["# mmm demo report", "",
                "Each part pretrains one modality's tiny config on its embedded data (built locally) and compares "
                "the trained encoder with the same network at its initialisation, on identical held-out data.", ""]
    for part in parts:
        part_dir = out_dir / part
        part_dir.mkdir(parents=True, exist_ok=True)
        logger.info("demo part %s → %s", part, part_dir)
        print(f"mmm demo: {part} part → {part_dir}", flush=True)
        t0 = time.perf_counter()
        metrics = _runner(part)(part_dir, config, max_steps, progress_bar, quick,
                                FULL_SCHEDULES.get(part) if full else None)
        metrics["schedule"] = "full" if full else "default"
        metrics["part_seconds"] = round(time.perf_counter() - t0, 1)  # data, assets, training, evaluation, figures
        sections.append(str(metrics.pop("report")))
        results[part] = metrics
        (part_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    everything = {"parts": results}
    (out_dir / "metrics.json").write_text(json.dumps(everything, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text("\n".join(sections), encoding="utf-8")
    return everything
