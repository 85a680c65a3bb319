"""Frozen teacher image encoders that compute masked-region targets on the fly.

UNITER (Chen et al. 2020, "UNITER: UNiversal Image-TExt Representation Learning") regresses the
features and predicts the class distributions a frozen Faster R-CNN gave each hidden region. With
patch inputs instead of detector regions there is no detector output in the shards, so a frozen
image encoder plays that part, as in feature-distillation masked image modeling (MaskFeat, Wei et
al. 2022; MVP / BEiT v2 use a CLIP teacher): its per-patch tokens are the regression targets
(MRFR) and, for a classifier, ``softmax(head(token))`` per patch gives the soft labels (MRC).

A :class:`FrozenTeacher` is deliberately a plain object, not an ``nn.Module``: an objective
holding one does not register its weights, so they are never in the model's ``state_dict``,
never seen by the optimizer, and ``model.train()`` cannot switch it out of eval mode. It moves to
the device of the pixels it is given, lazily. Weights come only from a local file, read with
safetensors or ``torch.load(weights_only=True)``; a file carrying pickled code is refused.

Spec (the ``teacher`` argument of the MRM objectives)::

    teacher: {kind: timm, model: vit_tiny_patch16_224, path: /data/t.safetensors, kwargs: {img_size: 32}}
    teacher: {kind: open_clip, model: ViT-B-32, path: /data/clip.safetensors}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmm.modalities.image.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["FrozenTeacher", "TeacherOutput", "TEACHER_KINDS", "build_teacher", "read_weight_file"]

TEACHER_KINDS = ("timm", "open_clip")
_SPEC_KEYS = {"kind", "model", "path", "kwargs", "input_size"}
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default preprocessing
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TeacherOutput:
    """Per-patch teacher targets on mmm's patch grid.

    Args:
        features: (B, P, F) float32 patch features.
        soft_labels: (B, P, C) float32 class distributions, or None for a teacher without a classifier.
    """

    features: torch.Tensor
    soft_labels: Optional[torch.Tensor] = None


def read_weight_file(path: Path) -> Dict[str, torch.Tensor]:
    """A flat ``name → tensor`` mapping from a local ``.safetensors`` or ``torch.save`` file, read safely.

    A ``torch.save`` file is read with ``weights_only=True`` (a pickle that references code is
    refused, naming the file); a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and a
    DDP ``module.`` prefix are unwrapped.

    Args:
        path: the weights file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file {path} does not exist or is not a file "
                                "(teachers load local files only, never downloads)")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # a header that is not JSON, a truncated file
            raise ValueError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    from mmm.checkpoint import safe_torch_load

    obj = safe_torch_load(path)  # raises ValueError naming the file on a code-carrying pickle
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = sorted(map(str, obj))[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a mapping of weight names to tensors, found {found}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    from mmm.checkpoint import load_weights

    load_weights(module, dict(state), f"teacher weights {source}",
                 hint="check teacher.model and teacher.kwargs, e.g. img_size / num_classes")


class FrozenTeacher:
    """A frozen image encoder giving per-patch features (and soft labels) on mmm's patch grid.

    Build it with :func:`build_teacher`. Calling it maps mmm's normalised pixels (ImageNet
    mean/std, :func:`mmm.modalities.image.transforms.normalize`) to the teacher's input (resize to its
    ``input_size``, its own mean/std), runs it under ``torch.no_grad`` in eval mode, and
    bilinearly resamples its token grid onto ``grid`` when the two differ.

    Args:
        model: the teacher network (its weights are frozen here).
        tokens_fn: ``model, pixels → (B, h*w, D)`` patch tokens (no prefix tokens), row-major.
        token_grid: the teacher's (h, w) token grid at ``input_size``.
        input_size: (H, W) the teacher expects.
        mean: per-channel mean of the teacher's input normalisation (on the [0, 1] scale).
        std: per-channel std of the teacher's input normalisation.
        grid: mmm's (rows, cols) patch grid the targets are returned on.
        classifier: ``tokens (.., D) → logits (.., C)`` or None; gives ``soft_labels``.
        source: a description (the file) for messages.
    """

    def __init__(self, model: nn.Module, tokens_fn, token_grid: Tuple[int, int], input_size: Tuple[int, int],
                 mean, std, grid: Tuple[int, int], classifier=None, source: str = "") -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokens_fn, self.classifier = tokens_fn, classifier
        self.token_grid, self.input_size, self.grid = tuple(token_grid), tuple(input_size), tuple(grid)
        self.source = source
        self._norm = torch.tensor([IMAGENET_MEAN, IMAGENET_STD, tuple(mean), tuple(std)], dtype=torch.float32)
        with torch.no_grad():
            probe = self._tokens(torch.zeros(1, 3, *self.input_size))
            self.feature_dim = int(probe.shape[-1])
            self.num_classes = int(classifier(probe[:, :1]).shape[-1]) if classifier is not None else None

    @property
    def has_classifier(self) -> bool:
        return self.classifier is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens_fn(self.model, x)  # (B, h*w, D)
        h, w = self.token_grid
        if tokens.dim() != 3 or tokens.shape[1] != h * w:
            raise ValueError(f"teacher {self.source}: expected (B, {h * w}, D) patch tokens for its {h}x{w} grid, got "
                             f"{tuple(tokens.shape)}")
        return tokens

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) mmm-normalised pixels → :class:`TeacherOutput` with (B, P, F) [and (B, P, C)]."""
        if self.device != pixels.device:
            self.model.to(pixels.device)  # lazily follow the data (the teacher is outside the module tree)
        if self.model.training:
            self.model.eval()
        mean, std, t_mean, t_std = self._norm.to(pixels.device)[:, :, None, None]  # each (3, 1, 1)
        x = pixels.float() * std + mean  # (B, 3, H, W) on the [0, 1] scale
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        x = (x - t_mean) / t_std
        tokens = self._tokens(x).float()  # (B, h*w, D)
        if self.token_grid != self.grid:
            b, _, d = tokens.shape
            g = tokens.transpose(1, 2).reshape(b, d, *self.token_grid)  # (B, D, h, w)
            g = F.interpolate(g, size=self.grid, mode="bilinear", align_corners=False)  # (B, D, gh, gw)
            tokens = g.flatten(2).transpose(1, 2)  # (B, P, D)
        soft = self.classifier(tokens).float().softmax(-1) if self.classifier is not None else None  # (B, P, C)
        return TeacherOutput(tokens.contiguous(), soft)


# ----------------------------------------------------------------------------- builders


def _create(factory, what: str, name: str, kwargs: Dict[str, Any], no_weights: Any) -> nn.Module:
    """``factory(name, pretrained=no_weights, **kwargs)``: never downloading weights, errors naming the call."""
    if "pretrained" in kwargs:
        raise ValueError("teacher.kwargs must not set 'pretrained': teacher weights come from teacher.path only")
    try:
        return factory(name, pretrained=no_weights, **kwargs)
    except Exception as e:
        raise ValueError(f"teacher: {what}({name!r}, **{kwargs}) failed: {type(e).__name__}: {e}") from None


def _timm_teacher(name: str, path: Path, kwargs: Dict[str, Any], grid, input_size) -> FrozenTeacher:
    try:
        import timm
    except ImportError:
        raise ImportError("a timm teacher needs the `timm` package: pip install timm") from None
    model = _create(timm.create_model, "timm.create_model", name, kwargs, False)
    _load_strict(model, read_weight_file(path), path)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    pe = getattr(model, "patch_embed", None)
    if input_size is None:
        size = getattr(pe, "img_size", None) or cfg.get("input_size", (3, 224, 224))[1:]
        input_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    input_size = tuple(int(s) for s in input_size)
    with torch.no_grad():
        out = model.eval().forward_features(torch.zeros(1, 3, *input_size))
    if out.dim() == 4:  # a CNN feature map (B, D, h, w)
        token_grid = tuple(out.shape[-2:])

        def tokens_fn(m, x):
            return m.forward_features(x).flatten(2).transpose(1, 2)
    elif out.dim() == 3:  # a ViT token sequence (B, prefix + h*w, D)
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        gs = getattr(pe, "grid_size", None)
        n = out.shape[1] - prefix
        token_grid = tuple(gs) if gs is not None and gs[0] * gs[1] == n else (int(round(n ** 0.5)),) * 2
        if token_grid[0] * token_grid[1] != n:
            raise ValueError(f"teacher {name}: cannot tell the token grid of {n} patch tokens")

        def tokens_fn(m, x):
            return m.forward_features(x)[:, prefix:]
    else:
        raise ValueError(f"teacher {name}: forward_features gave a {out.dim()}-d output; expected tokens or a feature map")
    classifier = None
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear) and getattr(model, "num_classes", 0):
        norm = getattr(model, "fc_norm", None) or nn.Identity()

        def classifier(tokens):  # per-patch logits: the classifier's norm and linear applied to each token
            return head(norm(tokens))
    return FrozenTeacher(model, tokens_fn, token_grid, input_size, mean, std, grid, classifier, str(path))


def _open_clip_teacher(name: str, path: Path, kwargs: Dict[str, Any], grid, input_size) -> FrozenTeacher:
    try:
        import open_clip
    except ImportError:
        raise ImportError("an open_clip teacher needs the `open_clip_torch` package") from None
    model = _create(open_clip.create_model, "open_clip.create_model", name, kwargs, None)
    visual = model.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "grid_size"):
        raise ValueError(f"teacher: open_clip model {name!r} has no ViT image tower with patch tokens")
    state = read_weight_file(path)
    if any(k.startswith("visual.") for k in state):  # a whole CLIP checkpoint: keep the image tower
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    _load_strict(visual, state, path)
    size = tuple(visual.image_size) if input_size is None else tuple(int(s) for s in input_size)
    if size != tuple(visual.image_size):
        raise ValueError(f"teacher {name}: input_size {size} differs from the tower's image_size {visual.image_size}")
    mean = getattr(visual, "image_mean", None) or _OPENAI_MEAN
    std = getattr(visual, "image_std", None) or _OPENAI_STD

    def tokens_fn(m, x):  # last block's patch tokens after ln_post (the tower's own token output)
        out = m.forward_intermediates(x, indices=1, normalize_intermediates=True, intermediates_only=True,
                                      output_fmt="NLC")
        return out["image_intermediates"][-1]
    return FrozenTeacher(visual, tokens_fn, tuple(visual.grid_size), size, mean, std, grid, None, str(path))


def build_teacher(spec: Mapping[str, Any], grid: Tuple[int, int]) -> FrozenTeacher:
    """Build a frozen teacher from its spec.

    Args:
        spec: ``kind`` (``timm`` | ``open_clip``), ``model`` (the library's model name), ``path``
            (a local ``.safetensors`` / ``.pth`` file), optional ``kwargs`` for the library's
            ``create_model`` (architecture only; never ``pretrained``) and ``input_size`` ([H, W]
            the pixels are resized to; default: the model's own).
        grid: mmm's (rows, cols) patch grid the targets are returned on.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"teacher must be a mapping {{kind, model, path, kwargs}}, got {type(spec).__name__}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"teacher: unknown keys {sorted(unknown)}; expected some of {sorted(_SPEC_KEYS)}")
    for key in ("kind", "model", "path"):
        if not spec.get(key):
            raise ValueError(f"teacher.{key} is required (got {spec.get(key)!r})")
    kind = spec["kind"]
    if kind not in TEACHER_KINDS:
        raise ValueError(f"teacher.kind={kind!r} is not one of {TEACHER_KINDS}")
    kwargs = dict(spec.get("kwargs") or {})
    size = spec.get("input_size")
    if size is not None:
        size = (int(size), int(size)) if isinstance(size, int) else tuple(size)
    build = _timm_teacher if kind == "timm" else _open_clip_teacher
    return build(str(spec["model"]), Path(spec["path"]), kwargs, tuple(grid), size)
