"""Model FLOPs utilisation (MFU) of an encoder's training step, and its measurement for the MLM step.

Model FLOPs per token of one training step (forward + backward) of a bidirectional Transformer
encoder, the standard estimate (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B)::

    flops_per_token = 6 * N + 12 * L * d * s

* ``N``: parameter count excluding embeddings (token / position / token-type tables). Every
  such weight takes part in one multiply-add per token forward (2 FLOPs) and two backward
  (4 FLOPs): 6 FLOPs per parameter per token.
* ``12 * L * d * s``: the attention products, which have no parameters. Per layer and token,
  QKᵀ and the weighted sum over V each cost 2·s·d FLOPs forward (``d`` = heads × head dim,
  ``s`` = the length of the token's sequence, every key visible: an encoder is not causal);
  ×3 for forward + backward gives 12·s·d.

In a packed batch every sequence has its own ``s``; the batch costs Σᵢ nᵢ·(6N + 12·L·d·nᵢ)
FLOPs, which is ``tokens × flops_per_token(s_eff)`` with the token-weighted length
``s_eff = Σ nᵢ² / Σ nᵢ`` (:func:`effective_seq_len`). Padding tokens are never counted: they
are work a padded implementation does, not work the model needs.

For mmm's MLM models ``N`` is the shared encoder's parameters only (:func:`non_embedding_params`
of ``model.encoder``): the MLM head runs on the masked ~15% of positions, so leaving it out
makes the MFU slightly conservative (BERT-base: 85.05 M encoder parameters; the head's
transform adds 0.59 M).

``MFU = tokens/s × flops_per_token / peak``, with the dense bf16 tensor-core peak of the GPU
(:data:`PEAK_BF16_FLOPS`, from NVIDIA's data sheets, no sparsity), chosen from
``torch.cuda.get_device_name()``. Unknown GPUs and CPUs have no peak: MFU is then None.

:func:`measure_mlm_step` times the mmm MLM training step (forward in bf16 autocast + backward +
AdamW, xformers attention on CUDA) against ``transformers.BertForMaskedLM`` (SDPA, padded) on
batches whose lengths are uniform in [L/4, L], interleaved, and reports real tokens/s and MFU.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

PEAK_BF16_FLOPS: Dict[str, float] = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
}
"""Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU."""


def flops_per_token(non_embedding_params: int, layers: int, dim: int, seq_len: float) -> float:
    """Training (forward + backward) model FLOPs per token: ``6·N + 12·L·d·s``.

    Args:
        non_embedding_params: N, parameters excluding embedding tables.
        layers: L, Transformer blocks.
        dim: d, model width (heads × head dim).
        seq_len: s, length of the sequence the token attends over (see :func:`effective_seq_len`).
    """
    if non_embedding_params < 0 or layers < 0 or dim <= 0 or seq_len <= 0:
        raise ValueError(f"flops_per_token needs N ≥ 0, L ≥ 0, d > 0, s > 0; got N={non_embedding_params}, "
                         f"L={layers}, d={dim}, s={seq_len}")
    return 6.0 * non_embedding_params + 12.0 * layers * dim * seq_len


def effective_seq_len(seqlens: Sequence[int]) -> float:
    """Token-weighted sequence length Σn²/Σn of a packed batch (exact for the attention FLOPs).

    Args:
        seqlens: the length of every sequence in the batch.
    """
    total = sum(seqlens)
    if not seqlens or total <= 0:
        raise ValueError(f"effective_seq_len needs sequences with tokens, got {list(seqlens)}")
    return sum(n * n for n in seqlens) / total


def non_embedding_params(module: nn.Module) -> int:
    """Parameters of ``module`` that are not ``nn.Embedding`` tables (shared tensors counted once).

    Args:
        module: e.g. ``model.encoder`` of an mmm model.
    """
    embedding = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    seen = set()
    count = 0
    for p in module.parameters():
        if id(p) in seen or id(p) in embedding:
            continue
        seen.add(id(p))
        count += p.numel()
    return count


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak FLOP/s for a CUDA device name, or None (CPU, unknown GPU).

    Args:
        device_name: ``torch.cuda.get_device_name()`` (e.g. "NVIDIA H100 80GB HBM3"), or None.
    """
    if not device_name:
        return None
    name = device_name.upper()
    if "H100" in name:
        if "PCIE" in name:
            return PEAK_BF16_FLOPS["H100 PCIe"]
        if "SXM" in name or "HBM3" in name:  # the SXM part reports itself as "H100 80GB HBM3"
            return PEAK_BF16_FLOPS["H100 SXM"]
        return None  # H100 NVL and other variants have other clocks
    if "H200" in name:
        return PEAK_BF16_FLOPS["H200"]
    if "A100" in name:
        return PEAK_BF16_FLOPS["A100"]
    return None


def device_peak_flops(device: torch.device) -> Optional[float]:
    """:func:`peak_flops` of ``device`` (None on CPU).

    Args:
        device: where the benchmark runs.
    """
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def mfu(tokens_per_sec: float, flops_per_tok: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1], or None without a known peak.

    Args:
        tokens_per_sec: real (non-padding) tokens processed per second.
        flops_per_tok: model FLOPs per token (:func:`flops_per_token`).
        peak: the device's peak FLOP/s (:func:`peak_flops`), or None.
    """
    if peak is None:
        return None
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_sec * flops_per_tok / peak


# ----------------------------------------------------------------------------- MLM step measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_mlm_step(max_len: int, tokens_per_batch: int, *, device: torch.device, preset: str = "base",
                     attention: str = "xformers", autocast_bf16: bool = True, steps: int = 10, warmup: int = 3,
                     compile: bool = False, with_hf: bool = True, seed: int = 0,
                     overrides: Optional[Dict[str, Any]] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Time the MLM training step of mmm (and HF) on ``device`` and report tokens/s and MFU.

    Args:
        max_len: longest sequence L; lengths are uniform in [L/4, L].
        tokens_per_batch: about this many real tokens per batch (sets the sequence count).
        device: where to run (CUDA for the real measurement; CPU works, with MFU None).
        preset: ``benchmarks.text_mlm_step`` preset (``base`` = BERT-base).
        attention: mmm attention backend (``xformers`` on CUDA).
        autocast_bf16: forward under ``torch.autocast(dtype=bfloat16)``.
        steps: timed steps per contender (interleaved).
        warmup: untimed steps per contender first (compilation happens there).
        compile: wrap the mmm model in ``torch.compile``.
        with_hf: also time ``BertForMaskedLM`` (SDPA, padded) with the same weights and batch.
        seed: batch and weight seed.
        overrides: BenchConfig fields to change (tests shrink the model with this).
        log: progress printer.
    """
    from benchmarks import text_mlm_step as tms

    cfg = tms.PRESETS[preset]
    batch = max(1, round(tokens_per_batch / (0.625 * max_len)))  # mean length of U[L/4, L] is 5L/8
    cfg = replace(cfg, name=f"{preset}-L{max_len}", max_len=max_len, batch=batch, **(overrides or {}))
    b = tms.make_batches(cfg, seed)
    b = tms.Batches(b.packed.to(device), b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device),
                    b.real_tokens, b.masked_tokens)
    model = tms.build_mmm(cfg, seed)
    model.encoder.cfg = replace(model.encoder.cfg, attention=attention)
    n_params = non_embedding_params(model.encoder)
    s_eff = effective_seq_len(b.packed.seq.seqlens)
    fpt = flops_per_token(n_params, cfg.depth, cfg.dim, s_eff)
    peak = device_peak_flops(device)

    contenders: Dict[str, Dict[str, Any]] = {}
    if with_hf:
        hf = tms.build_hf(cfg)
        tms.copy_mmm_to_hf(model, hf)
        hf.to(device).train()
        contenders["hf"] = {"model": hf, "loss": tms.hf_loss, "opt": tms.hf_optimizer(hf)}
    model.to(device).train()
    opt = tms.mmm_optimizer(model)
    run_model: nn.Module = torch.compile(model) if compile else model
    contenders = {"mmm": {"model": run_model, "loss": tms.mmm_loss, "opt": opt}, **contenders}
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast_bf16 else nullcontext

    def step(c: Dict[str, Any]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with amp():
            loss = c["loss"](c["model"], b)
        loss.backward()
        c["opt"].step()
        c["opt"].zero_grad(set_to_none=True)
        _sync(device)
        c.setdefault("losses", []).append(float(loss.detach()))
        return time.perf_counter() - t0

    times: Dict[str, List[float]] = {k: [] for k in contenders}
    for i in range(warmup + steps):
        order = list(contenders) if i % 2 == 0 else list(contenders)[::-1]
        for name in order:
            dt = step(contenders[name])
            if i >= warmup:
                times[name].append(dt)
    log(f"[mlm {cfg.name}] " + "  ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()))

    result: Dict[str, Any] = {
        "config": asdict(cfg), "device": str(device), "attention": attention, "autocast_bf16": autocast_bf16,
        "compile": compile, "real_tokens": b.real_tokens, "padded_tokens": cfg.batch * cfg.max_len,
        "sequences": cfg.batch, "effective_seq_len": s_eff, "non_embedding_params": n_params,
        "flops_per_token": fpt, "peak_flops": peak, "steps": steps, "warmup": warmup,
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = b.real_tokens / med
        result[name] = {"median_step_s": med, "step_times_s": ts, "real_tokens_per_s": tps,
                        "mfu": mfu(tps, fpt, peak), "final_loss": contenders[name]["losses"][-1]}
    if with_hf:
        result["speedup_real_tokens_per_s"] = result["mmm"]["real_tokens_per_s"] / result["hf"]["real_tokens_per_s"]
    return result
