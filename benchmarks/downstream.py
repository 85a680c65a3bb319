"""``mmm bench --suite downstream CKPT [CKPT ...]``: downstream quality of pretrained encoders.

For every checkpoint (an mmm ``.ckpt``, a ``save_encoder`` folder or an HF BERT folder) and every
embedded task of a modality it has (:func:`mmm.downstream.tasks.downstream_tasks`: the built-in ones below,
then a loaded plug-in modality's), three scores on the same splits:

* **linear probe** (logistic regression) and **kNN** (cosine, k = 20, DINO's temperature-weighted
  votes, T = 0.07) on frozen mean-pooled features (:mod:`mmm.probe`, :mod:`mmm.downstream.knn`);
* **fine-tuning** end to end (:func:`mmm.downstream.finetune.finetune`).

An mmm ``.ckpt`` is also scored at its random initialisation (the same architecture, built with
the run's seed plus the evaluation seed), so each row says what pretraining contributed. Every
score is a mean ± std over seeds (:func:`_score_model` says what a seed changes). Built-in tasks (built locally,
no download; each modality's in ``mmm/modalities/<name>/downstream.py``):

===================  ========  =========  ================================================================
task                 modality  data       what
===================  ========  =========  ================================================================
stdlib-package       text      real       stdlib docstrings → top-level package; split by module (test)
docstring-signature  text      real       (signature, docstring) pairs, does the docstring belong to the
                                          signature? negatives from the same module; split by module
digits               image     real       scikit-learn's bundled 8x8 handwritten digits at 32x32
shapes               image     synthetic  the demo's rendered shapes (shape class)
dna-motifs           dna       synthetic  the demo's synthetic genome windows (planted motif class)
audio-sounds         audio     synthetic  the demo's synthesized sounds (sound class)
===================  ========  =========  ================================================================

Shard tasks train on their ``train`` shards (80 %, the other 20 % is the dev split for early
stopping and model selection) and report on their ``val`` shards; the two stdlib tasks have their
own dev and test modules. Every fine-tuning score is the *test* metric of the best dev state.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from benchmarks.report import accuracy_axis, save_panels
from mmm.downstream.split import Split
from mmm.downstream.tasks import SIZES, DownstreamSizes, downstream_tasks

MICRO_ENV = "MMM_BENCH_MICRO"


def select_sizes(quick: bool) -> DownstreamSizes:
    """``micro`` when ``$MMM_BENCH_MICRO`` is set (tests), else ``quick`` or ``full``."""
    if os.environ.get(MICRO_ENV, "") not in ("", "0"):
        return SIZES["micro"]
    return SIZES["quick" if quick else "full"]


# ----------------------------------------------------------------------------- encoders


def encoder_modalities(source: Path) -> List[str]:
    """The modalities :func:`mmm.load_encoder` can build from ``source``."""
    from mmm.encoders import ENCODER_META_FILE, encoder_modalities, read_checkpoint

    if source.is_file():
        contents = read_checkpoint(source)
        found = {k.split(".")[1] for k in contents.state_dict if k.startswith("embedders.")}
        return [m for m in encoder_modalities() if m in found]
    if (source / ENCODER_META_FILE).is_file():
        return [json.loads((source / ENCODER_META_FILE).read_text())["modality"]]
    if (source / "config.json").is_file():
        return ["text"]
    raise ValueError(f"{source}: not an mmm checkpoint, a save_encoder folder or an HF BERT folder")


def random_init_factory(checkpoint: Path, modality: str, seed_offset: int = 0) -> Callable[[], Any]:
    """A factory of ``checkpoint``'s ``modality`` encoder at random initialisation: the run's model rebuilt
    with seed ``config.seed + seed_offset`` (offset 0 is the pretraining run's own initialisation), assets
    (tokenizer, audio statistics) kept."""
    import torch

    from mmm.encoders import encoder_from_checkpoint, read_checkpoint
    from mmm.train.pretrain import build_model_for
    from mmm.train.tasks import modalities_from_checkpoint

    def build() -> Any:
        contents = read_checkpoint(checkpoint)
        torch.manual_seed(contents.config.seed + seed_offset)
        model = build_model_for(contents.config, modalities_from_checkpoint(contents))
        contents.state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return encoder_from_checkpoint(contents, modality)

    build.__name__ = f"{checkpoint} (random init, seed offset {seed_offset})"
    return build


# ----------------------------------------------------------------------------- running

PROBE_FRACTION = 0.8
"""Share of the training split each seed's frozen-feature probes are fitted on (a seeded draw)."""


def _score_model(checkpoint: Path, label: str, modality: str, random_init: bool,
                 splits: Tuple[Split, Split, Split], sizes: DownstreamSizes, log: Callable[[str], None]) -> Dict[str, Any]:
    """Frozen-feature probes and fine-tuning of one encoder on one task, once per seed.

    Seed ``s``: the linear probe and kNN are fitted on a seeded :data:`PROBE_FRACTION` of the training
    split (so both rows vary with the probe's data); fine-tuning uses seed ``s`` for its head, dropout and
    data order; and a random-initialisation row builds its encoder with seed offset ``s`` (3 different
    initialisations), both for its frozen features and as the start of its fine-tuning.
    """
    from mmm.downstream.data import Labels, encode_labels
    from mmm.downstream.finetune import FinetuneConfig, finetune
    from mmm.downstream.inputs import load_adapter, make_adapter
    from mmm.downstream.knn import knn_probe
    from mmm.downstream.metrics import mean_std
    from mmm.probe import linear_probe

    train, dev, test = splits
    t0 = time.perf_counter()
    labels = Labels.fit(train, "classification")
    ytr, yte = (np.asarray(encode_labels(s, labels)) for s in (train, test))
    probes, knns, fts, fts_dev, chance, pooling, feats = [], [], [], [], 0.0, "mean", None
    for seed in range(sizes.seeds):
        source: Any = random_init_factory(checkpoint, modality, seed) if random_init else checkpoint
        if random_init or feats is None:  # a pretrained encoder's features are the same for every seed
            adapter = make_adapter(source(), modality, label) if callable(source) else load_adapter(str(source), modality)
            feats = (adapter.features(train.inputs, "mean", where=train.where),
                     adapter.features(test.inputs, "mean", where=test.where))
            pooling = "cls" if adapter.has_cls else "mean"
        xtr, xte = feats
        keep = np.sort(np.random.default_rng(seed).permutation(len(ytr))[: max(2, int(PROBE_FRACTION * len(ytr)))])
        probe = linear_probe((xtr[keep], ytr[keep]), (xte, yte), seed=seed)
        probes.append(probe.accuracy)
        knns.append(knn_probe((xtr[keep], ytr[keep]), (xte, yte)).accuracy)
        chance = probe.chance
        cfg = FinetuneConfig(lr=sizes.lr, batch_size=sizes.batch_size, epochs=sizes.epochs, seeds=1, first_seed=seed,
                             pooling=pooling, patience=2)
        ft = finetune(source, modality, train, dev, test, cfg=cfg, log=lambda s: log(f"    {s}"))
        fts.append(ft.seeds[0].test["accuracy"])
        fts_dev.append(ft.seeds[0].dev["accuracy"])
        log(f"    seed {seed}: linear probe {probes[-1]:.3f}, kNN {knns[-1]:.3f}, fine-tune test {fts[-1]:.3f}")
    return {"model": label, "linear_probe": mean_std(probes), "knn": mean_std(knns), "chance": chance,
            "linear_probe_seeds": probes, "knn_seeds": knns, "finetune": mean_std(fts), "finetune_dev": mean_std(fts_dev),
            "finetune_seeds": fts, "pooling_finetune": pooling, "seconds": round(time.perf_counter() - t0, 1)}


def run(checkpoints: Sequence[Any], quick: bool = False, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Every task that applies to each checkpoint; returns the suite section.

    Args:
        checkpoints: mmm ``.ckpt`` files, ``save_encoder`` folders or HF BERT folders.
        quick: small tasks (the smoke size under ``$MMM_BENCH_MICRO``).
        log: progress printer.
    """
    if not checkpoints:
        raise ValueError("the downstream suite needs at least one checkpoint: mmm bench --suite downstream CKPT [CKPT ...]")
    sizes = select_sizes(quick)
    models: List[Tuple[str, Path, bool, List[str]]] = []
    for c in checkpoints:
        p = Path(c)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
        mods = encoder_modalities(p)
        models.append((str(p), p, False, mods))
        if sizes.random_init and p.is_file():
            models.append((f"{p} (random init)", p, True, mods))
    tasks = downstream_tasks()
    results: List[Dict[str, Any]] = []
    for task, td in tasks.items():
        users = [(label, p, init) for label, p, init, mods in models if td.modality in mods]
        if not users:
            continue
        log(f"== {task} ({td.modality}, {td.data} data): {td.what}")
        splits = td.load(sizes)
        for label, p, init in users:
            log(f"  {label}")
            row = _score_model(p, label, td.modality, init, splits, sizes, log)
            row.update({"task": task, "modality": td.modality, "data": td.data,
                        "sizes": {"train": len(splits[0]), "dev": len(splits[1]), "test": len(splits[2])}})
            results.append(row)
    if not results:
        raise ValueError(f"no downstream task applies to the checkpoints' modalities "
                         f"{sorted({m for _, _, _, ms in models for m in ms})}; tasks exist for "
                         f"{sorted({t.modality for t in tasks.values()})} (a plug-in modality's tasks: mmm --plugin "
                         "MODULE bench ...)")
    return {"sizes": asdict(sizes), "tasks": {k: {"modality": v.modality, "data": v.data, "what": v.what}
                                              for k, v in tasks.items()}, "results": results}


def markdown(section: Dict[str, Any]) -> str:
    """The results as a markdown table."""
    s = section["sizes"]
    lines = [f"Test accuracy, mean ± std over {s['seeds']} seeds. Frozen features: mean-pooled, linear probe "
             f"(logistic regression) and kNN (cosine, k=20, T=0.07 weighted votes), each seed fitted on a seeded "
             f"{PROBE_FRACTION:.0%} of the training split. Fine-tuning: {s['epochs']} epoch(s), lr {s['lr']}, batch "
             f"{s['batch_size']}, the best dev state. A random-init row uses a different initialisation per seed. At "
             f"most {s['train_per_class']} training and {s['eval_per_class']} test samples per class.", "",
             "| task | data | model | linear probe | kNN | fine-tune | chance | train / dev / test |",
             "|---|---|---|---:|---:|---:|---:|---|"]

    def ms(v: Dict[str, float]) -> str:
        return f"{v['mean']:.3f} ± {v['std']:.3f}"

    for r in section["results"]:
        z = r["sizes"]
        lines.append(f"| {r['task']} | {r['data']} | `{r['model']}` | {ms(r['linear_probe'])} | {ms(r['knn'])} | "
                     f"{ms(r['finetune'])} | {r['chance']:.3f} | {z['train']} / {z['dev']} / {z['test']} |")
    return "\n".join(lines)


def plot(section: Dict[str, Any], path: Path) -> None:
    """PNG: per task, the three scores of every model (fine-tuning with its std as an error bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in section["results"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in section["results"] if r["task"] == task]
        xs = np.arange(len(rows))
        ax.bar(xs - 0.27, [r["linear_probe"]["mean"] for r in rows], 0.27, yerr=[r["linear_probe"]["std"] for r in rows],
               capsize=3, label="linear probe")
        ax.bar(xs, [r["knn"]["mean"] for r in rows], 0.27, yerr=[r["knn"]["std"] for r in rows], capsize=3, label="kNN")
        ax.bar(xs + 0.27, [r["finetune"]["mean"] for r in rows], 0.27, yerr=[r["finetune"]["std"] for r in rows],
               capsize=3, label="fine-tune")
        accuracy_axis(ax, rows[0]["chance"], f"{task} ({rows[0]['data']})")
        ax.set_xticks(xs, [Path(r["model"].replace(" (random init)", "")).name[:18]
                           + ("\n(random init)" if r["model"].endswith("(random init)") else "") for r in rows],
                      fontsize=7)
    save_panels(fig, axes, path)
