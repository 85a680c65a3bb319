"""The benchmark suite behind ``mmm bench``: throughput and held-out evaluation, as JSON, markdown and plots.

``--suite throughput`` runs

1. :mod:`benchmarks.text_mlm_step` — one fp32 MLM training step, mmm (packed) vs HF
   ``BertForMaskedLM`` on CPU: the ``small`` preset, plus ``base`` unless ``--quick``;
2. :mod:`benchmarks.attention_backends` — xformers / sdpa / padded sdpa / math forward + backward
   over L = 128 … 4096 (``--quick`` on CPU: 128 … 1024);
3. :mod:`benchmarks.loader` — the shard pipeline's sequences/s with 0, 1, 2 DataLoader workers for
   text and images, vs the same samples read one file per sample, vs the tiny configs' training
   step rate (ratios, one run);
4. :mod:`benchmarks.e2e_pretrain` — whole training loops, ``mmm pretrain`` vs HF ``Trainer`` with
   ``run_mlm``'s recipe on the embedded corpus (data loading included, start-up removed; in a fresh
   process, :func:`e2e_in_fresh_process`): real
   tokens/s, model FLOPs per token, achieved GFLOP/s and the machine's GEMM rate at the model's
   shapes; the tiny size, plus BERT-base unless ``--quick``;
5. on CUDA only, :func:`benchmarks.mfu.measure_mlm_step` — the BERT-base MLM step with the
   forward in bf16 autocast and xformers attention, vs HF, at L = 128 and 512 (lengths uniform in
   [L/4, L], ~16k real tokens per batch), with model FLOPs utilisation. ``--compile`` wraps the
   mmm model in ``torch.compile`` there (the first, untimed warm-up steps absorb compilation).
   Without CUDA this section says ``skipped: no CUDA device``.

``--suite eval CKPT`` scores an mmm checkpoint on held-out data against the same architecture
at random initialisation (``build_model`` with the checkpoint's config after seeding with its
``seed``), with identical masks (a fixed masking seed). Evaluations are looked up per modality in
:data:`EVALUATIONS` (the modality of each objective in :data:`OBJECTIVE_MODALITY`); text MLM is the
one there is. Held-out data: the checkpoint config's ``data.val`` shards; when it is null (a run
trained without validation), the embedded corpus's val split, and the output says so.

Output folder (``--out``, default ``runs/bench/<suite>``): ``results.json`` (results plus the
machine: CPU model, threads, GPU, library versions, date), ``results.md`` (markdown tables) and
PNG plots. ``--quick`` keeps a CPU run to a few minutes (fewer steps and repeats, small preset
only, eval on 5 batches). ``--suite recipes --modality M`` (:mod:`benchmarks.recipes`) pretrains
the modality's recipes at an equal training-FLOP budget and scores each downstream. Setting ``MMM_BENCH_MICRO=1`` shrinks everything to toy sizes (seconds;
used by the tests, meaningless as a measurement).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from benchmarks.report import machine_info, report_header

SUITES = ("throughput", "eval", "downstream", "recipes")
MICRO_ENV = "MMM_BENCH_MICRO"
NO_CUDA = "skipped: no CUDA device"


@dataclass
class Sizes:
    """How much work each part of the suite does."""

    name: str
    mlm_configs: List[str]
    mlm_args: List[str]
    attn_lengths_cpu: List[int]
    attn_lengths_cuda: List[int]
    attn_repeats: int
    attn_warmup: int
    attn_total_tokens: Optional[int] = None  # None: 16384 on CUDA, 4096 on CPU
    attn_heads: int = 12
    gpu_lengths: List[int] = field(default_factory=lambda: [128, 512])
    gpu_tokens: int = 16384
    gpu_steps: int = 20
    gpu_warmup: int = 5
    gpu_overrides: Dict[str, Any] = field(default_factory=dict)
    eval_batches: Optional[int] = None
    mae_args: List[str] = field(default_factory=lambda: ["--steps", "8"])
    loader_args: List[str] = field(default_factory=list)
    e2e_sizes: List[str] = field(default_factory=lambda: ["tiny", "base"])


FULL_LENGTHS = [128, 256, 512, 1024, 2048, 4096]
SIZES: Dict[str, Sizes] = {
    "full": Sizes("full", ["small", "base"], ["--steps", "10", "--warmup", "2"], FULL_LENGTHS, FULL_LENGTHS,
                  attn_repeats=10, attn_warmup=2),
    "quick": Sizes("quick", ["small"], ["--steps", "5", "--warmup", "1"], [128, 256, 512, 1024], FULL_LENGTHS,
                   attn_repeats=3, attn_warmup=1, gpu_steps=10, gpu_warmup=3, eval_batches=5, mae_args=["--quick"],
                   loader_args=["--quick"], e2e_sizes=["tiny"]),
    "micro": Sizes("micro", ["small"], ["--steps", "2", "--warmup", "1", "--no-memory", "--depth", "1", "--dim", "32",
                                        "--heads", "2", "--mlp-hidden", "64", "--vocab", "300", "--max-len", "32",
                                        "--batch", "4"],
                   [32, 64], [32, 64], attn_repeats=2, attn_warmup=1, attn_total_tokens=256, attn_heads=2,
                   gpu_lengths=[32], gpu_tokens=256, gpu_steps=2, gpu_warmup=1,
                   gpu_overrides={"depth": 1, "dim": 32, "heads": 2, "mlp_hidden": 64, "vocab": 300}, eval_batches=2,
                   mae_args=["--config", "small", "--image-size", "16", "--patch-size", "4", "--dim", "32", "--depth", "1",
                             "--heads", "2", "--mlp-hidden", "64", "--decoder-dim", "16", "--decoder-depth", "1",
                             "--decoder-heads", "2", "--batch", "4", "--steps", "2"],
                   loader_args=["--micro", "--modalities", "text", "--workers", "0,1"], e2e_sizes=["micro"]),
}


def select_sizes(quick: bool) -> Sizes:
    """``micro`` when ``$MMM_BENCH_MICRO`` is set (tests), else ``quick`` or ``full``.

    Args:
        quick: the ``--quick`` flag.
    """
    if os.environ.get(MICRO_ENV, "") not in ("", "0"):
        return SIZES["micro"]
    return SIZES["quick" if quick else "full"]


# ----------------------------------------------------------------------------- machine


# ----------------------------------------------------------------------------- throughput


def run_throughput(sizes: Sizes, compile: bool = False, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The three throughput sections (the GPU one skipped without CUDA).

    Args:
        sizes: how much work to do.
        compile: ``torch.compile`` the mmm model in the GPU MLM step.
        log: progress printer.
    """
    from benchmarks import attention_backends, text_mlm_step

    sections: Dict[str, Any] = {}
    log("== MLM training step, mmm vs HF (CPU, fp32)")
    step_results = []
    for name in sizes.mlm_configs:
        step_results.extend(text_mlm_step.main(["--config", name, *sizes.mlm_args])["results"])
    sections["text_mlm_step"] = {"device": "cpu", "results": step_results}
    from benchmarks import image_mae_step

    log("== MAE training step: drop-masked vs mask-token encoder vs HF ViTMAEForPreTraining (CPU, fp32)")
    sections["image_mae_step"] = {"device": "cpu", "results": image_mae_step.main(sizes.mae_args)["results"]}

    from benchmarks import loader

    log("== loader throughput vs training step rate (CPU)")
    sections["loader"] = {"device": "cpu", **{k: v for k, v in loader.main(sizes.loader_args).items()
                                               if k in ("env", "results")}}

    log("== whole pretraining runs: mmm pretrain vs HF Trainer (CPU, fp32; a fresh process)")
    e2e = e2e_in_fresh_process(sizes.e2e_sizes, log)
    sections["e2e_pretrain"] = {"device": "cpu", "env": e2e["env"], "results": e2e["results"]}

    cuda = torch.cuda.is_available()
    log("== attention backends")
    sections["attention_backends"] = attention_backends.run_sweep(
        sizes.attn_lengths_cuda if cuda else sizes.attn_lengths_cpu, sizes.attn_total_tokens,
        heads=sizes.attn_heads, repeats=sizes.attn_repeats, warmup=sizes.attn_warmup, log=log)

    if not cuda:
        sections["gpu_mlm"] = {"skipped": NO_CUDA, "compile": compile}
        return sections
    from benchmarks.attention_backends import xformers_unavailable
    from benchmarks.mfu import measure_mlm_step

    device = torch.device("cuda")
    reason = xformers_unavailable(device)
    attention = "sdpa" if reason else "xformers"
    log(f"== BERT-base MLM step on {torch.cuda.get_device_name()} (bf16 autocast, {attention})")
    runs = []
    for L in sizes.gpu_lengths:
        try:
            runs.append(measure_mlm_step(L, sizes.gpu_tokens, device=device, attention=attention,
                                         steps=sizes.gpu_steps, warmup=sizes.gpu_warmup, compile=compile,
                                         overrides=sizes.gpu_overrides, log=log))
        except Exception as e:  # an OOM or a compile failure at one length must not lose the rest
            runs.append({"max_len": L, "error": f"{type(e).__name__}: {e}"})
            torch.cuda.empty_cache()
    sections["gpu_mlm"] = {"device": torch.cuda.get_device_name(), "attention": attention,
                           "xformers_unavailable": reason, "compile": compile, "results": runs}
    return sections


# ----------------------------------------------------------------------------- eval


@dataclass
class EvalSettings:
    """Options shared by every modality's evaluation."""

    max_batches: Optional[int]
    device: torch.device


def evaluate_text(contents: Any, settings: EvalSettings) -> Dict[str, Any]:
    """Held-out MLM accuracy/perplexity of the checkpoint vs the same architecture at random init.

    Args:
        contents: a :class:`mmm.encoders.CheckpointContents`.
        settings: batch limit and device.
    """
    import mmm.masking  # noqa: F401  (registers maskers)
    from mmm.encoders import load_weights
    from mmm.evaluate import evaluate_mlm
    from mmm.train.pretrain import build_model_for, modality_from_checkpoint, resolve_shards

    cfg, tok = contents.config, contents.tokenizer
    if tok is None:
        raise ValueError(f"{contents.path}: the checkpoint stores no tokenizer; the text evaluation needs one")
    from mmm.train.tasks import resolve_val_shards, task_configs

    note = None
    spec = cfg.data.val
    urls = resolve_val_shards(task_configs(cfg)[0]) if spec else None
    if not urls:
        spec = "embedded"
        note = ("the checkpoint's config has no validation shards (data.val: null, or no val split beside data.train); "
                "scored on the embedded corpus's val split instead (held out from the embedded training split, but "
                "not necessarily from this run's training data)")
        urls = resolve_shards(spec, cfg.data.dataset, "val")
    modality = modality_from_checkpoint(contents)
    trained = build_model_for(cfg, modality)
    load_weights(trained, contents.state_dict, contents.path)
    torch.manual_seed(cfg.seed)
    random_init = build_model_for(cfg, modality)
    masker = modality.build_masker(cfg.masking)
    scores = {}
    for name, model in (("trained", trained), ("random_init", random_init)):
        s = evaluate_mlm(model.to(settings.device), tok, masker, urls, max_len=cfg.model.text.max_len,
                         batch_size=cfg.data.batch_size, max_batches=settings.max_batches)
        scores[name] = vars(s)
    return {"modality": "text", "objective": "mlm", "val": spec, "val_shards": len(urls), "note": note,
            "max_batches": settings.max_batches, "device": str(settings.device), **scores}


EVALUATIONS: Dict[str, Callable[[Any, EvalSettings], Dict[str, Any]]] = {"text": evaluate_text}
"""Held-out evaluation per modality; image, audio and DNA add theirs with their objectives."""

OBJECTIVE_MODALITY: Dict[str, str] = {"mlm": "text"}
"""The modality an objective head's evaluation belongs to."""


def run_eval(checkpoint: Union[str, Path], sizes: Sizes, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Every registered evaluation that applies to the checkpoint's objectives.

    Args:
        checkpoint: an mmm ``.ckpt``.
        sizes: batch limit (``eval_batches``).
        log: progress printer.
    """
    from mmm.encoders import read_checkpoint

    contents = read_checkpoint(checkpoint)
    modalities: List[str] = []
    for o in contents.config.objectives:
        modality = OBJECTIVE_MODALITY.get(o.name)
        if modality is None or modality not in EVALUATIONS:
            raise ValueError(f"no held-out evaluation is registered for objective {o.name!r} "
                             f"(evaluations exist for objectives {sorted(OBJECTIVE_MODALITY)})")
        if modality not in modalities:
            modalities.append(modality)
    settings = EvalSettings(sizes.eval_batches, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    out: Dict[str, Any] = {"checkpoint": str(contents.path)}
    for modality in modalities:
        log(f"== {modality} held-out evaluation of {contents.path}")
        out[modality] = EVALUATIONS[modality](contents, settings)
    return out


# ----------------------------------------------------------------------------- markdown


def _gpu_markdown(gpu: Dict[str, Any]) -> str:
    if "skipped" in gpu:
        return f"{gpu['skipped']}."

    def pct(x: Optional[float]) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [f"BERT-base MLM step (fwd in bf16 autocast + bwd + AdamW) on {gpu['device']}, mmm attention "
             f"{gpu['attention']}{', torch.compile' if gpu['compile'] else ''}; HF BertForMaskedLM SDPA padded.",
             "", "| L | sequences | real tokens | model | median step (ms) | real tokens/s | MFU | speedup mmm/HF |",
             "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in gpu["results"]:
        if "error" in r:
            lines.append(f"| {r['max_len']} | | | error: {r['error'][:120]} | | | | |")
            continue
        for i, name in enumerate(n for n in ("mmm", "hf") if n in r):
            e = r[name]
            head = f"| {r['config']['max_len']} | {r['sequences']} | {r['real_tokens']} " if i == 0 else "| | | "
            speed = f"{r['speedup_real_tokens_per_s']:.2f}×" if i == 0 and "speedup_real_tokens_per_s" in r else ""
            lines.append(head + f"| {name} | {e['median_step_s'] * 1e3:.1f} | {e['real_tokens_per_s']:,.0f} | "
                         f"{pct(e['mfu'])} | {speed} |")
    first = next((r for r in gpu["results"] if "flops_per_token" in r), None)
    if first:
        peak = first["peak_flops"]
        lines += ["", f"MFU = real tokens/s × (6·N + 12·L·d·s_eff) / peak, N = {first['non_embedding_params']:,} "
                  f"encoder parameters, s_eff = Σn²/Σn, peak = {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}"
                  " dense bf16."]
    return "\n".join(lines)


def _eval_markdown(ev: Dict[str, Any]) -> str:
    lines = [f"Checkpoint: `{ev['checkpoint']}`"]
    for modality, r in ev.items():
        if modality == "checkpoint":
            continue
        tr, rn = r["trained"], r["random_init"]
        lines += ["", f"{modality} ({r['objective']}), held-out data `{r['val']}` ({r['val_shards']} shard(s)), "
                  f"{'all' if r['max_batches'] is None else r['max_batches']} batch(es), identical masks:", "",
                  "| model | masked-token accuracy | perplexity | loss | masked tokens | sequences |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, s in (("trained", tr), ("random init (same config and seed)", rn)):
            lines.append(f"| {label} | {s['accuracy']:.4f} | {s['perplexity']:.1f} | {s['loss']:.3f} | "
                         f"{s['predictions']} | {s['sequences']} |")
        if r["note"]:
            lines += ["", f"Note: {r['note']}."]
    return "\n".join(lines)


def markdown(report: Dict[str, Any]) -> str:
    """The whole report as markdown."""
    from benchmarks import attention_backends, text_mlm_step

    m = report["machine"]
    lines = report_header(report)
    s = report["sections"]
    if "text_mlm_step" in s:
        env = {"device": "cpu", "threads": m["torch_threads"], "torch": m["torch"], "transformers": m["transformers"]}
        lines += ["## MLM training step: mmm vs HF", "", text_mlm_step.markdown(s["text_mlm_step"]["results"], env), ""]
    if "image_mae_step" in s:
        from benchmarks import image_mae_step

        lines += ["## MAE training step", "", image_mae_step.markdown(s["image_mae_step"]["results"], env), ""]
    if "loader" in s:
        from benchmarks import loader

        lines += ["## Loader throughput vs training step rate", "",
                  loader.markdown(s["loader"]["results"], s["loader"]["env"]), ""]
    if "e2e_pretrain" in s:
        from benchmarks import e2e_pretrain

        lines += ["## Whole pretraining runs: mmm vs HF Trainer", "",
                  e2e_pretrain.markdown(s["e2e_pretrain"]["results"], s["e2e_pretrain"]["env"]), ""]
    if "attention_backends" in s:
        lines += ["## Attention backends", "", attention_backends.markdown(s["attention_backends"]), ""]
    if "gpu_mlm" in s:
        lines += ["## GPU: BERT-base MLM step, bf16, MFU", "", _gpu_markdown(s["gpu_mlm"]), ""]
    if "eval" in s:
        lines += ["## Held-out evaluation: trained vs random init", "", _eval_markdown(s["eval"]), ""]
    if "downstream" in s:
        from benchmarks import downstream

        lines += ["## Downstream tasks: frozen features and fine-tuning", "", downstream.markdown(s["downstream"]), ""]
    if "recipes" in s:
        from benchmarks import recipes

        lines += [f"## Recipes at equal compute: {s['recipes']['modality']}", "", recipes.markdown(s["recipes"]), ""]
    if report["plots"]:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _plot_throughput(sections: Dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    groups = [("CPU fp32", [(r["config"]["name"], r["mmm"]["real_tokens_per_s"], r["hf"]["real_tokens_per_s"])
                            for r in sections["text_mlm_step"]["results"]])]
    gpu = sections.get("gpu_mlm", {})
    gpu_rows = [(f"L={r['config']['max_len']}", r["mmm"]["real_tokens_per_s"], r.get("hf", {}).get("real_tokens_per_s"))
                for r in gpu.get("results", []) if "mmm" in r]
    if gpu_rows:
        groups.append((f"{gpu['device']} bf16", gpu_rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (title, rows) in zip(axes[0], groups):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="mmm (packed)")
        ax.bar([x + 0.2 for x in xs], [r[2] or 0 for r in rows], 0.4, label="HF BertForMaskedLM")
        ax.set_xticks(list(xs), [r[0] for r in rows])
        ax.set_ylabel("real tokens / s")
        ax.set_title(f"MLM training step, {title}")
        ax.margins(y=0.2)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_attention(sweep: Dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(dict.fromkeys(n for p in sweep["points"] for n in p["backends"]))
    for name in names:
        pts = [(p["max_len"], p["backends"][name]) for p in sweep["points"] if name in p["backends"]]
        ok = [(L, r) for L, r in pts if "median_s" in r]
        ax_t.plot([L for L, _ in ok], [r["median_s"] * 1e3 for _, r in ok], marker="o", label=name)
        mem = [(L, r["peak_mib"]) for L, r in ok if r["peak_mib"] is not None]
        if mem:
            ax_m.plot([L for L, _ in mem], [v for _, v in mem], marker="o", label=name)
    lengths = [p["max_len"] for p in sweep["points"]]
    for ax, label in ((ax_t, "forward + backward (ms)"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.set_xlabel("max sequence length L")
        ax.set_ylabel(label)
    ax_t.set_yscale("log")
    ax_t.legend()
    ax_t.set_title(f"attention, {sweep['total_tokens']} tokens, {sweep['dtype']}, {sweep['device']}")
    if ax_m.lines:
        ax_m.set_yscale("log")
        ax_m.legend()
        ax_m.set_title("peak memory above inputs")
    else:
        ax_m.set_axis_off()
        ax_m.text(0.5, 0.5, f"peak memory: {sweep['memory']}", ha="center", va="center", transform=ax_m.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_eval(ev: Dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    modalities = [m for m in ev if m != "checkpoint"]
    fig, axes = plt.subplots(len(modalities), 2, figsize=(8, 3.4 * len(modalities)), squeeze=False)
    for row, modality in zip(axes, modalities):
        r = ev[modality]
        labels = ["trained", "random init"]
        for ax, key, title in ((row[0], "accuracy", "masked-token accuracy"), (row[1], "perplexity", "perplexity")):
            values = [r["trained"][key], r["random_init"][key]]
            bars = ax.bar(labels, values, color=["tab:blue", "tab:gray"])
            ax.bar_label(bars, [f"{v:.3f}" if key == "accuracy" else f"{v:.1f}" for v in values])
            ax.set_title(f"{modality}: {title}")
            ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(report: Dict[str, Any], out: Path) -> List[str]:
    """Write the PNGs for the report's sections into ``out``; returns their file names.

    Args:
        report: the suite's result.
        out: output folder.
    """
    import matplotlib

    matplotlib.use("Agg")
    s = report["sections"]
    written = []
    if "text_mlm_step" in s:
        _plot_throughput(s, out / "throughput_mmm_vs_hf.png")
        written.append("throughput_mmm_vs_hf.png")
    if "attention_backends" in s:
        _plot_attention(s["attention_backends"], out / "attention_backends.png")
        written.append("attention_backends.png")
    if "eval" in s:
        _plot_eval(s["eval"], out / "eval_trained_vs_random.png")
        written.append("eval_trained_vs_random.png")
    if "downstream" in s:
        from benchmarks import downstream

        downstream.plot(s["downstream"], out / "downstream.png")
        written.append("downstream.png")
    if "recipes" in s:
        from benchmarks import recipes

        name = f"recipes_{s['recipes']['modality']}.png"
        recipes.plot(s["recipes"], out / name)
        written.append(name)
    return written


# ----------------------------------------------------------------------------- entry point


def e2e_in_fresh_process(size_names: Sequence[str], log: Callable[[str], None]) -> Dict[str, Any]:
    """:mod:`benchmarks.e2e_pretrain` at ``size_names`` in a Python process of its own; its report.

    In the suite's process the benchmarks before it leave glibc's heap grown, and HF's per-step logits and
    their gradient then page-fault 17-22k times a step instead of about 66k, as they do in a process that runs
    HF alone: the tiny mmm/HF ratio read 1.04-1.07x there against 1.15-1.17x standalone (2026-12-04). A
    user's training process is a fresh one, so the suite measures in one. Progress lines are passed to ``log``.

    Raises:
        RuntimeError: the benchmark process failed (its last lines are in the message).
    """
    import subprocess
    import sys
    import tempfile

    repo = Path(__file__).resolve().parents[1]  # `python -m` there imports this checkout's benchmarks and mmm
    with tempfile.TemporaryDirectory(prefix="mmm_e2e_suite_") as out:
        cmd = [sys.executable, "-m", "benchmarks.e2e_pretrain", "--sizes", ",".join(size_names), "--out", out]
        lines: List[str] = []
        with subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                if line.startswith("["):  # the benchmark's progress lines ([size] ...); its report is read below
                    log(line)
        if proc.returncode != 0:
            tail = "\n".join(lines[-20:])
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; its last lines:\n{tail}")
        return json.loads((Path(out) / "results.json").read_text(encoding="utf-8"))


def run_suite(suite: str, out: Optional[Union[str, Path]] = None, quick: bool = False,
              checkpoint: Union[None, str, Path, Sequence[Union[str, Path]]] = None, compile: bool = False,
              log: Callable[[str], None] = print, modality: Optional[str] = None) -> Dict[str, Any]:
    """Run one suite and write ``results.json``, ``results.md`` and plots to ``out``.

    Args:
        suite: ``throughput`` or ``eval``.
        out: output folder (default ``runs/bench/<suite>``).
        quick: a few minutes on CPU instead of the full sizes.
        checkpoint: the mmm checkpoint the ``eval`` suite scores (required there, refused by ``throughput``);
            one or several checkpoints / encoder folders for ``downstream`` (:mod:`benchmarks.downstream`).
        compile: ``torch.compile`` the mmm model in the CUDA MLM step (throughput only).
        log: progress printer.
        modality: the modality whose recipes ``--suite recipes`` compares (required there, refused elsewhere).
    """
    if suite not in SUITES:
        raise ValueError(f"unknown benchmark suite {suite!r}; expected one of {list(SUITES)}")
    if suite == "recipes":
        from benchmarks import recipes

        if modality not in recipes.MODALITIES:
            raise ValueError(f"the recipes suite needs --modality, one of {list(recipes.MODALITIES)}; got {modality!r}")
        if checkpoint or compile:
            raise ValueError("the recipes suite takes no checkpoint and no --compile (it pretrains its own models)")
    elif modality is not None:
        raise ValueError(f"--modality applies to the recipes suite only (got --suite {suite})")
    checkpoints = [] if checkpoint is None else [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if suite == "downstream" and not checkpoints:
        raise ValueError("the downstream suite needs checkpoints: mmm bench --suite downstream CKPT [CKPT ...]")
    if suite != "downstream" and len(checkpoints) > 1:
        raise ValueError(f"the {suite} suite takes at most one checkpoint, got {len(checkpoints)}")
    if suite == "downstream" and compile:
        raise ValueError("--compile applies to the throughput suite only")
    checkpoint = checkpoints[0] if suite != "downstream" and checkpoints else None
    if suite == "eval" and checkpoint is None:
        raise ValueError("the eval suite needs a checkpoint: mmm bench --suite eval CKPT")
    if suite == "throughput" and checkpoint is not None:
        raise ValueError("the throughput suite takes no checkpoint (it benchmarks fresh models)")
    if suite == "eval" and compile:
        raise ValueError("--compile applies to the throughput suite only")
    sizes = select_sizes(quick)
    out_dir = Path(out) if out is not None else Path("runs") / "bench" / (f"recipes_{modality}" if modality else suite)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    if suite == "throughput":
        sections = run_throughput(sizes, compile, log)
    elif suite == "downstream":
        from benchmarks import downstream

        sections = {"downstream": downstream.run(checkpoints, quick, log)}
    elif suite == "recipes":
        from benchmarks import recipes

        sections = {"recipes": recipes.run(modality, quick, out_dir, log)}  # type: ignore[arg-type]
    else:
        sections = {"eval": run_eval(checkpoint, sizes, log)}  # type: ignore[arg-type]
    if suite == "recipes":
        from benchmarks import recipes

        sizes_name = recipes.select_sizes(quick).name
    else:
        sizes_name = sizes.name
    report: Dict[str, Any] = {"suite": suite, "quick": quick, "sizes": sizes_name, "machine": machine,
                              "sections": sections, "plots": []}
    report["plots"] = write_plots(report, out_dir)
    report["markdown"] = markdown(report)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(report["markdown"] + "\n", encoding="utf-8")
    report["out"] = str(out_dir)
    return report


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``python -m benchmarks.suite --suite throughput|eval [--quick] [--out DIR] [--compile] [CKPT]``."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, choices=SUITES)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--modality", default=None)
    p.add_argument("checkpoint", nargs="*", default=None)
    a = p.parse_args(argv)
    report = run_suite(a.suite, a.out, a.quick, a.checkpoint, a.compile, modality=a.modality)
    print(report["markdown"])
    return report


if __name__ == "__main__":
    main()
