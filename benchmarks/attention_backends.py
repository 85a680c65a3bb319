"""Attention backends side by side on packed batches: forward + backward time, tokens/s, peak memory.

For each maximum length L (default 128 … 4096), one batch of variable-length sequences is drawn
with lengths uniform in [L/4, L] (the last sequence takes whatever remains of the token budget),
holding ``total_tokens`` real tokens in all, so every point does the same amount of
linear-layer work and only attention's quadratic part grows. Queries, keys and values are
random (N, H, D) tensors (H = 12 heads, D = 64 by default; bf16 on CUDA, fp32 on CPU).

Contenders (the same q, k, v and output gradient):

* ``xformers`` — mmm's packed backend: block-diagonal memory-efficient attention over the flat
  stream, no padding (CUDA only: on CPU it is skipped, with the reason in the JSON);
* ``sdpa`` — mmm's packed SDPA backend (pads a few length groups, see ``mmm.core.attention``);
* ``sdpa_padded`` — what a non-packing user runs: the whole batch padded to L as (B, L, H, D)
  tensors, ``scaled_dot_product_attention`` with a key-padding mask (HF BERT's SDPA path);
* ``math`` — mmm's explicit softmax(QKᵀ/√d)V reference; the baseline of every ratio.

A measurement is one forward + backward (``out.backward(grad)``). After warm-up, the contenders
run in turn, the order rotating every repeat, and the median per contender is reported; ratios
are math's median over the contender's (> 1 = faster than math). Real tokens/s counts the
non-padding tokens only. Each contender's output is also compared with math's (max |Δ|).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one forward + backward minus
``memory_allocated`` just before it (q, k, v and the output gradient already exist: their size
is ``input_mib``, which is larger for ``sdpa_padded``). On CPU no allocator statistics exist
and the fields are null ("n/a" in the table).

Usage::

    python -m benchmarks.attention_backends [--lengths 128 256 ...] [--total-tokens N] [--heads 12]
        [--head-dim 64] [--repeats R] [--warmup W] [--device cpu|cuda] [--json OUT] [--markdown OUT]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.report import at_least, emit
from mmm.core.attention import math_attention, sdpa_attention, xformers_attention
from mmm.core.packing import PackedSeqInfo

LENGTHS = (128, 256, 512, 1024, 2048, 4096)
BACKENDS = ("xformers", "sdpa", "sdpa_padded", "math")
BASELINE = "math"
XFORMERS_CPU_REASON = "xformers has no CPU kernels"


def spread_lengths(max_len: int, total_tokens: int, rng: np.random.Generator) -> List[int]:
    """Sequence lengths uniform in [max_len/4, max_len] summing to ``total_tokens``, longest first.

    Args:
        max_len: the longest allowed sequence L.
        total_tokens: real tokens in the batch (the last sequence takes the remainder).
        rng: random generator.
    """
    if max_len < 1 or total_tokens < 1:
        raise ValueError(f"need max_len ≥ 1 and total_tokens ≥ 1, got {max_len}, {total_tokens}")
    lo = max(1, max_len // 4)
    out: List[int] = []
    left = total_tokens
    while left > 0:
        n = min(int(rng.integers(lo, max_len + 1)), left)
        out.append(n)
        left -= n
    return sorted(out, reverse=True)


def xformers_unavailable(device: torch.device) -> Optional[str]:
    """Why xformers cannot run on ``device``, or None when it can.

    Args:
        device: the benchmark device.
    """
    if device.type != "cuda":
        return XFORMERS_CPU_REASON
    try:
        from xformers.ops import fmha  # noqa: F401
    except Exception as e:  # a broken build raises more than ImportError
        return f"xformers does not import: {type(e).__name__}: {e}"
    return None


class _Contender:
    """Inputs and the forward function of one backend at one point."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: List[torch.Tensor], grad: torch.Tensor,
                 packed_out: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn, self.inputs, self.grad, self.packed_out = fn, inputs, grad, packed_out

    def step(self) -> None:
        out = self.fn(*self.inputs)
        out.backward(self.grad)
        for t in self.inputs:
            t.grad = None

    @torch.no_grad()
    def output(self) -> torch.Tensor:
        """(N, H, D) forward output, in packed order."""
        return self.packed_out(self.fn(*self.inputs))


def _contenders(names: Sequence[str], seq: PackedSeqInfo, max_len: int, qkv: List[torch.Tensor],
                grad: torch.Tensor) -> Dict[str, _Contender]:
    def leaves(ts: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [t.detach().clone().requires_grad_(True) for t in ts]

    out: Dict[str, _Contender] = {}
    for name in names:
        if name in ("xformers", "sdpa", "math"):
            fn = {"xformers": xformers_attention, "sdpa": sdpa_attention, "math": math_attention}[name]
            out[name] = _Contender(lambda q, k, v, fn=fn: fn(q, k, v, seq), leaves(qkv), grad, lambda o: o)
        elif name == "sdpa_padded":
            full = PackedSeqInfo.from_seqlens(seq.lengths, seq.cu_seqlens.device, max_seqlen=max_len)  # rows padded to L
            mask = full.key_padding[:, None, None, :]  # (B, 1, 1, L) True = attend

            def padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=mask)
                return o.transpose(1, 2)  # (B, L, H, D)

            out[name] = _Contender(padded, leaves([full.pad(t) for t in qkv]), full.pad(grad),
                                   lambda o, full=full: full.unpad(o))
        else:
            raise ValueError(f"unknown attention contender {name!r}; expected one of {BACKENDS}")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(c: _Contender, device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    c.step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_point(max_len: int, total_tokens: int, *, names: Sequence[str], device: torch.device, dtype: torch.dtype,
              heads: int, head_dim: int, repeats: int, warmup: int, seed: int) -> Dict[str, Any]:
    """Time and measure every contender in ``names`` at one maximum length.

    Args:
        max_len: longest sequence L.
        total_tokens: real tokens in the batch.
        names: contenders (a subset of :data:`BACKENDS`) that can run on ``device``.
        device: where to run.
        dtype: q/k/v dtype.
        heads: attention heads H.
        head_dim: head dimension D.
        repeats: timed repeats per contender (interleaved).
        warmup: untimed repeats per contender first.
        seed: batch seed.
    """
    rng = np.random.default_rng(seed + max_len)
    lengths = spread_lengths(max_len, total_tokens, rng)
    seq = PackedSeqInfo.from_seqlens(lengths, device=device)
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(seq.num_tokens, heads, head_dim, generator=g).to(device, dtype) for _ in range(3)]
    grad = torch.randn(seq.num_tokens, heads, head_dim, generator=g).to(device, dtype)
    contenders = _contenders(names, seq, max_len, qkv, grad)
    rows: Dict[str, Dict[str, Any]] = {}
    live = dict(contenders)
    times: Dict[str, List[float]] = {n: [] for n in contenders}
    for i in range(warmup + repeats):
        order = list(live)
        order = order[i % len(order):] + order[:i % len(order)] if order else order
        for name in order:
            c = live[name]
            try:
                _sync(device)
                t0 = time.perf_counter()
                c.step()
                _sync(device)
                dt = time.perf_counter() - t0
            except RuntimeError as e:
                if not _is_oom(e):
                    raise
                rows[name] = {"error": "out of memory"}
                del live[name]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if i >= warmup:
                times[name].append(dt)
    ref = live[BASELINE].output().float() if BASELINE in live else None
    for name, c in live.items():
        med = statistics.median(times[name])
        try:
            peak = _peak_mib(c, device)
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            peak = None
        rows[name] = {
            "median_s": med, "times_s": times[name], "real_tokens_per_s": seq.num_tokens / med, "peak_mib": peak,
            "input_mib": sum(t.numel() * t.element_size() for t in [*c.inputs, c.grad]) / 2 ** 20,
            "max_abs_diff_vs_math": None if ref is None else float((c.output().float() - ref).abs().max()),
        }
    base = rows.get(BASELINE, {})
    for name, r in rows.items():
        if "error" in r:
            continue
        r["speedup_vs_math"] = base["median_s"] / r["median_s"] if "median_s" in base else None
        r["memory_vs_math"] = (r["peak_mib"] / base["peak_mib"]
                               if r["peak_mib"] is not None and base.get("peak_mib") else None)
    return {"max_len": max_len, "sequences": len(lengths), "real_tokens": seq.num_tokens,
            "padded_tokens": len(lengths) * max_len, "seqlens": lengths, "backends": rows}


def run_sweep(lengths: Sequence[int] = LENGTHS, total_tokens: Optional[int] = None, *, heads: int = 12,
              head_dim: int = 64, repeats: int = 10, warmup: int = 2, device: Optional[torch.device] = None,
              backends: Sequence[str] = BACKENDS, seed: int = 0, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every length and return the JSON-able result.

    Args:
        lengths: maximum lengths L to test.
        total_tokens: real tokens per batch (default 16384 on CUDA, 4096 on CPU).
        heads: attention heads.
        head_dim: head dimension.
        repeats: timed repeats per contender and length.
        warmup: untimed repeats first.
        device: default CUDA when available, else CPU.
        backends: contenders wanted; those that cannot run on the device are listed under ``skipped``.
        seed: batch seed.
        log: progress printer.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    total_tokens = total_tokens or (16384 if device.type == "cuda" else 4096)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown attention contenders {unknown}; expected a subset of {list(BACKENDS)}")
    if BASELINE not in backends:
        raise ValueError(f"the contenders must include {BASELINE!r}: every ratio is relative to it")
    skipped: Dict[str, str] = {}
    names = list(backends)
    if "xformers" in names:
        reason = xformers_unavailable(device)
        if reason:
            skipped["xformers"] = reason
            names.remove("xformers")
    points = []
    for L in lengths:
        p = run_point(L, max(total_tokens, L), names=names, device=device, dtype=dtype, heads=heads,
                      head_dim=head_dim, repeats=repeats, warmup=warmup, seed=seed)
        log(f"[attention L={L}] " + "  ".join(
            f"{n} {r['median_s'] * 1e3:.2f} ms" if "median_s" in r else f"{n} {r['error']}"
            for n, r in p["backends"].items()))
        points.append(p)
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "heads": heads, "head_dim": head_dim,
            "total_tokens": total_tokens, "repeats": repeats, "warmup": warmup, "contenders": names,
            "skipped": skipped, "memory": "torch.cuda.max_memory_allocated delta" if device.type == "cuda"
            else "n/a on CPU (no allocator statistics)", "points": points}


def markdown(result: Dict[str, Any]) -> str:
    """Markdown table of :func:`run_sweep`'s result."""

    def num(x: Optional[float], fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    lines = [
        f"Attention forward + backward, packed batches with lengths uniform in [L/4, L], {result['total_tokens']} "
        f"real tokens per batch, {result['heads']} heads × {result['head_dim']}, {result['dtype']} on "
        f"{result['device']}; median of {result['repeats']} interleaved repeats.",
        "",
        "| L | sequences | backend | median (ms) | real tokens/s | speedup vs math | peak (MiB) | memory vs math "
        "| max \\|Δ\\| vs math |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        for i, (name, r) in enumerate(p["backends"].items()):
            head = f"| {p['max_len']} | {p['sequences']} " if i == 0 else "| | "
            if "error" in r:
                lines.append(head + f"| {name} | {r['error']} | | | | | |")
                continue
            lines.append(head + f"| {name} | {r['median_s'] * 1e3:.2f} | {r['real_tokens_per_s']:,.0f} | "
                         f"{num(r['speedup_vs_math'], '.2f')}× | {num(r['peak_mib'], '.1f')} | "
                         f"{num(r['memory_vs_math'], '.2f')} | {num(r['max_abs_diff_vs_math'], '.1e')} |")
    for name, reason in result["skipped"].items():
        lines += ["", f"{name}: skipped ({reason})."]
    lines += ["", f"Peak memory: {result['memory']}; q, k, v and the output gradient are excluded. sdpa_padded pads "
              "every sequence to L (a non-packing pipeline); sdpa is mmm's packed SDPA backend."]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--total-tokens", type=int, default=None, help="real tokens per batch (16384 CUDA, 4096 CPU)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=at_least(1), default=10)
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the markdown table here")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the sweep from command-line arguments; returns the JSON-able result."""
    a = parse_args(argv)
    result = run_sweep(a.lengths, a.total_tokens, heads=a.heads, head_dim=a.head_dim, repeats=a.repeats,
                       warmup=a.warmup, device=torch.device(a.device) if a.device else None,
                       backends=a.backends, seed=a.seed)
    emit(markdown(result), result, a.json, a.markdown)
    return result


if __name__ == "__main__":
    main()
