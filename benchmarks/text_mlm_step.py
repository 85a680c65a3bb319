"""One MLM training step: mmm (packed, head on masked positions only) vs ``transformers.BertForMaskedLM``.

Both models are the same post-LayerNorm BERT (GELU MLP, learned absolute positions, token
embedding tied to the output projection, the same dropout) in fp32. Both train on the same
variable-length batch with the same masked positions and labels:

* mmm gets the packed batch from :func:`mmm.batch.pack_masked` (no padding in the linear layers;
  the MLM head runs on the masked positions only);
* Hugging Face gets the same corrupted sequences right-padded to ``max_len`` with an
  ``attention_mask`` and ``labels`` = -100 except at the masked positions: its standard recipe,
  which computes the (B, T, V) logits for every position, padding included.

A step is forward + backward + ``AdamW.step()`` + ``zero_grad()``. The two contenders are timed
alternately in one process (A, B, A, B, ...) and medians are compared, so machine noise hits both.
Before timing, the HF model is loaded with the mmm weights and both losses are compared in eval
mode; the max absolute difference is reported so the reader can check the comparison is like for
like.

Memory: each contender runs again in a fresh subprocess (with ``MALLOC_MMAP_THRESHOLD_`` fixed so
freed tensors go back to the OS) and reads the kernel's resident-set high-water mark
(``VmHWM``): ``step_peak_mib`` is the peak during one training step above the resident set
just before it (weights and AdamW state already allocated, gradients freed), i.e. activations,
logits and gradients; ``total_peak_mib`` is the peak above the process after imports and batch
creation (weights + AdamW state + the step). Linux only; elsewhere the fields are null.

Dropout is 0.1 in both models by default (BERT's setting; ``--dropout 0`` for none). On a
machine shared with other jobs, ``--threads 1`` gives steadier ratios: with several OpenMP
threads, a preempted thread stalls every parallel op, which hurts the many small ops of the
optimizer step far more than the large matrix products.

Usage::

    python -m benchmarks.text_mlm_step --config small|base|all --steps N --warmup W \
        [--batch B] [--max-len L] [--json OUT] [--markdown OUT]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from benchmarks.report import argument_parser, at_least, contender_rows, emit, with_threads
from mmm.batch import PackedBatch, pack_masked
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig, OptimConfig, TextConfig
from mmm.masking.base import MaskedTokens, TokenVocab
from mmm.masking.token import BertRandomMasker
from mmm.model import MaskedModel, build_model, build_text_embedder

PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3
SPECIAL_IDS = frozenset({PAD_ID, CLS_ID, SEP_ID, MASK_ID})


@dataclass
class BenchConfig:
    """Dimensions of one comparison."""

    name: str
    depth: int
    dim: int
    heads: int
    mlp_hidden: int
    max_len: int
    batch: int
    vocab: int = 30522
    dropout: float = 0.1
    mask_ratio: float = 0.15


PRESETS: Dict[str, BenchConfig] = {
    "small": BenchConfig("small", depth=4, dim=256, heads=4, mlp_hidden=1024, max_len=128, batch=32),
    "base": BenchConfig("base", depth=12, dim=768, heads=12, mlp_hidden=3072, max_len=128, batch=16),
}
TARGETS = {"small": 4.0, "base": 1.8}  # mmm/HF real tokens/s wanted on CPU


# ----------------------------------------------------------------------------- batch


@dataclass
class Batches:
    """The same masked sequences, packed for mmm and padded for Hugging Face."""

    packed: PackedBatch
    input_ids: torch.Tensor  # (B, max_len) corrupted ids, PAD_ID after each sequence
    attention_mask: torch.Tensor  # (B, max_len) 1 on real tokens
    labels: torch.Tensor  # (B, max_len) original ids at masked positions, -100 elsewhere
    real_tokens: int
    masked_tokens: int


def make_batches(cfg: BenchConfig, seed: int = 0) -> Batches:
    """Draw ``cfg.batch`` sequences of lengths uniform in [max_len/4, max_len] and mask 15% of them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(3, cfg.max_len // 4), cfg.max_len + 1, size=cfg.batch)
    masker = BertRandomMasker(ratio=cfg.mask_ratio, vocab=TokenVocab(cfg.vocab, MASK_ID, SPECIAL_IDS))
    samples: List[MaskedTokens] = []
    for n in lengths:
        body = rng.integers(len(SPECIAL_IDS), cfg.vocab, size=int(n) - 2)
        ids = np.concatenate([[CLS_ID], body, [SEP_ID]]).astype(np.int64)
        word_ids = np.concatenate([[-1], np.arange(body.size), [-1]]).astype(np.int64)
        samples.append(masker(ids, word_ids, rng))
    samples.sort(key=lambda s: -len(s.input_ids))  # pack_masked orders longest first; keep HF rows aligned
    packed = pack_masked(samples)
    input_ids = torch.full((cfg.batch, cfg.max_len), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((cfg.batch, cfg.max_len), dtype=torch.long)
    labels = torch.full((cfg.batch, cfg.max_len), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = torch.from_numpy(s.input_ids)
        attention_mask[i, :n] = 1
        labels[i, torch.from_numpy(s.positions)] = torch.from_numpy(s.labels)
    return Batches(packed, input_ids, attention_mask, labels, int(lengths.sum()), int(packed.targets["text"].count))


# ----------------------------------------------------------------------------- models


def build_mmm(cfg: BenchConfig, seed: int = 0) -> MaskedModel:
    """The mmm BERT at ``cfg``'s dimensions (SDPA attention, tied MLM head)."""
    torch.manual_seed(seed)
    enc = EncoderConfig(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, mlp_hidden=cfg.mlp_hidden, mlp="gelu",
                        norm_first=False, final_norm=False, norm_eps=1e-12, dropout=cfg.dropout,
                        attn_dropout=cfg.dropout, attention="sdpa")
    model_cfg = ModelConfig(encoder=enc, text=TextConfig(max_len=cfg.max_len, position="learned", embed_norm=True))
    embedder = build_text_embedder(model_cfg, cfg.vocab, PAD_ID)
    return build_model(model_cfg, [ObjectiveConfig("mlm", 1.0, {"tie_weights": True})], {"text": embedder})


def build_hf(cfg: BenchConfig):
    """``BertForMaskedLM`` (SDPA attention) at ``cfg``'s dimensions."""
    from transformers import BertConfig, BertForMaskedLM

    hf_cfg = BertConfig(vocab_size=cfg.vocab, hidden_size=cfg.dim, num_hidden_layers=cfg.depth,
                        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_hidden, hidden_act="gelu",
                        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                        max_position_embeddings=cfg.max_len, type_vocab_size=2, layer_norm_eps=1e-12,
                        pad_token_id=PAD_ID, tie_word_embeddings=True, attn_implementation="sdpa")
    model = BertForMaskedLM(hf_cfg)
    return model


def copy_mmm_to_hf(model: MaskedModel, hf: torch.nn.Module) -> None:
    """Load ``model``'s weights into ``hf`` (q/k/v split from the fused ``qkv``; token types zeroed)."""
    d = model.encoder.cfg.dim
    src = model.state_dict()
    dst: Dict[str, torch.Tensor] = {
        "bert.embeddings.word_embeddings.weight": src["embedders.text.tokens.weight"],
        "bert.embeddings.position_embeddings.weight": src["embedders.text.positions.weight"],
        "bert.embeddings.token_type_embeddings.weight": torch.zeros_like(
            hf.bert.embeddings.token_type_embeddings.weight),
        "bert.embeddings.LayerNorm.weight": src["embedders.text.norm.weight"],
        "bert.embeddings.LayerNorm.bias": src["embedders.text.norm.bias"],
        "cls.predictions.bias": src["objectives.mlm.head.bias"],
        "cls.predictions.transform.dense.weight": src["objectives.mlm.head.dense.weight"],
        "cls.predictions.transform.dense.bias": src["objectives.mlm.head.dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": src["objectives.mlm.head.norm.weight"],
        "cls.predictions.transform.LayerNorm.bias": src["objectives.mlm.head.norm.bias"],
    }
    for i in range(len(model.encoder.blocks)):
        m, h = f"encoder.blocks.{i}.", f"bert.encoder.layer.{i}."
        for j, part in enumerate(("query", "key", "value")):
            dst[h + f"attention.self.{part}.weight"] = src[m + "attn.qkv.weight"][j * d:(j + 1) * d]
            dst[h + f"attention.self.{part}.bias"] = src[m + "attn.qkv.bias"][j * d:(j + 1) * d]
        pairs = {"attn.proj": "attention.output.dense", "norm1": "attention.output.LayerNorm",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "norm2": "output.LayerNorm"}
        for a, b in pairs.items():
            dst[h + b + ".weight"] = src[m + a + ".weight"]
            dst[h + b + ".bias"] = src[m + a + ".bias"]
    names = {n for n, _ in hf.named_parameters()}
    missing = names - set(dst)
    if missing:
        raise RuntimeError(f"weight copy does not cover HF parameters {sorted(missing)}")
    with torch.no_grad():
        params = dict(hf.named_parameters())
        for name, value in dst.items():
            params[name].copy_(value)


def mmm_optimizer(model: MaskedModel) -> torch.optim.Optimizer:
    """The AdamW that ``mmm.train.module.MaskedModelingModule`` configures (default OptimConfig)."""
    from mmm.train.module import MaskedModelingModule

    return MaskedModelingModule(model, OptimConfig(), max_steps=1000).configure_optimizers()["optimizer"]


def hf_optimizer(hf: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with the same hyperparameters, decay / no-decay split and fused kernel as mmm's."""
    o = OptimConfig()
    decay, no_decay = [], []
    for name, p in hf.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "position_embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


def mmm_loss(model: MaskedModel, b: Batches) -> torch.Tensor:
    return model(b.packed)[0]


def hf_loss(hf: torch.nn.Module, b: Batches) -> torch.Tensor:
    return hf(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss


def train_step(loss_fn, model: torch.nn.Module, opt: torch.optim.Optimizer, b: Batches) -> float:
    """forward + backward + AdamW step + zero_grad; returns the loss."""
    loss = loss_fn(model, b)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def parity(cfg: BenchConfig, b: Batches, seed: int = 0) -> Dict[str, float]:
    """Both losses in eval mode with identical weights."""
    model, hf = build_mmm(cfg, seed), build_hf(cfg)
    copy_mmm_to_hf(model, hf)
    model.eval()
    hf.eval()
    with torch.no_grad():
        a, h = float(mmm_loss(model, b)), float(hf_loss(hf, b))
    return {"mmm_loss": a, "hf_loss": h, "max_abs_loss_diff": abs(a - h)}


# ----------------------------------------------------------------------------- memory (subprocess)


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def memory_child(cfg: BenchConfig, contender: str, seed: int) -> Dict[str, Optional[float]]:
    """Run in a fresh process: RSS high-water marks of one contender's training step."""
    b = make_batches(cfg, seed)
    # One step of a tiny model of the same kind first, so lazy imports (Lightning for mmm's
    # optimizer, transformers' modeling modules) and one-off allocations are in the baseline.
    tiny = replace(cfg, depth=1, dim=8, heads=1, mlp_hidden=8, vocab=64, batch=2, max_len=8)
    if contender == "mmm":
        m = build_mmm(tiny, seed)
        train_step(mmm_loss, m, mmm_optimizer(m), make_batches(tiny, seed))
    else:
        m = build_hf(tiny)
        train_step(hf_loss, m, hf_optimizer(m), make_batches(tiny, seed))
    del m
    _trim()
    rss0 = _proc_status_kib("VmRSS")
    if contender == "mmm":
        model, loss_fn = build_mmm(cfg, seed), mmm_loss
        opt = mmm_optimizer(model)
    else:
        model, loss_fn = build_hf(cfg), hf_loss
        opt = hf_optimizer(model)
    model.train()
    train_step(loss_fn, model, opt, b)  # allocates AdamW state
    _trim()
    rss1 = _proc_status_kib("VmRSS")
    if rss0 is None or rss1 is None or not _reset_hwm():
        return {"step_peak_mib": None, "total_peak_mib": None}
    train_step(loss_fn, model, opt, b)
    hwm = _proc_status_kib("VmHWM")
    return {"step_peak_mib": (hwm - rss1) / 1024, "total_peak_mib": (hwm - rss0) / 1024}


def measure_memory(cfg: BenchConfig, contender: str, seed: int) -> Dict[str, Optional[float]]:
    if not sys.platform.startswith("linux"):
        return {"step_peak_mib": None, "total_peak_mib": None}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-m", "benchmarks.text_mlm_step", "--_memory-child", contender,
           "--_cfg", json.dumps(asdict(cfg)), "--seed", str(seed), "--threads", str(torch.get_num_threads())]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- timing


def run_config(cfg: BenchConfig, steps: int, warmup: int, seed: int = 0, memory: bool = True,
               log=print) -> Dict[str, Any]:
    """Parity check, interleaved timing and (optionally) memory for one configuration."""
    b = make_batches(cfg, seed)
    check = parity(cfg, b, seed)
    log(f"[{cfg.name}] parity (eval, same weights): mmm loss {check['mmm_loss']:.6f}  "
        f"HF loss {check['hf_loss']:.6f}  max |diff| {check['max_abs_loss_diff']:.2e}")

    model = build_mmm(cfg, seed)
    hf = build_hf(cfg)
    copy_mmm_to_hf(model, hf)
    model.train()
    hf.train()
    contenders = {"mmm": (mmm_loss, model, mmm_optimizer(model)), "hf": (hf_loss, hf, hf_optimizer(hf))}
    times: Dict[str, List[float]] = {k: [] for k in contenders}
    losses: Dict[str, List[float]] = {k: [] for k in contenders}
    for i in range(warmup + steps):
        order = list(contenders) if i % 2 == 0 else list(contenders)[::-1]
        for name in order:
            loss_fn, m, opt = contenders[name]
            t0 = time.perf_counter()
            loss = train_step(loss_fn, m, opt, b)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
                losses[name].append(loss)
        if i >= warmup:
            log(f"[{cfg.name}] step {i - warmup + 1}/{steps}: mmm {times['mmm'][-1] * 1e3:.1f} ms  "
                f"HF {times['hf'][-1] * 1e3:.1f} ms")
    del contenders, model, hf

    result: Dict[str, Any] = {"config": asdict(cfg), "real_tokens": b.real_tokens,
                              "padded_tokens": cfg.batch * cfg.max_len, "masked_tokens": b.masked_tokens,
                              "parity": check, "steps": steps, "warmup": warmup}
    for name in ("mmm", "hf"):
        med = statistics.median(times[name])
        entry = {"median_step_s": med, "step_times_s": times[name], "real_tokens_per_s": b.real_tokens / med,
                 "final_loss": losses[name][-1]}
        if memory:
            entry.update(measure_memory(cfg, name, seed))
        else:
            entry.update({"step_peak_mib": None, "total_peak_mib": None})
        result[name] = entry
    result["speedup_real_tokens_per_s"] = result["mmm"]["real_tokens_per_s"] / result["hf"]["real_tokens_per_s"]
    # Each timed iteration ran both models back to back: the median of those per-pair ratios is
    # less sensitive to load that comes and goes than the ratio of the two medians.
    result["speedup_paired_median"] = statistics.median(h / m for m, h in zip(times["mmm"], times["hf"]))
    result["target_speedup"] = TARGETS.get(cfg.name)
    return result


def markdown(results: Sequence[Dict[str, Any]], env: Dict[str, Any]) -> str:
    def mem(x: Optional[float]) -> str:
        return "n/a" if x is None else f"{x:.0f}"

    lines = [
        f"MLM training step (fwd + bwd + AdamW + zero_grad), fp32, {env['device']}, {env['threads']} threads, "
        f"torch {env['torch']}, transformers {env['transformers']}.",
        "",
        "| config | model | median step (ms) | real tokens/s | step peak (MiB) | total peak (MiB) | "
        "speedup mmm/HF (medians) | per-pair median | target | parity \\|Δloss\\| |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c = r["config"]
        label = (f"{c['name']} ({c['depth']}L d{c['dim']}, V={c['vocab']}, B={c['batch']}, L={c['max_len']}, "
                 f"dropout {c['dropout']})")
        for title, e, first in contender_rows(r, (("mmm", "mmm (packed)"), ("hf", "HF BertForMaskedLM sdpa"))):
            speed = f"**{r['speedup_real_tokens_per_s']:.2f}×**" if first else ""
            paired = f"{r['speedup_paired_median']:.2f}×" if first else ""
            target = (f"≥ {r['target_speedup']}×" if r["target_speedup"] else "") if first else ""
            par = f"{r['parity']['max_abs_loss_diff']:.1e}" if first else ""
            lines.append(f"| {label if first else ''} | {title} | {e['median_step_s'] * 1e3:.1f} | "
                         f"{e['real_tokens_per_s']:.0f} | {mem(e['step_peak_mib'])} | {mem(e['total_peak_mib'])} | "
                         f"{speed} | {paired} | {target} | {par} |")
    lines += [
        "",
        "Real tokens = non-padding tokens of the batch (same for both); HF pads every sequence to max_len and "
        "computes logits at every position. Dropout is the same in both (see config). The speedup is "
        "mmm/HF in real tokens/s: the ratio of the median step times, and the median over timed iterations of "
        "the ratio of the two back-to-back steps. "
        "Step peak = resident-set high-water mark during one step above the resident set before it "
        "(activations, logits, gradients); total peak = above the process after imports "
        "(adds weights and AdamW state). Both are measured in a fresh subprocess per model with "
        "MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the resident set.",
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--config", default="small", choices=[*PRESETS, "all"])
    p.add_argument("--steps", type=at_least(1), default=10, help="timed steps per model")
    p.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps per model first")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default: the preset's)")
    p.add_argument("--max-len", type=int, default=None, help="longest sequence (default: the preset's, 128)")
    p.add_argument("--dropout", type=float, default=None, help="dropout in both models (default 0.1)")
    p.add_argument("--depth", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--dim", type=int, default=None, help="override the preset's width")
    p.add_argument("--heads", type=int, default=None, help="override the preset's head count")
    p.add_argument("--mlp-hidden", type=int, default=None, help="override the preset's MLP hidden size")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (30522)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the per-model memory subprocesses")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the markdown table here")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_cfg", dest="cfg_json", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def configs_from_args(args: argparse.Namespace) -> List[BenchConfig]:
    names = list(PRESETS) if args.config == "all" else [args.config]
    out = []
    for name in names:
        overrides = {k: v for k, v in (("batch", args.batch), ("max_len", args.max_len), ("dropout", args.dropout),
                                       ("depth", args.depth), ("dim", args.dim), ("heads", args.heads),
                                       ("mlp_hidden", args.mlp_hidden), ("vocab", args.vocab)) if v is not None}
        out.append(replace(PRESETS[name], **overrides))
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark; returns the JSON-able result (also written to ``--json`` if given)."""
    args = parse_args(argv)
    return with_threads(args.threads, lambda: _run(args))


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.memory_child:
        cfg = BenchConfig(**json.loads(args.cfg_json))
        print(json.dumps(memory_child(cfg, args.memory_child, args.seed)))
        return {}
    import transformers

    env = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_count": os.cpu_count()}
    results = [run_config(cfg, args.steps, args.warmup, args.seed, memory=not args.no_memory)
               for cfg in configs_from_args(args)]
    table = markdown(results, env)
    report = {"env": env, "results": results, "markdown": table}
    emit(table, report, args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
