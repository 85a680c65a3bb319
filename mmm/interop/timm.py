"""Convert between mmm image encoders and timm Vision Transformers (``timm.models.VisionTransformer``).

Weight layout. timm's ViT and mmm's pre-LN encoder name their block parts alike, and both fuse
query/key/value into one Linear with rows ordered q | k | v, heads contiguous inside each::

    embedder.patch_embed.proj / cls_token / pos_embed  ↔ patch_embed.proj / cls_token / pos_embed
    embedder.norm                                      ↔ norm_pre   (CLIP-style pre-norm, optional)
    encoder.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}  ↔ blocks.{i}.<same>
    encoder.final_norm                                 ↔ norm

Equivalences used on import (exact up to float rounding):

* LayerScale (``init_values``; Touvron et al. 2021, CaiT / DeiT III): ``x + γ ⊙ (W h + b)`` is
  ``x + (diag(γ) W) h + γ ⊙ b``, so γ is folded into ``attn.proj`` and ``mlp.fc2``.
* ``no_embed_class`` (DeiT III): [CLS] gets no position in timm; mmm gives it a zero row.
* a missing bias (``proj_bias=False``, ``pre_norm``'s bias-free patch projection) is a zero bias.

Equivalences used on export: ``pre_norm`` ViTs have no patch-projection bias in timm, so mmm's
bias is folded into the patch rows of ``pos_embed``; fixed sin-cos positions are written as
timm's (learned) ``pos_embed``. The ``mask_token`` (a pretraining part) is not exported, and
dropout rates are not carried over (set them on the timm model when fine-tuning).

What mmm cannot represent is refused by name: register tokens, distillation tokens, QK-norm,
norms inside attention or the MLP, non-(exact-)GELU or gated MLPs, non-LayerNorm or mixed-epsilon
norms, non-square images or patches, a patch-embedding norm, models without absolute positions,
and block/attention classes other than timm's plain ``Block``/``Attention``. Parts after
``forward_features`` (``fc_norm``, ``attn_pool``, ``head``) belong to the classifier and are
neither imported nor needed for parity: :class:`~mmm.modalities.image.embedder.ImageEncoder` equals
``forward_features``.

Weight files are read with safetensors or ``torch.load(weights_only=True)`` only, so a file
carrying pickled code is refused, never run.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from mmm.config import EncoderConfig
from mmm.checkpoint import load_weights, safe_torch_load
from mmm.interop.require import require
from mmm.modalities.image.embedder import ImageEncoder, ImageEncoderConfig

PathLike = Union[str, Path]

logger = logging.getLogger("mmm.interop")

TIMM_MODEL_NAME = "vit_base_patch16_224"
"""Entry point :func:`to_timm_model` passes to ``timm.create_model``; every architecture argument is overridden."""
TIMM_NORM_EPS = 1e-6  # timm ViT's LayerNorm default
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


# ----------------------------------------------------------------------------- export


def check_exportable(encoder: ImageEncoder) -> None:
    """Raise ValueError naming the first setting a timm ``VisionTransformer`` cannot represent.

    Args:
        encoder: the image encoder to export.
    """
    if not isinstance(encoder, ImageEncoder):
        raise TypeError(f"expected an mmm ImageEncoder, got {type(encoder).__name__}")
    e = encoder.config.encoder
    rules = [
        ("encoder.norm_first", e.norm_first, True, "timm's ViT block is pre-LayerNorm"),
        ("encoder.mlp", e.mlp, "gelu", "timm's ViT MLP is Linear-GELU-Linear"),
        ("encoder.relative_position", e.relative_position, "none", "timm's ViT has no ALiBi/rotary positions"),
    ]
    for key, value, expected, why in rules:
        if value != expected:
            raise ValueError(f"cannot export to a timm ViT: {key}={value!r}, but {why} (needs {expected!r})")
    hidden = e.mlp_hidden or 4 * e.dim
    if int(e.dim * (hidden / e.dim)) != hidden:
        raise ValueError(f"cannot export to a timm ViT: encoder.mlp_hidden={hidden} is not int(dim * mlp_ratio) "
                         f"for any float mlp_ratio with dim={e.dim}")


def export_timm_vit(encoder: ImageEncoder) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The timm ``VisionTransformer`` arguments and state_dict equal to an mmm image encoder.

    ``timm.create_model(TIMM_MODEL_NAME, pretrained=False, **kwargs)`` then
    ``load_state_dict(state_dict, strict=True)`` rebuilds it (what :func:`to_timm_model` does).
    The arguments are plain data except ``norm_layer``, present only when the LayerNorm epsilon
    is not timm's 1e-6. Models without [CLS] use ``global_pool="avg"`` with the final norm
    before pooling (``fc_norm=False``), so ``forward_features`` still equals the mmm output.

    Args:
        encoder: the mmm encoder.

    Returns:
        ``(kwargs, state_dict)``; tensors are float32 CPU copies.
    """
    check_exportable(encoder)
    e, emb = encoder.config.encoder, encoder.embedder
    hidden = e.mlp_hidden or 4 * e.dim
    has_cls = emb.cls_token is not None
    kwargs: Dict[str, Any] = dict(
        img_size=emb.image_size, patch_size=emb.patch_size, in_chans=emb.in_chans, num_classes=0,
        global_pool="token" if has_cls else "avg", fc_norm=False, class_token=has_cls,
        embed_dim=e.dim, depth=e.depth, num_heads=e.heads, mlp_ratio=hidden / e.dim, qkv_bias=e.qkv_bias,
        pre_norm=emb.norm is not None, final_norm=e.final_norm, dynamic_img_size=False)
    eps = {e.norm_eps} | ({emb.norm.eps} if emb.norm is not None else set())
    if len(eps) > 1:
        raise ValueError(f"cannot export to a timm ViT: the embedding LayerNorm eps {emb.norm.eps} differs from "
                         f"encoder.norm_eps={e.norm_eps}; timm uses one norm_layer for both")
    if e.norm_eps != TIMM_NORM_EPS:
        kwargs["norm_layer"] = functools.partial(nn.LayerNorm, eps=e.norm_eps)

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu", torch.float32).clone()

    pos = t(emb.pos_embed)  # (1, cls+P, d)
    state: Dict[str, torch.Tensor] = {"patch_embed.proj.weight": t(emb.patch_embed.proj.weight)}
    if emb.norm is None:
        state["patch_embed.proj.bias"] = t(emb.patch_embed.proj.bias)
    else:  # timm's pre-norm patch projection has no bias: add it to every patch position instead
        pos[:, emb.num_prefix_tokens:] += t(emb.patch_embed.proj.bias)
        state["norm_pre.weight"], state["norm_pre.bias"] = t(emb.norm.weight), t(emb.norm.bias)
    state["pos_embed"] = pos
    if has_cls:
        state["cls_token"] = t(emb.cls_token)
    for k, v in encoder.encoder.state_dict().items():
        if k.startswith("blocks."):
            state[k] = t(v)
        elif k.startswith("final_norm."):
            state["norm." + k[len("final_norm."):]] = t(v)
        else:
            raise ValueError(f"cannot export to a timm ViT: encoder weight {k!r} has no timm counterpart")
    return kwargs, state


def to_timm_model(encoder: ImageEncoder) -> nn.Module:
    """A timm ``VisionTransformer`` (eval mode, no classifier) whose ``forward_features`` equals ``encoder``.

    Args:
        encoder: the mmm image encoder.
    """
    timm = require("timm", "timm interop")
    kwargs, state = export_timm_vit(encoder)
    model = timm.create_model(TIMM_MODEL_NAME, pretrained=False, pretrained_cfg_overlay=preprocessing_cfg(encoder),
                              **kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocessing_cfg(encoder: ImageEncoder) -> Dict[str, Any]:
    """The input settings mmm trained ``encoder`` with, as timm's ``pretrained_cfg`` keys, so that
    ``timm.data.resolve_model_data_config`` and ``create_transform`` build mmm's evaluation transform (its
    image size, ImageNet mean/std, bicubic resize of the short side, centre crop) instead of the
    ``vit_base_patch16_224`` defaults (224 px, mean/std 0.5, crop 0.9)."""
    from mmm.modalities.image.transforms import IMAGENET_MEAN, IMAGENET_STD

    size = encoder.embedder.image_size
    return {"input_size": (3, size, size), "mean": tuple(IMAGENET_MEAN), "std": tuple(IMAGENET_STD),
            "crop_pct": 1.0, "interpolation": "bicubic", "crop_mode": "center"}


# ----------------------------------------------------------------------------- import


def _refuse(what: str, why: str) -> ValueError:
    return ValueError(f"cannot import this timm ViT into mmm: {what} ({why})")


def _layer_norm(m: nn.Module, where: str, eps: List[float]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of a plain LayerNorm, None for Identity; anything else is refused."""
    from timm.layers import LayerNorm, LayerNormFp32

    if isinstance(m, nn.Identity):
        return None
    if type(m) not in (nn.LayerNorm, LayerNorm, LayerNormFp32) or m.weight is None:
        raise _refuse(f"{where} is {type(m).__name__}", "mmm uses affine LayerNorm only")
    eps.append(float(m.eps))
    bias = m.bias if m.bias is not None else torch.zeros_like(m.weight)
    return m.weight.detach(), bias.detach()


def _linear(m: nn.Module, where: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if type(m) is not nn.Linear:
        raise _refuse(f"{where} is {type(m).__name__}", "expected nn.Linear")
    return m.weight.detach(), (m.bias.detach() if m.bias is not None else None)


def _exact_gelu(act: nn.Module) -> bool:
    from timm.layers.activations import GELU

    return (type(act) is nn.GELU and act.approximate == "none") or type(act) is GELU


def _layer_scale(m: nn.Module, where: str) -> Optional[torch.Tensor]:
    from timm.layers import LayerScale

    if isinstance(m, nn.Identity):
        return None
    if type(m) is not LayerScale:
        raise _refuse(f"{where} is {type(m).__name__}", "only timm's LayerScale can be folded into the weights")
    return m.gamma.detach()


def _block_state(block: nn.Module, i: int, eps: List[float]) -> Tuple[Dict[str, torch.Tensor], int, bool]:
    """mmm ``encoder.blocks.{i}.*`` tensors of one timm ``Block``, its MLP width and whether qkv has a bias."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    where = f"blocks.{i}"
    if type(block) is not Block:
        raise _refuse(f"{where} is {type(block).__name__}", "only timm's pre-norm `Block` maps onto mmm's encoder")
    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention:
        raise _refuse(f"{where}.attn is {type(attn).__name__}", "only plain multi-head self-attention is supported")
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        raise _refuse("qk_norm=True", "mmm's attention has no query/key normalisation")
    if not isinstance(attn.norm, nn.Identity):
        raise _refuse("scale_attn_norm=True", "mmm's attention has no norm before its output projection")
    if getattr(attn, "gate", None) is not None:
        raise _refuse("a gated attention output", "mmm's attention has no output gate")
    if attn.attn_dim != attn.qkv.in_features or attn.proj.out_features != attn.qkv.in_features:
        raise _refuse(f"{where}.attn has width {attn.attn_dim} for a {attn.qkv.in_features}-wide model",
                      "mmm's attention width equals the model width")
    if type(mlp) is not Mlp:
        raise _refuse(f"{where}.mlp is {type(mlp).__name__}", "mmm imports the Linear-GELU-Linear ViT MLP only "
                      "(gated/SwiGLU timm MLPs use another weight layout)")
    if not _exact_gelu(mlp.act):
        raise _refuse(f"MLP activation {mlp.act!r}", "mmm's MLP uses exact (erf) GELU; tanh-approximate GELU, "
                      "QuickGELU and others differ")
    if not isinstance(mlp.norm, nn.Identity):
        raise _refuse("scale_mlp_norm=True", "mmm's MLP has no norm between its two layers")
    dim = attn.qkv.in_features
    out: Dict[str, torch.Tensor] = {}
    n1, n2 = _layer_norm(block.norm1, f"{where}.norm1", eps), _layer_norm(block.norm2, f"{where}.norm2", eps)
    if n1 is None or n2 is None:
        raise _refuse(f"{where} has no norm1/norm2", "mmm's pre-norm blocks always normalise")
    qkv_w, qkv_b = _linear(attn.qkv, f"{where}.attn.qkv")
    proj_w, proj_b = _linear(attn.proj, f"{where}.attn.proj")
    fc1_w, fc1_b = _linear(mlp.fc1, f"{where}.mlp.fc1")
    fc2_w, fc2_b = _linear(mlp.fc2, f"{where}.mlp.fc2")
    zeros = torch.zeros(dim, dtype=proj_w.dtype, device=proj_w.device)
    proj_b = zeros if proj_b is None else proj_b
    fc1_b = torch.zeros_like(fc1_w[:, 0]) if fc1_b is None else fc1_b
    fc2_b = zeros if fc2_b is None else fc2_b
    g1 = _layer_scale(block.ls1, f"{where}.ls1")
    g2 = _layer_scale(block.ls2, f"{where}.ls2")
    if g1 is not None:
        proj_w, proj_b = g1[:, None] * proj_w, g1 * proj_b
    if g2 is not None:
        fc2_w, fc2_b = g2[:, None] * fc2_w, g2 * fc2_b
    p = f"encoder.blocks.{i}."
    out[p + "norm1.weight"], out[p + "norm1.bias"] = n1
    out[p + "attn.qkv.weight"] = qkv_w
    if qkv_b is not None:
        out[p + "attn.qkv.bias"] = qkv_b
    out[p + "attn.proj.weight"], out[p + "attn.proj.bias"] = proj_w, proj_b
    out[p + "norm2.weight"], out[p + "norm2.bias"] = n2
    out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = fc1_w, fc1_b
    out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = fc2_w, fc2_b
    return out, fc1_w.shape[0], qkv_b is not None


def _square(value: Any, what: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise _refuse(f"{what}={tuple(value)} is not square", "mmm's image embedder takes square images and patches")
    return int(a)


def _warn_of_other_normalisation(model: nn.Module) -> None:
    """mmm's pipelines feed ImageNet-normalised pixels; say so when the timm model expects other statistics
    (its ``pretrained_cfg``: CLIP's, or mean/std 0.5), since its features would then be computed on inputs
    normalised otherwise than in its training."""
    from mmm.modalities.image.transforms import IMAGENET_MEAN, IMAGENET_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return
    if any(abs(a - b) > 1e-3 for a, b in zip((*mean, *std), (*IMAGENET_MEAN, *IMAGENET_STD))):
        logger.warning("this timm ViT was trained on pixels normalised with mean %s, std %s, but mmm's image "
                       "pipelines (mmm embed, finetune, probes) normalise with ImageNet's mean %s, std %s: its "
                       "features there are computed on inputs unlike its training's", tuple(mean), tuple(std),
                       IMAGENET_MEAN, IMAGENET_STD)


def _from_model(model: nn.Module) -> ImageEncoder:
    """Convert a timm ``VisionTransformer`` instance (its current weights) into an mmm ImageEncoder."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    if type(model) is not VisionTransformer:
        raise _refuse(f"the model is a {type(model).__module__}.{type(model).__name__}",
                      "only timm.models.vision_transformer.VisionTransformer is supported")
    if model.num_reg_tokens:
        raise _refuse(f"reg_tokens={model.num_reg_tokens}", "mmm's image embedder has no register tokens")
    if model.pos_embed is None:
        raise _refuse("pos_embed='none'", "mmm's image embedder adds absolute patch positions")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or type(pe.proj) is not nn.Conv2d:
        raise _refuse(f"patch_embed is {type(pe).__name__}", "only timm's convolutional PatchEmbed is supported")
    if not isinstance(pe.norm, nn.Identity):
        raise _refuse("a patch-embedding norm (embed_norm_layer)", "mmm normalises patch tokens only after positions")
    if pe.img_size is None:
        raise _refuse("a patch embedding without a fixed image size", "mmm embedders have a fixed image_size")
    _warn_of_other_normalisation(model)
    image_size, patch_size = _square(pe.img_size, "img_size"), _square(pe.patch_size, "patch_size")
    if tuple(pe.proj.kernel_size) != (patch_size, patch_size) or tuple(pe.proj.stride) != (patch_size, patch_size):
        raise _refuse("an overlapping or resized patch projection", "mmm's patches do not overlap")

    eps: List[float] = []
    dim = model.embed_dim
    has_cls = model.cls_token is not None
    prefix = 1 if has_cls else 0
    pos = model.pos_embed.detach()
    if model.no_embed_class and has_cls:  # timm gives [CLS] no position: a zero row is the same
        pos = torch.cat([pos.new_zeros(1, 1, dim), pos], dim=1)
    if tuple(pos.shape) != (1, prefix + pe.num_patches, dim):
        raise _refuse(f"pos_embed has shape {tuple(pos.shape)}", f"expected {(1, prefix + pe.num_patches, dim)}")
    pre = _layer_norm(model.norm_pre, "norm_pre", eps)
    conv_b = pe.proj.bias.detach() if pe.proj.bias is not None else pos.new_zeros(dim)
    state: Dict[str, torch.Tensor] = {"embedder.patch_embed.proj.weight": pe.proj.weight.detach(),
                                      "embedder.patch_embed.proj.bias": conv_b, "embedder.pos_embed": pos}
    if has_cls:
        state["embedder.cls_token"] = model.cls_token.detach()
    if pre is not None:
        state["embedder.norm.weight"], state["embedder.norm.bias"] = pre
    widths, qkv_biases, heads = set(), set(), set()
    for i, block in enumerate(model.blocks):
        block_state, width, qkv_bias = _block_state(block, i, eps)
        state.update(block_state)
        widths.add(width)
        qkv_biases.add(qkv_bias)
        heads.add(block.attn.num_heads)
    if len(model.blocks) == 0:
        raise _refuse("a model without blocks", "mmm's encoder needs at least one")
    if len(widths) > 1 or len(qkv_biases) > 1 or len(heads) > 1:
        raise _refuse("blocks of different MLP widths, head counts or qkv biases", "mmm's encoder blocks are all alike")
    final = _layer_norm(model.norm, "norm", eps)
    if final is not None:
        state["encoder.final_norm.weight"], state["encoder.final_norm.bias"] = final
    if len(set(eps)) > 1:
        raise _refuse(f"LayerNorm epsilons {sorted(set(eps))}", "mmm uses one norm_eps for every LayerNorm")
    enc_cfg = EncoderConfig(
        dim=dim, depth=len(model.blocks), heads=heads.pop(), mlp_hidden=widths.pop(), mlp="gelu", norm_first=True,
        final_norm=final is not None, norm_eps=eps[0], qkv_bias=qkv_biases.pop(), dropout=0.0, attn_dropout=0.0,
        relative_position="none", attention="auto")
    config = ImageEncoderConfig(encoder=enc_cfg, image_size=image_size, patch_size=patch_size,
                                in_chans=pe.proj.in_channels, cls_token=has_cls, position="learned",
                                embed_norm=pre is not None, norm_eps=enc_cfg.norm_eps, dropout=0.0)
    enc = ImageEncoder.from_config(config)
    state["embedder.mask_token"] = enc.embedder.mask_token.detach()  # not in timm: keep the fresh init
    load_weights(enc, {k: v.to("cpu", torch.float32).clone() for k, v in state.items()}, "timm VisionTransformer")
    return enc.eval()


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"timm weights file {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # a header that is not JSON, a truncated file
            raise ValueError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from None
    if suffix in TORCH_SUFFIXES:
        tensors = safe_torch_load(path)
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            keys = sorted(tensors)[:5] if isinstance(tensors, dict) else type(tensors).__name__
            raise ValueError(f"{path}: expected a flat mapping of weight names to tensors, found {keys}; "
                             "extract the model's state_dict first")
        return tensors
    raise ValueError(f"{path}: unknown weights format {suffix!r}; expected one of "
                     f"{list(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} (timm_model/timm_kwargs are for timm weights "
                     "files; an mmm checkpoint or saved encoder loads without them)")


def _model_from_state(state: Mapping[str, torch.Tensor], model_name: Optional[str],
                      model_kwargs: Optional[Dict[str, Any]], source: str) -> nn.Module:
    timm = require("timm", "timm interop")
    if not model_name:
        raise ValueError(f"{source}: a state_dict does not say which ViT it is; pass its timm model name (such as "
                         "'vit_base_patch16_224': timm_model= to load_encoder, model_name= to import_timm_vit), and "
                         "its create_model arguments (timm_kwargs= / model_kwargs=) if it was customised")
    kwargs = {"num_classes": 0, **(model_kwargs or {})}
    try:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # unknown model; an argument it does not take
        raise ValueError(f"timm cannot build {model_name!r} with create_model arguments {model_kwargs or {}} "
                         f"(timm_kwargs): {type(e).__name__}: {e}") from None
    weights = dict(state)
    if not kwargs["num_classes"]:  # the classifier is not part of the encoder
        weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit timm {model_name!r} {model_kwargs or {}}: missing keys "
                         f"{missing[:8]}, unexpected keys {unexpected[:8]} (wrong timm model name or timm_kwargs?)")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in weights.items() if v.shape != own[k].shape]
    if bad:
        k, got, want = bad[0]
        raise ValueError(f"{source}: weight {k!r} has shape {got} but timm {model_name!r} {model_kwargs or {}} "
                         f"expects {want} (wrong timm model name, or timm_kwargs such as img_size/patch_size?)")
    model.load_state_dict(weights, strict=True)
    return model.eval()


def import_timm_vit(source: Union[nn.Module, Mapping[str, torch.Tensor], PathLike], model_name: Optional[str] = None,
                    model_kwargs: Optional[Dict[str, Any]] = None) -> ImageEncoder:
    """Build an mmm :class:`~mmm.modalities.image.embedder.ImageEncoder` (eval mode) equal to a timm ViT's ``forward_features``.

    Args:
        source: a timm ``VisionTransformer`` instance; or its state_dict; or a local weights file
            (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``).
        model_name: for a state_dict or file: the timm model name it belongs to (built with
            ``pretrained=False``, nothing is downloaded).
        model_kwargs: extra ``timm.create_model`` arguments the weights were trained with
            (``img_size``, ``init_values`` ...). ``head.*`` weights are dropped unless
            ``num_classes`` is given here.
    """
    if isinstance(source, nn.Module):
        if model_name is not None or model_kwargs:
            raise ValueError("model_name/model_kwargs are only for a state_dict or weights file, not a model instance")
        return _from_model(source)
    if isinstance(source, Mapping):
        return _from_model(_model_from_state(source, model_name, model_kwargs, "state_dict"))
    if isinstance(source, (str, Path)):
        path = Path(source)
        return _from_model(_model_from_state(_read_weights(path), model_name, model_kwargs, str(path)))
    raise TypeError(f"expected a timm VisionTransformer, a state_dict or a weights file path, "
                    f"got {type(source).__name__}")


def load_timm_encoder(path: PathLike, model_name: str, model_kwargs: Optional[Dict[str, Any]] = None) -> ImageEncoder:
    """Load a local timm ViT weights file as an mmm image encoder (eval mode).

    Args:
        path: ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (read with ``weights_only=True``).
        model_name: the timm model name the weights belong to.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size``).
    """
    return import_timm_vit(Path(path), model_name, model_kwargs)


__all__ = ["TIMM_MODEL_NAME", "check_exportable", "export_timm_vit", "import_timm_vit", "load_timm_encoder",
           "to_timm_model"]
