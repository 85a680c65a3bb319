"""Pieces every part of ``mmm demo`` shares: the part skeleton (config, pretraining, the same network
at its initialisation), metrics CSV reading, loss plots, held-out losses, probes."""
from __future__ import annotations

import contextlib
import csv
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import lightning as L
import torch

from mmm.data.stream import SampleErrorHandler, make_pipeline
from mmm.config import PretrainConfig, load_config
from mmm.model import MaskedModel
from mmm.probe import ProbeScore, extract_features, linear_probe
from mmm.train.pretrain import build_model_for, pretrain, resolve_shards
from mmm.train.tasks import scoring_val_shards, task_configs


def part_config(config: Optional[Path], default: Path, out_dir: Path, max_steps: Optional[int],
                progress_bar: bool, schedule: Optional[Dict[str, Any]] = None) -> PretrainConfig:
    """A demo part's config: ``config`` (or the part's ``default``) with the ``schedule`` overrides
    (``mmm demo --full``: :data:`mmm.demo.FULL_SCHEDULES`), its run folder under ``out_dir/run``, the
    progress bar setting and an optional ``trainer.max_steps`` (applied last)."""
    overrides: Dict[str, Any] = dict(schedule or {})
    overrides.update({"trainer.default_root_dir": str(Path(out_dir) / "run"),
                      "trainer.enable_progress_bar": progress_bar})
    if max_steps is not None:
        overrides["trainer.max_steps"] = max_steps
    return load_config(Path(config) if config else default, overrides)


PartRunner = Callable[..., Dict[str, object]]


def demo_part(title: str, default: Path, evaluate: Callable[[PretrainConfig, Path, bool], Dict[str, object]],
              report: Callable[[Dict, PretrainConfig, str], str]) -> PartRunner:
    """The runner of one ``mmm demo`` part (``run_text_demo(out_dir, config=None, max_steps=None,
    progress_bar=True, quick=False, schedule=None)``), every part with the same arguments.

    The runner builds the part's config (:func:`part_config`), runs ``evaluate(cfg, out_dir, quick)``
    (train, score, plot) under the config's thread count (:func:`torch_threads`) and returns its
    metrics with ``config`` and ``report`` (``report(metrics, cfg, folder name)``, the part's markdown
    section) added.

    Args:
        title: the part's name in the runner's docstring (``"text"``).
        default: the part's default config.
        evaluate: the part's training and evaluation; returns its metrics.
        report: the part's markdown section from its metrics.
    """
    def run(out_dir: Path, config: Optional[Path] = None, max_steps: Optional[int] = None, progress_bar: bool = True,
            quick: bool = False, schedule: Optional[Dict[str, Any]] = None) -> Dict[str, object]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = Path(config) if config else default
        cfg = part_config(config, default, out_dir, max_steps, progress_bar, schedule)
        shutil.rmtree(cfg.trainer.default_root_dir, ignore_errors=True)  # each demo trains afresh (the part's own folder)
        with torch_threads(cfg.trainer.threads):
            metrics = evaluate(cfg, out_dir, quick)
        metrics["config"] = str(config)
        metrics["report"] = report(metrics, cfg, out_dir.name)
        return metrics

    run.__doc__ = f"""Run the {title} part of ``mmm demo`` in ``out_dir``; returns its metrics (``report``: its markdown).

        Args:
            out_dir: folder for the run, the figures and the metrics.
            config: pretraining config (default ``{default.relative_to(default.parents[1])}``).
            max_steps: override ``trainer.max_steps``.
            progress_bar: show Lightning's progress bar.
            quick: a small held-out set and probe, for smoke tests.
            schedule: config overrides applied before ``max_steps`` (``mmm demo --full``: the longer schedule).
        """
    return run


@dataclass
class TrainedPart:
    """A demo part's pretraining run and the same network at its initialisation, both on the CPU in eval mode."""

    run: Any
    """The :class:`~mmm.train.pretrain.PretrainRun`."""
    train_seconds: float
    models: Dict[str, MaskedModel]
    """``{"trained": ..., "untrained": ...}``: the untrained one is built from the run's seed, so it starts where
    training started."""
    series: Dict[str, List[tuple]]
    """The run's logged metrics (:func:`read_metrics`)."""
    train_urls: List[str]
    val_urls: List[str]
    """The shards of a single-task run's dataset (``data.val`` or the embedded set's val split); empty for a
    multi-task run."""

    def summary(self, cfg: PretrainConfig) -> Dict[str, object]:
        """The metrics every part reports: steps, thread count, training seconds, the last checkpoint."""
        return {"steps": cfg.trainer.max_steps, "threads": cfg.trainer.threads,
                "train_seconds": round(self.train_seconds, 1), "checkpoint": str(self.run.last_checkpoint)}

    def losses_and_probes(self, loss_batch_size: int, quick: bool = False, **probe: Any) -> Dict[str, Any]:
        """``held_out_loss`` ``{model: {head: loss}}`` on :attr:`val_urls` (:func:`held_out_loss`: identical masks
        for both models; 3 batches with ``quick``, else 20), ``linear_probe`` ``{model: score dict}``
        (:func:`probe_models` on :attr:`train_urls` / :attr:`val_urls`, ``probe`` passed on) and ``probe_seconds``."""
        losses = {name: held_out_loss(m, self.run.modality, self.run.masker, self.val_urls, batch_size=loss_batch_size,
                                      max_batches=3 if quick else 20) for name, m in self.models.items()}
        t0 = time.perf_counter()
        scores = probe_models(self.models, self.run.modality, self.train_urls, self.val_urls, **probe)
        return {"held_out_loss": losses, "linear_probe": {k: vars(v) for k, v in scores.items()},
                "probe_seconds": round(time.perf_counter() - t0, 1)}


def train_part(cfg: PretrainConfig) -> TrainedPart:
    """Pretrain ``cfg`` (:func:`mmm.train.pretrain.pretrain`), timed, and build its untrained twin."""
    t0 = time.perf_counter()
    run = pretrain(cfg)
    train_seconds = time.perf_counter() - t0
    trained = run.module.model.cpu().eval()
    L.seed_everything(cfg.seed, verbose=False)
    untrained = build_model_for(cfg, run.modalities if len(run.modalities.feeds) > 1 else run.modality).eval()
    series = read_metrics(run.csv_logger.log_dir and Path(run.csv_logger.log_dir) / "metrics.csv")
    train_urls = val_urls = []
    if not cfg.tasks:
        train_urls = resolve_shards(cfg.data.train, cfg.data.dataset, "train")
        val_urls = scoring_val_shards(task_configs(cfg)[0])
    return TrainedPart(run, train_seconds, {"trained": trained, "untrained": untrained}, series, train_urls, val_urls)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (``trainer.threads``), restored after; None = unchanged.

    A demo part trains and evaluates in this process, so it applies the config's thread count to both.
    """
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"trainer.threads must be >= 1 or null, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_metrics(csv_path: Optional[Path]) -> Dict[str, List[tuple]]:
    """Lightning CSV metrics as ``{name: [(step, value), ...]}`` (empty when the file is missing)."""
    series: Dict[str, List[tuple]] = {}
    if csv_path is None or not Path(csv_path).is_file():
        return series
    with Path(csv_path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            step = row.get("step")
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None) or step in ("", None):
                    continue
                series.setdefault(key, []).append((int(float(step)), float(value)))
    return series


def plot_losses(series: Dict[str, List[tuple]], out: Path, title: str, ylabel: str,
                hlines: Sequence[tuple] = (), loss: str = "loss") -> None:
    """PNG of the training and validation loss (legend: ``train {loss}``, ``held-out {loss}``), with optional
    reference lines ``(value, label, style)`` (style ``--`` grey, others red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if "train/loss" in series:
        s, v = zip(*series["train/loss"])
        ax.plot(s, v, label=f"train {loss}", lw=1)
    if "val/loss" in series:
        s, v = zip(*series["val/loss"])
        ax.plot(s, v, "o-", label=f"held-out {loss}")
    for value, label, style in hlines:
        ax.axhline(value, ls=style, color="grey" if style == "--" else "tab:red", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


@torch.no_grad()
def held_out_loss(model: MaskedModel, modality: Any, masker: Any, urls: List[str], *, batch_size: int,
                  max_batches: int = 20, seed: int = 1234, task: str = "") -> Dict[str, float]:
    """Prediction-weighted mean loss per objective on held-out shards, with masks fixed by ``seed``
    (so different models are scored on identical hidden positions); ``task`` tags the batches for a
    multi-task model (its heads score them)."""
    was = model.training
    model.eval()
    stages = modality.stages(masker, batch_size=batch_size, seed=seed, handler=SampleErrorHandler(),
                             fixed_masking=True, epochs=None, train=False)
    sums: Dict[str, List[float]] = {}
    for i, batch in enumerate(make_pipeline(urls, stages=stages, shuffle_shards=False, shuffle_buffer=0)):
        if i >= max_batches:
            break
        batch.task = task
        _, outputs = model(batch)
        for name, out in outputs.items():
            s = sums.setdefault(name, [0.0, 0])
            s[0] += float(out.loss) * out.count
            s[1] += out.count
    model.train(was)
    return {name: total / count if count else float("nan") for name, (total, count) in sums.items()}  # NaN: nothing scored


def probe_models(models: Dict[str, MaskedModel], modality: Any, train_urls: List[str], val_urls: List[str], *,
                 max_train: int = 2000, max_test: int = 1000, pooling: str = "mean",
                 batch_size: int = 64) -> Dict[str, ProbeScore]:
    """Linear-probe accuracy of each model's frozen features (fitted on ``train_urls``, scored on ``val_urls``)."""
    scores = {}
    for name, model in models.items():
        train = extract_features(model, modality, train_urls, batch_size=batch_size, max_samples=max_train,
                                 pooling=pooling)
        test = extract_features(model, modality, val_urls, batch_size=batch_size, max_samples=max_test,
                                pooling=pooling)
        scores[name] = linear_probe(train, test)
    return scores


def bold_better(rows: Dict[str, Sequence[Optional[float]]], higher_is_better: Sequence[bool],
                fmt: Union[str, Sequence[str]] = "{:.3f}") -> Dict[str, List[str]]:
    """Markdown cells of rows compared column by column, the better value of each column in bold.

    In each column, the value that is strictly best among the rows (as printed with ``fmt``: values
    that print the same are a tie, and a tie bolds nothing) is bold. A row's label is bold when its
    row is best or tied in every column and strictly best in at least one: the better row, whichever
    it is (the trained model, or its initialisation where training did not help).

    Args:
        rows: row label → one value per column (None or NaN: shown as ``–`` and not compared).
        higher_is_better: per column, True when a larger value is better (accuracy, recall), False
            when a smaller one is (loss, perplexity).
        fmt: format of a value, or one format per column.

    Returns:
        row label → ``[label cell, value cell, ...]``, in the order of ``rows``.
    """
    fmts = [fmt] * len(higher_is_better) if isinstance(fmt, str) else list(fmt)
    widths = {len(values) for values in rows.values()} | {len(fmts)}
    if widths - {len(higher_is_better)}:
        raise ValueError(f"every row (and fmt) needs {len(higher_is_better)} values, one per column; "
                         f"got {sorted(widths)}")

    def shown(v: Optional[float], col: int) -> Optional[str]:
        return None if v is None or v != v else fmts[col].format(v)

    outcome: Dict[str, List[str]] = {label: [] for label in rows}  # per column: win | tie | lose | none
    for col, higher in enumerate(higher_is_better):
        scored = {label: float(shown(values[col], col)) for label, values in rows.items()
                  if shown(values[col], col) is not None}
        top = (max if higher else min)(scored.values()) if len(scored) > 1 else None
        winners = [label for label, v in scored.items() if v == top]
        for label in rows:
            outcome[label].append("none" if top is None or label not in scored else
                                  "lose" if label not in winners else "win" if len(winners) == 1 else "tie")
    out: Dict[str, List[str]] = {}
    for label, values in rows.items():
        cells = [shown(v, c) or "–" for c, v in enumerate(values)]
        cells = [f"**{cell}**" if o == "win" else cell for cell, o in zip(cells, outcome[label])]
        better = "win" in outcome[label] and "lose" not in outcome[label]
        out[label] = [f"**{label}**" if better else label] + cells
    return out


def report_end(folder: str, figures: Sequence[Tuple[str, str]], checkpoint: str, how: str) -> List[str]:
    """The last lines of a part's report: its figures (``(alt text, file name)`` in the part's folder) and the
    checkpoint with ``how`` to load it."""
    lines: List[str] = []
    for alt, name in figures:
        lines += ["", f"![{alt}]({folder}/{name})"]
    return lines + ["", f"Checkpoint: `{checkpoint}` ({how}).", ""]


def table_row(cells: Sequence[str]) -> str:
    """``| a | b | c |``: one markdown table row."""
    return "| " + " | ".join(cells) + " |"
