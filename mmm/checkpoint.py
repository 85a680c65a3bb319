"""Checkpoint I/O: read an mmm pretraining checkpoint safely, and load weights with clear errors.

Nothing here depends on the model, the modalities or the data layer (only on :mod:`mmm.config`,
the registries and, for folding modality experts, :mod:`mmm.core.encoder`), so inference code,
interop and teachers can read checkpoints without the training stack. A checkpoint is read with ``torch.load(weights_only=True)``: a file carrying
pickled code is refused, never run. What a checkpoint means for one modality (its encoder, its
tokenizer) is asked of that modality through :data:`mmm.registry.MODALITIES`.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from mmm.config import ConfigError, PretrainConfig, from_dict
from mmm.registry import MODALITIES

PathLike = Union[str, Path]

CHECKPOINT_FORMAT = "mmm-pretrain-v1"


@dataclass
class CheckpointContents:
    """What an mmm pretraining checkpoint holds, as plain data.

    Args:
        path: the checkpoint file.
        config: the run's configuration.
        state_dict: model weights with the Lightning ``model.`` prefix removed.
        assets: modality → {file name: text} of every modality's assets (tokenizers, statistics).
        modality_order: the modalities in the order of the model's modality-embedding rows, or None.
    """

    path: Path
    config: PretrainConfig
    state_dict: Dict[str, torch.Tensor]
    assets: Dict[str, Dict[str, str]]
    modality_order: Optional[List[str]] = None
    _modalities: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def modality(self, name: str) -> Any:
        """The registered :class:`~mmm.modalities.base.Modality` ``name`` of this run, its assets
        restored from the checkpoint (built once, then cached)."""
        if name not in self._modalities:
            modality = MODALITIES.create(name, model_cfg=self.config.model)
            modality.load_assets(self.assets.get(name, {}), str(self.path))
            self._modalities[name] = modality
        return self._modalities[name]

    @property
    def tokenizer(self) -> Any:
        """The run's text tokenizer rebuilt from the embedded files, or None if none was stored."""
        return self.modality("text").tokenizer if self.assets.get("text") else None

    def modality_vector(self, modality: str) -> Optional[torch.Tensor]:
        """The learned modality embedding the model added to ``modality``'s tokens, or None for a
        single-modality model (its encoders must add it to match what the shared encoder saw)."""
        table = self.state_dict.get("modality_embed.weight")
        if table is None:
            return None
        order = self.modality_order
        if not order or modality not in order or len(order) != table.shape[0]:
            raise ValueError(f"{self.path}: the model has a modality embedding ({table.shape[0]} rows) but the "
                             f"checkpoint's modality list {order!r} does not place {modality!r} in it")
        return table[order.index(modality)]

    def modality_state(self, modality: str) -> Dict[str, torch.Tensor]:
        """Weights of one modality's encoder path: ``embedders.<modality>.*`` as ``embedder.*``, and ``encoder.*``."""
        prefix = f"embedders.{modality}."
        state = {"embedder." + k[len(prefix):]: v for k, v in self.state_dict.items() if k.startswith(prefix)}
        if not state:
            found = sorted({k.split(".")[1] for k in self.state_dict if k.startswith("embedders.")})
            raise ValueError(f"{self.path}: the checkpoint has no {modality!r} embedder (modalities: {found})")
        state.update({k: v for k, v in self.state_dict.items() if k.startswith("encoder.")})
        if any(".mlp.experts." in k for k in state):  # modality experts: this modality's MLP becomes the plain one
            from mmm.core.encoder import fold_modality_experts

            if modality not in (self.modality_order or []):
                raise ValueError(f"{self.path}: the encoder has modality experts but the checkpoint's modality list "
                                 f"{self.modality_order!r} does not place {modality!r} among them")
            state = fold_modality_experts(state, self.modality_order.index(modality))
        return state

    def finish_encoder(self, encoder: nn.Module, modality: str) -> nn.Module:
        """Fold the checkpoint's modality embedding for ``modality`` into ``encoder.embedder`` (its
        ``fold_modality_vector``); eval mode.

        A multimodal :class:`~mmm.model.MaskedModel` adds a learned modality embedding after each
        embedder; a single-modality encoder loaded from it folds that vector into the embedder (exact
        in eval mode), so it stays a plain embedder + encoder that exports to HF / timm unchanged.
        """
        vector = self.modality_vector(modality)
        if vector is not None:
            fold = getattr(encoder.embedder, "fold_modality_vector", None)
            if fold is None:
                raise TypeError(f"cannot fold a modality embedding into a {type(encoder.embedder).__name__} "
                                "(it has no fold_modality_vector method)")
            with torch.no_grad():
                fold(vector.detach().to(next(encoder.embedder.parameters()).dtype))
        return encoder.eval()


def damaged_entry(path: PathLike) -> Optional[str]:
    """The first entry of a zip-format ``torch.save`` file whose bytes do not match their stored CRC-32, else None.

    ``torch.load`` does not check the CRCs: a checkpoint with overwritten tensor bytes loads without an error and
    carries garbage weights. This reads the whole file once (about 0.4 s per GiB from the page cache). Entries
    written without a CRC (``torch.utils.serialization.config.save.compute_crc32 = False``) are not checked. A file
    that is not a zip (a legacy or foreign format) gives None here; ``torch.load`` names it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:  # written without CRCs (torch's save option): nothing to check
                    continue
                try:
                    with archive.open(info) as fh:  # reading to the end checks the entry's CRC-32
                        while fh.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return info.filename
    except (zipfile.BadZipFile, OSError, EOFError):
        return None
    return None


def safe_torch_load(path: Path) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name ``path``.

    A file whose pickle references anything beyond tensors and plain containers (a class with a
    ``__reduce__`` payload, say) is refused before any of it runs.

    Args:
        path: a file written by ``torch.save``.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0].strip()
        if "Unsupported global" in text:
            raise ValueError(f"refusing to load {path}: it contains pickled objects other than tensors and plain "
                             f"data, and mmm only unpickles with torch.load(weights_only=True) ({detail})") from None
        raise ValueError(f"{path} is not a PyTorch checkpoint torch.load can read safely ({detail or text})") from None
    except Exception as e:  # a truncated zip, a foreign format
        raise ValueError(f"{path} is not a PyTorch checkpoint torch.load can read: {type(e).__name__}: {e}") from None
    bad = damaged_entry(path)
    if bad is not None:
        raise ValueError(f"{path} is corrupt: the bytes of its entry {bad!r} do not match their CRC-32 (damaged on disk "
                         f"or in a copy); use another copy or an earlier checkpoint")
    return loaded


def read_checkpoint(path: PathLike) -> CheckpointContents:
    """Read an mmm Lightning checkpoint safely (``weights_only=True``: tensors and plain data only).

    The assets of every modality are restored once here (so a broken tokenizer is reported on
    reading, naming the file).

    Args:
        path: a ``.ckpt`` written by ``mmm pretrain``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist or is not a file")
    ckpt = safe_torch_load(p)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{p} is not a Lightning checkpoint: expected a dict with a 'state_dict' entry")
    meta = ckpt.get("mmm")
    if not isinstance(meta, dict):
        raise ValueError(f"{p} has no 'mmm' section (config and tokenizer); was it written by `mmm pretrain`?")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p}: checkpoint['mmm']['format'] is {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{p}: checkpoint['mmm']['config'] is missing or not a mapping")
    order = meta.get("modalities")
    if order is not None and not (isinstance(order, list) and all(isinstance(m, str) for m in order)):
        raise ValueError(f"{p}: checkpoint['mmm']['modalities'] must be a list of modality names, got {order!r}")
    try:
        cfg = from_dict(PretrainConfig, _without_unused_plugin_sections(meta["config"], order, p),
                        "checkpoint['mmm']['config']")
    except ConfigError as e:
        raise ValueError(f"{p}: {e}") from None
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise ValueError(f"{p}: state_dict has no 'model.*' keys (found e.g. {sorted(ckpt['state_dict'])[:3]})")
    assets = meta.get("assets") or {}
    if not isinstance(assets, dict) or not all(isinstance(v, dict) for v in assets.values()):
        raise ValueError(f"{p}: checkpoint['mmm']['assets'] must map modality names to {{file name: text}}")
    contents = CheckpointContents(p, cfg, state, assets, order)
    contents.tokenizer  # noqa: B018  (restores the text tokenizer now: a broken one is an error on reading)
    return contents


def _without_unused_plugin_sections(config: Dict[str, Any], used: Optional[List[str]], path: Path) -> Dict[str, Any]:
    """``config`` without the ``model.<name>`` sections of modalities not registered in this process and not used by
    the checkpoint's model (``used``: its modalities). A run's config holds a section for every modality registered
    when it was written, so a text run trained with a plug-in imported would otherwise be unreadable without it.

    Raises:
        ValueError: the model uses such a modality: its plug-in must be imported first.
    """
    from mmm.config import ModelConfig

    model = config.get("model")
    if not isinstance(model, dict):
        return config
    known = {f.name for f in ModelConfig.config_fields()}
    unknown = [k for k in model if k not in known]
    if not unknown:
        return config
    needed = [k for k in unknown if used is None or k in used]
    if needed:
        raise ValueError(f"{path}: the checkpoint's model has the modality section(s) {needed}, which no registered "
                         f"modality declares: a plug-in's; import the module that registers it first (`mmm --plugin "
                         f"MODULE ...`, MMM_PLUGINS=MODULE, or import it in Python)")
    return {**config, "model": {k: v for k, v in model.items() if k not in unknown}}


def load_weights(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: PathLike, hint: str = "") -> None:
    """``load_state_dict(strict=True)`` with an error that names ``source`` and the differing keys.

    Args:
        module: the module to fill.
        state_dict: weights keyed like ``module.state_dict()``.
        source: file the weights came from (for the message).
        hint: appended to the message in parentheses (what to check), or empty.
    """
    tail = f" ({hint})" if hint else ""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}{tail}")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{source}: weight {k!r} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)}{tail}")
    module.load_state_dict(state_dict, strict=True)
