"""``mmm bench --suite recipes --modality M``: pretraining recipes compared at equal compute, downstream.

Per modality, a group of *recipes* (a preset in ``configs/`` plus overrides) with a named
baseline. Each recipe is pretrained on the modality's embedded data with the **same training
FLOP budget** (not the same number of steps), then its encoder is scored on the modality's
downstream task(s) (:func:`mmm.downstream.tasks.downstream_tasks`), three ways: fine-tuning end to end,
and a linear probe and kNN on frozen mean-pooled features. Three pretraining seeds per recipe
(each followed by its own downstream evaluation; fine-tuning seeded with the pretraining seed),
mean ± std over them. The baseline's architecture at random initialisation (one per seed) is the
reference row.

Equal compute (:mod:`benchmarks.recipe_budget`): each recipe's FLOPs per training step are
counted over real batches of its own pipeline (forward + backward, ELECTRA's generator and a
data2vec teacher's forward included); the budget is the baseline's FLOPs per step times the
size's ``baseline_steps``, and every recipe trains ``round(budget / its FLOPs per step)`` steps,
its warm-up scaled by the same fraction of the run as in its preset. The same recipes' whole
training steps are also timed side by side in interleaved rounds (tokens/s; ELECTRA's throughput
relative to MLM at the same encoder size is the generator's cost). All runs use
``trainer.threads`` (1 by default) and no validation during pretraining.

A recipe whose preset is not in ``configs/`` (yet) is listed as skipped with the reason, not run.

Sizes: ``full`` (text: sized from measured step and fine-tuning times for about 30 minutes on a
quiet 2-core CPU; not yet timed end to end), ``--quick`` (a few minutes),
and ``$MMM_BENCH_MICRO`` (one seed, a few steps, the smallest downstream sizes: the test's smoke
size, meaningless as a measurement).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from benchmarks.downstream import random_init_factory
from benchmarks.recipe_budget import RecipeCost, measure_recipe, steps_for_budget, time_steps
from benchmarks.report import accuracy_axis, at_least, save_panels
from mmm.downstream.tasks import SIZES as DOWNSTREAM_SIZES, DownstreamSizes, downstream_tasks

MICRO_ENV = "MMM_BENCH_MICRO"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Recipe:
    """A pretraining recipe: a preset and overrides (dotted keys, as ``mmm pretrain --section.key``).

    Args:
        name: short name in tables.
        preset: file stem in ``configs/``.
        overrides: dotted-key overrides applied on top of the preset.
        what: one line for the report.
    """

    name: str
    preset: str
    overrides: Dict[str, Any] = field(default_factory=dict)
    what: str = ""


@dataclass(frozen=True)
class RecipeGroup:
    """The recipes compared for one modality, the baseline among them, and the downstream tasks."""

    modality: str
    baseline: str
    recipes: Tuple[Recipe, ...]
    tasks: Tuple[str, ...]
    retrieval: bool = False  # also score zero-shot image<->text retrieval and ITM on the held-out pairs (vision-language)


TEXT_PRE_LN = {"model.encoder.norm_first": True, "model.encoder.final_norm": True}
"""Every text recipe runs pre-LayerNorm blocks (the presets are post-LN, as BERT, for the HF export):
with post-LN, the detection objectives (RTS, ELECTRA) sit on their prior for most of this short
budget. Measured on ``text_rts_tiny`` (lr 1e-3, warm-up 100): the gradient reaching the token table
falls from 0.04 to 1e-5 by step 50 (about 10x less per block from the top), the loss stays at
the prior 0.419 through step 200; pre-LN leaves the prior by step 50 (0.285). One architecture
for all rows, so the table compares objectives."""

GROUPS: Dict[str, RecipeGroup] = {
    "text": RecipeGroup("text", "mlm-15", (
        Recipe("mlm-15", "text_mlm_tiny", {**TEXT_PRE_LN}, "BERT MLM, 15 % of tokens, 80/10/10"),
        Recipe("mlm-30", "text_mlm_tiny", {**TEXT_PRE_LN, "masking.args.ratio": 0.3},
               "BERT MLM, 30 % of tokens (Wettig et al. 2023)"),
        Recipe("electra", "text_electra_tiny", {**TEXT_PRE_LN}, "ELECTRA replaced-token detection, generator 1/4 width"),
        Recipe("electra-gdes", "text_electra_gdes_tiny", {**TEXT_PRE_LN},
               "ELECTRA with DeBERTaV3's gradient-disentangled embedding sharing"),
        Recipe("clm-mlm", "text_clm_mlm_tiny", {**TEXT_PRE_LN}, "causal LM, then MLM"),
        Recipe("rts", "text_rts_tiny", {**TEXT_PRE_LN}, "random token substitution detection"),
    ), ("stdlib-package",)),
    "dna": RecipeGroup("dna", "mlm", (
        Recipe("mlm", "dna_mlm_tiny", {}, "masked 6-mer modeling over whole base spans, 15 %"),
        Recipe("electra", "dna_electra_tiny", {}, "ELECTRA replaced-6-mer detection, generator 1/4 width"),
        Recipe("d2v", "dna_d2v_tiny", {}, "data2vec-style self-distillation, EMA teacher's top-2 blocks"),
    ), ("dna-motifs",)),
    "image": RecipeGroup("image", "mae", (
        Recipe("mae", "image_mae_tiny", {}, "MAE: drop-masked encoder, pixel decoder"),
        Recipe("simmim", "image_simmim_tiny", {}, "SimMIM's linear pixel head (L1) + BEiT-style visual tokens, "
               "mask tokens, BEiT block masking 40 % (the preset; not the paper's random 60 %, L1 alone)"),
        Recipe("d2v", "image_d2v_tiny", {}, "data2vec-style self-distillation"),
        Recipe("mp3", "image_mp3_tiny", {}, "MP3 position prediction"),
        Recipe("simmim-mto", "image_simmim_mto_tiny", {}, "the simmim recipe with masked-token optimisation (MTO) in "
               "the first 2 blocks"),
    ), ("digits", "shapes")),
    "audio": RecipeGroup("audio", "mam", (
        Recipe("mam", "audio_mam_tiny", {}, "masked acoustic modeling"),
        Recipe("d2v", "audio_d2v_tiny", {}, "data2vec-style self-distillation, EMA teacher's top-3 blocks"),
        Recipe("mto", "audio_mto_tiny", {}, "MAM with masked-token optimisation (MTO) in the first 2 blocks"),
        Recipe("mp3", "audio_mp3_tiny", {}, "MP3 position prediction, no position embedding"),
    ), ("audio-sounds",)),
    "vl": RecipeGroup("vl", "uniter", (
        Recipe("uniter", "vl_uniter_tiny", {}, "UNITER-style MLM + MRM + ITM"),
        Recipe("lxmert", "vl_lxmert_tiny", {}, "LXMERT-style objectives"),
        Recipe("mrm-visual-tokens", "vl_uniter_vtok_tiny", {}, "UNITER with visual-token MRM"),
        Recipe("itc", "vl_itc_soft_tiny", {"objectives.0.args.duplicate_captions": False,
                                           "objectives.0.args.label_smoothing": 0.0}, "CLIP contrastive, one-hot targets"),
        Recipe("itc-soft", "vl_itc_soft_tiny", {}, "LightCLIP-style soft ITC labels"),
    ), ("stdlib-package", "digits", "shapes"), retrieval=True),
}
"""The recipe groups of ``--modality``; presets not (yet) in ``configs/`` are skipped with a note.

DNA has no MTO recipe: MTO (:mod:`mmm.masking.mto`) acts on inputs that the embedder replaces by a
mask embedding (image patches, audio frames, regions); DNA, like text, hides tokens by swapping ids
before the embedder (BERT's 80/10/10: ``[MASK]``, a random 6-mer, or the token kept), so a hidden token
is an ordinary vocabulary entry and ``mto_layers`` has nothing to act on there."""

MODALITIES = tuple(GROUPS)


@dataclass
class RecipeSizes:
    """How much work the suite does.

    Args:
        name: full | quick | micro.
        baseline_steps: per modality, the steps of the baseline recipe; budget = that x its FLOPs/step.
        seeds: pretraining seeds per recipe.
        flop_batches: batches the FLOPs per step are averaged over.
        timing_rounds, timing_steps: interleaved timing of the recipes' training steps.
        downstream: sizes of the downstream evaluation (fine-tuning ``seeds`` is per pretraining seed).
        overrides: applied to every recipe (e.g. fewer data workers for the smoke size).
    """

    name: str
    baseline_steps: Dict[str, int]
    seeds: int
    flop_batches: int
    timing_rounds: int
    timing_steps: int
    downstream: DownstreamSizes
    overrides: Dict[str, Any] = field(default_factory=dict)


SIZES: Dict[str, RecipeSizes] = {
    "full": RecipeSizes("full", {"text": 250, "dna": 300, "image": 300, "audio": 250, "vl": 300}, seeds=3,
                        flop_batches=4, timing_rounds=3, timing_steps=5,
                        downstream=DownstreamSizes("recipes-full", 150, 60, 10, 1)),
    "quick": RecipeSizes("quick", {m: 20 for m in MODALITIES}, seeds=2, flop_batches=2, timing_rounds=2,
                         timing_steps=3, downstream=DownstreamSizes("recipes-quick", 40, 20, 1, 1)),
    "micro": RecipeSizes("micro", {m: 5 for m in MODALITIES}, seeds=1, flop_batches=1, timing_rounds=1,
                         timing_steps=1, downstream=DownstreamSizes("micro", 8, 6, 1, 1, batch_size=16),
                         overrides={"data.num_workers": 0, "data.batch_size": 8, "data.shuffle_buffer": 0}),
}

MICRO_MODEL: Dict[str, Dict[str, Any]] = {
    "text": {"model.encoder.dim": 64, "model.encoder.depth": 2, "model.encoder.mlp_hidden": 128,
             "model.text.vocab_size": 500, "model.text.tokenizer_train_docs": 50, "model.text.max_len": 64},
}
"""The smoke size's smaller model per modality (on top of ``SIZES["micro"].overrides``)."""


def select_sizes(quick: bool) -> RecipeSizes:
    """``micro`` when ``$MMM_BENCH_MICRO`` is set (tests), else ``quick`` or ``full``."""
    if os.environ.get(MICRO_ENV, "") not in ("", "0"):
        return SIZES["micro"]
    return SIZES["quick" if quick else "full"]


# ----------------------------------------------------------------------------- configs


def recipe_config(recipe: Recipe, extra: Optional[Dict[str, Any]] = None) -> Any:
    """The recipe's :class:`~mmm.config.PretrainConfig`: its preset, its overrides, then ``extra``."""
    from mmm.config import load_config

    return load_config(CONFIGS / f"{recipe.preset}.yaml", {**recipe.overrides, **(extra or {})})


def scaled_warmup(preset_cfg: Any, steps: int) -> int:
    """Warm-up steps of a ``steps``-step run at the same fraction of the run as in the preset."""
    return int(round(preset_cfg.optim.warmup_steps / max(1, preset_cfg.trainer.max_steps) * steps))


def run_overrides(preset_cfg: Any, steps: int, seed: int, root: Path, threads: int, sizes: RecipeSizes) -> Dict[str, Any]:
    """Overrides that turn a recipe into one budgeted run: ``steps`` steps, warm-up at the preset's
    fraction of its run (:func:`scaled_warmup`), ``seed`` for weights and data, no validation, one checkpoint at the end."""
    return {**sizes.overrides, "seed": seed, "data.seed": seed, "data.val": None, "trainer.max_steps": steps,
            "optim.warmup_steps": scaled_warmup(preset_cfg, steps), "trainer.threads": threads,
            "trainer.checkpoint_every_n_steps": steps, "trainer.log_every_n_steps": max(1, min(10, steps)),
            "trainer.enable_progress_bar": False, "trainer.default_root_dir": str(root)}


def phase_steps(cfg: Any, cost: RecipeCost) -> List[int]:
    """Steps of each phase in a run of ``cfg`` (its ``trainer.max_steps``), as the run schedules them;
    ``[max_steps]`` for a run without phases."""
    if len(cost.phases) == 1:
        return [cfg.trainer.max_steps]
    from mmm.train.phases import build_schedule  # only phased configs get here

    ends = list(build_schedule(cfg).ends)
    return [e - s for s, e in zip([0] + ends[:-1], ends)]


def spent_flops(steps_per_phase: List[int], flops_per_phase: List[float]) -> float:
    """FLOPs of a run: each phase's steps x its measured FLOPs per step."""
    if len(steps_per_phase) != len(flops_per_phase):
        raise ValueError(f"{len(steps_per_phase)} phase step counts for {len(flops_per_phase)} phases")
    return float(sum(n * f for n, f in zip(steps_per_phase, flops_per_phase)))


def plan_steps(budget: float, cost: RecipeCost, cfg_for: Callable[[int], Any]) -> Tuple[int, List[int]]:
    """Steps (and their split over phases) nearest to ``budget``: ``round(budget / FLOPs per step)``; for a
    phased run the nearest of a few step counts around it as its phases are scheduled.

    Args:
        budget: FLOPs every recipe spends.
        cost: the recipe's measured cost.
        cfg_for: the recipe's run config for a number of steps.
    """
    from mmm.config import ConfigError

    steps = steps_for_budget(budget, cost.flops_per_step)
    if len(cost.phases) == 1:
        return steps, [steps]
    best: Optional[Tuple[float, int, List[int]]] = None
    for n in range(max(1, steps - 2), steps + 3):
        try:
            split = phase_steps(cfg_for(n), cost)
        except ConfigError:  # a phase would get no step
            continue
        gap = abs(spent_flops(split, cost.phase_flops) - budget)
        if best is None or gap < best[0]:
            best = (gap, n, split)
    if best is None:
        raise ValueError(f"recipe {cost.name}: the budget of {budget:.3g} FLOPs ({steps} steps) is too small to give "
                         f"each of its {len(cost.phases)} phases a step; raise the baseline steps")
    return best[1], best[2]


def shared_assets(cfg: Any, folder: Path) -> Dict[str, Any]:
    """Fit the baseline's assets once into ``folder``; overrides that make every recipe with the same
    text tokenizer settings load that tokenizer (same vocabulary for all, no refitting per run)."""
    from mmm.train.tasks import prepare_run_assets

    mods = prepare_run_assets(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer,
                                                                                  default_root_dir=str(folder))))
    from mmm.modalities.text.modality import TOKENIZER_DIR

    if "text" not in mods.base or cfg.model.text.tokenizer_path is not None:
        return {}
    return {"model.text.tokenizer_path": str(folder / TOKENIZER_DIR)}


def assets_fingerprint(folder: Path) -> str:
    """A hash of every file under the shared assets ``folder`` (tokenizer, statistics, codebooks). Parts joined by
    :func:`merge` must have the same: a tokenizer fitted in another process numbers tokens differently (HF
    ``tokenizers`` training breaks count ties in hash-map order, so it is not reproducible across processes)."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def check_assets_unchanged(folder: Path, fingerprint: str) -> None:
    """Raise when the shared assets in ``folder`` no longer have the ``fingerprint`` a part started with: another part
    fitted them meanwhile, so this part's recipes did not all see one vocabulary (and an end-time fingerprint
    alone would match the other part's)."""
    if assets_fingerprint(folder) != fingerprint:
        raise RuntimeError(f"the shared assets in {folder} changed while this part ran (another part fitted them "
                           "meanwhile): its recipes did not all see one vocabulary; start parts that share --assets "
                           "once the first has logged 'shared assets'")


def budget_problems(section: Dict[str, Any]) -> List[str]:
    """What breaks equal compute in a suite section (empty when every recipe is within one step's worth
    of the budget): each recipe's FLOPs are recomputed from its planned steps per phase and its measured
    FLOPs per step of each phase, and its runs must have trained the planned steps.

    Args:
        section: :func:`run`'s result.
    """
    problems, budget = [], section["budget_flops"]
    for r in section["recipes"]:
        name, plan, cost = r["name"], section["plan"][r["name"]], section["cost"][r["name"]]
        phase_flops = [p["flops_per_step"] for p in cost["phases"]] if "phases" in cost else [cost["flops_per_step"]]
        if sum(plan["phase_steps"]) != plan["steps"]:
            problems.append(f"{name}: phase steps {plan['phase_steps']} do not add up to {plan['steps']} steps")
        spent = spent_flops(plan["phase_steps"], phase_flops)
        step = max(phase_flops)
        if abs(spent - budget) > step:
            problems.append(f"{name}: {plan['steps']} steps spend {spent:.4g} FLOPs, {abs(spent - budget) / step:.2f} "
                            f"steps' worth away from the budget {budget:.4g}")
        if budget < MIN_BUDGET_STEPS * step:  # whole steps cannot come near the budget (1 step can be 1.9x it)
            problems.append(f"{name}: the budget {budget:.4g} FLOPs covers {budget / step:.2f} of its steps "
                            f"({step:.4g} FLOPs each), fewer than {MIN_BUDGET_STEPS}: {plan['steps']} step(s) spend "
                            f"{spent / budget:.2f}x the budget; raise --baseline-steps")
        if section.get("only") is not None and name not in section["only"]:
            continue  # trained in another part (see merge)
        runs = section["runs"].get(name, [])
        if not runs and section.get("parts"):
            problems.append(f"{name}: trained in none of the merged parts (no runs, no scores)")
            continue
        trained = {run["steps"] for run in runs}
        if trained != {plan["steps"]}:
            problems.append(f"{name}: runs trained {sorted(trained)} steps, planned {plan['steps']}")
    return problems


MIN_BUDGET_STEPS = 2
"""A budget must cover at least this many steps of every recipe, or equal compute is out of reach in whole steps."""


def _same_text_tokenizer(a: Any, b: Any) -> bool:
    keys = ("tokenizer", "vocab_size", "lowercase", "tokenizer_path")
    return all(getattr(a.model.text, k, None) == getattr(b.model.text, k, None) for k in keys)


def available(group: RecipeGroup) -> Tuple[List[Recipe], List[Dict[str, str]]]:
    """The group's recipes whose preset exists, and the skipped ones with the reason."""
    present, skipped = [], []
    for r in group.recipes:
        if (CONFIGS / f"{r.preset}.yaml").is_file():
            present.append(r)
        else:
            skipped.append({"recipe": r.name, "preset": r.preset, "reason": f"configs/{r.preset}.yaml is not in this checkout"})
    if not any(r.name == group.baseline for r in present):
        raise ValueError(f"the {group.modality} baseline recipe {group.baseline!r} has no preset in {CONFIGS}")
    return present, skipped


# ----------------------------------------------------------------------------- downstream


def score_encoder(source: Any, label: str, modality: str, splits: Tuple[Any, Any, Any], sizes: DownstreamSizes,
                  seed: int, log: Callable[[str], None]) -> Dict[str, float]:
    """Linear probe, kNN and fine-tuning (seeded with ``seed``) of one encoder on one task's splits.

    Args:
        source: an mmm ``.ckpt`` path, or a factory of an encoder (random initialisation).
        label: the encoder's name in logs.
        modality: the task's modality.
        splits: train, dev, test.
        sizes: downstream sizes (epochs, lr, batch; fine-tuning seeds from ``seed`` on).
        seed: the pretraining seed (first fine-tuning seed).
        log: progress printer.
    """
    from mmm.downstream.data import Labels, encode_labels
    from mmm.downstream.finetune import FinetuneConfig, finetune
    from mmm.downstream.inputs import load_adapter, make_adapter
    from mmm.downstream.knn import knn_probe
    from mmm.probe import linear_probe

    train, dev, test = splits
    adapter = make_adapter(source(), modality, label) if callable(source) else load_adapter(str(source), modality)
    labels = Labels.fit(train, "classification")
    ytr, yte = (np.asarray(encode_labels(s, labels)) for s in (train, test))
    xtr = adapter.features(train.inputs, "mean", where=train.where)
    xte = adapter.features(test.inputs, "mean", where=test.where)
    probe, knn = linear_probe((xtr, ytr), (xte, yte)), knn_probe((xtr, ytr), (xte, yte))
    cfg = FinetuneConfig(lr=sizes.lr, batch_size=sizes.batch_size, epochs=sizes.epochs, seeds=sizes.seeds,
                         first_seed=seed, pooling="cls" if adapter.has_cls else "mean", patience=2)
    ft = finetune(source, modality, train, dev, test, cfg=cfg, log=lambda s: log(f"      {s}"))
    return {"finetune": float(ft.test["mean"]), "linear_probe": float(probe.accuracy), "knn": float(knn.accuracy),
            "chance": float(probe.chance)}


VL_METRICS = ("t2i@1", "i2t@1", "t2i@5", "i2t@5", "itm")
"""Zero-shot retrieval recalls (text→image, image→text) and ITM accuracy, the vision-language table's columns."""


def score_vl(model: Any, cfg: Any, modalities: Any, micro: bool) -> Dict[str, Optional[float]]:
    """Held-out zero-shot retrieval R@1/5 both ways and ITM accuracy of a vision-language model
    (:func:`mmm.evaluate_vl.evaluate_vl` on the ``itc`` task's validation shards, the demo's protocol:
    a hit is an item described by the same caption text), with the chance levels of the same relevance sets.

    Args:
        model: the run's model (trained, or at initialisation).
        cfg: its config (the ``itc`` task names the head; an ``itm`` task, if any, the ITM head).
        modalities: the run's :class:`~mmm.train.tasks.RunModalities`.
        micro: score two batches per mode only (the smoke size).
    """
    from mmm.evaluate_vl import evaluate_vl, itc_head_name, itc_task, itm_head_name
    from mmm.train.tasks import scoring_val_shards

    task = itc_task(cfg)
    if task is None:
        raise ValueError(f"recipes suite: a vision-language recipe needs an image_text task of mode itc for retrieval; "
                         f"tasks: {[t.name for t in cfg.tasks]}")
    itm_head = itm_head_name(cfg)
    urls = scoring_val_shards(task)
    score = evaluate_vl(model.cpu().eval(), modalities.feeds[task.name], urls, itc_head=itc_head_name(cfg, task),
                        itm_head=itm_head, max_batches=2 if micro else None)
    r = score.retrieval
    out: Dict[str, Optional[float]] = {f"{way}@{k}": float(getattr(r, way)[str(k)]) for way in ("t2i", "i2t") for k in (1, 5)}
    out.update({f"chance {way}@{k}": float(getattr(r, f"{way}_chance")[str(k)]) for way in ("t2i", "i2t") for k in (1, 5)})
    out["itm"] = float(score.itm_accuracy) if itm_head is not None else None
    out["chance itm"] = score.itm_chance if itm_head is not None else None  # the majority share of the scored pairs
    return out


def untrained_vl_scores(cfg: Any, modalities: Any, micro: bool) -> Dict[str, Optional[float]]:
    """:func:`score_vl` of ``cfg``'s network at initialisation: built with the run's seed from the trained run's
    modalities (their fitted assets), as the demo builds its untrained twin (:func:`mmm.demo.common.train_part`)."""
    import lightning as L

    from mmm.train.pretrain import build_model_for

    L.seed_everything(cfg.seed, verbose=False)
    return score_vl(build_model_for(cfg, modalities), cfg, modalities, micro)


def _mean_std(values: List[float]) -> Dict[str, Any]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a),
            "values": [float(v) for v in a]}


# ----------------------------------------------------------------------------- running


def run(modality: str, quick: bool, out: Path, log: Callable[[str], None] = print,
        threads: int = 1, only: Optional[List[str]] = None, sizes: Optional[RecipeSizes] = None,
        assets: Optional[Path] = None) -> Dict[str, Any]:
    """Measure, budget, pretrain and evaluate every available recipe of ``modality``; returns the suite section.

    Args:
        modality: a key of :data:`GROUPS`.
        quick: small sizes (the smoke size under ``$MMM_BENCH_MICRO``).
        out: output folder (pretraining runs go to ``out/runs/<recipe>/seed<s>``).
        log: progress printer.
        threads: torch threads of every measurement and run.
        only: pretrain and evaluate only these recipes (every recipe is still measured, so the budget is
            the same); parts run in separate processes are joined by :func:`merge`. None = all.
        sizes: explicit sizes instead of :func:`select_sizes` (``python -m benchmarks.recipes``'s overrides).
        assets: the folder of the assets every recipe shares (fitted there when it holds none, else reused);
            default ``out/assets``. Parts that are merged must share one (:func:`assets_fingerprint`).
    """
    import torch

    if modality not in GROUPS:
        raise ValueError(f"unknown --modality {modality!r} for the recipes suite; expected one of {list(GROUPS)}")
    sizes = sizes or select_sizes(quick)
    group = GROUPS[modality]
    recipes, skipped = available(group)
    if only is not None:
        unknown = sorted(set(only) - {r.name for r in recipes})
        if unknown:
            raise ValueError(f"--only: {unknown} are not available {modality} recipes; available: {[r.name for r in recipes]}")
    for s in skipped:
        log(f"  skipped {s['recipe']}: {s['reason']}")
    torch.set_num_threads(threads)
    micro = sizes.name.split("+")[0] == "micro"  # "micro+custom": the smoke size with a flag changed
    base = {**sizes.overrides, **(MICRO_MODEL.get(modality, {}) if micro else {}),
            "trainer.threads": threads}
    baseline = next(r for r in recipes if r.name == group.baseline)
    baseline_cfg = recipe_config(baseline, base)
    assets_dir = Path(assets) if assets is not None else out / "assets"
    assets = shared_assets(baseline_cfg, assets_dir)
    fingerprint = assets_fingerprint(assets_dir)
    log(f"== {modality}: shared assets in {assets_dir} (fingerprint {fingerprint[:12]})")
    extra: Dict[str, Dict[str, Any]] = {  # per recipe: the shared tokenizer where its text settings match
        r.name: {**base, **(assets if assets and _same_text_tokenizer(recipe_config(r, base), baseline_cfg) else {})}
        for r in recipes}

    log(f"== {modality}: FLOPs per training step ({sizes.flop_batches} batch(es) each)")
    costs: List[RecipeCost] = []
    for r in recipes:
        c = measure_recipe(r.name, recipe_config(r, extra[r.name]), sizes.flop_batches)
        log(f"  {r.name}: {c.flops_per_step / 1e9:.2f} GFLOP/step, {c.tokens_per_step:.0f} tokens/step")
        costs.append(c)
    if sizes.timing_rounds > 0:
        log(f"== {modality}: training-step throughput, {sizes.timing_rounds} interleaved round(s) of {sizes.timing_steps}")
        time_steps(costs, rounds=sizes.timing_rounds, steps=sizes.timing_steps, log=log)
    for c in costs:
        c.release()
    cost = {c.name: c.summary() for c in costs}
    baseline_fps = cost[group.baseline]["flops_per_step"]
    budget = baseline_fps * sizes.baseline_steps[modality]
    plan = {}
    presets = {r.name: recipe_config(r) for r in recipes}
    for r, c in zip(recipes, costs):
        def cfg_for(n: int, r: Recipe = r) -> Any:
            return recipe_config(r, {**extra[r.name], **run_overrides(presets[r.name], n, 0, out, threads, sizes)})

        steps, split = plan_steps(budget, c, cfg_for)
        spent = spent_flops(split, c.phase_flops)
        plan[r.name] = {"steps": steps, "phase_steps": split, "flops": spent,
                        "budget_error_steps": (spent - budget) / c.flops_per_step}
        log(f"  {r.name}: {steps} steps, {spent / 1e12:.3f} TFLOP of {budget / 1e12:.3f}")

    known = downstream_tasks()
    tasks = {t: known[t] for t in group.tasks}
    splits = {t: td.load(sizes.downstream) for t, td in tasks.items()}
    scores: Dict[str, Dict[str, Dict[str, List[float]]]] = {}  # recipe -> task -> metric -> per seed
    vl_scores: Dict[str, Dict[str, List[Optional[float]]]] = {}  # recipe -> metric -> per seed (group.retrieval)
    runs: Dict[str, List[Dict[str, Any]]] = {}
    baseline_ckpts: List[Tuple[int, Path]] = []
    for r in recipes:
        if only is not None and r.name not in only:
            continue
        for seed in range(sizes.seeds):
            root = out / "runs" / r.name / f"seed{seed}"
            cfg = recipe_config(r, {**extra[r.name],
                                    **run_overrides(presets[r.name], plan[r.name]["steps"], seed, root, threads, sizes)})
            log(f"== {modality}/{r.name} seed {seed}: pretraining {cfg.trainer.max_steps} steps")
            from mmm.train.pretrain import pretrain

            t0 = time.perf_counter()
            pr = pretrain(cfg)
            wall = time.perf_counter() - t0
            torch.set_num_threads(threads)
            ckpt = pr.last_checkpoint
            runs.setdefault(r.name, []).append({"seed": seed, "steps": int(pr.trainer.global_step), "wall_s": round(wall, 1),
                                                "checkpoint": str(ckpt)})
            if r.name == group.baseline:
                baseline_ckpts.append((seed, ckpt))
            if group.retrieval:
                scored = [(r.name, score_vl(pr.module.model, cfg, pr.modalities, micro))]
                if r.name == group.baseline:
                    scored.append((RANDOM_INIT, untrained_vl_scores(cfg, pr.modalities, micro)))
                for name, v in scored:
                    log(f"    retrieval ({name}): " + ", ".join(f"{k} {x:.3f}" for k, x in v.items()
                                                             if x is not None and "chance" not in k))
                    for k, x in v.items():
                        vl_scores.setdefault(name, {}).setdefault(k, []).append(x)
            for t, td in tasks.items():
                if td.modality not in _encoder_modalities(ckpt):
                    continue
                s = score_encoder(ckpt, f"{r.name} seed {seed}", td.modality, splits[t], sizes.downstream, seed, log)
                log(f"    {t}: fine-tune {s['finetune']:.3f}, linear probe {s['linear_probe']:.3f}, kNN {s['knn']:.3f}")
                for k, v in s.items():
                    scores.setdefault(r.name, {}).setdefault(t, {}).setdefault(k, []).append(v)
    for seed, ckpt in baseline_ckpts:
        for t, td in tasks.items():
            if td.modality not in _encoder_modalities(ckpt):
                continue
            log(f"== {modality}/{RANDOM_INIT} seed {seed}: {t}")
            s = score_encoder(random_init_factory(ckpt, td.modality), f"{RANDOM_INIT} seed {seed}", td.modality,
                              splits[t], sizes.downstream, seed, log)
            for k, v in s.items():
                scores.setdefault(RANDOM_INIT, {}).setdefault(t, {}).setdefault(k, []).append(v)

    check_assets_unchanged(assets_dir, fingerprint)
    section = {"modality": modality, "baseline": group.baseline, "sizes": dataclasses.asdict(sizes), "threads": threads,
               "budget_flops": budget, "baseline_steps": sizes.baseline_steps[modality], "only": only,
               "assets_fingerprint": fingerprint,
               "recipes": [{"name": r.name, "preset": r.preset, "overrides": r.overrides, "what": r.what} for r in recipes],
               "skipped": skipped, "cost": cost, "plan": plan, "runs": runs, "scores": scores, "vl_scores": vl_scores,
               "tasks": {t: td.data for t, td in tasks.items()},
               "splits": {t: [len(x) for x in sp] for t, sp in splits.items()}}
    return _finish(section, log)


RANDOM_INIT = "random init"


def _finish(section: Dict[str, Any], log: Callable[[str], None]) -> Dict[str, Any]:
    """Add the result rows (mean ± std per recipe and task) and the budget check to a section."""
    rows, scores = [], section["scores"]
    for name in [r["name"] for r in section["recipes"]] + [RANDOM_INIT]:
        for t, data in section["tasks"].items():
            if t not in scores.get(name, {}):
                continue
            sc = scores[name][t]
            row: Dict[str, Any] = {"recipe": name, "task": t, "data": data, "chance": sc["chance"][0],
                                   **{k: _mean_std(sc[k]) for k in ("finetune", "linear_probe", "knn")}}
            if name != RANDOM_INIT:
                plan, cost = section["plan"][name], section["cost"][name]
                row.update({"steps": plan["steps"], "flops": plan["flops"], "budget_error_steps": plan["budget_error_steps"],
                            "wall_s": _mean_std([x["wall_s"] for x in section["runs"][name]]),
                            **{k: cost.get(k) for k in ("flops_per_step", "tokens_per_s", "step_seconds_median")}})
            rows.append(row)
    section["results"] = rows
    section["vl_results"] = [
        {"recipe": name, **{k: (_mean_std(v) if all(x is not None for x in v) else None) for k, v in sc.items()}}
        for name in [r["name"] for r in section["recipes"]] + [RANDOM_INIT]
        for sc in [section.get("vl_scores", {}).get(name)] if sc]
    section["budget_problems"] = budget_problems(section)
    for p in section["budget_problems"]:
        log(f"  unequal budget: {p}")
    return section


TIMING_ONLY_SIZES = ("name", "timing_rounds", "timing_steps")
"""Size fields that do not change a recipe's training or scores (a part may skip the throughput timing)."""


def sizes_that_differ(a: Dict[str, Any], b: Dict[str, Any], modality: str) -> List[str]:
    """The size fields (``dataclasses.asdict`` of :class:`RecipeSizes`) that make two parts' results
    incomparable, as ``field: a vs b``: everything but the name and the timing, and of the baseline
    steps only this modality's.
    """
    def relevant(sizes: Dict[str, Any]) -> Dict[str, Any]:
        out = {k: v for k, v in sizes.items() if k not in TIMING_ONLY_SIZES}
        out["baseline_steps"] = sizes["baseline_steps"].get(modality)
        return out

    ra, rb = relevant(a), relevant(b)
    return [f"{k}: {ra.get(k)!r} vs {rb.get(k)!r}" for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]


def merge(sections: List[Dict[str, Any]], log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Join sections of one modality whose recipes ran in separate processes (``only``).

    The budget, plan and costs are the first section's; every section must have measured the same budget
    (within 0.5 %, FLOP counts of the same batches), the same plan of steps and the same sizes apart from
    the timing (:func:`sizes_that_differ`: a ``--no-timing`` part joins a timed one), and a recipe may be
    trained in one section only. Throughput is the first section's side-by-side timing.

    Args:
        sections: :func:`run` results.
        log: progress printer.
    """
    if not sections:
        raise ValueError("merge needs at least one section")
    first = sections[0]
    out = {**first, "only": None, "runs": {}, "scores": {}, "vl_scores": {}, "parts": []}
    for sec in sections:
        if sec["modality"] != first["modality"]:
            raise ValueError(f"cannot merge a {sec['modality']} section into a {first['modality']} one")
        differ = sizes_that_differ(sec["sizes"], first["sizes"], first["modality"])
        if differ:
            raise ValueError(f"cannot merge {sec['sizes']['name']} into {first['sizes']['name']}: they differ in "
                             + "; ".join(differ))
        if sec.get("assets_fingerprint") != first.get("assets_fingerprint"):
            raise ValueError(f"the parts used different shared assets (fingerprints {str(first.get('assets_fingerprint'))[:12]} "
                             f"and {str(sec.get('assets_fingerprint'))[:12]}): a tokenizer fitted in another process "
                             "numbers tokens differently; run the parts with one --assets DIR (the first part fits it, "
                             "start the others once it has logged 'shared assets')")
        if abs(sec["budget_flops"] - first["budget_flops"]) > 0.005 * first["budget_flops"]:
            raise ValueError(f"budgets differ: {sec['budget_flops']:.4g} vs {first['budget_flops']:.4g} FLOPs")
        for name, runs in sec["runs"].items():
            if name in out["runs"]:
                raise ValueError(f"recipe {name} was trained in two sections")
            if sec["plan"][name]["steps"] != first["plan"][name]["steps"]:
                raise ValueError(f"recipe {name}: {sec['plan'][name]['steps']} steps in one section, "
                                 f"{first['plan'][name]['steps']} in the first")
            out["runs"][name] = runs
        for name, by_task in sec["scores"].items():
            if name in out["scores"]:
                raise ValueError(f"recipe {name} was scored in two sections")
            out["scores"][name] = by_task
        for name, by_metric in sec.get("vl_scores", {}).items():
            if name in out["vl_scores"]:
                raise ValueError(f"recipe {name} was scored (retrieval) in two sections")
            out["vl_scores"][name] = by_metric
        out["parts"].append({"only": sec.get("only"), "sizes": sec["sizes"]["name"], "budget_flops": sec["budget_flops"],
                             "cost": {k: {m: v.get(m) for m in ("flops_per_step", "tokens_per_s")} for k, v in sec["cost"].items()}})
    return _finish(out, log)


def _encoder_modalities(ckpt: Path) -> List[str]:
    from benchmarks.downstream import encoder_modalities

    return encoder_modalities(ckpt)


# ----------------------------------------------------------------------------- report


def _fmt(ms: Dict[str, Any]) -> str:
    return f"{ms['mean']:.3f} ± {ms['std']:.3f}"


def markdown(section: Dict[str, Any]) -> str:
    """Cost and downstream tables of one modality's section."""
    s, m = section["sizes"], section["modality"]
    ds = s["downstream"]
    base = section["baseline"]
    base_tps = section["cost"][base].get("tokens_per_s")
    lines = [f"Equal compute: every recipe trains {section['budget_flops'] / 1e12:.3f} TFLOP (the {base} baseline's "
             f"FLOPs per step × {section['baseline_steps']} steps; counted forward + backward over real batches, "
             f"generator / teacher included), {s['seeds']} pretraining seed(s), {section['threads']} thread(s) per run.",
             "", "| recipe | preset | GFLOP / step | steps | budget used | tokens / step | train tokens/s | "
             f"vs {base} | wall s / run |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in section["recipes"]:
        c, p = section["cost"][r["name"]], section["plan"][r["name"]]
        walls = [x["wall_s"] for x in section["runs"].get(r["name"], [])] or [float("nan")]
        tps = c.get("tokens_per_s")
        ratio = f"{tps / base_tps:.2f}×" if tps and base_tps else "n/a"
        preset = f"`{r['preset']}`" + "".join(f" {k}={v}" for k, v in r["overrides"].items())
        lines.append(f"| {r['name']} | {preset} | {c['flops_per_step'] / 1e9:.2f} | {p['steps']} | "
                     f"{p['flops'] / section['budget_flops']:.3f} | {c['tokens_per_step']:.0f} | "
                     f"{f'{tps:,.0f}' if tps else 'n/a'} | {ratio} | {np.mean(walls):.0f} |")
    lines += ["", f"Downstream ({m}): fine-tuning {ds['epochs']} epoch(s) at lr {ds['lr']} (test accuracy of the best dev "
              f"state), linear probe and kNN on frozen mean-pooled features; at most {ds['train_per_class']} training "
              f"and {ds['eval_per_class']} test samples per class; mean ± std over pretraining seeds.", "",
              "| task | recipe | fine-tune | linear probe | kNN | chance |", "|---|---|---:|---:|---:|---:|"]
    for r in section["results"]:
        lines.append(f"| {r['task']} ({r['data']}) | {r['recipe']} | {_fmt(r['finetune'])} | {_fmt(r['linear_probe'])} | "
                     f"{_fmt(r['knn'])} | {r['chance']:.3f} |")
    if section.get("vl_results"):
        first = section["vl_results"][0]
        lines += ["", "Zero-shot retrieval on the held-out image-caption pairs (images and captions encoded alone, "
                  "contrastive projections, cosine ranking; a hit is an item with the same caption text) and ITM "
                  "accuracy (in-batch negatives; its chance is the majority label's share of the scored pairs); mean ± std over pretraining seeds.", "",
                  "| recipe | " + " | ".join(f"{k} R" if k != "itm" else "ITM acc." for k in VL_METRICS) + " |",
                  "|---|" + "---:|" * len(VL_METRICS)]
        for r in section["vl_results"]:
            lines.append(f"| {r['recipe']} | " + " | ".join(_fmt(r[k]) if r.get(k) else "—" for k in VL_METRICS) + " |")
        lines.append("| chance | " + " | ".join(f"{first[f'chance {k}']['mean']:.3f}" if first.get(f"chance {k}")
                                                else "—" for k in VL_METRICS) + " |")
    if section.get("budget_problems"):
        lines += ["", "**Unequal budgets:** " + "; ".join(section["budget_problems"]) + "."]
    if section["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{x['recipe']} ({x['reason']})" for x in section["skipped"]) + "."]
    return "\n".join(lines)


def plot(section: Dict[str, Any], path: Path) -> None:
    """PNG: per task, fine-tune / linear probe / kNN of every recipe, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in section["results"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(5.0, 1.1 * len(section["recipes"]) + 2.5) * len(tasks), 3.8),
                             squeeze=False)
    metrics = (("finetune", "fine-tune"), ("linear_probe", "linear probe"), ("knn", "kNN"))
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in section["results"] if r["task"] == task]
        xs = np.arange(len(rows))
        for i, (key, label) in enumerate(metrics):
            ax.bar(xs + (i - 1) * 0.27, [r[key]["mean"] for r in rows], 0.27, yerr=[r[key]["std"] for r in rows],
                   capsize=3, label=label)
        accuracy_axis(ax, rows[0]["chance"],
                      f"{section['modality']}: {task}, equal FLOPs ({section['budget_flops'] / 1e12:.2f} TFLOP)")
        ax.set_xticks(xs, [r["recipe"] for r in rows], fontsize=8, rotation=20)
    save_panels(fig, axes, path)


# ----------------------------------------------------------------------------- parts and merging


def write_report(section: Dict[str, Any], out: Path, quick: bool) -> Dict[str, Any]:
    """Write ``results.json``, ``results.md`` and the plot for a section, as ``mmm bench`` does."""
    import json

    from benchmarks.report import machine_info, report_header

    out.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {"suite": "recipes", "quick": quick, "sizes": section["sizes"]["name"],
                              "machine": machine_info(), "sections": {"recipes": section}, "plots": []}
    plot_name = f"recipes_{section['modality']}.png"
    plot(section, out / plot_name)
    report["plots"] = [plot_name]
    report["markdown"] = "\n".join(
        report_header(report) + [f"## Recipes at equal compute: {section['modality']}", "", markdown(section), "",
                                 "## Plots", "", f"![{plot_name}]({plot_name})", ""])
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(report["markdown"] + "\n", encoding="utf-8")
    return report


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``python -m benchmarks.recipes --modality M [--quick] [--only a,b] --out DIR`` runs a part (or all) of
    the suite; ``python -m benchmarks.recipes --merge DIR [DIR ...] --out DIR`` joins parts' ``results.json``.
    Parts let the recipes of one modality run in parallel processes at the same budget."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="Pretraining recipes of one modality compared at equal compute (FLOPs), "
                                "several seeds, downstream; or --merge of parts that ran separately.")
    p.add_argument("--modality", choices=MODALITIES)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated recipe names to pretrain and evaluate")
    p.add_argument("--threads", type=at_least(1), default=1)
    p.add_argument("--merge", nargs="+", default=None, help="folders of parts' results.json to join (the first one's "
                   "throughput timing is reported)")
    p.add_argument("--baseline-steps", type=at_least(1), default=None, help="budget = the baseline's FLOPs/step x this")
    p.add_argument("--seeds", type=at_least(1), default=None, help="pretraining seeds per recipe")
    p.add_argument("--downstream", choices=["recipes-full", "recipes-quick", "quick", "full"], default=None,
                   help="downstream sizes (recipes-*: this suite's; quick/full: mmm.downstream.tasks.SIZES, one fine-tuning seed)")
    p.add_argument("--no-timing", action="store_true", help="skip the side-by-side throughput timing (a part "
                   "whose timing another part measures)")
    p.add_argument("--assets", default=None, help="folder of the assets every recipe shares (tokenizer, statistics, "
                   "codebooks; default OUT/assets): fitted there if it holds none, else reused; parts to be merged "
                   "must share one")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.merge:
        ignored = [flag for flag, given in (("--modality", a.modality is not None), ("--quick", a.quick),
                                            ("--only", a.only is not None), ("--seeds", a.seeds is not None),
                                            ("--baseline-steps", a.baseline_steps is not None),
                                            ("--downstream", a.downstream is not None), ("--no-timing", a.no_timing),
                                            ("--assets", a.assets is not None))
                   if given]
        if ignored:
            p.error(f"--merge joins parts that already ran; {', '.join(ignored)} set how a part runs and would be "
                    "ignored: pass them to the parts, not to --merge")
        parts, sections = [], []
        for d in a.merge:
            path = Path(d) / "results.json"
            try:
                parts.append(json.loads(path.read_text(encoding="utf-8")))
                sections.append(parts[-1]["sections"]["recipes"])
            except OSError as e:
                p.error(f"--merge: {path}: cannot read it ({e.strerror or e}); pass the folders the parts wrote")
            except ValueError as e:
                p.error(f"--merge: {path}: not JSON ({e})")
            except (KeyError, TypeError):
                p.error(f"--merge: {path} holds no recipes section (a results.json of python -m benchmarks.recipes "
                        "is expected)")
        try:
            section = merge(sections)
        except ValueError as e:
            p.error(f"--merge {' '.join(a.merge)}: {e}")
        report = write_report(section, out, parts[0]["quick"])
    else:
        if a.modality is None:
            p.error("--modality is required unless --merge is given")
        only = [x.strip() for x in a.only.split(",") if x.strip()] if a.only else None
        sizes = select_sizes(a.quick)
        if any(x is not None for x in (a.baseline_steps, a.seeds, a.downstream)) or a.no_timing:
            ds = {x.name: x for x in (SIZES["full"].downstream, SIZES["quick"].downstream)}
            if a.downstream in ("quick", "full"):
                ds[a.downstream] = dataclasses.replace(DOWNSTREAM_SIZES[a.downstream], seeds=1)
            sizes = dataclasses.replace(
                sizes, name=f"{sizes.name}+custom",
                baseline_steps={**sizes.baseline_steps, **({a.modality: a.baseline_steps} if a.baseline_steps is not None else {})},
                seeds=a.seeds if a.seeds is not None else sizes.seeds, downstream=ds[a.downstream] if a.downstream else sizes.downstream,
                timing_rounds=0 if a.no_timing else sizes.timing_rounds)
        report = write_report(run(a.modality, a.quick, out, threads=a.threads, only=only, sizes=sizes,
                                  assets=Path(a.assets) if a.assets else None), out, a.quick)
    print(report["markdown"])
    return report


if __name__ == "__main__":
    main()
