"""A pipeline stage that checks what a modality's stages yield, naming the task and modality that made it.

A modality's :meth:`~mmm.modalities.base.Modality.stages` must end by collating into a
:class:`~mmm.batch.PackedBatch` whose inputs are keyed by the model's embedder names. A plug-in that got this
wrong (no collate step, a list or tuple instead of a batch, inputs under another key) failed far from the
mistake: a bare ``TypeError`` inside webdataset, an ``AttributeError`` in the training step, a ``KeyError`` in
the model. The check is a type test and a set comparison per batch, in the data workers.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from mmm.batch import PackedBatch


class CheckBatches:
    """Pass batches through; raise a ``TypeError`` naming ``task`` and ``modality`` for anything that is not a
    :class:`PackedBatch` whose inputs are among ``embedders`` (a class: pipelines are pickled into workers).

    Args:
        task: the task's name ("" for a single-task run).
        modality: the modality whose stages feed the task.
        embedders: the model's embedder names.
    """

    def __init__(self, task: str, modality: str, embedders: Iterable[str]) -> None:
        self.task, self.modality, self.embedders = task, modality, tuple(embedders)

    def _where(self) -> str:
        return (f"task {self.task!r} (modality {self.modality!r})" if self.task else f"modality {self.modality!r}")

    def __call__(self, src: Iterator[object]) -> Iterator[PackedBatch]:
        for batch in src:
            if not isinstance(batch, PackedBatch):
                raise TypeError(f"{self._where()}: its stages yielded a {type(batch).__module__}.{type(batch).__name__}, "
                                f"not a mmm.batch.PackedBatch; a modality's stages end by collating samples into one "
                                f"(e.g. wds.batched(batch_size, collation_fn=partial(pack_masked, modality=NAME)))")
            unknown = sorted(set(batch.inputs) - set(self.embedders))
            if unknown:
                raise TypeError(f"{self._where()}: its batch has inputs {sorted(batch.inputs)}, but the model's "
                                f"embedders are {list(self.embedders)}: key a batch's inputs by the modality's name")
            yield batch
