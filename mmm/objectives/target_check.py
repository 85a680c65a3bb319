"""Check the heads that classify codebook ids against the ids the run's data carries, before any data is read.

A ``token_targets`` head (HuBERT's cluster ids, BEiT-style visual tokens) or an ``mvm`` head reads
``batch.targets[target]``; a batch without that key gives the head a zero loss, since in a task mixture
another task's batches legitimately lack it. So a ``target`` that no modality of the run produces (a typo
such as ``audio_mfc``, or ``audio_chroma`` while ``model.audio.targets`` is ``[mfcc]``) trained nothing,
and the run still finished. Each modality says which keys it fills and with how many classes
(:meth:`mmm.modalities.base.Modality.token_targets`); a head whose ``num_classes`` differs from its
codebook's size is refused as well (larger: classes that never occur; smaller: it failed at the first batch).
The other way round, a codebook target that no head reads (``model.audio.targets: [mfcc, chroma]`` with one
head) is fitted and computed for every sample for nothing: a warning names it.
"""
from __future__ import annotations

import inspect
import logging
from typing import Dict, Iterable, List, Set

from mmm.config import ComponentConfig, ConfigError
from mmm.registry import OBJECTIVES

logger = logging.getLogger("mmm.train")


def _arg(cls: type, args: Dict, name: str):
    if name in args:
        return args[name]
    param = inspect.signature(cls).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def check_token_targets(objectives: List[ComponentConfig], modalities: Iterable) -> None:
    """Refuse a head marked ``reads_token_targets`` whose ``target`` no modality of ``modalities`` produces, or
    whose ``num_classes`` is not that target's number of classes.

    Raises:
        ConfigError: ``objectives[i] (objective NAME): ...`` naming the target keys the run does produce and
            the setting that sizes each.
    """
    from mmm.model import head_name  # the model module imports the objectives

    produced: Dict[str, int] = {}
    for m in modalities:
        produced.update(m.token_targets())
    offered = ", ".join(f"{k} ({n} classes)" for k, n in sorted(produced.items())) or "none"
    read: Set[str] = set()
    for i, o in enumerate(objectives):
        cls = OBJECTIVES.get(o.name)
        if not getattr(cls, "reads_token_targets", False):
            continue
        target, num_classes = _arg(cls, o.args, "target"), _arg(cls, o.args, "num_classes")
        where = f"objectives[{i}] (objective {head_name(o)!r})"
        read.add(target)
        if target not in produced:
            raise ConfigError(f"{where}: target {target!r} is not produced by any modality of this run (its "
                              f"codebook targets: {offered}); audio gives <modality>_<kind> for each kind of "
                              f"model.audio.targets, images give image_tokens when model.image.visual_tokens > 0")
        if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes != produced[target]:
            raise ConfigError(f"{where}: num_classes={num_classes} but target {target!r} has {produced[target]} "
                              f"classes (the codebook size: model.audio.target_clusters or "
                              f"model.image.visual_tokens); set num_classes: {produced[target]}")
    unread = sorted(set(produced) - read)
    if unread:
        logger.warning("codebook target(s) %s are fitted and computed for every sample, but no head reads them "
                       "(a token_targets or mvm head with target: <name>); drop them from model.audio.targets / "
                       "set model.image.visual_tokens: 0, or add a head", unread)
