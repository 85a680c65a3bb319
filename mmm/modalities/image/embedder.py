"""Image embedder: non-overlapping patches → tokens (ViT, Dosovitskiy et al. 2021), with masking.

Each image is cut into a ``gh × gw`` grid of ``patch × patch`` patches, projected by a strided
Conv2d, given an absolute position (a learned table, or the fixed 2-D sin-cos table of MAE,
He et al. 2022; or none at all, for position prediction, MP3, Zhai et al. 2022) and optionally
preceded by a learned [CLS] token. The output is packed:
``(N, d)`` tokens plus per-image lengths, ready for the shared
:class:`~mmm.core.encoder.TransformerEncoder`.

Masking (``mask`` (B, P) bool, True = hidden) comes in the two flavours of masked image modeling:

* ``drop_masked=True`` -- MAE: hidden patches never reach the encoder; each image keeps only its
  visible patches, in grid order, so images may have different lengths (packing handles that).
  :meth:`ImageEmbedder.visible_index` says where each packed token came from, which is what a
  light decoder needs to scatter encoder outputs back onto the full grid.
* ``drop_masked=False`` -- SimMIM (Xie et al. 2022) / BEiT (Bao et al. 2022): a hidden patch's
  embedding is replaced by a learned ``mask_token`` plus that patch's position.

:class:`ImageEncoder` is the embedder plus the shared encoder as a plain module taking
``(B, C, H, W)`` images and returning ``(B, T, d)`` token features, the image counterpart of
:class:`~mmm.encoders.TextEncoder`; :mod:`mmm.interop.timm` converts it to and from timm ViTs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Set, Tuple

import torch
from torch import nn

from mmm.config import EncoderConfig, _f
from mmm.core.dropout import Dropout
from mmm.core.encoder import TransformerEncoder
from mmm.core.output_rows import OutputRows
from mmm.core.packing import PackedSeqInfo, mask_positions
from mmm.host_reads import on_host
from mmm.modalities.standalone import EmbedderEncoder
from mmm.registry import EMBEDDERS

IMAGE_POSITIONS = ("learned", "sincos", "none")


def sincos_2d_table(grid: Tuple[int, int], dim: int) -> torch.Tensor:
    """(gh * gw, dim) fixed 2-D sin-cos positions in row-major patch order (MAE layout).

    The first half of the channels encodes the column, the second half the row; each half is
    ``[sin(c·ω_k) | cos(c·ω_k)]`` with ``ω_k = 10000^(-k / (dim/4))``, ``k < dim/4``.

    Args:
        grid: (rows, columns) of the patch grid.
        dim: embedding size, a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need dim divisible by 4, got dim={dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1) * omega[None, :]  # (P, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (P, dim/2)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (P, dim)


def visible_slots(dropped: torch.Tensor, prefix: int, count: Optional[int] = None) -> torch.Tensor:
    """Where each image token an embedder encoded sits in the ``(B, prefix + P)`` layout, flattened.

    An image's tokens are its prefix ([CLS]) then its patches not dropped, row-major, so token
    ``n`` of the batch's image tokens belongs at flat slot ``slots[n]`` (a decoder scatters encoder
    outputs back onto the full grid with it). A function of the mask and the prefix length only:
    heads get it without a reference to the embedder.

    Args:
        dropped: (B, P) bool, True = patch not encoded (all False when masked patches are kept as mask tokens).
        prefix: tokens before the patches ([CLS]: 1, else 0).
        count: N_img, when the caller knows it on the host (e.g. the encoded tokens' row count): then
            no device read.

    Returns:
        (N_img,) long.
    """
    kept = torch.cat([dropped.new_zeros(dropped.shape[0], prefix), dropped], dim=1).logical_not()  # (B, prefix + P)
    return mask_positions(kept.flatten(), count)


class PatchIndex(NamedTuple):
    """Origin of each packed image token: ``image`` (N,) batch index, ``patch`` (N,) grid index (−1 = CLS)."""

    image: torch.Tensor
    patch: torch.Tensor


def visible_patches(dropped: torch.Tensor, prefix: int, count: Optional[int] = None) -> PatchIndex:
    """Where each image token an embedder encoded came from: its image and grid cell (−1 for the prefix
    tokens, [CLS]), in stream order. A function of the mask and the prefix length only (as
    :func:`visible_slots`), so a head needs no reference to the embedder.

    Args:
        dropped: (B, P) bool, True = patch not encoded (all False when masked patches are kept as mask tokens).
        prefix: tokens before the patches ([CLS]: 1, else 0).
        count: the number of encoded tokens, when the caller knows it on the host: then no device read.
    """
    b, p = dropped.shape
    dev = dropped.device
    keep = ~dropped
    patch = torch.arange(p, device=dev).expand(b, -1)  # (B, P)
    image = torch.arange(b, device=dev)[:, None].expand(-1, p)  # (B, P)
    if prefix:
        patch = torch.cat([patch.new_full((b, prefix), -1), patch], dim=1)
        image = torch.cat([image[:, :1].expand(-1, prefix), image], dim=1)
        keep = torch.cat([keep.new_ones(b, prefix), keep], dim=1)
    flat = mask_positions(keep.flatten(), count)
    return PatchIndex(image.flatten().index_select(0, flat), patch.flatten().index_select(0, flat))


class PatchEmbed(nn.Module):
    """Strided convolution: (B, C, H, W) → (B, P, d), patches in row-major grid order."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, P, d)


@EMBEDDERS.register("image")
class ImageEmbedder(nn.Module):
    """Images → packed patch tokens (+ [CLS]) with positions, optionally masked.

    Args:
        dim: token size (the encoder width).
        image_size: height and width every input must have (resizing is the data pipeline's job).
        patch_size: side of a square patch; must divide ``image_size``.
        in_chans: input channels.
        cls_token: prepend a learned [CLS] token (with its own position) to every image.
        position: ``learned`` table, fixed 2-D ``sincos`` (MAE; a buffer, [CLS] row zero), or
            ``none`` (an all-zero buffer: tokens carry no position; exports as a zero timm table).
        embed_norm: LayerNorm on the tokens before the encoder (CLIP-style ``norm_pre``); off for ViT/MAE.
        norm_eps: epsilon of that LayerNorm.
        dropout: dropout on the output tokens.
    """

    def __init__(self, dim: int, image_size: int = 32, patch_size: int = 4, in_chans: int = 3, cls_token: bool = True,
                 position: str = "learned", embed_norm: bool = False, norm_eps: float = 1e-6,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if position not in IMAGE_POSITIONS:
            raise ValueError(f"unknown image position kind {position!r}; expected one of {IMAGE_POSITIONS}")
        if patch_size < 1 or image_size < 1 or image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a positive multiple of patch_size={patch_size}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be ≥ 1, got {in_chans}")
        self.dim = dim
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.position = position
        side = image_size // patch_size
        self.grid: Tuple[int, int] = (side, side)
        self.num_patches = side * side
        self.num_prefix_tokens = 1 if cls_token else 0
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        table_len = self.num_prefix_tokens + self.num_patches
        if position == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, table_len, dim))
        elif position == "none":  # adding zeros is exact: no position reaches the encoder
            self.register_buffer("pos_embed", torch.zeros(1, table_len, dim), persistent=False)
        else:
            table = torch.cat([torch.zeros(self.num_prefix_tokens, dim), sincos_2d_table(self.grid, dim)])
            self.register_buffer("pos_embed", table[None], persistent=False)  # (1, cls+P, d)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if embed_norm else None
        self.dropout = Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE initialisation: patch projection xavier-uniform (viewed as a Linear), bias 0;
        [CLS] and mask tokens normal(0.02); a learned position table truncated-normal(0.02) (ViT)."""
        with torch.no_grad():
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.patch_embed.proj.bias)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
            if isinstance(self.pos_embed, nn.Parameter):
                nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
            if self.norm is not None:
                self.norm.reset_parameters()

    def no_weight_decay(self) -> Set[str]:
        """Learned tokens and the position table are not decayed (MAE, timm ViT)."""
        return {"cls_token", "mask_token", "pos_embed"}

    def fold_modality_vector(self, vector: torch.Tensor) -> None:
        """Absorb a constant ``vector`` added to every output token into the weights (exact in eval
        mode; called under ``torch.no_grad``): into the LayerNorm's bias when there is one (output =
        dropout(LN(x))), else into the patch projection's bias, the mask token and the [CLS] token."""
        if self.norm is not None and self.norm.bias is not None:
            self.norm.bias += vector
            return
        self.patch_embed.proj.bias += vector  # visible patches
        self.mask_token += vector  # hidden patches (mask-token mode)
        if self.cls_token is not None:
            self.cls_token += vector

    def check_pixels(self, pixels: Any, what: str = "pixels") -> None:
        """Raise a clear error unless ``pixels`` is a (B, in_chans, image_size, image_size) float tensor."""
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"{what} must be a (batch, channels, height, width) tensor, got {shape}")
        if not pixels.dtype.is_floating_point:
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {pixels.dtype}; convert and "
                            "normalise images in the data pipeline (e.g. uint8 / 255, then mean/std)")
        b, c, h, w = pixels.shape
        if b == 0:
            raise ValueError(f"{what} is an empty batch (shape {tuple(pixels.shape)})")
        if c != self.in_chans:
            raise ValueError(f"{what} has {c} channels but this embedder expects in_chans={self.in_chans}")
        if (h, w) != (self.image_size, self.image_size):
            hint = "" if h % self.patch_size == 0 and w % self.patch_size == 0 else \
                f"; {h}x{w} is not even divisible by patch_size={self.patch_size}"
            raise ValueError(f"{what} are {h}x{w} but this embedder expects {self.image_size}x{self.image_size} "
                             f"(image_size={self.image_size}){hint}; resize or crop in the data pipeline")

    def _check_mask(self, mask: Any, batch: int) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, self.num_patches):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a (batch, num_patches) = {(batch, self.num_patches)} tensor, got {shape}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = hidden patch), got dtype {mask.dtype}")
        return mask

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images → (B, P, d) patch embeddings plus their positions (no [CLS])."""
        self.check_pixels(pixels)
        x = self.patch_embed(pixels)  # (B, P, d)
        # no cast down: under autocast the conv's bf16 output plus the fp32 table is fp32, so the residual stream
        # is fp32 as in timm (casting the table to bf16 kept the whole stream in bf16: 1.7-2.8x the error)
        return x + self.pos_embed[:, self.num_prefix_tokens:]

    def forward(self, pixels: torch.Tensor, mask: Optional[torch.Tensor] = None,
                drop_masked: bool = False, hidden_count: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of images into one packed token stream.

        Args:
            pixels: (B, C, H, W) float images of size ``image_size``.
            mask: (B, P) bool, True = hidden patch; None = nothing hidden.
            drop_masked: with ``mask``, drop hidden patches (MAE) instead of replacing their
                embeddings by ``mask_token`` + position (SimMIM/BEiT).
            hidden_count: ``mask``'s number of hidden patches, a host integer
                (:class:`~mmm.batch.ImageInput` counts it before the batch leaves the host): dropping
                then gathers by index, with no device read.

        Returns:
            ``tokens`` (N, d) packed image after image, [CLS] first in each when enabled, and
            ``lengths`` (B,) int64 tokens per image.
        """
        x = self.patch_tokens(pixels)  # (B, P, d)
        b, p, d = x.shape
        keep = None  # (B, P) True = token kept
        if mask is not None:
            mask = self._check_mask(mask, b)
            if drop_masked:
                keep = ~mask
            else:
                hidden = self.mask_token + self.pos_embed[:, self.num_prefix_tokens:]  # (1, P, d)
                x = torch.where(mask[..., None], hidden.to(x.dtype), x)
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(b, 1, d)
            x = torch.cat([cls, x], dim=1)  # (B, 1+P, d)
            if keep is not None:
                keep = torch.cat([keep.new_ones(b, 1), keep], dim=1)
        if keep is None:
            tokens = x.reshape(-1, d)  # (B*T, d)
            lengths = torch.full((b,), x.shape[1], dtype=torch.int64, device=x.device)
        else:
            kept = mask_positions(keep.flatten(), None if hidden_count is None else keep.numel() - hidden_count)
            tokens = x.reshape(-1, d).index_select(0, kept)  # (N, d), row-major = image by image, grid order inside each
            lengths = keep.sum(1)
            if keep.device.type == "cpu":  # on a GPU the batch's layout, built on the host, already refused it
                with on_host():
                    if bool((lengths == 0).any()):
                        empty = int((lengths == 0).nonzero()[0, 0])
                        raise ValueError(f"image {empty} has every patch masked and no [CLS] token, so it has no "
                                         "tokens left; keep at least one visible patch per image (or enable "
                                         "cls_token)")
        if self.norm is not None:
            tokens = self.norm(tokens)
        return self.dropout(tokens), lengths

    def visible_index(self, mask: torch.Tensor) -> PatchIndex:
        """Where each token of ``forward(pixels, mask, drop_masked=True)`` came from.

        A decoder scatters encoder outputs back onto the full grid with these: token ``n`` belongs
        to image ``image[n]`` at grid cell ``patch[n]`` (row-major, ``0 ≤ patch < num_patches``),
        or is that image's [CLS] token when ``patch[n] == -1``. In a (B, prefix + P) layout the
        flat slot is ``image * (prefix + P) + prefix + patch`` (which puts [CLS] at column 0).
        For the layout without dropping, pass an all-False mask.

        Args:
            mask: (B, P) bool, True = hidden patch.
        """
        b = mask.shape[0] if isinstance(mask, torch.Tensor) else 0
        return visible_patches(self._check_mask(mask, b), self.num_prefix_tokens)


# ----------------------------------------------------------------------------- standalone encoder


@dataclass
class ImageEncoderConfig:
    """A standalone image encoder: the shared encoder plus the image embedder's arguments."""

    encoder: EncoderConfig = _f(default_factory=EncoderConfig, help="shared encoder (its dim is the token size)")
    image_size: int = _f(32, "input height and width in pixels")
    patch_size: int = _f(4, "side of a square patch in pixels")
    in_chans: int = _f(3, "input channels")
    cls_token: bool = _f(True, "prepend a learned [CLS] token")
    position: str = _f("learned", "absolute patch positions: learned, sincos (fixed 2-D, MAE), none (MP3)")
    embed_norm: bool = _f(False, "LayerNorm on the tokens before the encoder (CLIP-style pre-norm)")
    norm_eps: float = _f(1e-6, "epsilon of the embedding LayerNorm")
    dropout: float = _f(0.0, "dropout on the embedded tokens")

    def embedder_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :class:`ImageEmbedder` (``dim`` included)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "encoder"}
        return {"dim": self.encoder.dim, **kw}


_EMBEDDER_FIELDS = tuple(f.name for f in dataclasses.fields(ImageEncoderConfig) if f.name != "encoder")


class ImageEncoder(EmbedderEncoder):
    """Image embedder + shared Transformer encoder: ``(B, C, H, W)`` images → ``(B, T, d)`` token features.

    ``T = cls + num_patches``, [CLS] first when the embedder has one; the output is the encoder's
    last hidden state (after its final LayerNorm, if configured), like timm's ``forward_features``.

    Args:
        embedder: an :class:`ImageEmbedder`.
        encoder: the shared :class:`~mmm.core.encoder.TransformerEncoder`.
        config: the configuration both were built from (kept for saving and export).
    """

    modality = "image"

    def __init__(self, embedder: ImageEmbedder, encoder: TransformerEncoder, config: ImageEncoderConfig) -> None:
        super().__init__(embedder, encoder, config)

    @classmethod
    def from_config(cls, config: ImageEncoderConfig) -> "ImageEncoder":
        """A freshly initialised encoder from ``config``.

        Args:
            config: encoder configuration and embedder arguments.
        """
        return cls(ImageEmbedder(**config.embedder_kwargs()), TransformerEncoder(config.encoder), config)

    @classmethod
    def build(cls, encoder_cfg: EncoderConfig, **embedder_kwargs: Any) -> "ImageEncoder":
        """A freshly initialised encoder from an :class:`EncoderConfig` and :class:`ImageEmbedder` arguments.

        Args:
            encoder_cfg: the shared encoder configuration; its ``dim`` is the token size.
            **embedder_kwargs: any of ``image_size, patch_size, in_chans, cls_token, position,
                embed_norm, norm_eps, dropout``; anything else is refused by name.
        """
        if "dim" in embedder_kwargs:
            raise TypeError("ImageEncoder.build takes the token size from encoder_cfg.dim; do not pass dim")
        unknown = sorted(set(embedder_kwargs) - set(_EMBEDDER_FIELDS))
        if unknown:
            raise TypeError(f"unknown image embedder argument(s) {unknown}; accepted: {list(_EMBEDDER_FIELDS)}")
        return cls.from_config(ImageEncoderConfig(encoder=encoder_cfg, **embedder_kwargs))

    @property
    def num_prefix_tokens(self) -> int:
        return self.embedder.num_prefix_tokens

    def forward(self, images: torch.Tensor, first_token_only: bool = False) -> torch.Tensor:
        """Encode a batch of images.

        Args:
            images: (B, C, H, W) float images, already resized and normalised.
            first_token_only: return only each image's first token ([CLS] when the encoder has one),
                (B, d); the last block then runs for those rows alone
                (:class:`~mmm.core.output_rows.OutputRows`, MosaicBERT's final-layer subset).

        Returns:
            (B, cls + P, d) token features, or (B, d) with ``first_token_only``.
        """
        self.embedder.check_pixels(images, what="images")
        tokens, lengths = self.embedder(images)  # (B*T, d)
        b, t = images.shape[0], int(self.embedder.num_prefix_tokens + self.embedder.num_patches)
        seq = PackedSeqInfo.from_seqlens([t] * b, device=tokens.device)
        if first_token_only:
            return self.encoder(tokens, seq, rows=OutputRows.first_tokens(seq))  # (B, d)
        return self.encoder(tokens, seq).view(b, t, -1)  # (B, T, d)


__all__ = ["IMAGE_POSITIONS", "ImageEmbedder", "ImageEncoder", "ImageEncoderConfig", "PatchIndex", "sincos_2d_table"]
