"""Whole pretraining runs: ``mmm pretrain`` (Lightning, packed) vs HF ``Trainer`` with ``run_mlm``'s recipe.

A user compares training runs, not model steps. This benchmark runs both whole training loops
on the CPU, data loading included, on the same corpus with the same tokenizer and a model of the
same size:

* **mmm**: :func:`mmm.train.pretrain.build_run` + ``trainer.fit`` on ``configs/text_mlm_tiny.yaml``
  as a user runs it (the embedded corpus streamed from its shards, tokenized, chunked to 128
  tokens, masked 80/10/10 at 15% and packed in a DataLoader worker; the MLM head on the masked
  positions only; Lightning with the config's logging, throughput and LR callbacks), with
  validation off and the tokenizer below;
* **HF**: ``transformers.Trainer`` with the recipe of its ``run_mlm.py`` example: every training
  text tokenized with [CLS] … [SEP], all concatenated and cut into full 128-token blocks (no
  padding; the remainder dropped), ``DataCollatorForLanguageModeling`` at 15%, a
  ``BertForMaskedLM`` (SDPA) of the same size, vocabulary and dropout, with the same AdamW
  hyper-parameters, schedule and gradient clipping (HF's default fused AdamW; mmm's default is
  fused AdamW too).

Both use the WordPiece tokenizer mmm trains on the embedded corpus (``model.text.vocab_size``
pieces asked for; the table gives the size it reached) and the same torch thread count
(``--threads``, default 1). mmm keeps the config's one DataLoader worker process (on a 2-core
machine it has the second core to itself at 1 thread); HF keeps ``Trainer``'s default of
collating in the training process (``dataloader_num_workers=0``; its data work per step is the
collator's masking of ready-made blocks).

**Timing.** Each run trains ``steps`` optimizer steps; a clock records the end of every step
(Lightning's ``on_train_batch_end`` / the ``Trainer``'s ``on_step_end``). Start-up (building the
run, tokenizing HF's corpus, DataLoader workers, the first steps) is removed by timing steps
``skip + 1 … steps`` only; a step's time runs from the end of the step before it to its own end
(fetching its batch included). A step ends before its checkpoint is written, so mmm's final
``last.ckpt`` (written inside the last step) is left out, as a user's HF ``save_model`` after
``train()`` is (:func:`add_before_checkpoints`). The two contenders run back to back, ``rounds`` times,
alternating which goes first. Real tokens/s and GFLOP/s are the medians over every timed step of
every round (robust to a neighbour's job on a shared machine); the *window mean* beside them is
all timed tokens over all timed time of a run (median over rounds), what an undisturbed run gets
including rare slow steps. On a machine shared with other jobs the wall clock of a step is
mostly waiting for a core, so every step also records the training thread's CPU time
(``time.thread_time``; one torch thread runs every op in that thread): GFLOP/s per CPU-second is
the same comparison without the waiting. It leaves out mmm's DataLoader worker (another process,
on another core when the machine is quiet) and keeps HF's collation (in the training thread).

**FLOPs.** :mod:`benchmarks.flops` counts each step's model FLOPs from its batch (mmm: its
sequence lengths and masked count; HF: ``B`` blocks of 128, logits at every position). Achieved
GFLOP/s = those FLOPs over the same time. The **matmul limit** is this machine's GEMM rate (fp32, or
bf16 with ``--precision bf16-mixed``) on exactly the matrix products of that contender's step (every linear layer's forward,
input-gradient and weight-gradient product at its median batch, each timed alone with ``torch.mm``,
the fastest of a few calls, same threads, in the same run; attention's batched products left out): how fast the step would
go if it did nothing but its GEMMs. ``% of limit`` says how far each side is from it.

**Where mmm's time goes.** The mmm clock also splits every timed step at Lightning's hooks:
forward (``training_step``: model forward, loss, ``self.log``), backward, optimizer (gradient
clipping + fused AdamW), after the step (LR scheduler, callbacks' batch-end hooks) and between
steps (the next batch from the DataLoader worker, moving it, Lightning's loop and its logger).

**Page faults.** Each step also records the process's minor page faults. With glibc's default
settings a large tensor (HF's (B, T, V) logits are 67 MB at tiny) is ``mmap``-ed afresh every step
and the kernel zero-fills it a page at a time on first touch, which is slow inside a virtual
machine and varies with the host. ``--keep-freed-memory`` makes malloc keep freed memory for reuse
(:func:`keep_freed_memory`, both contenders alike), so the comparison is of the two training loops'
own work; the default leaves the allocator as a user has it.

**Precision.** fp32 by default. ``--precision bf16-mixed`` runs both sides under bf16 autocast
(mmm's ``trainer.precision: bf16-mixed``, HF ``Trainer``'s ``bf16=True``; on the CPU both are
``torch.autocast("cpu", torch.bfloat16)``): weights, optimizer state and gradients stay fp32, the
linear layers multiply in bf16 (AMX or AVX-512-BF16 kernels where the CPU has them). The
issue-18 targets (:data:`TARGETS`) were set for the fp32 comparison, so a bf16 report shows none.

Sizes: ``tiny`` (the config as it is), ``base`` (BERT-base: 12 × 768, 12 heads, MLP 3072,
vocabulary 30522 asked for, of which the embedded corpus yields about 8.7k pieces; dropout 0.1;
batch 8; short runs), ``micro`` (toy sizes for the tests, meaningless as a measurement; also under
``$MMM_BENCH_MICRO``). ``--quick`` runs tiny only.

Usage::

    python -m benchmarks.e2e_pretrain [--quick | --sizes tiny,base] [--rounds R] [--threads T]
        [--keep-freed-memory] [--precision 32-true|bf16-mixed] [--out DIR]   # writes DIR/results.json and DIR/results.md (default runs/bench/e2e_pretrain)
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from benchmarks.report import at_least, run_in_work_folder
from benchmarks.flops import BertShape, gemm_flops, gemm_shapes, step_flops

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "text_mlm_tiny.yaml"
MICRO_ENV = "MMM_BENCH_MICRO"
DEFAULT_THREADS = 1
"""torch threads of both contenders unless ``--threads`` says otherwise: one compute thread gives steady
ratios on a small shared machine (a preempted OpenMP thread stalls every parallel op)."""
TARGETS = {"tiny": 1.1, "base": 1.0}
"""mmm / HF achieved GFLOP/s wanted (issue 18, set for the fp32 comparison)."""
PRECISIONS = {"32-true": "fp32", "bf16-mixed": "bf16 autocast (bf16-mixed)"}
"""``--precision`` values (Lightning's names; HF ``Trainer`` gets ``bf16=True`` for ``bf16-mixed``) and their
report labels."""
GEMM_DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}
"""The dtype a precision's linear layers multiply in: what the matmul limit times."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``bfloat16``: how results and reports name a dtype."""
    return str(dtype).replace("torch.", "")


@dataclass
class Size:
    """One comparison: mmm config overrides (HF follows them) and how long to run."""

    name: str
    overrides: Dict[str, Any]
    steps: int  # optimizer steps per run
    skip: int  # leading steps left out of the timing (start-up)
    rounds: int  # mmm/HF run pairs, alternating order
    matmul_repeats: int = 5


BASE = {"model.encoder.dim": 768, "model.encoder.depth": 12, "model.encoder.heads": 12,
        "model.encoder.mlp_hidden": 3072, "model.encoder.dropout": 0.1, "model.encoder.attn_dropout": 0.1,
        "model.text.vocab_size": 30522, "data.batch_size": 8}
MICRO = {"model.encoder.dim": 32, "model.encoder.depth": 1, "model.encoder.heads": 2, "model.encoder.mlp_hidden": 64,
         "model.text.vocab_size": 300, "model.text.tokenizer_train_docs": 50, "model.text.max_len": 32,
         "data.batch_size": 4, "data.shuffle_buffer": 0, "data.num_workers": 0}
SIZES: Dict[str, Size] = {
    "tiny": Size("tiny", {}, steps=50, skip=10, rounds=3),
    "base": Size("base", BASE, steps=10, skip=2, rounds=2, matmul_repeats=3),
    "micro": Size("micro", MICRO, steps=4, skip=1, rounds=1, matmul_repeats=1),
}


# ----------------------------------------------------------------------------- set-up


def load_size_config(size: Size, run_dir: Path, threads: int, tokenizer_dir: Optional[Path] = None,
                     precision: str = "32-true"):
    """``configs/text_mlm_tiny.yaml`` with the size's overrides, for one benchmark run on the CPU."""
    from mmm.config import load_config

    overrides = {**size.overrides, "trainer.default_root_dir": str(run_dir), "trainer.max_steps": size.steps,
                 "trainer.accelerator": "cpu", "trainer.enable_progress_bar": False, "trainer.threads": threads,
                 "trainer.precision": precision, "data.val": None}
    if tokenizer_dir is not None:
        overrides["model.text.tokenizer_path"] = str(tokenizer_dir)
    return load_config(CONFIG, overrides)


def train_tokenizer(cfg, out_dir: Path):
    """The WordPiece tokenizer an mmm run of ``cfg`` fits on the embedded training corpus, saved to ``out_dir``."""
    import itertools

    import datasets_def  # noqa: F401  (registers the dataset definitions)
    from datasets_def.text import iter_texts
    from mmm.registry import TOKENIZERS
    from mmm.train.tasks import resolve_shards

    t = cfg.model.text
    urls = resolve_shards(cfg.data.train, cfg.data.dataset, "train")
    texts = itertools.islice(iter_texts(urls), t.tokenizer_train_docs)
    tok = TOKENIZERS.create(t.tokenizer, texts=texts, vocab_size=t.vocab_size, lowercase=t.lowercase)
    tok.save(out_dir)
    return tok


def training_texts(cfg) -> List[str]:
    """Every text of the corpus's training split (what both contenders train on)."""
    import datasets_def  # noqa: F401
    from datasets_def.text import iter_texts
    from mmm.train.tasks import resolve_shards

    return list(iter_texts(resolve_shards(cfg.data.train, cfg.data.dataset, "train")))


def hf_tokenizer(tok):
    """The mmm tokenizer as a ``transformers`` fast tokenizer (same vocabulary, same [CLS]/[SEP] template)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer, model_max_length=10**9,
                                   **{f"{role}_token": token for role, token in tok.roles.items()})


def group_texts(hf_tok, texts: Sequence[str], block: int) -> List[Dict[str, List[int]]]:
    """``run_mlm.py``'s preprocessing: tokenize with special tokens, concatenate, cut full ``block``-token blocks."""
    enc = hf_tok(list(texts), return_special_tokens_mask=True)
    keys = [k for k in enc.keys()]
    joined = {k: [x for row in enc[k] for x in row] for k in keys}
    total = (len(joined["input_ids"]) // block) * block
    return [{k: joined[k][i:i + block] for k in keys} for i in range(0, total, block)]


def bert_config(cfg, vocab: int):
    """An HF ``BertConfig`` of the mmm model's size (post-LN BERT, GELU, learned positions)."""
    from transformers import BertConfig

    e, t = cfg.model.encoder, cfg.model.text
    return BertConfig(vocab_size=vocab, hidden_size=e.dim, num_hidden_layers=e.depth, num_attention_heads=e.heads,
                      intermediate_size=e.mlp_hidden, hidden_act="gelu", hidden_dropout_prob=e.dropout,
                      attention_probs_dropout_prob=e.attn_dropout, max_position_embeddings=t.max_len,
                      layer_norm_eps=e.norm_eps, type_vocab_size=2, tie_word_embeddings=True,
                      attn_implementation="sdpa")


def model_shape(cfg, vocab: int) -> BertShape:
    e = cfg.model.encoder
    if e.final_layer_subset:  # the FLOP count passes every token through every block
        raise ValueError("e2e_pretrain counts every token through every block: run it with "
                         "model.encoder.final_layer_subset: false")
    return BertShape(dim=e.dim, depth=e.depth, mlp_hidden=e.mlp_hidden, vocab=vocab)


# ----------------------------------------------------------------------------- clocks


def _mmm_clock(shape: BertShape):
    """A Lightning callback recording every step's end, tokens, FLOPs and its split at the hooks."""
    import lightning as L

    class MmmClock(L.Callback):
        def __init__(self) -> None:
            self.steps: List[Dict[str, Any]] = []
            self._t: Dict[str, float] = {}
            self._handle = None

        def on_train_start(self, trainer, pl_module) -> None:
            opt = trainer.optimizers[0]
            self._handle = opt.register_step_post_hook(lambda *_: self._mark("opt_end"))

        def on_train_end(self, trainer, pl_module) -> None:
            if self._handle is not None:
                self._handle.remove()

        def _mark(self, name: str) -> None:
            self._t[name] = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._mark("start")

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            self._mark("backward")

        def on_after_backward(self, trainer, pl_module) -> None:
            self._mark("after_backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            end = time.perf_counter()
            t = self._t
            seqlens = list(batch.seq.seqlens)
            predicted = int(batch.targets["text"].count)
            self.steps.append(dict(
                end=end, cpu=time.thread_time(), faults=minor_faults(), start=t["start"], tokens=int(batch.num_tokens),
                predicted=predicted,
                flops=step_flops(shape, seqlens, predicted),
                forward=t["backward"] - t["start"], backward=t["after_backward"] - t["backward"],
                optimizer=t["opt_end"] - t["after_backward"], after_step=end - t["opt_end"]))
            self._t = {}

    return MmmClock()


def _hf_clock(flops_per_step: int, tokens_per_step: int):
    from transformers import TrainerCallback

    class HfClock(TrainerCallback):
        def __init__(self) -> None:
            self.steps: List[Dict[str, Any]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(dict(end=time.perf_counter(), cpu=time.thread_time(), faults=minor_faults(),
                                   tokens=tokens_per_step, flops=flops_per_step))

    return HfClock()


def minor_faults() -> Optional[int]:
    """Minor page faults of this process so far (None where the OS does not count them). A fresh
    allocation that glibc serves with ``mmap`` (large tensors, by default) is zero-filled by the kernel
    one page at a time on first touch, and each such fault is costly inside a virtual machine."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

DEFAULT_ALLOCATOR = "glibc default (large tensors mmapped, freed memory returned)"
"""How the report names an allocator left as the user has it (:func:`keep_freed_memory` otherwise)."""


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel, so a step's
    large tensors stop costing page faults (``mallopt``: no ``mmap`` below 1 GiB, no heap trimming).
    Applies to this process from now on, both contenders alike; returns what it set. Call it before
    the process allocates large tensors. glibc still serves a request by ``mmap`` when its heap cannot
    grow in place (the address-space layout differs from run to run), so the effect is not certain:
    the report's page faults per step show whether it took (16 per HF step instead of 70k at tiny
    when it did).

    Raises:
        RuntimeError: not a glibc system (the allocator cannot be tuned this way).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        raise RuntimeError(f"--keep-freed-memory tunes glibc's malloc; this is {platform.system()} "
                           f"(C library: {name or 'not found'})")
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        raise RuntimeError(f"--keep-freed-memory: the C library {name} has no mallopt (not glibc)")
    ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    if not ok:
        raise RuntimeError(f"--keep-freed-memory: mallopt refused the settings on {name}")
    return "glibc malloc keeps freed memory (mallopt M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB)"


def window(steps: List[Dict[str, Any]], skip: int) -> Dict[str, Any]:
    """Throughput of steps ``skip + 1 …`` timed from the end of step ``skip`` (``skip`` ≥ 1)."""
    if skip < 1 or len(steps) <= skip:
        raise ValueError(f"the timing needs 1 <= skip < steps recorded; got skip {skip}, {len(steps)} steps")
    timed, previous = steps[skip:], steps[skip - 1:-1]
    seconds = timed[-1]["end"] - previous[0]["end"]
    tokens = sum(s["tokens"] for s in timed)
    flops = sum(s["flops"] for s in timed)
    out = {"steps": len(timed), "seconds": seconds, "tokens": tokens, "flops": flops,
           "tokens_per_s": tokens / seconds, "gflops_per_s": flops / seconds / 1e9, "flops_per_token": flops / tokens,
           "tokens_per_step": statistics.median(s["tokens"] for s in timed),
           "step_seconds": [s["end"] - p["end"] for s, p in zip(timed, previous)],
           "step_tokens": [s["tokens"] for s in timed], "step_flops": [s["flops"] for s in timed]}
    if timed[0].get("faults") is not None:  # the process's minor page faults per timed step
        out["minor_faults_per_step"] = (timed[-1]["faults"] - previous[0]["faults"]) / len(timed)
    if "cpu" in timed[0]:  # the training thread's CPU time per step (what a step costs without waiting for a core)
        out["step_cpu_seconds"] = [s["cpu"] - p["cpu"] for s, p in zip(timed, previous)]
    if "predicted" in timed[0]:  # mmm: masked positions per step and the split at Lightning's hooks
        out["predicted_per_step"] = statistics.median(s["predicted"] for s in timed)
        split = {p: sum(s[p] for s in timed) for p in ("forward", "backward", "optimizer", "after_step")}
        split["between_steps"] = sum(s["start"] - p["end"] for s, p in zip(timed, previous))
        out["split_s"] = split
    return out


# ----------------------------------------------------------------------------- the two runs


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning.*")


def watch_linear_dtype(model: torch.nn.Module) -> Dict[str, str]:
    """The dtype the model's first linear layer computes in, seen at its first call (``{"dtype": ...}`` once it has
    run): ``float32``, or ``bfloat16`` where autocast is on, so a report shows what precision each side really ran."""
    seen: Dict[str, str] = {}
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def hook(module, inputs, output) -> None:
        seen["dtype"] = dtype_name(output.dtype)
        handle.remove()

    handle = linear.register_forward_hook(hook)
    return seen


def add_before_checkpoints(trainer, clock) -> None:
    """Add ``clock`` to ``trainer``'s callbacks ahead of its checkpoint callbacks, so a step's end is taken before a
    checkpoint of that step is written: the final step's ``last.ckpt`` (:class:`mmm.train.callbacks.RunCheckpoint`
    writes it inside the loop) is then outside the timing, as HF's ``save_model`` after ``train()`` is. A periodic
    checkpoint inside the window still counts, as the next step's time."""
    from lightning.pytorch.callbacks import Checkpoint

    callbacks = trainer.callbacks
    first = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
    callbacks.insert(first, clock)


def run_mmm(size: Size, work: Path, threads: int, tokenizer_dir: Path, shape: BertShape, tag: str,
            precision: str = "32-true") -> Dict[str, Any]:
    """One mmm pretraining run of ``size.steps`` steps; returns its timed window."""
    from mmm.train.pretrain import build_run

    _quiet_lightning()
    cfg = load_size_config(size, work / f"mmm_{tag}", threads, tokenizer_dir, precision)
    run = build_run(cfg)
    if run.tokenizer.vocab_size != shape.vocab:
        raise RuntimeError(f"mmm run has vocabulary {run.tokenizer.vocab_size}, expected {shape.vocab}")
    clock = _mmm_clock(shape)
    add_before_checkpoints(run.trainer, clock)
    computed = watch_linear_dtype(run.module.model)
    torch.set_float32_matmul_precision("high")  # as mmm.train.pretrain.pretrain (no effect on CPU fp32)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    if len(clock.steps) != size.steps:
        raise RuntimeError(f"mmm trained {len(clock.steps)} steps, expected {size.steps}")
    return {**window(clock.steps, size.skip), "linear_dtype": computed.get("dtype")}


def run_hf(size: Size, work: Path, threads: int, cfg, blocks, hf_tok, shape: BertShape, tag: str,
           precision: str = "32-true") -> Dict[str, Any]:
    """One HF ``Trainer`` run of ``size.steps`` steps on the grouped blocks; returns its timed window."""
    from transformers import (BertForMaskedLM, DataCollatorForLanguageModeling, PrinterCallback, Trainer,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = BertForMaskedLM(bert_config(cfg, shape.vocab))
    o, tc = cfg.optim, cfg.trainer
    args = TrainingArguments(
        output_dir=str(work / f"hf_{tag}"), per_device_train_batch_size=cfg.data.batch_size, max_steps=size.steps,
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        adam_epsilon=o.eps, warmup_steps=o.warmup_steps, lr_scheduler_type="linear",
        max_grad_norm=tc.gradient_clip_val or 0.0, logging_steps=tc.log_every_n_steps, save_strategy="no",
        eval_strategy="no", report_to="none", seed=cfg.seed, disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, bf16=precision == "bf16-mixed")
    block = cfg.model.text.max_len
    collator = DataCollatorForLanguageModeling(tokenizer=hf_tok, mlm=True, mlm_probability=0.15)
    per_step = cfg.data.batch_size * block
    clock = _hf_clock(step_flops(shape, [block] * cfg.data.batch_size, per_step), per_step)
    trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=collator, callbacks=[clock])
    computed = watch_linear_dtype(model)
    trainer.remove_callback(PrinterCallback)  # its log lines only (logging itself still runs every logging_steps)
    trainer.train()
    if len(clock.steps) != size.steps:
        raise RuntimeError(f"HF trained {len(clock.steps)} steps, expected {size.steps}")
    return {**window(clock.steps, size.skip), "optimizer": str(args.optim), "linear_dtype": computed.get("dtype")}


# ----------------------------------------------------------------------------- matmul limit


def time_gemm(m: int, k: int, n: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """Fastest of ``repeats`` ``torch.mm`` of (m × k)(k × n) in ``dtype``, in seconds (one warm-up call first):
    the machine's limit is its best rate, so a neighbour's job slowing one call does not lower it."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_limit(shape: BertShape, tokens: int, predicted: int, repeats: int,
                 dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    """This machine's GFLOP/s in ``dtype`` on one step's linear-layer GEMMs (see the module docstring)."""
    gemms = gemm_shapes(shape, tokens, predicted)
    seconds = {}
    for m, k, n, _ in gemms:
        if (m, k, n) not in seconds:
            seconds[(m, k, n)] = time_gemm(m, k, n, repeats, dtype)
    total = sum(seconds[(m, k, n)] * c for m, k, n, c in gemms)
    return {"tokens": tokens, "predicted": predicted, "gemm_flops": gemm_flops(gemms), "gemm_seconds": total,
            "gflops_per_s": gemm_flops(gemms) / total / 1e9}


# ----------------------------------------------------------------------------- one size


def run_size(size: Size, threads: int, work: Path, log: Callable[[str], None] = print,
             precision: str = "32-true") -> Dict[str, Any]:
    """Both contenders at one size, ``size.rounds`` back-to-back pairs, then the matmul limits."""
    torch.set_num_threads(threads)
    base_cfg = load_size_config(size, work / "setup", threads, precision=precision)
    tok_dir = work / "tokenizer"
    tok = train_tokenizer(base_cfg, tok_dir)
    shape = model_shape(base_cfg, tok.vocab_size)
    hf_tok = hf_tokenizer(tok)
    t0 = time.perf_counter()
    blocks = group_texts(hf_tok, training_texts(base_cfg), base_cfg.model.text.max_len)
    log(f"[{size.name}] vocabulary {tok.vocab_size}; HF corpus: {len(blocks)} blocks of {base_cfg.model.text.max_len} "
        f"tokens ({time.perf_counter() - t0:.1f} s to tokenize and group, start-up)")
    runs: Dict[str, List[Dict[str, Any]]] = {"mmm": [], "hf": []}
    expected = dtype_name(GEMM_DTYPES[precision])
    for r in range(size.rounds):
        order = ("mmm", "hf") if r % 2 == 0 else ("hf", "mmm")
        for name in order:
            if name == "mmm":
                res = run_mmm(size, work, threads, tok_dir, shape, f"r{r}", precision)
            else:
                res = run_hf(size, work, threads, base_cfg, blocks, hf_tok, shape, f"r{r}", precision)
            if res.get("linear_dtype") != expected:
                raise RuntimeError(f"{name}'s linear layers computed in {res.get('linear_dtype')}, not {expected} as "
                                   f"--precision {precision} asks: the comparison would not be like for like")
            res["load_average_after"] = load_average()
            runs[name].append(res)
            log(f"[{size.name}] round {r + 1}/{size.rounds} {name}: {res['tokens_per_s']:,.0f} real tokens/s, "
                f"{res['gflops_per_s']:.2f} GFLOP/s (load average {res['load_average_after']})")
    torch.set_num_threads(threads)
    out: Dict[str, Any] = {"size": size.name, "steps": size.steps, "skip": size.skip, "rounds": size.rounds,
                           "threads": threads, "vocab": tok.vocab_size, "shape": asdict(shape),
                           "batch_size": base_cfg.data.batch_size, "max_len": base_cfg.model.text.max_len,
                           "hf_blocks": len(blocks), "dropout": base_cfg.model.encoder.dropout, "precision": precision}
    for name, rs in runs.items():
        per_step = statistics.median(x["tokens_per_step"] for x in rs)
        predicted = statistics.median(x.get("predicted_per_step", x["tokens_per_step"]) for x in rs)
        limit = matmul_limit(shape, int(round(per_step)), int(round(predicted)), size.matmul_repeats,
                             GEMM_DTYPES[precision])
        steps = [(n, f, dt) for x in rs for n, f, dt in zip(x["step_tokens"], x["step_flops"], x["step_seconds"])]
        e = {"runs": rs, "tokens_per_s": statistics.median(n / dt for n, _, dt in steps),
             "gflops_per_s": statistics.median(f / dt for _, f, dt in steps) / 1e9,
             "window_tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
             "window_gflops_per_s": statistics.median(x["gflops_per_s"] for x in rs),
             "flops_per_token": sum(x["flops"] for x in rs) / sum(x["tokens"] for x in rs),
             "tokens_per_step": per_step, "matmul_limit": limit}
        e["fraction_of_limit"] = e["gflops_per_s"] / limit["gflops_per_s"]
        faults = [x["minor_faults_per_step"] for x in rs if x.get("minor_faults_per_step") is not None]
        e["minor_faults_per_step"] = statistics.median(faults) if faults else None
        cpu = [(f, dt) for x in rs for f, dt in zip(x["step_flops"], x.get("step_cpu_seconds", ())) if dt > 0]
        e["cpu_gflops_per_s"] = statistics.median(f / dt for f, dt in cpu) / 1e9 if cpu else None
        if name == "mmm":
            totals = {p: sum(x["split_s"][p] for x in rs) for p in rs[0]["split_s"]}
            whole = sum(x["seconds"] for x in rs)
            e["split_share"] = {p: v / whole for p, v in totals.items()}
        out[name] = e
    m, h = out["mmm"], out["hf"]
    out["tokens_per_s_ratio"] = m["tokens_per_s"] / h["tokens_per_s"]
    out["gflops_ratio"] = m["gflops_per_s"] / h["gflops_per_s"]
    out["flops_ceiling"] = h["flops_per_token"] / m["flops_per_token"]
    out["window_tokens_per_s_ratio"] = m["window_tokens_per_s"] / h["window_tokens_per_s"]
    out["window_gflops_ratio"] = m["window_gflops_per_s"] / h["window_gflops_per_s"]
    out["target_gflops_ratio"] = TARGETS.get(size.name) if precision == "32-true" else None
    if m["cpu_gflops_per_s"] and h["cpu_gflops_per_s"]:
        out["cpu_gflops_ratio"] = m["cpu_gflops_per_s"] / h["cpu_gflops_per_s"]
    out["round_gflops_ratios"] = round_ratios(runs["mmm"], runs["hf"])
    out["square_1024_gflops_per_s"] = 2 * 1024 ** 3 / time_gemm(1024, 1024, 1024, size.matmul_repeats,
                                                                GEMM_DTYPES[precision]) / 1e9
    log(f"[{size.name}] mmm/HF: {out['tokens_per_s_ratio']:.2f}x real tokens/s, "
        f"{ratio_text(out['gflops_ratio'], out['target_gflops_ratio'], 'x')} GFLOP/s "
        f"(FLOPs-per-token ceiling {out['flops_ceiling']:.2f}x); per CPU-second of the training thread "
        f"{out.get('cpu_gflops_ratio', float('nan')):.2f}x GFLOP/s")
    return out


def round_ratios(mmm_runs: Sequence[Dict[str, Any]], hf_runs: Sequence[Dict[str, Any]]) -> List[float]:
    """mmm/HF GFLOP/s of each round: the median over the mmm run's timed steps over the median over the HF run's
    of the same round (the pair ran back to back), so a reader sees how far the rounds spread."""
    def median_rate(run: Dict[str, Any]) -> float:
        return statistics.median(f / dt for f, dt in zip(run["step_flops"], run["step_seconds"]))

    return [median_rate(m) / median_rate(h) for m, h in zip(mmm_runs, hf_runs)]


def ratio_text(x: float, target: Optional[float] = None, sign: str = "×") -> str:
    """``x`` to 2 decimals, or to 3 where 2 would put it on the other side of ``target`` (0.995 is not ≥ 1.0)."""
    text = f"{x:.2f}"
    if target is not None and (float(text) >= target) != (x >= target):
        text = f"{x:.3f}"
    return text + sign


# ----------------------------------------------------------------------------- report


SPLIT_LABELS = {"forward": "forward (training_step: model, loss, self.log)", "backward": "backward",
                "optimizer": "gradient clipping + fused AdamW", "after_step": "after the step (LR scheduler, callbacks)",
                "between_steps": "between steps (next batch from the worker, Lightning loop, logger, a periodic checkpoint)"}


def markdown(results: Sequence[Dict[str, Any]], env: Dict[str, Any]) -> str:
    """The results as markdown tables."""
    load, end = env.get("load_average"), env.get("load_average_end")
    precision = PRECISIONS[env.get("precision", "32-true")]
    lines = [f"Whole training loops on the CPU, {precision}, {env['threads']} torch thread(s), torch {env['torch']}, "
             f"transformers {env['transformers']}, {env['cpu_count']} cores"
             + (f", load average {load[0]:.2f} at the start" if load else "")
             + (f" and {end[0]:.2f} at the end" if end else "") + ".", "",
             "| size | contender | real tokens/s (window mean) | model FLOPs/token | achieved GFLOP/s | matmul limit "
             "GFLOP/s | % of limit | mmm/HF tokens/s | mmm/HF GFLOP/s (target) | FLOPs ceiling |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r["shape"]
        label = (f"{r['size']} ({s['depth']}L d{s['dim']}, V={r['vocab']}, B={r['batch_size']}, "
                 f"steps {r['skip'] + 1}–{r['steps']}, {r['rounds']} rounds)")
        for name, title in (("mmm", "mmm pretrain (packed)"), ("hf", "HF Trainer, run_mlm recipe")):
            e = r[name]
            first = name == "mmm"
            target = f" (≥ {r['target_gflops_ratio']})" if r.get("target_gflops_ratio") else ""
            lines.append(
                f"| {label if first else ''} | {title} | {e['tokens_per_s']:,.0f} ({e['window_tokens_per_s']:,.0f}) | "
                f"{e['flops_per_token'] / 1e6:.2f} M | {e['gflops_per_s']:.1f} | "
                f"{e['matmul_limit']['gflops_per_s']:.1f} | {100 * e['fraction_of_limit']:.0f}% | "
                + (f"**{r['tokens_per_s_ratio']:.2f}×** ({r['window_tokens_per_s_ratio']:.2f}×) | "
                   f"**{ratio_text(r['gflops_ratio'], r.get('target_gflops_ratio'))}**{target} | "
                   f"{r['flops_ceiling']:.2f}× |" if first else "| | |"))
    lines += ["", "Real tokens/s and GFLOP/s: medians over every timed step of every round (data loading included, "
              "start-up excluded); in brackets the window mean (all timed tokens over all timed time of a run, median "
              "over rounds). FLOPs ceiling = HF's model FLOPs per token / mmm's: the tokens/s ratio both would reach "
              f"at equal GFLOP/s. Matmul limit: {dtype_name(GEMM_DTYPES[env.get('precision', '32-true')])} "
              "`torch.mm` GFLOP/s on that contender's own linear-layer GEMMs "
              "(forward and both gradients, at its median batch), same threads, this run.", ""]
    for r in results:
        if r.get("cpu_gflops_ratio"):
            lines += [f"Per CPU-second of the training thread ({r['size']}; robust to other jobs on the machine, "
                      f"leaves out mmm's DataLoader worker): mmm {r['mmm']['cpu_gflops_per_s']:.1f}, "
                      f"HF {r['hf']['cpu_gflops_per_s']:.1f} GFLOP/s, "
                      f"**{ratio_text(r['cpu_gflops_ratio'], r.get('target_gflops_ratio'))}**.", ""]
    for r in results:
        rounds = r.get("round_gflops_ratios") or []
        if not rounds:
            continue
        spread = (f"; mean {statistics.mean(rounds):.2f} ± {statistics.stdev(rounds):.2f} (std over rounds)"
                  if len(rounds) > 1 else "")
        target = r.get("target_gflops_ratio")
        met = (f"; the target (≥ {target}) met in {sum(x >= target for x in rounds)} of {len(rounds)}"
               if target else "")
        lines += [f"mmm/HF GFLOP/s per round ({r['size']}; each run's median step, the pair back to back): "
                  + ", ".join(ratio_text(x, target) for x in rounds) + spread + met + ".", ""]
    lines += [f"Memory allocator: {env.get('allocator', DEFAULT_ALLOCATOR)}.", ""]
    for r in results:
        f = {n: r[n].get("minor_faults_per_step") for n in ("mmm", "hf")}
        if all(v is not None for v in f.values()):
            lines += [f"Minor page faults per timed step ({r['size']}, the training process; median over runs): "
                      f"mmm {f['mmm']:,.0f}, HF {f['hf']:,.0f}.", ""]
    for r in results:
        loads = {n: ", ".join(str(x.get("load_average_after")) for x in r[n]["runs"]) for n in ("mmm", "hf")}
        lines += [f"Load average (1 min) after each run, {r['size']}: mmm {loads['mmm']}; HF {loads['hf']}.", ""]
    for r in results:
        split = r["mmm"].get("split_share")
        if not split:
            continue
        lines += [f"Where an mmm step's time goes ({r['size']}, share of the timed steps):", "",
                  "| part | share |", "|---|---:|"]
        lines += [f"| {SPLIT_LABELS[p]} | {100 * v:.1f}% |" for p, v in split.items()]
        lines.append("")
    return "\n".join(lines)


def load_average() -> Optional[float]:
    """This machine's 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def environment(threads: int, precision: str = "32-true") -> Dict[str, Any]:
    import transformers

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"device": "cpu", "threads": threads, "precision": precision, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "load_average": load}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma-separated: tiny, base, micro (default tiny,base)")
    p.add_argument("--quick", action="store_true", help="tiny only")
    p.add_argument("--micro", action="store_true", help="toy sizes for tests (also $MMM_BENCH_MICRO=1)")
    p.add_argument("--rounds", type=at_least(1), default=None, help="mmm/HF run pairs (default: the size's)")
    p.add_argument("--steps", type=at_least(2), default=None, help="steps per run (default: the size's)")
    p.add_argument("--skip", type=at_least(1), default=None, help="leading steps left out of the timing (default: the size's)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch threads for both (default 1)")
    p.add_argument("--out", default="runs/bench/e2e_pretrain", help="folder for results.json and results.md")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc malloc keeps freed memory (no per-step page faults for large tensors), both sides")
    p.add_argument("--precision", choices=list(PRECISIONS), default="32-true",
                   help="both sides: fp32, or bf16 autocast (mmm trainer.precision, HF Trainer bf16=True)")
    return p.parse_args(argv)


def select_sizes(args: argparse.Namespace) -> List[Size]:
    if args.micro or os.environ.get(MICRO_ENV, "") not in ("", "0"):
        names = ["micro"]
    elif args.sizes:
        names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    else:
        names = ["tiny"] if args.quick else ["tiny", "base"]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; expected {list(SIZES)}")
    out = []
    for n in names:
        s = SIZES[n]
        changes = {k: v for k, v in (("rounds", args.rounds), ("steps", args.steps), ("skip", args.skip)) if v is not None}
        s = Size(**{**asdict(s), **changes})
        if s.skip >= s.steps:
            raise SystemExit(f"--skip {s.skip} leaves no timed step of {s.steps}")
        out.append(s)
    return out


def run_benchmark(sizes: Sequence[Size], threads: Optional[int] = None, work: Optional[Path] = None,
                  log: Callable[[str], None] = print, allocator: str = DEFAULT_ALLOCATOR,
                  precision: str = "32-true") -> Dict[str, Any]:
    """Every size in one run; returns ``{"env", "results", "markdown"}`` (writes nothing but the runs' folders).

    Args:
        sizes: the comparisons (:data:`SIZES` entries).
        threads: torch threads for both contenders (default :data:`DEFAULT_THREADS`).
        work: folder for the runs (default: a temporary one, removed afterwards).
        log: progress printer.
        allocator: how the memory allocator is set up (reported; see :func:`keep_freed_memory`).
        precision: both contenders' precision, a :data:`PRECISIONS` key.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {list(PRECISIONS)}")
    threads = threads or DEFAULT_THREADS
    before = torch.get_num_threads()
    env = {**environment(threads, precision), "allocator": allocator}
    results = run_in_work_folder("mmm_e2e_", work,
                                 lambda root: [run_size(s, threads, root / s.name, log, precision) for s in sizes],
                                 env, before)
    return {"env": env, "results": results, "markdown": markdown(results, env)}


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the benchmark; writes ``results.json`` and ``results.md`` to ``--out`` and returns the report."""
    import json

    args = parse_args(argv)
    sizes = select_sizes(args)
    allocator = keep_freed_memory() if args.keep_freed_memory else DEFAULT_ALLOCATOR
    report = {"benchmark": "e2e_pretrain",
              **run_benchmark(sizes, args.threads, Path(args.work) if args.work else None, log, allocator,
                              args.precision)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(report["markdown"] + "\n", encoding="utf-8")
    log("")
    log(report["markdown"])
    return report


if __name__ == "__main__":
    main()
