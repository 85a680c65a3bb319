"""Model-level step strategies: what the model runs between its shared encoder pass and one head.

A head reads ``(hidden, batch)``. Most heads read the shared pass directly; a head whose inputs
must first be derived from that pass and encoded again (ITM on negatives mined by contrastive
similarity, as ALBEF trains it) names a step strategy, and the model, which owns the encoder,
runs it. A strategy is registered in :data:`mmm.registry.STEPS`, built by
:func:`mmm.model.build_model` as ``Strategy(head=..., heads=..., two_stream=..., **args)`` and
called as ``strategy(model, hidden, batch) -> (hidden, batch)`` on the batches its
``applies(batch)`` accepts. Importing this package registers the built-in strategies.
"""
from mmm.steps import hard_negatives  # noqa: F401  (registers "itm_hard_negatives")
