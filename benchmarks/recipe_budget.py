"""What one training step of a pretraining recipe costs, and the steps that spend an equal FLOP budget.

Recipes are compared at equal *compute*, not equal steps (ELECTRA's generator, a data2vec
teacher's forward pass or a 30 % masking rate all change what a step costs). The cost of a
recipe's step is counted, not derived from a formula per method:

* :func:`count_step_flops` runs one real forward + backward of the recipe's model on a real batch
  of its own data pipeline under :class:`torch.utils.flop_counter.FlopCounterMode`: every matrix
  product of the step (encoder, heads, ELECTRA's generator, a teacher's forward) in FLOPs, 2 per
  multiply-add. PyTorch registers the matrix products and its GPU attention kernels; the CPU
  attention kernel (``_scaled_dot_product_flash_attention_for_cpu``, what the ``sdpa`` backend runs
  on CPU) is added here with PyTorch's own SDPA formulas, so attention is charged on CPU too (at
  the padded length groups the backend computes; the backward as PyTorch counts it for its GPU
  kernels: the recomputed scores plus four gradient products, 2.5x the forward). Element-wise work (norms, GELU, softmax, the
  losses) and the optimizer are left out, as in the usual model-FLOPs count.
* :func:`measure_recipe` averages that over a few batches (packed batches vary in tokens) and
  keeps the batches, the model and its optimizer for :func:`time_steps`. A phased run (config
  ``phases``, e.g. CLM for 40 % of the steps, then MLM) is measured phase by phase, each phase
  with only the heads it trains, and its FLOPs (and time) per step are the phases' values
  weighted by their fractions of the run.
* :func:`steps_for_budget` turns a FLOP budget into a step count: the nearest whole number of
  steps, so ``steps × FLOPs/step`` is within half a step of the budget (:func:`budget_error`).
* :func:`time_steps` times whole training steps (forward, backward, optimizer step and any
  post-step hook such as an EMA teacher update) of several recipes in interleaved rounds on the
  same machine, so their throughput *ratios* are measured side by side; data loading is excluded.
  A phased recipe times every phase's step in each round.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _extra_flop_formulas() -> Dict[Any, Callable[..., int]]:
    """FLOP formulas for ops :class:`FlopCounterMode` does not know (the CPU SDPA kernel and its backward)."""
    aten = torch.ops.aten
    out: Dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return out


def _forward(model: torch.nn.Module, batch: Any, heads: Optional[Sequence[str]]) -> torch.Tensor:
    loss, _ = model(batch) if heads is None else model(batch, heads=heads)
    return loss


def count_step_flops(model: torch.nn.Module, batch: Any, heads: Optional[Sequence[str]] = None) -> int:
    """FLOPs of one forward + backward of ``model`` (a :class:`~mmm.model.MaskedModel`) on ``batch``.

    Gradients are cleared afterwards, so the model is left as it was (apart from random draws).

    Args:
        model: the recipe's model, in training mode.
        batch: one :class:`~mmm.batch.PackedBatch` of the recipe's training pipeline.
        heads: only these heads score the batch (a phased run's phase); None = every head.
    """
    with FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
        _forward(model, batch, heads).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


@dataclass
class RecipeCost:
    """A recipe's measured cost per training step, and what :func:`time_steps` needs to time it.

    Attributes:
        name: the recipe.
        flops_per_step: mean FLOPs of forward + backward over ``flops_batches`` (floats: a mean),
            the phases' means weighted by their fractions in a phased run.
        flops_batches: FLOPs of each measured batch (per phase, phase after phase).
        tokens_per_step: mean real (packed) tokens per batch over the same batches.
        sequences_per_step: mean sequences per batch.
        params: trainable parameters of the whole model (generator, heads included; an EMA teacher not).
        step_seconds: per-step times from :func:`time_steps` (empty until it ran; all phases).
        phases: ``(fraction of the run, heads)`` per phase; one ``(1.0, None)`` (every head) if not phased.
        phase_flops: mean FLOPs per step of each phase.
        phase_seconds: per phase, its timed steps.
    """

    name: str
    flops_per_step: float
    flops_batches: List[int]
    tokens_per_step: float
    sequences_per_step: float
    params: int
    step_seconds: List[float] = field(default_factory=list)
    phases: List[Tuple[float, Optional[Tuple[str, ...]]]] = field(default_factory=lambda: [(1.0, None)])
    phase_flops: List[float] = field(default_factory=list)
    phase_seconds: List[List[float]] = field(default_factory=list)
    _model: Any = field(default=None, repr=False)
    _optimizer: Any = field(default=None, repr=False)
    _batches: List[Any] = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Drop the model, optimizer and batches (keep the numbers)."""
        self._model, self._optimizer, self._batches = None, None, []

    def summary(self) -> Dict[str, Any]:
        """The numbers as plain data (median step time and tokens/s when timed)."""
        out: Dict[str, Any] = {"flops_per_step": self.flops_per_step, "flops_batches": self.flops_batches,
                               "tokens_per_step": self.tokens_per_step, "sequences_per_step": self.sequences_per_step,
                               "params": self.params}
        if len(self.phases) > 1:
            out["phases"] = [{"fraction": f, "heads": list(h or []), "flops_per_step": fl}
                             for (f, h), fl in zip(self.phases, self.phase_flops)]
        if self.step_seconds:
            median = sum(f * statistics.median(t) for (f, _), t in zip(self.phases, self.phase_seconds))
            out.update({"step_seconds_median": median, "step_seconds": self.step_seconds,
                        "tokens_per_s": self.tokens_per_step / median, "gflops_per_s": self.flops_per_step / median / 1e9})
        return out


TASK_COVER_BATCHES = 64
"""Batches per task that :func:`measure_recipe` reads at most while looking for one batch of every task."""


def measure_recipe(name: str, cfg: Any, batches: int = 4) -> RecipeCost:
    """Build ``cfg``'s run in a temporary folder and count FLOPs per step over its first training batches.

    A multi-task config (``tasks``, one task drawn per step) is read until every task has given a batch, and its
    FLOPs (and tokens) per step are the tasks' means weighted by their sampling weights, the expected cost of a
    step: the first few batches alone can miss a task (LXMERT's cheaper ITC steps were never counted, and its runs
    got about 85 % of the budget).

    Args:
        name: the recipe's name (for the report).
        cfg: a :class:`~mmm.config.PretrainConfig` (its ``trainer.default_root_dir`` is replaced by
            a temporary folder; tokenizers and other assets are fitted there as a run would).
        batches: batches to average over (at least 1; a multi-task config may read more, see above).

    Raises:
        ValueError: ``trainer.accumulate_grad_batches`` above 1 (a step would be several counted batches: give the
            recipe a larger ``data.batch_size`` instead), or a task that gives no batch.
    """
    import dataclasses

    from mmm.optim import build_optimizer
    from mmm.train.pretrain import build_run
    from mmm.train.tasks import task_configs

    if batches < 1:
        raise ValueError(f"measure_recipe needs at least one batch, got batches={batches}")
    if cfg.trainer.accumulate_grad_batches != 1:
        raise ValueError(f"recipe {name}: trainer.accumulate_grad_batches is {cfg.trainer.accumulate_grad_batches}; "
                         "the suite counts one batch per optimizer step, so set data.batch_size for the recipe instead")
    tasks = task_configs(cfg)
    weights = {t.name: float(t.weight) for t in tasks} if len(tasks) > 1 else None
    with tempfile.TemporaryDirectory(prefix="mmm_recipe_cost_") as tmp:
        # in-process loading (num_workers 0): a few batches, and no worker process outlives the probe
        probe = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0),
                                    trainer=dataclasses.replace(cfg.trainer, default_root_dir=tmp,
                                                                enable_progress_bar=False))
        run = build_run(probe)
        run.datamodule.setup("fit")
        loader = run.datamodule.train_dataloader()
        cached: List[Any] = []
        cap = batches if weights is None else max(batches, TASK_COVER_BATCHES * len(weights))
        for b in loader:
            cached.append(b)
            if len(cached) >= batches and (weights is None or set(weights) <= {x.task for x in cached}):
                break
            if len(cached) >= cap:
                break
        del loader
    if not cached:
        raise ValueError(f"recipe {name}: its training data yielded no batch")
    missing = [] if weights is None else sorted(set(weights) - {x.task for x in cached})
    if missing:
        raise ValueError(f"recipe {name}: {len(cached)} training batches held no batch of task(s) {missing}")
    model = run.module.model
    model.train()
    schedule = getattr(run.module, "phases", None)
    phases: List[Tuple[float, Optional[Tuple[str, ...]]]] = [(1.0, None)]
    if schedule is not None:
        phases = [(float(p.fraction), tuple(h)) for p, h in zip(cfg.phases, schedule.heads)]
    flops, phase_flops = [], []
    for _, heads in phases:
        counts = [count_step_flops(model, b, heads) for b in cached]
        flops += counts
        phase_flops.append(step_mean(counts, [b.task for b in cached], weights))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tasks_of = [b.task for b in cached]
    return RecipeCost(name, sum(f * fl for (f, _), fl in zip(phases, phase_flops)), flops,
                      step_mean([b.num_tokens for b in cached], tasks_of, weights),
                      step_mean([b.num_sequences for b in cached], tasks_of, weights),
                      params, phases=phases, phase_flops=phase_flops,
                      _model=model, _optimizer=build_optimizer(model, cfg.optim), _batches=cached)


def step_mean(values: Sequence[float], tasks: Sequence[str], weights: Optional[Dict[str, float]]) -> float:
    """The expected value per step of per-batch ``values``: their mean, or with ``weights`` (task → sampling weight
    of a multi-task run) each task's mean weighted by its share of the steps."""
    if weights is None:
        return sum(values) / len(values)
    per_task = {t: [v for v, u in zip(values, tasks) if u == t] for t in weights}
    total = sum(weights.values())
    return sum(w / total * sum(per_task[t]) / len(per_task[t]) for t, w in weights.items())


def _train_step(cost: RecipeCost, batch: Any, heads: Optional[Sequence[str]] = None) -> None:
    model, opt = cost._model, cost._optimizer
    opt.zero_grad(set_to_none=True)
    _forward(model, batch, heads).backward()
    opt.step()
    model.after_optimizer_step()


def time_steps(costs: Sequence[RecipeCost], rounds: int = 3, steps: int = 5, warmup: int = 1,
               log: Callable[[str], None] = print) -> None:
    """Time whole training steps of every recipe in interleaved rounds (fills ``step_seconds``).

    Each round runs ``steps`` timed steps of each recipe in turn (after ``warmup`` untimed ones in
    the first round), cycling over its cached batches, so a change in machine load hits every
    recipe alike. Data loading is not included.

    Args:
        costs: recipes measured by :func:`measure_recipe` (not yet released).
        rounds: interleaved rounds.
        steps: timed steps per recipe and round.
        warmup: untimed steps per recipe before the first round.
        log: progress printer.
    """
    for c in costs:
        if c._model is None:
            raise ValueError(f"recipe {c.name}: its model was released; time_steps needs measure_recipe's model")
        for i in range(warmup):
            _train_step(c, c._batches[i % len(c._batches)], c.phases[0][1])
    for c in costs:
        c.phase_seconds = [[] for _ in c.phases]
    for r in range(rounds):
        for c in costs:
            for p, (_, heads) in enumerate(c.phases):
                for i in range(steps):
                    batch = c._batches[(r * steps + i) % len(c._batches)]
                    t0 = time.perf_counter()
                    _train_step(c, batch, heads)
                    dt = time.perf_counter() - t0
                    c.step_seconds.append(dt)
                    c.phase_seconds[p].append(dt)
        log(f"  timing round {r + 1}/{rounds}: " + ", ".join(
            f"{c.name} {c.summary()['step_seconds_median'] * 1e3:.0f} ms" for c in costs))


def steps_for_budget(budget_flops: float, flops_per_step: float) -> int:
    """The whole number of steps whose FLOPs come nearest to the budget (at least 1).

    Args:
        budget_flops: the FLOP budget every recipe gets.
        flops_per_step: the recipe's measured FLOPs per step.
    """
    if not flops_per_step > 0:
        raise ValueError(f"flops_per_step must be > 0, got {flops_per_step}")
    if not budget_flops > 0:
        raise ValueError(f"the FLOP budget must be > 0, got {budget_flops}")
    return max(1, int(round(budget_flops / flops_per_step)))


def budget_error(budget_flops: float, flops_per_step: float, steps: int) -> float:
    """``(steps × FLOPs/step − budget) / FLOPs/step``: how many steps' worth a recipe is off its budget
    (within ±0.5 for :func:`steps_for_budget`'s steps when the budget covers at least one step)."""
    return (steps * flops_per_step - budget_flops) / flops_per_step
