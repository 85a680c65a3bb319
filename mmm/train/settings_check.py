"""Checks of a run's settings that need more than one field, the machine, or a registry entry's signature.

:func:`check_settings` runs before anything is written or fitted (a tokenizer's fit can take minutes), so a
setting the run could not honour is refused at once, naming its dotted key.
"""
from __future__ import annotations

import os

import torch

from mmm.config import ConfigError, PretrainConfig, check_config
from mmm.model import OBJECTIVE_SUPPLIED
from mmm.optim import OPTIMIZER_SUPPLIED
from mmm.registry import OBJECTIVES, OPTIMIZERS, RegistryError, check_kwargs


def check_settings(cfg: PretrainConfig) -> None:
    """Refuse settings the run could not honour, before anything is written.

    Every field's range and choices (:func:`~mmm.config.check_config`), the objectives' and the optimizer's
    argument names (against their registry entries' signatures), then the choices that depend on each
    other or on this machine: ``trainer.nonfinite_loss`` and its single-process rule, and an
    ``xformers`` attention backend or the ``fsdp`` strategy (CUDA only) on a run without CUDA.
    """
    check_portable_settings(cfg)
    _check_devices(cfg)
    if cfg.trainer.nonfinite_loss == "skip" and (cfg.trainer.devices not in (1, "1") or cfg.trainer.num_nodes != 1):
        raise ConfigError("trainer.nonfinite_loss: skip needs a single process (ranks would disagree on which "
                          "batches step); use stop with several devices")
    _check_attention_backend(cfg)
    _check_strategy(cfg)


def check_portable_settings(cfg: PretrainConfig) -> None:
    """The checks that do not depend on this machine (``mmm prepare`` may fit a GPU run's assets on a CPU box):
    every field's range and choices, the components' argument names, the encoder's shape."""
    check_config(cfg)
    _check_component_args(cfg)
    _check_encoder_shape(cfg)
    _check_ranges(cfg)


def _check_ranges(cfg: PretrainConfig) -> None:
    """Pairs whose elements are each in range but must also be ordered (each element's bounds are checked by
    ``check_config``): refused here, before anything is written, not in a data worker."""
    image = getattr(cfg.model, "image", None)
    scale = getattr(image, "crop_scale", None)
    if scale is not None and len(scale) == 2 and scale[0] > scale[1]:
        raise ConfigError(f"model.image.crop_scale must be [low, high] with low <= high, got {list(scale)}")


def _check_encoder_shape(cfg: PretrainConfig) -> None:
    """The heads split the width evenly, and rotary positions rotate pairs of a head's channels."""
    enc = cfg.model.encoder
    if enc.dim % enc.heads:
        raise ConfigError(f"model.encoder.dim ({enc.dim}) must be divisible by model.encoder.heads ({enc.heads})")
    if enc.relative_position == "rotary" and (enc.dim // enc.heads) % 2:
        raise ConfigError(f"model.encoder.relative_position: rotary needs an even head width, and "
                          f"model.encoder.dim / heads is {enc.dim} / {enc.heads} = {enc.dim // enc.heads}")


def _check_devices(cfg: PretrainConfig) -> None:
    """``trainer.devices``: a positive count, -1 (all), ``auto``, or device indices such as ``"0,1"``."""
    devices = cfg.trainer.devices
    text = str(devices).strip()
    indices = [part.strip() for part in text.split(",") if part.strip()]  # "0," is Lightning's GPU 0 alone
    if devices == 0 or text == "0" or not (text in ("auto", "-1") or (indices and all(p.isdigit() for p in indices))):
        raise ConfigError(f"trainer.devices must be a positive number of devices, -1 (all), 'auto', or device "
                          f"indices such as '0,1'; got {devices!r}")


def _on_cuda(cfg: PretrainConfig) -> bool:
    """Whether the run's trainer will use CUDA GPUs (an accelerator that allows them, and CUDA present)."""
    return str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def _check_strategy(cfg: PretrainConfig) -> None:
    """``fsdp``: Lightning's FSDPStrategy runs on CUDA only (it would refuse only after the assets were fitted)."""
    accelerator = str(cfg.trainer.accelerator)
    if cfg.trainer.strategy == "fsdp" and not _on_cuda(cfg):
        raise ConfigError(f"trainer.strategy: fsdp needs CUDA GPUs (Lightning's FSDPStrategy has no CPU mode), and "
                          f"this run has none (trainer.accelerator {accelerator!r}, CUDA available: "
                          f"{torch.cuda.is_available()}); use ddp or auto on CPU")


def _check_attention_backend(cfg: PretrainConfig) -> None:
    """The backend asked for (config, or ``$MMM_ATTENTION`` under ``auto``) exists; ``xformers`` and ``flex``
    need CUDA (and xformers installed); ``xformers`` applies no ALiBi bias."""
    from mmm.core.attention import BACKEND_ENV, xformers_available
    from mmm.registry import ATTENTION_BACKENDS

    asked = cfg.model.encoder.attention
    key = "model.encoder.attention"
    if asked == "auto" and os.environ.get(BACKEND_ENV):
        asked, key = os.environ[BACKEND_ENV], f"${BACKEND_ENV} (model.encoder.attention is auto)"
    if asked != "auto" and asked not in ATTENTION_BACKENDS:
        raise ConfigError(f"{key}: unknown attention backend {asked!r}; known: auto, "
                          f"{', '.join(ATTENTION_BACKENDS.list())}")
    accelerator, on_cuda = str(cfg.trainer.accelerator), _on_cuda(cfg)
    if asked == "flex" and not on_cuda:
        raise ConfigError(f"{key}: flex (FlexAttention) compiles for CUDA only here, and this run has no GPU "
                          f"(trainer.accelerator {accelerator!r}, CUDA available: {torch.cuda.is_available()}); "
                          f"use auto, sdpa or math")
    if asked == "xformers" and cfg.model.encoder.relative_position == "alibi":
        raise ConfigError(f"{key}: xformers applies no ALiBi bias (model.encoder.relative_position is alibi); "
                          f"use auto (SDPA with the bias), sdpa or math")
    if asked != "xformers":
        return
    if not on_cuda:
        raise ConfigError(f"{key}: xformers needs a CUDA GPU (it has no CPU kernels), and this run has none "
                          f"(trainer.accelerator {accelerator!r}, CUDA available: {torch.cuda.is_available()}); "
                          f"use auto, sdpa or math")
    if not xformers_available():
        raise ConfigError(f"{key}: xformers is not installed (or does not import); install it or use auto, sdpa or math")


def _check_component_args(cfg: PretrainConfig) -> None:
    """Each objective's and the optimizer's ``args``: no keyword the builder supplies, none its entry lacks."""
    checks = [(OBJECTIVES.get(o.name), o.args, f"objectives[{i}].args (objective {o.name!r})", OBJECTIVE_SUPPLIED)
              for i, o in enumerate(cfg.objectives)]
    checks.append((OPTIMIZERS.get(cfg.optim.name), cfg.optim.args, f"optim.args (optimizer {cfg.optim.name!r})",
                   OPTIMIZER_SUPPLIED))
    for entry, args, key, supplied in checks:
        try:
            check_kwargs(entry, dict(args), key, supplied=supplied, types=True)
        except RegistryError as e:
            raise ConfigError(str(e)) from None
