"""``mmm finetune``: fine-tune a pretrained encoder end to end with a classification / regression head.

The head is BERT's sequence-classification head (Devlin et al. 2019; HF
``BertForSequenceClassification``): the pooled vector ([CLS] or mean) → ``dense`` (d → d) + tanh
→ dropout → ``classifier`` (d → classes, or 1 for regression), initialised N(0, 0.02) with zero
biases. Loss: cross-entropy (classification) or mean squared error (regression). AdamW (torch's
fused kernel; no decay on biases and LayerNorm weights), linear warmup then linear decay to 0,
gradient clipping at 1.0 (HF ``Trainer``'s defaults, its ``adamw_torch_fused`` included). The dev metric is scored after every epoch (or every ``eval_every``
steps); training stops after ``patience`` evaluations without improvement, and the best state is
restored (and written, with ``out``) before the test split is scored.

Small-data fine-tuning varies a lot between seeds, so :func:`finetune` runs ``seeds`` seeds
(3 by default: 0, 1, 2), each from a freshly loaded encoder, and reports mean ± standard deviation.
Text/DNA batches run packed (see :mod:`mmm.downstream.inputs`).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from mmm.core.dropout import Dropout
from mmm.downstream.data import DownstreamDataError, Labels, Split, encode_labels
from mmm.downstream.inputs import InputAdapter, adapter_class, load_adapter
from mmm.downstream.metrics import check_metric, mean_std, metric_value, score_all

PathLike = Union[str, Path]
HEAD_FILE = "head.safetensors"
RESULT_FILE = "finetune.json"


FLAG_FIELDS = {"seed": "first_seed"}
"""``mmm finetune`` flags whose FinetuneConfig field has another name."""
API_ONLY = ("max_grad_norm", "eval_batch_size")
"""FinetuneConfig fields with no ``mmm finetune`` flag (errors name the field alone)."""


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (every seed uses the same)."""

    task_type: str = "classification"  # classification | regression
    metric: Optional[str] = None  # accuracy | f1 | matthews | pearson | spearman; None: accuracy / pearson
    pooling: str = "cls"  # cls | mean (audio and CLS-less image encoders: mean)
    lr: float = 5e-5
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: int = 3
    max_steps: Optional[int] = None  # stop after this many optimizer steps in total
    warmup: float = 0.1  # fraction of the planned steps spent warming up linearly
    eval_every: Optional[int] = None  # steps between dev evaluations; None: once per epoch
    patience: int = 3  # dev evaluations without improvement before stopping
    max_grad_norm: float = 1.0
    dropout: Optional[float] = None  # set every dropout (encoder and head) to this; None: encoder's own, head 0.1
    seeds: int = 3
    first_seed: int = 0
    eval_batch_size: int = 64
    cls_last_block: bool = True  # [CLS] pooling of text/DNA: run the last block for [CLS] alone (same result)

    def __post_init__(self) -> None:
        """Refuse settings that would train nothing, or not what they say, naming the ``mmm finetune`` flag."""
        def bad(flag: str, value: Any, wanted: str) -> None:
            field_name = f"FinetuneConfig.{FLAG_FIELDS.get(flag, flag)}"
            what = field_name if flag in API_ONLY else f"--{flag} ({field_name})"
            raise ValueError(f"{what} must be {wanted}, got {value!r}")

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v: Any, least: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= least

        for flag in ("batch_size", "epochs", "seeds", "patience", "eval_batch_size"):
            if not integer(getattr(self, flag), 1):
                bad(flag, getattr(self, flag), "an integer >= 1")
        for flag in ("max_steps", "eval_every"):
            v = getattr(self, flag)
            if v is not None and not integer(v, 1):
                bad(flag, v, "an integer >= 1 (or left out)")
        if not integer(self.first_seed, 0):
            bad("seed", self.first_seed, "an integer >= 0")
        if not number(self.lr) or self.lr <= 0:
            bad("lr", self.lr, "a number > 0")
        if not number(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, "a number >= 0")
        if not number(self.warmup) or not 0 <= self.warmup < 1:
            bad("warmup", self.warmup, "a fraction of the planned steps in [0, 1)")
        if not number(self.max_grad_norm) or self.max_grad_norm <= 0:
            bad("max_grad_norm", self.max_grad_norm, "a number > 0")
        if self.dropout is not None and (not number(self.dropout) or not 0 <= self.dropout < 1):
            bad("dropout", self.dropout, "in [0, 1) (or left out)")
        if self.task_type not in ("classification", "regression"):
            bad("task_type", self.task_type, "classification or regression")
        if self.pooling not in ("cls", "mean"):
            bad("pooling", self.pooling, "cls or mean")

    def resolved_metric(self) -> str:
        return check_metric(self.metric or ("accuracy" if self.task_type == "classification" else "pearson"),
                            self.task_type)


class ClassificationHead(nn.Module):
    """BERT's sequence-classification head: dense + tanh → dropout → linear.

    Args:
        dim: hidden size of the encoder.
        outputs: number of classes (1 for regression).
        dropout: dropout before the classifier.
    """

    def __init__(self, dim: int, outputs: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(dim, outputs)
        for lin in (self.dense, self.classifier):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, d) → (B, outputs)."""
        return self.classifier(self.dropout(torch.tanh(self.dense(pooled))))


class FinetuneModel(nn.Module):
    """An encoder (through its :class:`InputAdapter`) + a :class:`ClassificationHead`."""

    def __init__(self, adapter: InputAdapter, head: ClassificationHead, pooling: str, cls_last_block: bool = True) -> None:
        super().__init__()
        self.adapter = adapter
        self.encoder = adapter.encoder
        self.head = head
        self.pooling = adapter.check_pooling(pooling)
        self.cls_last_block = cls_last_block

    def forward(self, items: Sequence[Any]) -> torch.Tensor:
        """Prepared items → (B, outputs) logits."""
        pooled = self.adapter.pooled(items, self.pooling, cls_last_block=self.cls_last_block)  # (B, d)
        return self.head(pooled)  # (B, outputs)


def set_dropout(module: nn.Module, p: float) -> None:
    """Set every ``nn.Dropout`` and attention-probability dropout in ``module`` to ``p``."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if isinstance(getattr(m, "attn_dropout", None), float):
            m.attn_dropout = p


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: decay on weight matrices, none on biases and normalisation weights (as HF Trainer)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw_ok(model: nn.Module) -> bool:
    """Whether torch's fused AdamW kernel (one kernel for all parameters, as HF ``Trainer``'s default
    ``adamw_torch_fused``) takes ``model``'s parameters: floating point, on CPU or CUDA."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())


def checked_device(device: Optional[str]) -> torch.device:
    """``device`` (``--device``) as a torch device, CUDA when available if None; a ``ValueError`` naming it when
    it is not a device name or names a CUDA device this machine lacks (torch raised an internal-looking error)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device name (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA GPU"
        raise ValueError(f"--device {device!r}: this machine has {have}; use --device cpu or leave it out")
    return dev


def warmup_steps(total_steps: int, ratio: float) -> int:
    """Warmup steps for a fraction ``ratio`` of ``total_steps``, rounded up as HF ``Trainer`` rounds them
    (``TrainingArguments.get_warmup_steps``: ``ceil(total * ratio)``; 7 of 63 steps at 0.1, not 6)."""
    return math.ceil(total_steps * ratio)


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: 0 → 1 over ``warmup_steps``, then linearly to 0 at ``total_steps`` (HF's linear schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> List[np.ndarray]:
    """The shuffled training batches of one epoch (seeded by ``(seed, epoch)``)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


@dataclass
class SeedResult:
    """One seed's outcome."""

    seed: int
    dev: Dict[str, float]
    test: Optional[Dict[str, float]]
    best_step: int
    steps: int
    stopped_early: bool
    first_losses: List[float]
    seconds: float
    examples_per_s: float
    checkpoint: Optional[str] = None


@dataclass
class FinetuneResult:
    """Every seed's result and the mean ± std of the chosen metric."""

    metric: str
    task_type: str
    labels: Dict[str, Any]
    seeds: List[SeedResult]
    dev: Dict[str, float]
    test: Optional[Dict[str, float]]
    config: Dict[str, Any]
    data: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def fmt(ms: Optional[Dict[str, float]]) -> str:
            return "n/a" if ms is None else f"{ms['mean']:.4f} ± {ms['std']:.4f} (n={ms['n']})"

        out = f"dev {self.metric}: {fmt(self.dev)}"
        return out + (f"; test {self.metric}: {fmt(self.test)}" if self.test is not None else "")


@torch.no_grad()
def predict(model: FinetuneModel, items: Sequence[Any], task_type: str, batch_size: int) -> np.ndarray:
    """Class ids (classification) or values (regression) of prepared items, in eval mode."""
    was = model.training
    model.eval()
    out = []
    for lo in range(0, len(items), batch_size):
        logits = model(items[lo:lo + batch_size])
        out.append((logits.argmax(-1) if task_type == "classification" else logits[:, 0]).float().cpu().numpy())
    model.train(was)
    return np.concatenate(out)


def _scores(pred: np.ndarray, gold: Sequence[Union[int, float]], task_type: str, num_classes: int) -> Dict[str, float]:
    return score_all(pred, np.asarray(gold), task_type, num_classes)


def prepare_split(adapter: InputAdapter, split: Split, skip_bad: bool) -> List[Any]:
    """The prepared inputs of ``split``; with ``skip_bad`` an input :meth:`InputAdapter.prepare` refuses is moved to
    ``split.skipped`` (with its reason), else its error, naming it, stops the run."""
    refused: Optional[List[Tuple[int, str, str]]] = [] if skip_bad else None
    items = adapter.prepare_all(split.inputs, split.where, refused)
    split.skip({i: reason for i, _, reason in refused or ()}).require_rows()
    return items


def check_scorable(split: Split, y: Sequence[Union[int, float]], metric: str, labels: Labels) -> None:
    """Refuse a dev or test split on which ``metric`` has one value whatever the model predicts: constant
    regression targets (Pearson and Spearman are undefined), a single class under Matthews correlation, no class-1
    row under a two-class F1. Dev would then pick its first evaluated state by chance, and test report noise."""
    why = None
    if labels.task_type == "regression" and len(set(y)) < 2:
        why = f"every regression target is {y[0]!r}: {metric} is undefined"
    elif metric == "matthews" and len(set(y)) < 2:
        why = f"every label is {labels.names[y[0]]!r}: Matthews correlation is 0 whatever the model predicts"
    elif metric == "f1" and labels.num_classes == 2 and 1 not in set(y):
        why = (f"no row has class {labels.names[1]!r} (class 1): its F1 is 0 whatever the model predicts; use "
               "--metric accuracy or add such rows")
    if why:
        raise DownstreamDataError(f"{split.path}: {why}, so this split cannot score or select a model")


def train_one_seed(make_adapter: Callable[[], InputAdapter], train: Tuple[List[Any], List[Any]],
                   dev: Tuple[List[Any], List[Any]], test: Optional[Tuple[List[Any], List[Any]]], outputs: int,
                   cfg: FinetuneConfig, seed: int, out_dir: Optional[Path] = None,
                   log: Callable[[str], None] = print) -> SeedResult:
    """Fine-tune a freshly loaded encoder with one seed; returns its best-dev result.

    Args:
        make_adapter: loads the pretrained encoder (a fresh copy per seed).
        train, dev, test: ``(prepared items, encoded labels)``.
        outputs: classes (or 1 for regression); also the class count F1 is scored with.
        cfg: hyper-parameters.
        seed: seeds the head's initialisation, dropout and the data order.
        out_dir: write the best encoder (``save_encoder``) and head here; None keeps nothing.
        log: progress printer.
    """
    metric = cfg.resolved_metric()
    torch.manual_seed(seed)
    adapter = make_adapter()
    head = ClassificationHead(adapter.hidden_size, outputs, 0.1 if cfg.dropout is None else cfg.dropout)
    model = FinetuneModel(adapter, head, cfg.pooling, cfg.cls_last_block)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    device = next(adapter.encoder.parameters()).device
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=fused_adamw_ok(model))
    per_epoch = math.ceil(len(train[0]) / cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(total, warmup_steps(total, cfg.warmup)))
    loss_fn = nn.CrossEntropyLoss() if cfg.task_type == "classification" else nn.MSELoss()
    dtype = torch.long if cfg.task_type == "classification" else torch.float32
    best, best_state, best_step, bad, step, first_losses = -math.inf, None, 0, 0, 0, []
    stopped, examples, scored_at = False, 0, -1
    t0 = time.perf_counter()

    def evaluate() -> bool:
        nonlocal best, best_state, best_step, bad, scored_at
        scored_at = step
        value = metric_value(metric, predict(model, dev[0], cfg.task_type, cfg.eval_batch_size), np.asarray(dev[1]),
                             outputs)
        if not math.isfinite(value):
            raise FloatingPointError(f"the dev {metric} is {value} at step {step} (seed {seed}): the model's "
                                     "predictions are not finite; lower --lr")
        if value > best:
            best, best_step, bad = value, step, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        return bad >= cfg.patience

    for epoch in range(cfg.epochs):
        for idx in batch_order(len(train[0]), cfg.batch_size, seed, epoch):
            if step >= total:
                break
            items = [train[0][i] for i in idx]
            y = torch.tensor([train[1][i] for i in idx], dtype=dtype, device=device)
            logits = model(items)
            loss = loss_fn(logits if cfg.task_type == "classification" else logits[:, 0], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            examples += len(idx)
            value = float(loss.detach())
            if len(first_losses) < 10:
                first_losses.append(value)
            if not math.isfinite(value):
                raise FloatingPointError(f"fine-tuning loss became {value} at step {step} (seed {seed}); "
                                         "lower --lr")
            if cfg.eval_every and step % cfg.eval_every == 0 and evaluate():
                stopped = True
                break
        if stopped or step >= total:
            break
        if not cfg.eval_every and evaluate():
            stopped = True
            break
    train_seconds = time.perf_counter() - t0
    if scored_at != step:
        evaluate()  # the last step's state has not been scored yet
    model.load_state_dict(best_state)
    dev_scores = _scores(predict(model, dev[0], cfg.task_type, cfg.eval_batch_size), dev[1], cfg.task_type, outputs)
    test_scores = None
    if test is not None:
        test_scores = _scores(predict(model, test[0], cfg.task_type, cfg.eval_batch_size), test[1], cfg.task_type,
                              outputs)
    ckpt = None
    if out_dir is not None:
        ckpt = str(save_finetuned(model, out_dir / f"seed{seed}"))
    log(f"seed {seed}: best dev {metric} {dev_scores[metric]:.4f} at step {best_step}/{step}"
        f"{' (stopped early)' if stopped else ''}")
    return SeedResult(seed, dev_scores, test_scores, best_step, step, stopped, first_losses,
                      round(train_seconds, 2), examples / max(train_seconds, 1e-9), ckpt)


def save_finetuned(model: FinetuneModel, directory: Path) -> Path:
    """The fine-tuned encoder (``save_encoder`` layout) + ``head.safetensors``."""
    from safetensors.torch import save_file

    from mmm.encoders import save_encoder

    save_encoder(model.encoder, directory)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
              str(directory / HEAD_FILE), metadata={"pooling": model.pooling})
    return directory


def finetune(source: Union[PathLike, Callable[[], nn.Module]], modality: str, train: Split, dev: Split, test: Optional[Split] = None, *,
             cfg: Optional[FinetuneConfig] = None, out: Optional[PathLike] = None, timm_model: Optional[str] = None,
             device: Optional[str] = None, log: Callable[[str], None] = print, skip_bad: bool = False) -> FinetuneResult:
    """Fine-tune ``source``'s ``modality`` encoder on ``train``, select on ``dev``, over ``cfg.seeds`` seeds.

    Args:
        source: an mmm ``.ckpt``, a ``save_encoder`` folder, an HF BERT folder or a timm ViT file; or a
            callable returning a freshly built encoder (called once per seed).
        modality: a registered modality with downstream inputs (``text``, ``dna``, ``image``, ``audio``, a plug-in's).
        train, dev, test: from :mod:`mmm.downstream.data`; labels are encoded by the training split's classes.
        cfg: hyper-parameters (defaults: :class:`FinetuneConfig`).
        out: folder for ``finetune.json`` and each seed's best checkpoint; None writes nothing.
        timm_model: timm model name when ``source`` is a timm weights file.
        device: torch device (default: CUDA when available).
        log: progress printer.
        skip_bad: an input the encoder's adapter refuses (:meth:`InputAdapter.prepare`, e.g. a character its
            tokenizer does not read) is moved to its split's ``skipped`` instead of stopping the run.
    """
    cfg = cfg or FinetuneConfig()
    metric = cfg.resolved_metric()
    dev_name = checked_device(device)

    def make_adapter() -> InputAdapter:
        if callable(source):  # a factory of fresh encoders (e.g. a checkpoint's architecture at random init)
            a = adapter_class(modality)(source(), getattr(source, "__name__", "encoder"))
        else:
            a = load_adapter(str(source), modality, timm_model=timm_model)
        a.encoder.to(dev_name)
        return a

    first = make_adapter()
    first.check_pooling(cfg.pooling)
    splits = (("train", train), ("dev", dev)) + ((("test", test),) if test is not None else ())
    prepared = {name: prepare_split(first, s, skip_bad) for name, s in splits}
    labels = Labels.fit(train, cfg.task_type)
    y = {name: encode_labels(s, labels) for name, s in splits}
    for name, s in splits[1:]:
        check_scorable(s, y[name], metric, labels)
    outputs = labels.num_classes if cfg.task_type == "classification" else 1
    out_dir = Path(out) if out is not None else None
    results = []
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        results.append(train_one_seed(make_adapter, (prepared["train"], y["train"]), (prepared["dev"], y["dev"]),
                                      (prepared["test"], y["test"]) if test is not None else None, outputs, cfg, seed,
                                      out_dir, log))
    res = FinetuneResult(
        metric, cfg.task_type, labels.to_dict(), results, mean_std([r.dev[metric] for r in results]),
        mean_std([r.test[metric] for r in results]) if test is not None else None, asdict(cfg),
        {"source": getattr(source, "__name__", str(source)), "modality": modality, "train": train.path, "dev": dev.path,
         "test": test.path if test is not None else None, "sizes": {k: len(v) for k, v in prepared.items()},
         "truncated_inputs": first.truncated,
         "skipped_rows": sum(len(s.skipped) for s in (train, dev, test) if s is not None)})
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESULT_FILE).write_text(json.dumps(res.to_dict(), indent=2) + "\n", encoding="utf-8")
    return res
