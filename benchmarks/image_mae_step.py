"""One MAE training step: mmm drop-masked vs mmm mask-token encoder vs ``transformers.ViTMAEForPreTraining``.

MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners") hides 75% of the patches
and lets the encoder see only the rest; a narrow decoder reconstructs the hidden pixels. This
script times one fp32 training step (forward + backward + fused ``AdamW.step()`` + ``zero_grad``)
on CPU for three contenders, all on the same batch of random images:

* ``mmm_drop`` -- mmm MAE: :class:`~mmm.modalities.image.embedder.ImageEmbedder` with ``drop_masked=True``
  (the encoder sees [CLS] + the visible 25% of the patches, packed), objective ``mae``;
* ``mmm_mask_token`` -- the same model (a copy with identical weights) in mask-token mode
  (``drop_masked=False``: every patch enters the encoder, hidden ones as the learned mask
  embedding) with the same ``mae`` decoder objective, so only the encoder input differs;
* ``hf`` -- ``ViTMAEForPreTraining`` (SDPA attention) at the same dimensions, starting from the
  mmm weights; it draws its own random mask every step (its standard recipe), mmm uses a fixed
  ``mae_random`` mask per image.

Both architectures are the MAE ViT: pre-LayerNorm blocks (GELU MLP, qkv bias, eps 1e-6), a final
encoder LayerNorm, fixed 2-D sin-cos positions, a [CLS] token, a pre-LN decoder of
``decoder_depth`` blocks with MLP 4 × ``decoder_dim``, and MSE on per-patch normalised pixels of the
hidden patches (``norm_pix_loss``). No dropout.

Before timing, each configuration checks that the contenders compute the same thing:

* parameter counts of both implementations (HF keeps its fixed sin-cos tables as frozen
  parameters, mmm as buffers; mmm's embedder holds an encoder-side mask token that MAE mode
  never uses);
* the loss of HF loaded with the mmm weights and given ``noise`` that makes it hide exactly
  mmm's patches, against mmm's loss (eval mode): they agree to float precision;
* the losses of both freshly initialised models (each with its own init and HF with its own
  random mask): the same magnitude;
* the tokens each encoder actually receives, counted with a forward hook (mmm MAE: [CLS] + 25%).

Timing: the three contenders run in rotating order (A B C, B C A, C A B, ...) in one process, so
machine noise hits all of them; the report gives the median step, images/s, the ratio of the
medians and the median over iterations of the per-iteration ratio. It also gives the model FLOPs
per image of each contender (matrix products and attention, forward + backward ≈ 3 × forward),
whose ratio is what the drop-masked speedup can at most reach on a compute-bound machine.

Usage::

    python -m benchmarks.image_mae_step [--quick] [--config small|base|all] [--steps N] [--warmup W] \
        [--batch B] [--threads T] [--json OUT] [--markdown OUT]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from benchmarks.report import argument_parser, at_least, emit, with_threads
from mmm.batch import ImageInput, PackedBatch
from mmm.config import EncoderConfig, ModelConfig, ObjectiveConfig, OptimConfig
from mmm.core.packing import PackedSeqInfo
from mmm.masking.patch import MaeRandomMasker
from mmm.model import MaskedModel, build_model
from mmm.modalities.image.embedder import ImageEmbedder

CONTENDERS = ("mmm_drop", "mmm_mask_token", "hf")
TITLES = {"mmm_drop": "mmm MAE (drop masked)", "mmm_mask_token": "mmm mask-token encoder",
          "hf": "HF ViTMAEForPreTraining sdpa"}
TARGETS = {"drop_vs_mask_token": 2.5, "mmm_vs_hf": 1.0}  # images/s ratios the issue asks for on CPU


@dataclass
class BenchConfig:
    """Dimensions of one comparison (the decoder MLP is 4 × ``decoder_dim`` on both sides)."""

    name: str
    image_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_hidden: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    batch: int
    mask_ratio: float = 0.75
    in_chans: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS: Dict[str, BenchConfig] = {
    "small": BenchConfig("small", image_size=64, patch_size=8, dim=192, depth=6, heads=3, mlp_hidden=768,
                         decoder_dim=128, decoder_depth=2, decoder_heads=4, batch=32),
    "base": BenchConfig("base", image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_hidden=3072,
                        decoder_dim=512, decoder_depth=8, decoder_heads=16, batch=8),
}


# ----------------------------------------------------------------------------- batch


@dataclass
class Batches:
    """One batch of images and one MAE mask, laid out for each contender."""

    pixels: torch.Tensor  # (B, C, H, W) normalised pixels
    mask: torch.Tensor  # (B, P) bool, True = hidden
    drop: PackedBatch  # mmm MAE: [CLS] + visible patches per image
    mask_token: PackedBatch  # mmm mask-token mode: [CLS] + every patch per image

    @property
    def images(self) -> int:
        return int(self.pixels.shape[0])


def make_batches(cfg: BenchConfig, seed: int = 0) -> Batches:
    """Random normal images and a ``mae_random`` mask per image, packed for both mmm modes."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(cfg.batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)
    rng = np.random.default_rng(seed)
    side = cfg.image_size // cfg.patch_size
    masker = MaeRandomMasker(cfg.mask_ratio)
    mask = torch.from_numpy(np.stack([masker((side, side), rng) for _ in range(cfg.batch)]))  # (B, P)
    visible = (~mask).sum(1).tolist()
    drop = PackedBatch(PackedSeqInfo.from_seqlens([1 + v for v in visible]), {"image": ImageInput(pixels, mask, True)})
    full = PackedBatch(PackedSeqInfo.from_seqlens([1 + cfg.num_patches] * cfg.batch),
                       {"image": ImageInput(pixels, mask, False)})
    return Batches(pixels, mask, drop, full)


def hf_noise(mask: torch.Tensor) -> torch.Tensor:
    """(B, P) ``noise`` for HF's ``random_masking`` that keeps exactly the patches ``mask`` leaves visible.

    HF keeps the ``int(P * (1 - ratio))`` patches of lowest noise; visible patches get noise in
    [0, 1), hidden ones in [1, 2), in grid order.
    """
    p = mask.shape[1]
    return mask.float() + torch.arange(p, dtype=torch.float32)[None, :] / p


# ----------------------------------------------------------------------------- models


def build_mmm(cfg: BenchConfig, seed: int = 0) -> MaskedModel:
    """The mmm MAE ViT at ``cfg``'s dimensions (SDPA attention, no dropout)."""
    torch.manual_seed(seed)
    enc = EncoderConfig(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, mlp_hidden=cfg.mlp_hidden, mlp="gelu",
                        norm_first=True, final_norm=True, norm_eps=1e-6, qkv_bias=True, dropout=0.0,
                        attn_dropout=0.0, attention="sdpa")
    embedder = ImageEmbedder(cfg.dim, image_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                             cls_token=True, position="sincos", embed_norm=False, norm_eps=1e-6, dropout=0.0)
    mae = ObjectiveConfig("mae", 1.0, {"decoder_dim": cfg.decoder_dim, "decoder_depth": cfg.decoder_depth,
                                       "decoder_heads": cfg.decoder_heads, "norm_pix_loss": True})
    return build_model(ModelConfig(encoder=enc), [mae], {"image": embedder})


def build_hf(cfg: BenchConfig, seed: int = 0) -> nn.Module:
    """``ViTMAEForPreTraining`` (SDPA attention) at ``cfg``'s dimensions."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(seed)
    hf_cfg = ViTMAEConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
                          hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                          intermediate_size=cfg.mlp_hidden, hidden_act="gelu", decoder_hidden_size=cfg.decoder_dim,
                          decoder_num_hidden_layers=cfg.decoder_depth, decoder_num_attention_heads=cfg.decoder_heads,
                          decoder_intermediate_size=4 * cfg.decoder_dim, mask_ratio=cfg.mask_ratio,
                          norm_pix_loss=True, qkv_bias=True, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return ViTMAEForPreTraining(hf_cfg)


def _block_pairs(src_prefix: str, dst_prefix: str, dim: int) -> Dict[str, Any]:
    """HF name → (mmm name, row slice) for one pre-LN block (q/k/v cut out of mmm's fused ``qkv``)."""
    out: Dict[str, Any] = {}
    for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
        for kind in ("weight", "bias"):
            out[f"{dst_prefix}attention.{part}.{kind}"] = (f"{src_prefix}attn.qkv.{kind}", slice(j * dim, (j + 1) * dim))
    for a, b in {"attn.proj": "attention.o_proj", "norm1": "layernorm_before", "norm2": "layernorm_after",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}.items():
        for kind in ("weight", "bias"):
            out[f"{dst_prefix}{b}.{kind}"] = (f"{src_prefix}{a}.{kind}", None)
    return out


def copy_mmm_to_hf(model: MaskedModel, hf: nn.Module) -> None:
    """Load ``model``'s weights (and fixed sin-cos tables) into ``hf``; every HF parameter is covered."""
    src = model.state_dict(keep_vars=False)
    src.update({"embedders.image.pos_embed": model.embedders["image"].pos_embed,
                "objectives.mae.decoder_pos": model.objectives["mae"].decoder_pos})
    d, dd = model.encoder.cfg.dim, model.objectives["mae"].decoder.cfg.dim
    pairs: Dict[str, Any] = {
        "vit.embeddings.cls_token": ("embedders.image.cls_token", None),
        "vit.embeddings.position_embeddings": ("embedders.image.pos_embed", None),
        "vit.embeddings.patch_embeddings.projection.weight": ("embedders.image.patch_embed.proj.weight", None),
        "vit.embeddings.patch_embeddings.projection.bias": ("embedders.image.patch_embed.proj.bias", None),
        "vit.layernorm.weight": ("encoder.final_norm.weight", None),
        "vit.layernorm.bias": ("encoder.final_norm.bias", None),
        "decoder.mask_token": ("objectives.mae.mask_token", None),
        "decoder.decoder_pos_embed": ("objectives.mae.decoder_pos", None),
        "decoder.decoder_embed.weight": ("objectives.mae.decoder_embed.weight", None),
        "decoder.decoder_embed.bias": ("objectives.mae.decoder_embed.bias", None),
        "decoder.decoder_norm.weight": ("objectives.mae.decoder.final_norm.weight", None),
        "decoder.decoder_norm.bias": ("objectives.mae.decoder.final_norm.bias", None),
        "decoder.decoder_pred.weight": ("objectives.mae.pred.weight", None),
        "decoder.decoder_pred.bias": ("objectives.mae.pred.bias", None),
    }
    for i in range(len(model.encoder.blocks)):
        pairs.update(_block_pairs(f"encoder.blocks.{i}.", f"vit.layers.{i}.", d))
    for i in range(len(model.objectives["mae"].decoder.blocks)):
        pairs.update(_block_pairs(f"objectives.mae.decoder.blocks.{i}.", f"decoder.decoder_layers.{i}.", dd))
    params = dict(hf.named_parameters())
    missing = set(params) - set(pairs)
    if missing:
        raise RuntimeError(f"weight copy does not cover HF parameters {sorted(missing)}")
    with torch.no_grad():
        for name, (src_name, rows) in pairs.items():
            value = src[src_name] if rows is None else src[src_name][rows]
            params[name].copy_(value.reshape(params[name].shape))


def count_params(model: MaskedModel, hf: nn.Module) -> Dict[str, int]:
    """Parameter counts of both sides, with the parts that explain their difference."""
    return {
        "mmm": sum(p.numel() for p in model.parameters()),
        "mmm_unused_in_drop_mode": model.embedders["image"].mask_token.numel(),
        "hf_trainable": sum(p.numel() for p in hf.parameters() if p.requires_grad),
        "hf_frozen": sum(p.numel() for p in hf.parameters() if not p.requires_grad),
    }


def mmm_optimizer(model: MaskedModel) -> torch.optim.Optimizer:
    """The fused AdamW that ``mmm.train.module.MaskedModelingModule`` configures (default OptimConfig)."""
    from mmm.train.module import MaskedModelingModule

    return MaskedModelingModule(model, OptimConfig(), max_steps=1000).configure_optimizers()["optimizer"]


def hf_optimizer(hf: nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW with mmm's hyperparameters and decay split, over HF's trainable parameters."""
    o = OptimConfig()
    decay, no_decay = [], []
    for name, p in hf.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


# ----------------------------------------------------------------------------- losses and checks


def loss_fn(name: str) -> Callable[[nn.Module, Batches], torch.Tensor]:
    """The loss of contender ``name`` on the batch."""
    if name == "mmm_drop":
        return lambda m, b: m(b.drop)[0]
    if name == "mmm_mask_token":
        return lambda m, b: m(b.mask_token)[0]
    if name == "hf":
        return lambda m, b: m(pixel_values=b.pixels).loss
    raise ValueError(f"unknown contender {name!r}; expected one of {CONTENDERS}")


def count_encoder_tokens(name: str, model: nn.Module, b: Batches) -> int:
    """Tokens the contender's encoder receives for the batch, counted by a hook on its first block."""
    seen: List[int] = []
    first = model.vit.layers[0] if name == "hf" else model.encoder.blocks[0]

    def hook(_module, args):
        x = args[0]
        seen.append(x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1])  # (N, d) packed or (B, T, d)

    handle = first.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            loss_fn(name)(model, b)
    finally:
        handle.remove()
    return seen[0]


def parity(cfg: BenchConfig, b: Batches, seed: int = 0) -> Dict[str, Any]:
    """Parameter counts, same-weights/same-mask losses and fresh-init losses of mmm and HF (eval mode)."""
    model, hf = build_mmm(cfg, seed), build_hf(cfg, seed + 1)
    model.eval()
    hf.eval()
    with torch.no_grad():
        init = {"mmm_loss": float(model(b.drop)[0]), "hf_loss": float(hf(pixel_values=b.pixels).loss)}
        params = count_params(model, hf)
        copy_mmm_to_hf(model, hf)
        out = hf(pixel_values=b.pixels, noise=hf_noise(b.mask))
        same_mask = bool(torch.equal(out.mask.bool(), b.mask))
        a, h = float(model(b.drop)[0]), float(out.loss)
        mask_token_loss = float(model(b.mask_token)[0])
    return {"params": params, "init": init,
            "same_weights": {"mmm_loss": a, "hf_loss": h, "abs_loss_diff": abs(a - h), "hf_hid_same_patches": same_mask,
                             "mmm_mask_token_loss": mask_token_loss}}


def train_flops(cfg: BenchConfig, encoder_tokens: int) -> float:
    """Model FLOPs of one training step per image (≈ 3 × forward matmul + attention FLOPs).

    Args:
        cfg: dimensions.
        encoder_tokens: tokens per image entering the encoder ([CLS] included).
    """
    p, t_dec, pix = cfg.num_patches, 1 + cfg.num_patches, cfg.patch_size ** 2 * cfg.in_chans

    def stack(tokens: int, d: int, depth: int, mlp: int) -> float:
        linear = 2 * tokens * (4 * d * d + 2 * d * mlp)
        attention = 4 * tokens * tokens * d  # QKᵀ and AV
        return depth * (linear + attention)

    fwd = (2 * p * pix * cfg.dim  # patch embedding (every patch, both modes)
           + stack(encoder_tokens, cfg.dim, cfg.depth, cfg.mlp_hidden)
           + 2 * encoder_tokens * cfg.dim * cfg.decoder_dim  # decoder_embed
           + stack(t_dec, cfg.decoder_dim, cfg.decoder_depth, 4 * cfg.decoder_dim)
           + 2 * p * cfg.decoder_dim * pix)  # pixel prediction
    return 3.0 * fwd


def train_step(fn, model: nn.Module, opt: torch.optim.Optimizer, b: Batches) -> float:
    """forward + backward + AdamW step + zero_grad; returns the loss."""
    loss = fn(model, b)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ----------------------------------------------------------------------------- timing


def run_config(cfg: BenchConfig, steps: int, warmup: int, seed: int = 0,
               log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Parity checks, token counts and interleaved timing for one configuration."""
    b = make_batches(cfg, seed)
    check = parity(cfg, b, seed)
    sw, pc = check["same_weights"], check["params"]
    log(f"[{cfg.name}] params: mmm {pc['mmm']:,} (of which {pc['mmm_unused_in_drop_mode']:,} unused in MAE mode), "
        f"HF {pc['hf_trainable']:,} trainable + {pc['hf_frozen']:,} frozen")
    log(f"[{cfg.name}] same weights, same mask (eval): mmm loss {sw['mmm_loss']:.6f}  HF loss {sw['hf_loss']:.6f}  "
        f"|diff| {sw['abs_loss_diff']:.2e}; fresh init: mmm {check['init']['mmm_loss']:.4f}  "
        f"HF {check['init']['hf_loss']:.4f}")

    drop = build_mmm(cfg, seed)
    models: Dict[str, nn.Module] = {"mmm_drop": drop, "mmm_mask_token": copy.deepcopy(drop), "hf": build_hf(cfg, seed)}
    copy_mmm_to_hf(drop, models["hf"])
    tokens = {name: count_encoder_tokens(name, m, b) for name, m in models.items()}
    opts = {"mmm_drop": mmm_optimizer(models["mmm_drop"]), "mmm_mask_token": mmm_optimizer(models["mmm_mask_token"]),
            "hf": hf_optimizer(models["hf"])}
    for m in models.values():
        m.train()
    times: Dict[str, List[float]] = {k: [] for k in CONTENDERS}
    losses: Dict[str, List[float]] = {k: [] for k in CONTENDERS}
    for i in range(warmup + steps):
        order = CONTENDERS[i % 3:] + CONTENDERS[:i % 3]
        for name in order:
            t0 = time.perf_counter()
            loss = train_step(loss_fn(name), models[name], opts[name], b)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
                losses[name].append(loss)
        if i >= warmup:
            log(f"[{cfg.name}] step {i - warmup + 1}/{steps}: " + "  ".join(
                f"{n} {times[n][-1] * 1e3:.0f} ms" for n in CONTENDERS))
    del models, opts

    p = cfg.num_patches
    result: Dict[str, Any] = {"config": asdict(cfg), "images": b.images, "patches_per_image": p,
                              "visible_per_image": int((~b.mask).sum()) // b.images, "parity": check,
                              "steps": steps, "warmup": warmup, "targets": dict(TARGETS)}
    for name in CONTENDERS:
        med = statistics.median(times[name])
        per_image = tokens[name] / b.images
        result[name] = {"median_step_s": med, "step_times_s": times[name], "images_per_s": b.images / med,
                        "final_loss": losses[name][-1], "encoder_tokens": tokens[name],
                        "encoder_patch_fraction": (tokens[name] - b.images) / (b.images * p),
                        "train_gflop_per_image": train_flops(cfg, round(per_image)) / 1e9}
    ips = {n: result[n]["images_per_s"] for n in CONTENDERS}
    result["speedup_drop_vs_mask_token"] = ips["mmm_drop"] / ips["mmm_mask_token"]
    result["speedup_drop_vs_mask_token_paired"] = statistics.median(
        m / d for d, m in zip(times["mmm_drop"], times["mmm_mask_token"]))
    result["flop_ratio_mask_token_vs_drop"] = (result["mmm_mask_token"]["train_gflop_per_image"]
                                               / result["mmm_drop"]["train_gflop_per_image"])
    result["speedup_mmm_vs_hf"] = ips["mmm_drop"] / ips["hf"]
    result["speedup_mmm_vs_hf_paired"] = statistics.median(h / d for d, h in zip(times["mmm_drop"], times["hf"]))
    return result


# ----------------------------------------------------------------------------- report


def _rate(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def _label(c: Dict[str, Any]) -> str:
    return (f"{c['name']} (img {c['image_size']}/{c['patch_size']}, d{c['dim']}×{c['depth']}L h{c['heads']}, "
            f"dec {c['decoder_dim']}×{c['decoder_depth']}, B={c['batch']})")


def markdown(results: Sequence[Dict[str, Any]], env: Dict[str, Any]) -> str:
    """Throughput table and parity table."""
    lines = [
        f"MAE training step (fwd + bwd + fused AdamW + zero_grad), fp32, {env['device']}, {env['threads']} threads, "
        f"torch {env['torch']}, transformers {env['transformers']}. Mask ratio 0.75, norm_pix_loss, no dropout.",
        "",
        "| config | contender | encoder tokens / image | model GFLOP / image | median step (ms) | images/s | "
        "ratio (medians) | per-iteration median | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows = [("mmm_drop", "", "", ""),
                ("mmm_mask_token", f"drop / mask-token **{r['speedup_drop_vs_mask_token']:.2f}×** "
                 f"(FLOPs {r['flop_ratio_mask_token_vs_drop']:.2f}×)",
                 f"{r['speedup_drop_vs_mask_token_paired']:.2f}×", f"≥ {r['targets']['drop_vs_mask_token']}×"),
                ("hf", f"mmm / HF **{r['speedup_mmm_vs_hf']:.2f}×**", f"{r['speedup_mmm_vs_hf_paired']:.2f}×",
                 f"≥ {r['targets']['mmm_vs_hf']}×")]
        for i, (name, ratio, paired, target) in enumerate(rows):
            e = r[name]
            lines.append(f"| {_label(r['config']) if i == 0 else ''} | {TITLES[name]} | "
                         f"{e['encoder_tokens'] / r['images']:.0f} ({100 * e['encoder_patch_fraction']:.0f}% of patches) | "
                         f"{e['train_gflop_per_image']:.3g} | {e['median_step_s'] * 1e3:.1f} | {_rate(e['images_per_s'])} | "
                         f"{ratio} | {paired} | {target} |")
    lines += ["", "| config | params mmm | params HF (trainable + frozen) | same weights & mask: loss mmm / HF (\\|Δ\\|) "
              "| fresh init: loss mmm / HF |", "|---|---:|---:|---:|---:|"]
    for r in results:
        pc, sw, init = r["parity"]["params"], r["parity"]["same_weights"], r["parity"]["init"]
        lines.append(f"| {r['config']['name']} | {pc['mmm']:,} | {pc['hf_trainable']:,} + {pc['hf_frozen']:,} | "
                     f"{sw['mmm_loss']:.5f} / {sw['hf_loss']:.5f} ({sw['abs_loss_diff']:.1e}) | "
                     f"{init['mmm_loss']:.4f} / {init['hf_loss']:.4f} |")
    lines += [
        "",
        "Encoder tokens are counted by a hook on the first encoder block ([CLS] included). The mask-token "
        "contender is the same mmm model with `drop_masked=False` and the same `mae` decoder, so only the "
        "encoder input differs; its possible speedup is bounded by the FLOP ratio. HF runs from the mmm "
        "weights and draws its own random mask each step. Parameters: mmm counts an encoder-side "
        "mask token of `dim` values that MAE mode never uses; HF stores the fixed sin-cos position tables "
        "as frozen parameters (mmm: buffers) and has no pooler. Model GFLOP = 3 × forward matrix-product "
        "and attention FLOPs. Ratios are in images/s: the ratio of the median steps and the median over "
        "iterations of the per-iteration ratio (contenders run back to back in rotating order).",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="small preset, 3 timed steps, 1 warm-up (under a minute)")
    p.add_argument("--config", default=None, choices=[*PRESETS, "all"], help="preset (default: all; small with --quick)")
    p.add_argument("--steps", type=at_least(1), default=None, help="timed steps per contender (default 8; 3 with --quick)")
    p.add_argument("--warmup", type=at_least(0), default=1, help="untimed steps per contender first")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: the preset's)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--mlp-hidden", type=int, default=None)
    p.add_argument("--decoder-dim", type=int, default=None)
    p.add_argument("--decoder-depth", type=int, default=None)
    p.add_argument("--decoder-heads", type=int, default=None)
    p.add_argument("--threads", type=at_least(1), default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the markdown tables here")
    return p.parse_args(argv)


def configs_from_args(args: argparse.Namespace) -> List[BenchConfig]:
    name = args.config or ("small" if args.quick else "all")
    names = list(PRESETS) if name == "all" else [name]
    fields = ("batch", "image_size", "patch_size", "dim", "depth", "heads", "mlp_hidden", "decoder_dim",
              "decoder_depth", "decoder_heads")
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    return [replace(PRESETS[n], **overrides) for n in names]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark; returns the JSON-able result (also written to ``--json`` if given)."""
    args = parse_args(argv)
    return with_threads(args.threads, lambda: _run(args))


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    import transformers

    steps = args.steps if args.steps is not None else (3 if args.quick else 8)
    env = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_count": os.cpu_count()}
    results = [run_config(cfg, steps, args.warmup, args.seed) for cfg in configs_from_args(args)]
    table = markdown(results, env)
    report = {"env": env, "quick": bool(args.quick), "results": results, "markdown": table}
    emit(table, report, args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
