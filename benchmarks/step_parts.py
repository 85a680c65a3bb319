"""Where an MLM training step's FLOPs and time go: encoder vs prediction head, mmm vs HF ``BertForMaskedLM``.

:mod:`benchmarks.e2e_pretrain` compares whole runs by achieved GFLOP/s (model FLOPs / time). That
figure mixes two parts that run at very different rates: the encoder (many small GEMMs, attention,
LayerNorm, GELU) and the MLM head, whose vocabulary projection is one large GEMM. HF predicts at
every position, so a third of its tiny step's FLOPs (V = 4096, d = 128) are that efficient GEMM;
mmm predicts at the masked 15 % only. This benchmark splits each side's step into the two parts and
gives each part's own GFLOP/s, so the encoders' FLOP efficiency is compared like for like.

Batches, as the two whole runs see them: mmm's come from its own pipeline on the embedded corpus
(``configs/text_mlm_tiny.yaml``: chunked to 128 tokens, 15 % masked, packed); HF's are ``B`` full
128-token blocks (``run_mlm``'s grouping) with 15 % of positions labelled. Same model size, fp32,
1 thread, dropout 0 (the config's).

Per contender and batch, in CPU time of this thread, interleaved over ``rounds``:

* **step**: forward, loss, backward (no optimizer; it is the same fused AdamW on both sides);
* **encoder**: the embeddings and the encoder, forward and backward from a fixed random gradient
  on its output;
* **head** = step - encoder: the MLM head (mmm: the gather of masked positions, transform, vocabulary
  projection; HF: the same at every position), the loss and their backward.

FLOPs per part come from :func:`benchmarks.flops.step_flops_parts` (encoder = linear + attention).
HF's head time includes the page faults of its large logits tensors under glibc's default
allocator; ``--keep-freed-memory`` removes them (both sides). The last line of the report answers:
at HF's own per-part rates, what would mmm's whole-step GFLOP/s ratio be? That is the ratio that
equally efficient code would show, the reference for the ≥ 1.1× target of issue 18.

Usage::

    python -m benchmarks.step_parts [--size tiny|base] [--batches N] [--rounds R] [--keep-freed-memory] [--micro]
        [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.e2e_pretrain import (DEFAULT_ALLOCATOR, SIZES, _quiet_lightning, bert_config, keep_freed_memory,
                                    load_size_config, model_shape)
from benchmarks.flops import BertShape, step_flops_parts


def mmm_batches(size_name: str, count: int, work: Path):
    """``count`` training batches from the mmm pipeline of the size's config, and its module."""
    from mmm.train.pretrain import build_run

    _quiet_lightning()
    cfg = load_size_config(SIZES[size_name], work / "mmm", threads=1)
    run = build_run(cfg)
    run.datamodule.setup("fit")
    batches = list(itertools.islice(iter(run.datamodule.train_dataloader()), count))
    if len(batches) < count:
        raise RuntimeError(f"the pipeline gave {len(batches)} batches, {count} asked for")
    return cfg, run, batches


def hf_batches(cfg, vocab: int, count: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``count`` batches of ``batch_size`` full blocks of ``max_len`` ids, 15 % of positions labelled."""
    g = torch.Generator().manual_seed(seed)
    b, t = cfg.data.batch_size, cfg.model.text.max_len
    out = []
    for _ in range(count):
        ids = torch.randint(5, vocab, (b, t), generator=g)
        labels = torch.full((b, t), -100)
        chosen = torch.rand(b, t, generator=g) < 0.15
        labels[chosen] = ids[chosen]
        ids = ids.masked_fill(chosen, 4)  # a [MASK]-like id
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(b, t, dtype=torch.long)})
    return out


def _cpu(fn: Callable[[], None]) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def _backward_from_fixed_gradient(hidden: torch.Tensor, cache: Dict[str, torch.Tensor]) -> None:
    """Backward from one random gradient per batch, drawn at the first call and reused after."""
    if "g" not in cache:
        cache["g"] = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    hidden.backward(cache["g"])


def mmm_parts(module, batch) -> Dict[str, Callable[[], None]]:
    """The step and the encoder-only pass of mmm on one packed batch."""
    model = module.model
    module.log = lambda *a, **k: None  # outside a Trainer

    def step() -> None:
        module.zero_grad(set_to_none=True)
        module._common_step(batch, "train").backward()

    grad: Dict[str, torch.Tensor] = {}

    def encoder() -> None:
        module.zero_grad(set_to_none=True)
        _backward_from_fixed_gradient(model.encode(batch), grad)

    return {"step": step, "encoder": encoder}


def hf_parts(model, batch) -> Dict[str, Callable[[], None]]:
    """The step and the encoder-only pass (``model.bert``) of HF on one batch."""
    grad: Dict[str, torch.Tensor] = {}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    def encoder() -> None:
        model.zero_grad(set_to_none=True)
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        _backward_from_fixed_gradient(hidden, grad)

    return {"step": step, "encoder": encoder}


def run(size_name: str = "tiny", batches: int = 12, rounds: int = 3, warmup: int = 2,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Measure both contenders' step and encoder times per batch; returns per-part GFLOP/s."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, mrun, mb = mmm_batches(size_name, batches, Path(tmp))
        vocab = mrun.tokenizer.vocab_size
        shape = model_shape(cfg, vocab)
        torch.manual_seed(cfg.seed)
        hf = BertForMaskedLM(bert_config(cfg, vocab)).train()
        hb = hf_batches(cfg, vocab, batches)
        module = mrun.module.train()
        sides = {"mmm": [mmm_parts(module, b) for b in mb], "hf": [hf_parts(hf, b) for b in hb]}
        flops = {"mmm": [step_flops_parts(shape, b.seq.seqlens, int(b.targets["text"].positions.numel())) for b in mb],
                 # HF projects every position onto the vocabulary (the loss then ignores the unlabelled ones)
                 "hf": [step_flops_parts(shape, [b["input_ids"].shape[1]] * b["input_ids"].shape[0],
                                         b["input_ids"].numel()) for b in hb]}
        for side in sides.values():  # warm-up: allocator, first-call costs
            for parts in side[:warmup]:
                for fn in parts.values():
                    fn()
        times: Dict[str, Dict[str, List[float]]] = {s: {"step": [], "encoder": []} for s in sides}
        for r in range(rounds):
            for s in (("mmm", "hf") if r % 2 == 0 else ("hf", "mmm")):
                for part in ("step", "encoder"):
                    times[s][part].append(sum(_cpu(p[part]) for p in sides[s]))
            log(f"[step_parts] round {r + 1}/{rounds}: " + ", ".join(
                f"{s} step {times[s]['step'][-1]:.2f} s, encoder {times[s]['encoder'][-1]:.2f} s" for s in sides))
    return summarise(shape, flops, times, {"batches": batches, "rounds": rounds, "size": size_name})


def summarise(shape: BertShape, flops: Dict[str, List[Dict[str, int]]], times: Dict[str, Dict[str, List[float]]],
              meta: Dict[str, Any]) -> Dict[str, Any]:
    """Per-part FLOPs, median CPU seconds and GFLOP/s per contender, and the like-for-like ratio."""
    out: Dict[str, Any] = {"shape": shape.__dict__, **meta, "contenders": {}}
    for s, per_batch in flops.items():
        enc = sum(f["linear"] + f["attention"] for f in per_batch)
        head = sum(f["head"] for f in per_batch)
        t_step, t_enc = statistics.median(times[s]["step"]), statistics.median(times[s]["encoder"])
        t_head = t_step - t_enc
        out["contenders"][s] = {
            "flops": {"encoder": enc, "head": head, "step": enc + head},
            "cpu_s": {"step": t_step, "encoder": t_enc, "head": t_head},
            "gflops_per_s": {"step": (enc + head) / t_step / 1e9, "encoder": enc / t_enc / 1e9,
                             "head": head / t_head / 1e9 if t_head > 0 else None},
            # a head far smaller than the timing noise can come out negative: reported as None
            "share_of_time": {"encoder": t_enc / t_step, "head": t_head / t_step if t_head > 0 else None},
            "share_of_flops": {"encoder": enc / (enc + head), "head": head / (enc + head)}}
    m, h = out["contenders"]["mmm"], out["contenders"]["hf"]
    out["ratios"] = {k: m["gflops_per_s"][k] / h["gflops_per_s"][k]
                     for k in ("step", "encoder", "head") if m["gflops_per_s"][k] and h["gflops_per_s"][k]}
    # mmm's FLOPs at HF's per-part rates: the whole-step ratio equally efficient code would show
    rate = h["gflops_per_s"]
    if rate["head"]:
        at_hf = m["flops"]["step"] / (m["flops"]["encoder"] / rate["encoder"] + m["flops"]["head"] / rate["head"])
        out["ratios"]["step_at_hf_part_rates"] = at_hf / rate["step"]
    return out


def markdown(r: Dict[str, Any]) -> str:
    lines = [f"Step parts, {r['size']} ({r['batches']} batches, {r['rounds']} interleaved rounds, median CPU time, 1 thread; "
             f"allocator: {r.get('allocator', DEFAULT_ALLOCATOR)})",
             "", "| contender | part | share of FLOPs | share of time | GFLOP/s | mmm/HF |", "|---|---|---:|---:|---:|---:|"]
    for s in ("mmm", "hf"):
        c = r["contenders"][s]
        for part in ("encoder", "head", "step"):
            share_f = c["share_of_flops"].get(part, 1.0)
            share_t = c["share_of_time"].get(part, 1.0)
            ratio = f"{r['ratios'][part]:.2f}×" if s == "mmm" and part in r["ratios"] else ""
            g = c["gflops_per_s"][part]
            time_cell = "below the noise" if share_t is None else f"{100 * share_t:.0f}%"
            lines.append(f"| {s} | {part} | {100 * share_f:.0f}% | {time_cell} | "
                         f"{'n/a' if g is None else f'{g:.1f}'} | {ratio} |")
    if "step_at_hf_part_rates" in r["ratios"]:
        lines += ["", f"mmm/HF step GFLOP/s if every part of mmm ran at HF's rate for that part: "
                  f"**{r['ratios']['step_at_hf_part_rates']:.2f}×**"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", choices=["tiny", "base"], default="tiny", help="benchmarks.e2e_pretrain's sizes")
    p.add_argument("--micro", action="store_true", help="toy size for the tests (meaningless as a measurement)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc malloc keeps freed memory (benchmarks.e2e_pretrain.keep_freed_memory)")
    p.add_argument("--out", default="runs/bench/step_parts")
    a = p.parse_args(argv)
    if a.batches < 3 or a.rounds < 1:
        p.error(f"--batches must be >= 3 and --rounds >= 1 (got {a.batches}, {a.rounds})")
    allocator = keep_freed_memory() if a.keep_freed_memory else DEFAULT_ALLOCATOR
    r = {**run("micro" if a.micro else a.size, a.batches, a.rounds), "allocator": allocator}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=2), encoding="utf-8")
    md = markdown(r)
    (out / "results.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return r


if __name__ == "__main__":
    main()
