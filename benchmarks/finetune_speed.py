"""Text fine-tuning speed: ``mmm finetune``'s loop vs HF ``Trainer`` on the exported model, one run, same task.

Both fine-tune the same text encoder (``configs/text_mlm_tiny.yaml``'s size, with the WordPiece
tokenizer mmm fits on the embedded corpus; freshly initialised unless ``--source`` gives a
checkpoint or saved encoder, since speed does not depend on the weights) on the embedded
``stdlib-package`` task (:func:`mmm.downstream.tasks.stdlib_package_task`, real docstrings):

* **mmm**: :func:`mmm.downstream.finetune.finetune`, the loop behind ``mmm finetune`` (one seed,
  batch 32, fused AdamW, linear warmup/decay, clipping at 1.0). Its text batches run packed: the
  token ids of a batch are concatenated into one stream that the embedder and the encoder read
  with ``cu_seqlens`` (block-diagonal attention), so it computes on real tokens only. Its last
  block runs for the [CLS] rows alone (MosaicBERT's final-layer subset,
  :mod:`mmm.core.output_rows`; the same logits and gradients);
* **mmm, whole last block**: the same loop with ``FinetuneConfig.cls_last_block=False``, so packing
  is its only saving (the contender the ceiling below is about);
* **HF**: the encoder exported with :func:`mmm.interop.hf.export_hf_bert`, loaded as
  ``BertForSequenceClassification``, trained by ``transformers.Trainer`` with its default dynamic
  padding (``DataCollatorWithPadding``: every batch padded to its longest row), the texts tokenized
  beforehand by the exported tokenizer (as ``dataset.map`` would), same batch size, learning rate,
  weight decay, warmup, clipping and seed.

Dropout is 0 on both sides (the tiny config's setting). Both use the same torch thread count.
The token ids of both sides are compared first (``same_token_ids``: the share of training
texts that both tokenize identically).

**Timing.** Each run trains ``steps`` optimizer steps with no evaluation inside them; the end of
every optimizer step is recorded (mmm: a global ``torch.optim`` step post-hook; HF: the
``Trainer``'s ``on_step_end``), and examples/s is the examples of steps ``skip + 1 …`` over the time
from the end of step ``skip`` to the end of the last one (start-up and the first steps removed).
mmm and HF run back to back ``rounds`` times, alternating which goes first; medians over rounds
(a step's cost follows the lengths in its batch, so the rate of a whole window is the measure, not
a median of per-step rates). The same window is also measured in the process's CPU time
(``time.process_time``; both sides run one torch thread), which leaves out the time spent waiting
for a core on a shared machine.

**Ceiling.** Packing saves at most the padded positions HF computes on: with a share ``p`` of
padded positions in HF's batches (counted on the batches HF trained on in the timed steps), mmm
can be at most ``1 / (1 - p)`` times faster at equal speed per position. The report gives each mmm
loop's ratio, that ceiling and the ratio as a share of it (target ≥ 90%, issue 15). The default loop
can pass the ceiling: its final-layer subset saves work that packing alone cannot.

Usage::

    python -m benchmarks.finetune_speed [--micro] [--rounds R] [--steps N] [--skip K] [--threads T]
        [--source CKPT_OR_ENCODER] [--out DIR]   # DIR/results.json, DIR/results.md (runs/bench/finetune_speed)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from benchmarks.report import at_least, run_in_work_folder
from benchmarks.e2e_pretrain import (CONFIG, DEFAULT_THREADS, MICRO_ENV, environment, load_average, minor_faults,
                                    train_tokenizer)

TARGET_SHARE_OF_CEILING = 0.9
CONTENDERS = ("mmm", "mmm_whole_last_block", "hf")
LABELS = {"mmm": "mmm finetune (packed, last block for [CLS] alone)",
          "mmm_whole_last_block": "mmm finetune (packed, whole last block)",
          "hf": "HF Trainer, BertForSequenceClassification + DataCollatorWithPadding"}


@dataclass
class Size:
    """Model overrides (of ``configs/text_mlm_tiny.yaml``), task size and run length."""

    name: str
    overrides: Dict[str, Any]
    train_per_class: Optional[int]
    eval_per_class: Optional[int]
    batch_size: int
    steps: int
    skip: int
    rounds: int


SIZES: Dict[str, Size] = {
    "tiny": Size("tiny", {}, 150, 50, batch_size=32, steps=40, skip=5, rounds=3),
    "micro": Size("micro", {"model.encoder.dim": 32, "model.encoder.depth": 1, "model.encoder.heads": 2,
                            "model.encoder.mlp_hidden": 64, "model.text.vocab_size": 300,
                            "model.text.tokenizer_train_docs": 50, "model.text.max_len": 64},
                  20, 5, batch_size=8, steps=4, skip=1, rounds=1),
}


# ----------------------------------------------------------------------------- set-up


def build_encoder(size: Size, work: Path, source: Optional[str]) -> Path:
    """A saved mmm text encoder folder: ``source``'s, or a fresh one of the size with the corpus tokenizer."""
    from mmm.config import load_config
    from mmm.encoders import TextEncoder, load_encoder, save_encoder

    out = work / "encoder"
    if source:
        save_encoder(load_encoder(source, "text"), out)
        return out
    cfg = load_config(CONFIG, size.overrides)
    tok = train_tokenizer(cfg, work / "tokenizer")
    torch.manual_seed(0)
    save_encoder(TextEncoder.from_config(cfg.model, tok.vocab_size, tok.pad_id, tok), out)
    return out


def examples_window(ends: List[float], examples: List[int], skip: int) -> Dict[str, float]:
    """Examples/s of steps ``skip + 1 …``, timed from the end of step ``skip`` (``skip`` ≥ 1)."""
    if skip < 1 or len(ends) <= skip or len(examples) < len(ends):
        raise ValueError(f"the timing needs 1 <= skip < steps; got skip {skip}, {len(ends)} step ends, "
                         f"{len(examples)} batches")
    seconds = ends[-1] - ends[skip - 1]
    n = sum(examples[skip:len(ends)])
    step_seconds = [b - a for a, b in zip(ends[skip - 1:-1], ends[skip:])]
    return {"steps": len(ends) - skip, "seconds": seconds, "examples": n, "examples_per_s": n / seconds,
            "step_seconds": step_seconds, "step_examples": list(examples[skip:len(ends)])}


def cpu_window(cpu_ends: List[float], examples: List[int], skip: int) -> Dict[str, float]:
    """Examples per CPU-second of the same window as :func:`examples_window`, from the process's CPU
    time at each step end (``time.process_time``): on a machine other jobs share, waiting for a core
    is not counted, so this rate moves far less with the load than the wall-clock one."""
    w = examples_window(cpu_ends, examples, skip)
    return {"cpu_seconds": w["seconds"], "examples_per_cpu_s": w["examples_per_s"]}


def faults_window(fault_ends: List[Optional[int]], skip: int) -> Dict[str, Optional[float]]:
    """The process's minor page faults per timed step (steps ``skip + 1 …``; None where not counted)."""
    if len(fault_ends) <= skip or fault_ends[-1] is None or fault_ends[skip - 1] is None:
        return {"minor_faults_per_step": None}
    return {"minor_faults_per_step": (fault_ends[-1] - fault_ends[skip - 1]) / (len(fault_ends) - skip)}


def padding_share(batches: Sequence[Dict[str, int]]) -> float:
    """Padded positions / all positions over padded batches (``rows``, ``width``, ``real``)."""
    total = sum(b["rows"] * b["width"] for b in batches)
    return 1.0 - sum(b["real"] for b in batches) / total


# ----------------------------------------------------------------------------- the two loops


def run_mmm(size: Size, encoder_dir: Path, splits, threads: int, cls_last_block: bool = True) -> Dict[str, Any]:
    """One seed of :func:`mmm.downstream.finetune.finetune` for ``size.steps`` steps, timed
    (``cls_last_block``: :attr:`~mmm.downstream.finetune.FinetuneConfig.cls_last_block`)."""
    from mmm.downstream.finetune import FinetuneConfig, finetune
    from mmm.encoders import load_encoder

    batches: List[Dict[str, int]] = []
    ends: List[float] = []
    cpu_ends: List[float] = []

    def record_batch(module, args):
        if module.training:  # dev scoring runs in eval mode
            seq = args[1]  # the packed layout the Transformer reads; width = the batch's longest row
            batches.append({"rows": seq.batch_size, "width": seq.max_seqlen, "real": seq.num_tokens})

    def fresh_encoder():
        enc = load_encoder(str(encoder_dir), "text")
        enc.encoder.register_forward_pre_hook(record_batch)
        return enc

    fresh_encoder.__name__ = str(encoder_dir)
    per_epoch = math.ceil(len(splits["train"].inputs) / size.batch_size)
    cfg = FinetuneConfig(batch_size=size.batch_size, epochs=size.steps // per_epoch + 1, max_steps=size.steps,
                         eval_every=size.steps + 1, dropout=0.0, seeds=1,  # no dev scoring inside the run
                         cls_last_block=cls_last_block)
    torch.set_num_threads(threads)
    fault_ends: List[Optional[int]] = []
    hook = register_optimizer_step_post_hook(lambda *_: (ends.append(time.perf_counter()),
                                                         cpu_ends.append(time.process_time()),
                                                         fault_ends.append(minor_faults())))
    try:
        finetune(fresh_encoder, "text", splits["train"], splits["dev"], cfg=cfg, device="cpu", log=lambda _: None)
    finally:
        hook.remove()
    if len(ends) != size.steps:
        raise RuntimeError(f"mmm fine-tuning took {len(ends)} optimizer steps, expected {size.steps}")
    return {**examples_window(ends, [b["rows"] for b in batches], size.skip),
            **cpu_window(cpu_ends, [b["rows"] for b in batches], size.skip), **faults_window(fault_ends, size.skip),
            "batches": batches[:size.steps]}


def hf_features(hf_dir: Path, splits, labels: List[int], max_len: int):
    """The training split tokenized by the exported tokenizer (truncated to the position table) + labels."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    enc = tok(list(splits["train"].inputs), truncation=True, max_length=max_len)
    rows = [{k: enc[k][i] for k in enc.keys()} for i in range(len(splits["train"].inputs))]
    for row, y in zip(rows, labels):
        row["labels"] = int(y)
    return tok, rows


def run_hf(size: Size, hf_dir: Path, tok, rows, num_labels: int, work: Path, threads: int, tag: str) -> Dict[str, Any]:
    """One ``Trainer`` run of ``size.steps`` steps on the exported model, timed."""
    from transformers import (BertForSequenceClassification, DataCollatorWithPadding, PrinterCallback, Trainer,
                              TrainerCallback, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from mmm.downstream.finetune import FinetuneConfig

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    batches: List[Dict[str, int]] = []
    ends: List[float] = []
    cpu_ends: List[float] = []
    fault_ends: List[Optional[int]] = []
    pad = DataCollatorWithPadding(tok)

    def collate(features):
        batch = pad(features)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        batches.append({"rows": int(ids.shape[0]), "width": int(ids.shape[1]), "real": int(mask.sum())})
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
            fault_ends.append(minor_faults())

    f = FinetuneConfig()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(hf_dir), num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0)
    args = TrainingArguments(
        output_dir=str(work / f"hf_{tag}"), per_device_train_batch_size=size.batch_size, max_steps=size.steps,
        learning_rate=f.lr, weight_decay=f.weight_decay, warmup_steps=int(round(f.warmup * size.steps)),
        lr_scheduler_type="linear", max_grad_norm=f.max_grad_norm, save_strategy="no", eval_strategy="no",
        report_to="none", seed=0, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    if len(ends) != size.steps:
        raise RuntimeError(f"HF fine-tuning took {len(ends)} optimizer steps, expected {size.steps}")
    return {**examples_window(ends, [b["rows"] for b in batches], size.skip),
            **cpu_window(cpu_ends, [b["rows"] for b in batches], size.skip), **faults_window(fault_ends, size.skip),
            "batches": batches[:size.steps], "optimizer": str(args.optim)}


# ----------------------------------------------------------------------------- one comparison


def run(size: Size, threads: int, work: Path, source: Optional[str] = None,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The three loops, ``size.rounds`` back-to-back rounds; returns ratios, padding share and ceiling."""
    from mmm.downstream.data import Labels, encode_labels
    from mmm.downstream.inputs import load_adapter
    from mmm.downstream.tasks import stdlib_package_task
    from mmm.interop.hf import export_hf_bert

    torch.set_num_threads(threads)
    encoder_dir = build_encoder(size, work, source)
    hf_dir = export_hf_bert(encoder_dir, work / "hf")
    splits = stdlib_package_task(size.train_per_class, size.eval_per_class)
    labels = Labels.fit(splits["train"], "classification")
    adapter = load_adapter(str(encoder_dir), "text")
    tok, rows = hf_features(hf_dir, splits, encode_labels(splits["train"], labels), adapter.max_len)
    mmm_ids = [adapter.prepare(x).tolist() for x in splits["train"].inputs]
    same = sum(a == r["input_ids"] for a, r in zip(mmm_ids, rows)) / len(rows)
    log(f"[{size.name}] stdlib-package: {len(rows)} training texts, {labels.num_classes} classes; "
        f"identical token ids on {100 * same:.1f}% of them")
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in CONTENDERS}
    for r in range(size.rounds):
        for name in CONTENDERS[r % 3:] + CONTENDERS[:r % 3]:  # each goes first, second and third in turn
            if name != "hf":
                res = run_mmm(size, encoder_dir, splits, threads, cls_last_block=name == "mmm")
            else:
                res = run_hf(size, hf_dir, tok, rows, labels.num_classes, work, threads, f"r{r}")
            res["load_average_after"] = load_average()
            runs[name].append(res)
            log(f"[{size.name}] round {r + 1}/{size.rounds} {name}: {res['examples_per_s']:.1f} examples/s "
                f"(load average {res['load_average_after']})")
    timed = {name: [b for x in rs for b in x["batches"][size.skip:]] for name, rs in runs.items()}
    share = padding_share(timed["hf"])
    ceiling = 1.0 / (1.0 - share)
    rate = {n: statistics.median(x["examples_per_s"] for x in rs) for n, rs in runs.items()}
    cpu_rate = {n: statistics.median(x["examples_per_cpu_s"] for x in rs) for n, rs in runs.items()}
    out: Dict[str, Any] = {
        "size": size.name, "task": "stdlib-package", "train_examples": len(rows), "classes": labels.num_classes,
        "same_token_ids": same, "batch_size": size.batch_size, "steps": size.steps, "skip": size.skip,
        "rounds": size.rounds, "threads": threads, "encoder": json.loads((encoder_dir / "mmm_encoder.json").read_text()),
        "source": source or "fresh initialisation", "contenders": LABELS,
        "hf": {"examples_per_s": rate["hf"], "examples_per_cpu_s": cpu_rate["hf"], "runs": runs["hf"],
               "padding_share_computed": share, "optimizer": runs["hf"][0]["optimizer"]},
        "load_averages_after_runs": {n: [x["load_average_after"] for x in rs] for n, rs in runs.items()},
        "minor_faults_per_step": {n: (statistics.median(x["minor_faults_per_step"] for x in rs)
                                      if all(x["minor_faults_per_step"] is not None for x in rs) else None)
                                  for n, rs in runs.items()},
        "ceiling": ceiling, "target_share_of_ceiling": TARGET_SHARE_OF_CEILING,
    }
    for name in CONTENDERS[:2]:
        ratio, cpu_ratio = rate[name] / rate["hf"], cpu_rate[name] / cpu_rate["hf"]
        out[name] = {
            "examples_per_s": rate[name], "examples_per_cpu_s": cpu_rate[name], "runs": runs[name],
            "padding_share_computed": 0.0, "padding_share_in_batches": padding_share(timed[name]),
            "ratio": ratio, "cpu_ratio": cpu_ratio, "share_of_ceiling": ratio / ceiling,
            "cpu_share_of_ceiling": cpu_ratio / ceiling, "reaches_target": ratio / ceiling >= TARGET_SHARE_OF_CEILING,
            "paired_ratio": statistics.median(a["examples_per_s"] / b["examples_per_s"]
                                              for a, b in zip(runs[name], runs["hf"])),
        }
        log(f"[{size.name}] {LABELS[name]}: {ratio:.2f}x HF examples/s; HF computes {100 * share:.1f}% padding, "
            f"ceiling {ceiling:.2f}x; {100 * ratio / ceiling:.0f}% of it (per CPU-second: {cpu_ratio:.2f}x, "
            f"{100 * cpu_ratio / ceiling:.0f}%)")
    out["subset_speedup"] = rate["mmm"] / rate["mmm_whole_last_block"]
    return out


def markdown(r: Dict[str, Any], env: Dict[str, Any]) -> str:
    e = r["encoder"]["model"]["encoder"]
    load = env.get("load_average")
    lines = [f"Text fine-tuning on `{r['task']}` ({r['train_examples']} training texts, {r['classes']} classes), "
             f"encoder {e['depth']}L d{e['dim']} ({r['source']}), batch {r['batch_size']}, steps "
             f"{r['skip'] + 1}–{r['steps']} of each run timed, {r['rounds']} rounds, {env['threads']} torch thread(s), "
             f"torch {env['torch']}, transformers {env['transformers']}"
             + (f", load average {load[0]:.2f} at the start" if load else "") + ".", "",
             "| contender | examples/s | padded positions computed | mmm/HF (paired) | ceiling 1/(1−p) "
             "| share of ceiling |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in CONTENDERS[:2]:
        m = r[name]
        lines.append(f"| {LABELS[name]} | {m['examples_per_s']:.1f} | 0% | **{m['ratio']:.2f}×** "
                     f"({m['paired_ratio']:.2f}×) | {r['ceiling']:.2f}× | **{100 * m['share_of_ceiling']:.0f}%** "
                     f"({'≥' if m['reaches_target'] else '<'} {100 * r['target_share_of_ceiling']:.0f}% target) |")
    lines += [f"| {LABELS['hf']} | {r['hf']['examples_per_s']:.1f} | {100 * r['hf']['padding_share_computed']:.1f}% "
              "| | | |", "",
              f"Per CPU-second of the process (wall-clock waits for a core left out): "
              + ", ".join(f"{n} {r[n]['examples_per_cpu_s']:.1f}" for n in CONTENDERS) + " examples; "
              + "; ".join(f"{n}/HF **{r[n]['cpu_ratio']:.2f}×** ({100 * r[n]['cpu_share_of_ceiling']:.0f}% of the "
                          f"ceiling)" for n in CONTENDERS[:2]) + ". "
              f"The last block for [CLS] alone is {r['subset_speedup']:.2f}× the whole last block.", ""]
    faults = r.get("minor_faults_per_step") or {}
    if all(faults.get(n) is not None for n in CONTENDERS):
        lines += [f"Minor page faults per timed step (the process; median over rounds): mmm {faults['mmm']:,.0f}, "
                  f"whole last block {faults['mmm_whole_last_block']:,.0f}, "
                  f"HF {faults['hf']:,.0f}.", ""]
    lines.append(
        f"Identical token ids on both sides for {100 * r['same_token_ids']:.1f}% of the training texts. "
        "The ceiling bounds what packing alone saves; the default loop also runs the last block for [CLS] alone, "
        "so it can pass it. "
        "Examples/s: all timed examples over all timed time of a run, median over rounds (a step's cost "
        "follows its batch's lengths, so per-step rates are not medians of one quantity); paired: the median "
        "of the rounds' mmm/HF ratios. p = share of padded positions in the "
        "batches HF trained on in the timed steps. Load average (1 min) after each run: "
        + "; ".join(f"{n} " + ", ".join(str(x) for x in r["load_averages_after_runs"][n]) for n in CONTENDERS) + ".")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro", action="store_true", help="toy sizes for tests (also $MMM_BENCH_MICRO=1)")
    p.add_argument("--rounds", type=at_least(1), default=None)
    p.add_argument("--steps", type=at_least(2), default=None)
    p.add_argument("--skip", type=at_least(1), default=None)
    p.add_argument("--threads", type=at_least(1), default=None, help="torch threads for both (default 1)")
    p.add_argument("--source", default=None, help="an mmm checkpoint or saved encoder (default: fresh weights)")
    p.add_argument("--out", default="runs/bench/finetune_speed")
    p.add_argument("--work", default=None, help="folder for the encoder, export and runs (default: temporary)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the comparison; writes ``results.json`` and ``results.md`` to ``--out`` and returns the report."""
    args = parse_args(argv)
    micro = args.micro or os.environ.get(MICRO_ENV, "") not in ("", "0")
    size = SIZES["micro" if micro else "tiny"]
    changes = {k: v for k, v in (("rounds", args.rounds), ("steps", args.steps), ("skip", args.skip)) if v is not None}
    size = Size(**{**asdict(size), **changes})
    if not 1 <= size.skip < size.steps:
        raise SystemExit(f"--skip must be in [1, steps); got {size.skip} with {size.steps} steps")
    threads = args.threads or DEFAULT_THREADS
    before = torch.get_num_threads()
    env = environment(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_in_work_folder("mmm_ftspeed_", args.work and Path(args.work),
                                lambda folder: run(size, threads, folder, args.source, log), env, before)
    table = markdown(result, env)
    report = {"benchmark": "finetune_speed", "env": env, "result": result, "markdown": table}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    log("")
    log(table)
    return report


if __name__ == "__main__":
    main()
