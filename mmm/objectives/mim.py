"""Masked image modeling heads: MAE pixel reconstruction with a light decoder, SimMIM pixel regression.

* ``mae`` (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"): the encoder saw
  only visible patches; a narrow Transformer decoder receives their encodings scattered back onto
  the full grid with a learned mask token at every hidden patch, plus fixed 2-D sin-cos positions,
  and regresses the pixels of the hidden patches (MSE), optionally against per-patch normalised
  pixels (``norm_pix_loss``, MAE's better target).
* ``simmim`` (Xie et al. 2022, "SimMIM"): the encoder saw every patch with hidden ones replaced by
  the mask embedding; a single linear layer regresses the hidden patches' raw pixels (L1).

Both score hidden patches only. Discrete visual-token targets (BEiT) use
:mod:`mmm.objectives.token_targets`.
"""
from __future__ import annotations

from typing import Dict, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmm.batch import ImageInput, PackedBatch
from mmm.config import EncoderConfig
from mmm.objectives.base import ObjectiveOutput, global_mean, in_lockstep
from mmm.objectives.grid_decoder import check_decoder_shape, decode_grid, decoder_blocks, grid_positions
from mmm.registry import OBJECTIVES


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) → (B, P, patch*patch*C), row-major grid, channels last inside a patch."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, P, patch*patch*C) → (B, C, H, W)."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardisation of pixel targets (MAE's ``norm_pix_loss``)."""
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + eps).sqrt()


def _image_part(hidden: torch.Tensor, batch: PackedBatch, modality: str) -> Tuple[ImageInput, torch.Tensor]:
    inp = batch.inputs.get(modality)
    if not isinstance(inp, ImageInput):
        raise ValueError(f"this objective needs an image input named {modality!r}; the batch has {sorted(batch.inputs)}")
    return inp, (hidden if inp.index is None else hidden.index_select(0, inp.index))


@OBJECTIVES.register("mae")
class MaskedAutoencoder(nn.Module):
    """MAE decoder + pixel loss on hidden patches.

    Args:
        dim: encoder width (given by the builder).
        embedders: the model's embedders (given by the builder; the image one defines the grid).
        encoder_cfg: the shared encoder's config (given by the builder; the decoder reuses its
            attention backend).
        decoder_dim: decoder width (MAE: 512 for ViT-B).
        decoder_depth: decoder blocks (MAE: 8).
        decoder_heads: decoder attention heads.
        norm_pix_loss: regress per-patch normalised pixels.
        modality: the image modality's name.
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: EncoderConfig, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4, norm_pix_loss: bool = True,
                 modality: str = "image") -> None:
        super().__init__()
        emb = embedders.get(modality)
        if emb is None or not hasattr(emb, "visible_index"):
            raise ValueError(f"objective mae: no image embedder named {modality!r} (modalities: {sorted(embedders)})")
        check_decoder_shape("mae", decoder_dim, decoder_depth, decoder_heads)
        self.modality, self.norm_pix_loss = modality, norm_pix_loss
        self.patch, self.channels, self.grid = emb.patch_size, emb.in_chans, emb.grid
        self.prefix = emb.num_prefix_tokens  # [CLS] before the patches
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim))
        self.register_buffer("decoder_pos", grid_positions(self.prefix, self.grid, decoder_dim),
                             persistent=False)  # (prefix + P, d_dec)
        self.decoder = decoder_blocks(decoder_dim, decoder_depth, decoder_heads, encoder_cfg.attention)
        self.pred = nn.Linear(decoder_dim, self.patch * self.patch * self.channels)

    def no_weight_decay(self) -> Set[str]:
        """The decoder's mask token is not decayed (MAE)."""
        return {"mask_token"}

    def reset_parameters(self) -> None:
        """MAE initialisation: xavier-uniform linears, N(0, 0.02) mask token."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def decode(self, hidden: torch.Tensor, batch: PackedBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Predicted pixels of every patch and the mask: ((B, P, p*p*C), (B, P) bool) (for figures)."""
        out, mask = self._decoder_states(hidden, batch)
        return self.pred(out), mask

    def _decoder_states(self, hidden: torch.Tensor, batch: PackedBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decoder outputs at every patch and the mask: ((B, P, d_dec), (B, P) bool)."""
        inp, h = _image_part(hidden, batch, self.modality)
        if inp.mask is None:
            raise ValueError("objective mae needs masked images (configure a patch masker, e.g. mae_random)")
        dropped = inp.mask if inp.drop_masked else torch.zeros_like(inp.mask)  # (B, P) patches not encoded
        out = decode_grid(self.decoder_embed(h), dropped, self.prefix, self.mask_token, self.decoder_pos,
                          self.decoder)  # (B, P, d_dec)
        return out, inp.mask

    def target(self, batch: PackedBatch) -> torch.Tensor:
        """(B, P, p*p*C) the pixels the decoder regresses (normalised per patch with ``norm_pix_loss``)."""
        t = patchify(batch.inputs[self.modality].pixels.float(), self.patch)
        return normalize_patches(t) if self.norm_pix_loss else t

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        out, _ = self._decoder_states(hidden, batch)
        rows = batch.inputs[self.modality].hidden_positions()  # (M,) into the B*P patches, no device read
        pred = self.pred(out.flatten(0, 1).index_select(0, rows))  # (M, p*p*C): only hidden patches are projected
        target = patchify(batch.inputs[self.modality].pixels.float(), self.patch).flatten(0, 1).index_select(0, rows)
        if self.norm_pix_loss:
            target = normalize_patches(target)
        # per-patch mean squared error, summed; / global patch count: exact under DDP (MAE's mean on one rank)
        loss_sum = F.mse_loss(pred.float(), target, reduction="sum") / pred.shape[-1]
        return ObjectiveOutput(global_mean(loss_sum, pred.shape[0], in_lockstep(self)), {}, pred.shape[0])


@OBJECTIVES.register("simmim")
class SimMIMRegression(nn.Module):
    """SimMIM: one linear layer from each hidden patch's encoding to its raw pixels, L1 loss.

    Args:
        dim, embedders, encoder_cfg: given by the model builder (see :mod:`mmm.objectives.base`).
        modality: the image modality's name.
    """

    def __init__(self, dim: int, embedders: Dict[str, nn.Module], encoder_cfg: Optional[EncoderConfig] = None,
                 modality: str = "image") -> None:
        super().__init__()
        emb = embedders.get(modality)
        if emb is None or not hasattr(emb, "patch_size"):
            raise ValueError(f"objective simmim: no image embedder named {modality!r} (modalities: {sorted(embedders)})")
        self.modality, self.patch, self.prefix = modality, emb.patch_size, emb.num_prefix_tokens
        self.num_patches = emb.num_patches
        self.pred = nn.Linear(dim, self.patch * self.patch * emb.in_chans)

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> ObjectiveOutput:
        inp, h = _image_part(hidden, batch, self.modality)
        if inp.mask is None or inp.drop_masked:
            raise ValueError("objective simmim needs mask-token mode (model.image.drop_masked: false) and a patch masker")
        pred = self.pred(h.index_select(0, inp.hidden_token_rows(self.prefix)))  # (M, p*p*C), no copy of the grid
        target = patchify(inp.pixels.float(), self.patch).flatten(0, 1).index_select(0, inp.hidden_positions())
        count = pred.shape[0]
        loss_sum = F.l1_loss(pred.float(), target, reduction="sum") / pred.shape[-1]  # per-patch mean L1, summed
        return ObjectiveOutput(global_mean(loss_sum, count, in_lockstep(self)), {}, count)
