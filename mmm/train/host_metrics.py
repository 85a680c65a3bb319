"""Per-step metrics that do not make a GPU step wait for the host.

Lightning turns every metric logged with ``prog_bar=True`` into a Python number after every batch
(``.item()``: on CUDA the host waits for the step to finish), and turns a Python number given to
``self.log`` into a tensor on the module's device (a blocking copy on CUDA). A run that logs its loss to
the bar and its throughput as floats therefore syncs several times per step, although the logger only
writes every ``log_every_n_steps``. Here:

* numbers the host already has (throughput, the phase, data-error counts) are logged as CPU tensors
  (:func:`log_host_value`): nothing is copied to the device and reading them back costs nothing;
* training metrics are logged without ``prog_bar``; the progress bar picks the ones it shows from
  ``trainer.callback_metrics`` (device tensors, not converted) when it redraws its numbers, every
  ``log_every_n_steps`` (:func:`bar_metrics`), as the logger does;
* per-step metrics are logged only at the steps whose metrics reach the logger (:func:`logs_this_step`).
  Lightning writes a step's ``on_step`` metrics only every ``log_every_n_steps``, yet each ``self.log``
  call costs its bookkeeping (about 1.2 ms on the CPU, measured: 6 calls were 2 % of a tiny text step).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping

import torch

BAR_METRICS = ("train/loss", "train/tokens_per_sec")
"""Training metrics the progress bar always shows; the module adds its own (``bar_keys``: a single-task
run's heads' ``acc``, e.g. ``train/mlm_acc``; a multi-task run's per-task metrics stay in the logs)."""


def logs_this_step(trainer: Any) -> bool:
    """Whether the metrics of the training step now running (``training_step`` to ``on_train_batch_end``)
    reach the logger: Lightning's own test (every ``log_every_n_steps``, and when the run stops), or the
    run's last step, so that ``trainer.callback_metrics`` ends with its values. True without a trainer."""
    if trainer is None:
        return True
    try:
        if trainer._logger_connector.should_update_logs or trainer.fast_dev_run:  # Lightning's own test
            return True
        stepped = trainer.fit_loop.epoch_loop._batches_that_stepped  # the count Lightning's test uses
    except (AttributeError, NotImplementedError):  # another Lightning, or outside fit: log as before
        return True
    return trainer.max_steps is not None and trainer.max_steps > 0 and stepped + 1 >= trainer.max_steps


def log_host_value(module: Any, name: str, value: float, **kwargs: Any) -> None:
    """``module.log(name, value)`` for a number the host already has, kept on the host (a CPU tensor).

    Args:
        module: the LightningModule logging.
        name: the metric's key.
        value: a Python number.
        kwargs: ``self.log`` options; ``on_step=True`` and ``batch_size=1`` unless given.
    """
    kwargs.setdefault("on_step", True)
    kwargs.setdefault("batch_size", 1)
    module.log(name, torch.tensor(float(value), dtype=torch.float32), **kwargs)


def bar_metrics(callback_metrics: Mapping[str, Any], keys: Iterable[str] = ()) -> Dict[str, float]:
    """The training metrics the progress bar shows (:data:`BAR_METRICS` and ``keys``) that were logged, as
    numbers (one read each)."""
    out = {}
    for name in (*BAR_METRICS, *keys):
        value = callback_metrics.get(name)
        if value is not None:
            out[name] = float(value.item() if isinstance(value, torch.Tensor) else value)
    return out
