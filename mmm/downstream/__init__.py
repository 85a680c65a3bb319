"""Downstream evaluation of pretrained encoders: frozen features (linear probe, kNN), ``mmm embed``,
``mmm finetune`` and the embedded downstream tasks behind ``mmm bench --suite downstream``.

One concern per module: :mod:`.metrics` (GLUE-convention scores), :mod:`.knn` (cosine kNN on
frozen features), :mod:`.inputs` (raw input → encoder batch → pooled features: the ``InputAdapter`` each
modality gives through ``Modality.downstream_inputs``, its own in ``mmm/modalities/<name>/downstream.py``),
:mod:`.split` (one split: inputs, labels, keys, skipped rows), :mod:`.data` (labelled files and shards, checked),
:mod:`.embed`, :mod:`.finetune`, :mod:`.tasks` (what a task is and :func:`~.tasks.downstream_tasks`, which collects
the tasks each modality offers through ``Modality.downstream_tasks``; the built-in ones in
``mmm/modalities/<name>/downstream.py``).
"""
