"""Training batches whose contrastive pairs every rank gathers must hold the same number of pairs on every rank.

The ``itc`` head scores the global batch: it gathers every rank's image and caption embeddings (open_clip's
``ClipLoss``, CLIP, Radford et al. 2021), and ``torch.distributed.all_gather`` needs equal shapes on every rank. A
one-pass stream ends each worker's share of the shards with a partial batch, and two ranks' partial batches differ:
the gather then fails (gloo: "Received data size doesn't match expected size") or, on GPUs, may hang. With several
ranks, a training batch carrying contrastive targets with fewer pairs than the batch size is therefore dropped in
its worker, before it reaches the step (so exact resume replays the same stream), and counted in a warning.
"""
from __future__ import annotations

import logging
from typing import Iterator

from mmm.batch import ContrastiveTargets, PackedBatch

logger = logging.getLogger(__name__)


class FullContrastiveBatches:
    """Drop training batches whose :class:`~mmm.batch.ContrastiveTargets` hold fewer than ``batch_size`` pairs (a
    class: pipelines are pickled into workers).

    Args:
        batch_size: the task's pairs per batch.
        task: the task's name ("" for a single-task run), for the warning.
    """

    def __init__(self, batch_size: int, task: str = "") -> None:
        self.batch_size, self.task = int(batch_size), task
        self.dropped_batches = self.dropped_pairs = 0

    def __call__(self, src: Iterator[PackedBatch]) -> Iterator[PackedBatch]:
        for batch in src:
            short = [t.count for t in batch.targets.values() if isinstance(t, ContrastiveTargets)
                     and t.count < self.batch_size]
            if not short:
                yield batch
                continue
            self.dropped_batches += 1
            self.dropped_pairs += short[0]
            if self.dropped_batches == 1 or self.dropped_batches % 100 == 0:
                logger.warning("%s: %d partial contrastive batch(es) (%d pair(s)) dropped so far in this data worker: "
                               "with several ranks every rank's itc batch must hold data.batch_size=%d pairs "
                               "(the head gathers them across ranks)", f"task {self.task!r}" if self.task else "training",
                               self.dropped_batches, self.dropped_pairs, self.batch_size)
