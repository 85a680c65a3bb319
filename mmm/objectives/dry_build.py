"""Check the objectives' arguments before the run's assets are fitted.

A head is built from the run's embedders (:func:`mmm.model.build_model`), and those exist only once the
modalities' assets -- tokenizers, feature statistics, codebooks -- are fitted, which can take minutes. Yet
most of a head's argument checks (``top_k`` within the encoder depth, a loss name, a modality the run has)
read no embedder. :func:`check_objective_args` therefore builds every head once with stand-ins: each
modality's embedder is an :class:`UnbuiltEmbedder`, whose first attribute read ends the dry build of that
head. Whatever the head refuses before that point is refused now, naming the objective's entry; the rest is
checked by the real build, as before. The dry build runs on the ``meta`` device under a forked RNG, so it
allocates no weights and leaves the run's initialisation unchanged.
"""
from __future__ import annotations

import random
from typing import Iterable, List

import numpy as np
import torch

from mmm.config import ComponentConfig, ConfigError, EncoderConfig
from mmm.registry import OBJECTIVES, RegistryError


class AssetsNeeded(Exception):
    """A head's dry build reached a part of an embedder, which needs the fitted assets."""


class UnbuiltEmbedder:
    """Stands for a modality's embedder before its assets are fitted: reading any attribute stops the dry build."""

    def __init__(self, modality: str) -> None:
        object.__setattr__(self, "_modality", modality)

    def __getattr__(self, name: str):
        raise AssetsNeeded(f"{self._modality}.{name}")

    def __repr__(self) -> str:
        return f"UnbuiltEmbedder({self._modality!r})"


def check_objective_args(objectives: List[ComponentConfig], encoder_cfg: EncoderConfig,
                         modalities: Iterable[str]) -> None:
    """Build each head of ``objectives`` with :class:`UnbuiltEmbedder` stand-ins for ``modalities`` (in the
    model's order) and refuse what a head refuses before it reads an embedder.

    Raises:
        ConfigError: ``objectives[i] (objective NAME): <the head's message>``.
    """
    from mmm.model import head_name  # the model module imports the objectives

    stand_ins = {m: UnbuiltEmbedder(m) for m in modalities}
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            for i, o in enumerate(objectives):
                try:
                    OBJECTIVES.create(o.name, dim=encoder_cfg.dim, embedders=dict(stand_ins),
                                      encoder_cfg=encoder_cfg, **o.args)
                except AssetsNeeded:
                    continue  # the rest of this head's checks need its embedder: the real build makes them
                except (ValueError, RegistryError) as exn:
                    if isinstance(exn, ConfigError):
                        raise
                    message, own = str(exn), f"objective {o.name}: "
                    message = message[len(own):] if message.startswith(own) else message
                    raise ConfigError(f"objectives[{i}] (objective {head_name(o)!r}): {message}") from None
                except Exception:  # noqa: BLE001 - a stand-in or the meta device got in the way: the real build decides
                    continue
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
