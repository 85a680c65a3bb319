"""The device check of issue 18: every GPU measurement and GPU test in one run, written to ``results.md``.

Sections (each one writes its part of the report as soon as it ends, so a run cut short still
leaves what it measured):

1. ``tests`` — the ``gpu``-marked tests (xformers vs SDPA vs math in fp32 and bf16, forward and
   backward; the blocked ALiBi path; the uniform xformers layout; a sync-free encoder step), run
   with pytest in a subprocess.
2. ``sync`` — mmm MLM and MAE training steps (forward in bf16 autocast, backward, fused AdamW) under
   ``torch.cuda.set_sync_debug_mode("error")`` and :class:`mmm.host_reads.HostReadDetector` once the
   batch is on the device: any host sync inside the step fails it, and the report quotes where
   (:func:`sync_free_step`, :func:`sync_free_mae_step`).
3. ``mfu`` — BERT-base MLM bf16 training step, mmm (packed, xformers) and HF ``BertForMaskedLM``
   (padded, SDPA), at sequence lengths 128 and 512: real tokens/s and MFU
   (:func:`benchmarks.mfu.measure_mlm_step`).
4. ``mae`` — one MAE ViT-B/16 bf16 training step at 224 px (:func:`mae_step`): images/s, peak memory.
5. ``attention`` — xformers vs mmm's packed SDPA vs padded SDPA vs math, time and memory
   (:func:`benchmarks.attention_backends.run_sweep`).
6. ``loop`` (run third) — the BERT-base preset (bf16-mixed, fused AdamW, gradient clipping, the non-finite loss
   check on the device) trained for 16 steps through Lightning's ``trainer.fit`` on the embedded
   corpus (:func:`mmm.train.step_reads.loop_host_reads`): that it trains at all, the host reads at
   steps away from logging (mmm's detector) and every sync CUDA's debug mode reports there.

On a machine without CUDA every section is skipped with its reason and the run exits 0. The causal
variants (CLM) are among the ``gpu``-marked tests (``tests/core/test_causal.py``).

Usage::

    python -m benchmarks.gpu_check [--out results.md] [--budget-s 330]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
SECTIONS = ("tests", "sync", "loop", "mfu", "mae", "attention")
GPU_TESTS = ["tests/core", "tests/interop", "tests/test_final_layer_subset.py",  # where the gpu-marked tests live
             "tests/benchmarks/test_gpu_check.py"]


@dataclass
class Sizes:
    """What each section runs; :data:`FULL` on the GPU, :data:`SMOKE` to exercise the sections on CPU in tests."""

    tests: List[str] = field(default_factory=lambda: list(GPU_TESTS))
    bert_preset: str = "base"
    bert_overrides: Dict[str, Any] = field(default_factory=dict)
    mfu_lengths: List[int] = field(default_factory=lambda: [128, 512])
    mfu_tokens: int = 16384
    mfu_steps: int = 10
    mfu_warmup: int = 3
    mae_preset: str = "base"
    mae_batch: int = 64
    mae_overrides: Dict[str, Any] = field(default_factory=dict)
    loop_config: str = "text_mlm_bert_base.yaml"
    loop_overrides: Dict[str, Any] = field(default_factory=lambda: {
        "data.train": "embedded", "data.val": None, "data.global_batch_size": None, "data.batch_size": 64,
        "data.num_workers": 2, "trainer.enable_progress_bar": False})
    loop_steps: int = 16
    attn_lengths: List[int] = field(default_factory=lambda: [128, 512, 2048])
    attn_tokens: int = 16384
    attn_heads: int = 12
    attn_head_dim: int = 64


FULL = Sizes()
SMOKE = Sizes(tests=["tests/benchmarks/test_gpu_check.py"], bert_preset="small",
              bert_overrides={"depth": 1, "dim": 32, "heads": 2, "mlp_hidden": 64, "vocab": 300},
              mfu_lengths=[32], mfu_tokens=128, mfu_steps=1, mfu_warmup=0, mae_preset="small", mae_batch=2,
              mae_overrides={"image_size": 32, "patch_size": 8, "dim": 32, "depth": 1, "heads": 2, "mlp_hidden": 64,
                             "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
              attn_lengths=[16], attn_tokens=64, attn_heads=2, attn_head_dim=8,
              loop_config="text_mlm_tiny.yaml",
              loop_overrides={"data.batch_size": 4, "data.num_workers": 0, "model.encoder.dim": 32,
                              "model.encoder.depth": 1, "model.encoder.heads": 2, "model.encoder.mlp_hidden": 64,
                              "model.text.vocab_size": 300, "model.text.tokenizer_train_docs": 50,
                              "trainer.enable_progress_bar": False},
              loop_steps=8)


# ----------------------------------------------------------------------------- pieces (also run on CPU)


@contextmanager
def sync_debug_errors(device: torch.device) -> Iterator[None]:
    """Inside: a host-device synchronisation on CUDA raises (no-op on CPU)."""
    if device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _checked_steps(device: torch.device, model: torch.nn.Module, batch: Any, opt: Any, steps: int) -> Dict[str, Any]:
    """Training steps (bf16 autocast on CUDA, backward, optimizer) of ``model`` on ``batch``; every
    step after the first runs under CUDA's sync debug mode and :class:`mmm.host_reads.HostReadDetector`
    (the CPU stand-in: on a machine without CUDA the check is that one). Returns ``{"ok": True,
    "loss": ...}`` or ``{"ok": False, "error": ..., "where": ...}`` with the innermost mmm frame."""
    from mmm.host_reads import HostReadDetector

    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> torch.Tensor:
        with amp:
            loss = model(batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step()  # allocator and kernel warm-up, optimizer state: outside the check
    backend = model.encoder.backend_for(device)
    try:
        with sync_debug_errors(device), HostReadDetector() as reads:
            for _ in range(max(1, steps - 1)):
                loss = step()
    except RuntimeError as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/mmm/" in f.filename]
        where = f"{frames[-1].filename.split('/mmm/', 1)[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        return {"ok": False, "error": str(e).splitlines()[0][:300], "where": where, "backend": backend}
    if reads.found:
        first = reads.sites()[0]
        return {"ok": False, "error": f"host read: {first.what} ({len(reads.sites())} place(s))", "where": first.where,
                "backend": backend}
    return {"ok": True, "loss": float(loss), "backend": backend, "device": str(device)}


def sync_free_step(device: torch.device, preset: str = "base", overrides: Optional[Dict[str, Any]] = None,
                   attention: str = "auto", steps: int = 2) -> Dict[str, Any]:
    """mmm MLM training steps with every host sync an error once the batch is on ``device`` (:func:`_checked_steps`).

    Args:
        device: where to run (on CPU the host-read detector is the check).
        preset: ``benchmarks.text_mlm_step`` preset.
        overrides: its fields to change (tests shrink the model).
        attention: mmm attention backend.
        steps: steps in all (≥ 2).
    """
    from benchmarks import text_mlm_step as tms

    cfg = replace(tms.PRESETS[preset], **(overrides or {}))
    b = tms.make_batches(cfg, 0)
    packed = b.packed.pin_memory() if device.type == "cuda" else b.packed
    model = tms.build_mmm(cfg, 0)
    model.encoder.cfg = replace(model.encoder.cfg, attention=attention)
    model.to(device).train()
    return _checked_steps(device, model, packed.to(device), tms.mmm_optimizer(model), steps)


def sync_free_mae_step(device: torch.device, preset: str = "base", batch: int = 64,
                       overrides: Optional[Dict[str, Any]] = None, steps: int = 2) -> Dict[str, Any]:
    """The same check for an MAE training step (visible patches gathered in the embedder, hidden ones in the head).

    Args:
        device: where to run.
        preset: ``benchmarks.image_mae_step`` preset.
        batch: images per step.
        overrides: preset fields to change (tests shrink the model).
        steps: steps in all (≥ 2).
    """
    from benchmarks import image_mae_step as ims

    cfg = replace(ims.PRESETS[preset], batch=batch, **(overrides or {}))
    b = ims.make_batches(cfg, 0)
    packed = b.drop.pin_memory() if device.type == "cuda" else b.drop
    model = ims.build_mmm(cfg, 0)
    model.encoder.cfg = replace(model.encoder.cfg, attention="auto")
    model.to(device).train()
    return _checked_steps(device, model, packed.to(device), ims.mmm_optimizer(model), steps)


def mae_step(device: torch.device, preset: str = "base", batch: int = 64, steps: int = 5, warmup: int = 2,
             overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """MAE training step (drop masked patches; bf16 autocast on CUDA): median time, images/s, peak memory.

    Args:
        device: where to run.
        preset: ``benchmarks.image_mae_step`` preset (``base`` = ViT-B/16 at 224 px, 8-layer decoder).
        batch: images per step.
        steps: timed steps.
        warmup: untimed steps first.
        overrides: preset fields to change (tests shrink the model).
    """
    from benchmarks import image_mae_step as ims

    cfg = replace(ims.PRESETS[preset], batch=batch, **(overrides or {}))
    b = ims.make_batches(cfg, 0)
    model = ims.build_mmm(cfg, 0)
    model.encoder.cfg = replace(model.encoder.cfg, attention="auto")
    model.to(device).train()
    opt = ims.mmm_optimizer(model)
    packed = b.drop.to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times: List[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with amp:
            loss = model(packed)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return {"config": cfg.name, "images": cfg.batch, "median_step_s": med, "images_per_s": cfg.batch / med,
            "peak_mib": peak, "loss": float(loss.detach()), "backend": model.encoder.backend_for(device),
            "encoder_tokens": packed.num_tokens}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- sections (CUDA)


def _bert(sizes: Sizes) -> str:
    return "BERT-base" if sizes == FULL else f"Preset {sizes.bert_preset} (shrunk)"


def _attention_for(device: torch.device) -> str:
    return "xformers" if device.type == "cuda" else "sdpa"


def section_tests(device: torch.device, budget_s: float, sizes: Sizes) -> str:
    """The ``gpu``-marked tests in one pytest process. ``-o addopts=`` drops the project's ``-n auto``: pytest-xdist
    need not be installed on the device machine, and one process keeps one CUDA context. ``-v`` prints each test's
    result as it finishes, so a run cut off by its time limit still reports the finished ones."""
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-v", "-m", "gpu", "-p", "no:cacheprovider",
           *sizes.tests]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=budget_s)
        out, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:  # its output is bytes whatever text= says
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = f"{partial}\n(timed out after {budget_s:.0f} s)", "timeout"
    results = (" PASSED", " FAILED", " ERROR", " SKIPPED", " XFAIL", " XPASS")
    lines = [ln.strip() for ln in out.splitlines() if "::" in ln and any(r in ln for r in results)]
    summary = [ln for ln in out.splitlines() if " passed" in ln or " failed" in ln or "error" in ln.lower()
               or "timed out" in ln][-1:]
    return "\n".join([f"`{' '.join(cmd[1:])}` → exit {rc}", "", "```", *lines, *summary, "```"])


def section_sync(device: torch.device, budget_s: float, sizes: Sizes) -> str:
    rows = []
    for attention in sorted({_attention_for(device), "sdpa"}, reverse=True):
        try:
            r = sync_free_step(device, sizes.bert_preset, sizes.bert_overrides, attention=attention, steps=3)
        except Exception as e:  # e.g. xformers failing to import: the sdpa and MAE rows still run
            rows.append(f"| {_bert(sizes)} MLM | {attention} | FAILED: {type(e).__name__}: {str(e)[:200]} | |")
            continue
        rows.append(f"| {_bert(sizes)} MLM | {r['backend']} | {'no host sync' if r['ok'] else 'SYNC: ' + r['error']} | "
                    f"{'' if r['ok'] else r['where']} |")
    r = sync_free_mae_step(device, sizes.mae_preset, min(sizes.mae_batch, 8), sizes.mae_overrides, steps=3)
    rows.append(f"| MAE ({sizes.mae_preset}) | {r['backend']} | {'no host sync' if r['ok'] else 'SYNC: ' + r['error']} "
                f"| {'' if r['ok'] else r['where']} |")
    return "\n".join(["Training steps (bf16 autocast, fused AdamW) with the batch already on the device, under "
                      "`torch.cuda.set_sync_debug_mode(\"error\")` and mmm's host-read detector.", "",
                      "| step | attention | result | where |", "|---|---|---|---|", *rows])


def section_loop(device: torch.device, budget_s: float, sizes: Sizes) -> str:
    from mmm.config import load_config
    from mmm.train.step_reads import loop_host_reads

    cfg = load_config(REPO / "configs" / sizes.loop_config, dict(sizes.loop_overrides))
    loop = loop_host_reads(cfg, sizes.loop_steps, accelerator=device.type)
    between, cuda = loop.between_logging(), loop.cuda_between_logging()
    rows = [f"| {sizes.loop_config} | {cfg.trainer.precision}, {cfg.optim.name} | {loop.trained} of {loop.steps} | "
            f"{', '.join(map(str, loop.quiet_steps()))} | {len(between)}{': ' + str(between[0]) if between else ''} | "
            f"{len(cuda) if device.type == 'cuda' else 'n/a (no CUDA)'}{': ' + cuda[0] if cuda else ''} |"]
    return "\n".join([
        "Lightning's whole loop (logging, progress bar off, callbacks, clipping, optimizer, LR schedule), "
        "logging at steps 0, N/2 and N; the quiet steps are those two or more away from a logging step.", "",
        "| config | precision, optimizer | steps trained | quiet steps | host reads there (mmm's detector) | "
        "syncs there (CUDA's debug mode) |", "|---|---|---:|---|---|---|", *rows, "",
        "All reads and syncs, by step:", "", "```", loop.report(),
        *(f"CUDA sync at step {k}: {', '.join(dict.fromkeys(v))} ({len(v)}x)" for k, v in sorted(loop.cuda_syncs.items())),
        "```"])


def section_mfu(device: torch.device, budget_s: float, sizes: Sizes) -> str:
    from benchmarks.mfu import measure_mlm_step

    lines = [f"{_bert(sizes)} MLM step (forward in bf16 autocast + backward + fused AdamW), lengths uniform in "
             f"[L/4, L], about {sizes.mfu_tokens} real tokens per batch, median of {sizes.mfu_steps} interleaved steps "
             f"after {sizes.mfu_warmup} warm-up steps.", "",
             "| L | model | median step (ms) | real tokens/s | MFU | mmm / HF |", "|---:|---|---:|---:|---:|---:|"]
    with_hf = importlib.util.find_spec("transformers") is not None  # the device machine may not have it
    if not with_hf:
        lines[0] += " (transformers is not installed: mmm alone, no HF row)"
    for L in sizes.mfu_lengths:
        r = measure_mlm_step(L, sizes.mfu_tokens, device=device, preset=sizes.bert_preset,
                             attention=_attention_for(device), steps=sizes.mfu_steps, warmup=sizes.mfu_warmup,
                             overrides=sizes.bert_overrides, log=print, with_hf=with_hf)
        for name in ("mmm", "hf") if with_hf else ("mmm",):
            e = r[name]
            mfu = "n/a" if e["mfu"] is None else f"{100 * e['mfu']:.1f}%"
            ratio = f"{r['speedup_real_tokens_per_s']:.2f}×" if name == "mmm" and with_hf else ""
            lines.append(f"| {L} | {name} | {e['median_step_s'] * 1e3:.1f} | {e['real_tokens_per_s']:,.0f} | {mfu} "
                         f"| {ratio} |")
    return "\n".join(lines)


def section_mae(device: torch.device, budget_s: float, sizes: Sizes) -> str:
    r = mae_step(device, sizes.mae_preset, sizes.mae_batch, overrides=sizes.mae_overrides)
    name = "ViT-B/16, 224 px, 8-layer decoder" if sizes == FULL else f"preset {sizes.mae_preset} (shrunk)"
    return (f"MAE {name}, 75% masked, {r['images']} images, bf16 autocast on CUDA, "
            f"attention {r['backend']}: median step {r['median_step_s'] * 1e3:.1f} ms, "
            f"{r['images_per_s']:,.0f} images/s, peak "
            f"{'n/a' if r['peak_mib'] is None else format(r['peak_mib'], ',.0f')} MiB, loss {r['loss']:.3f}.")


def section_attention(device: torch.device, budget_s: float, sizes: Sizes) -> str:
    from benchmarks.attention_backends import markdown, run_sweep

    table = markdown(run_sweep(sizes.attn_lengths, sizes.attn_tokens, heads=sizes.attn_heads,
                               head_dim=sizes.attn_head_dim, repeats=5, warmup=2, device=device))
    rows = ["", "ALiBi, forward + backward at the same batches: mmm's sdpa path (bias built per block of query "
                "rows) against the dense (B, H, T, T) bias of the math reference, and compiled FlexAttention on "
                "CUDA (the first call compiles; the median is over the later ones).", "",
            "| L | backend | median (ms) | peak (MiB) |", "|---:|---|---:|---:|"]
    for L in sizes.attn_lengths:
        for name, r in alibi_point(L, sizes.attn_tokens, sizes.attn_heads, sizes.attn_head_dim, device).items():
            peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:,.1f}"
            rows.append(f"| {L} | {name} | {r['median_s'] * 1e3:.2f} | {peak} |")
    return table + "\n" + "\n".join(rows)


def alibi_point(max_len: int, total_tokens: int, heads: int, head_dim: int, device: torch.device,
                repeats: int = 5) -> Dict[str, Dict[str, Any]]:
    """Median forward + backward time and peak memory of ALiBi attention: flex (CUDA), blocked sdpa, dense math.

    Args:
        max_len: longest sequence; lengths uniform in [L/4, L] (:func:`benchmarks.attention_backends.spread_lengths`).
        total_tokens: real tokens in the batch.
        heads: attention heads.
        head_dim: per-head size.
        device: where to run (bf16 on CUDA, fp32 on CPU; peak memory only on CUDA).
        repeats: timed repeats after one warm-up.
    """
    import numpy as np

    from benchmarks.attention_backends import spread_lengths
    from mmm.core.attention import flex_attention_backend, flex_context, math_attention, sdpa_attention
    from mmm.core.packing import PackedSeqInfo
    from mmm.core.position import ALiBi

    seq = PackedSeqInfo.from_seqlens(spread_lengths(max_len, max(total_tokens, max_len), np.random.default_rng(0)),
                                     device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    alibi = ALiBi(heads).to(device)
    out: Dict[str, Dict[str, Any]] = {}
    contenders = [("sdpa (blocked)", sdpa_attention, alibi), ("math (dense)", math_attention, alibi)]
    if device.type == "cuda":  # compiled FlexAttention: the bias inside the kernel
        contenders.insert(0, ("flex", flex_attention_backend, flex_context(seq, alibi)))
    for name, fn, bias in contenders:
        q, k, v = (torch.randn(seq.num_tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        times = []
        for i in range(1 + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            t0 = time.perf_counter()
            fn(q, k, v, seq, bias).float().sum().backward()
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20 if device.type == "cuda" else None
        out[name] = {"median_s": sorted(times)[len(times) // 2], "peak_mib": peak}
    return out


RUNNERS: Dict[str, Callable[[torch.device, float, Sizes], str]] = {
    "tests": section_tests, "sync": section_sync, "mfu": section_mfu, "mae": section_mae,
    "attention": section_attention, "loop": section_loop,
}
TITLES = {"tests": "GPU tests", "sync": "Host syncs in a training step", "mfu": "BERT-base MLM MFU",
          "mae": "MAE ViT-B step", "attention": "Attention: xformers vs SDPA (packed and padded) vs math",
          "loop": "A whole training loop through Lightning (bf16 preset)"}
SHARE = {"tests": 0.25, "sync": 0.1, "loop": 0.15, "mfu": 0.25, "mae": 0.1, "attention": 0.15}  # of the time budget, per section


# ----------------------------------------------------------------------------- driver


def environment() -> List[str]:
    try:
        import xformers

        xf = xformers.__version__
    except Exception as e:  # reported, not fatal: the xformers rows then say why they are missing
        xf = f"not importable ({type(e).__name__})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    cc = shutil.which("cc") or shutil.which("gcc")
    missing = [m for m in ("pytest", "transformers", "soundfile", "torchaudio") if importlib.util.find_spec(m) is None]
    return [f"- torch {torch.__version__}, CUDA {torch.version.cuda}, xformers {xf}", f"- device: {gpu}",
            f"- C compiler: {cc or 'none (Triton cannot build its launcher: compiled FlexAttention will fail)'}; "
            f"not installed: {', '.join(missing) or 'nothing the check uses'}",
            f"- python {sys.version.split()[0]}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]


def run(out: Path, budget_s: float = 330.0, sections: Sequence[str] = SECTIONS,
        device: Optional[torch.device] = None, sizes: Sizes = FULL) -> Dict[str, str]:
    """Run the sections in order and write ``out`` after each; returns section → status.

    Args:
        out: the markdown report to write.
        budget_s: wall-clock budget; a section that would start past it is skipped with that reason.
        sections: which sections to run.
        device: default CUDA when available; without CUDA every section is skipped.
        sizes: what the sections run (:data:`SMOKE` with ``device=cpu`` exercises them in tests).
    """
    device = device or (torch.device("cuda") if torch.cuda.is_available() else None)
    start = time.perf_counter()
    parts = ["# mmm GPU check", "", *environment(), ""]
    status: Dict[str, str] = {}
    for name in sections:
        left = budget_s - (time.perf_counter() - start)
        if device is None:
            status[name] = f"skipped: {NO_CUDA}"
            body = f"Skipped: {NO_CUDA}."
        elif left < 10:
            status[name] = "skipped: time budget spent"
            body = f"Skipped: the {budget_s:.0f} s budget was spent."
        else:
            t0 = time.perf_counter()
            try:
                body = RUNNERS[name](device, max(10.0, min(left, SHARE[name] * budget_s * 1.5)), sizes)
                status[name] = "ran"
            except Exception as e:  # one failing section must not hide the others' numbers
                body = "Failed:\n\n```\n" + "".join(traceback.format_exception(e))[-3000:] + "```"
                status[name] = f"failed: {type(e).__name__}: {e}"[:200]
            body += f"\n\n({time.perf_counter() - t0:.0f} s)"
        parts += [f"## {TITLES[name]}", "", body, ""]
        out.write_text("\n".join(parts), encoding="utf-8")
        print(f"[gpu_check] {name}: {status[name]}", flush=True)
    if device is None:
        parts += ["Nothing was measured: run this on a machine with a CUDA GPU (and xformers for its rows)."]
        out.write_text("\n".join(parts), encoding="utf-8")
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results.md", help="markdown report to write")
    p.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget for all sections")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    a = p.parse_args(argv)
    status = run(Path(a.out), a.budget_s, a.sections)
    print(f"[gpu_check] wrote {a.out}")
    return 1 if any(s.startswith("failed") for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
