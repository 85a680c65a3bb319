"""Audio embedder and standalone audio encoder: continuous feature tokens → (N, d) encoder inputs.

The embedder follows wav2vec 2.0's feature projection (Baevski et al. 2020): LayerNorm over a
token's features, then a linear map to the encoder width. Hidden tokens (HuBERT, Hsu et al. 2021,
and wav2vec 2.0 mask the *projected* features) are replaced by one learned ``mask_embedding``;
absolute positions are added, then an optional LayerNorm and dropout. Tokens come from
:class:`~mmm.modalities.audio.frontend.AudioFrontend` (stacked log-mel frames or AudioMAE-style
spectrogram patches).

:class:`AudioEncoder` is the embedder plus the shared
:class:`~mmm.core.encoder.TransformerEncoder` without heads: ``(B, T, F)`` right-padded feature
tokens → ``(B, T, d)`` hidden states, and :meth:`AudioEncoder.encode_waveform` for raw audio.

Spectrogram patches (AudioMAE, Huang et al. 2022) come row-major, ``rows`` frequency patches by ``cols``
time patches. A patch's position id is ``row * (max_len // rows) + col`` (:func:`grid_position_ids`),
so the same time-frequency cell has the same id whatever the clip's width; training batches and the
standalone encoder compute it alike (:mod:`~mmm.modalities.audio.grid_positions`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from mmm.config import EncoderConfig, _f
from mmm.core.dropout import Dropout
from mmm.core.encoder import TransformerEncoder
from mmm.core.packing import pack_padded
from mmm.core.position import AbsolutePositions
from mmm.modalities.audio.grid_positions import grid_position_ids
from mmm.modalities.standalone import EmbedderEncoder
from mmm.registry import EMBEDDERS


@EMBEDDERS.register("audio")
class AudioEmbedder(nn.Module):
    """Packed feature tokens → (N, d) embeddings.

    Args:
        feature_dim: values per token F (``AudioFrontendConfig.token_dim``).
        dim: embedding size (the encoder width).
        max_len: longest sequence in tokens (size of the position table).
        position: ``learned``, ``sinusoidal`` or ``none`` (use ``none`` with ALiBi/rotary).
        embed_norm: LayerNorm after adding positions (wav2vec 2.0 / HuBERT norm the encoder input).
        norm_eps: LayerNorm epsilon.
        dropout: dropout on the embeddings.
    """

    def __init__(self, feature_dim: int, dim: int, max_len: int, position: str = "learned", embed_norm: bool = True,
                 norm_eps: float = 1e-12, dropout: float = 0.1) -> None:
        super().__init__()
        if feature_dim < 1 or dim < 1 or max_len < 1:
            raise ValueError(f"AudioEmbedder: feature_dim, dim and max_len must be >= 1, "
                             f"got {feature_dim}, {dim}, {max_len}")
        self.feature_dim, self.dim = feature_dim, dim
        self.feature_norm = nn.LayerNorm(feature_dim, eps=norm_eps)
        self.proj = nn.Linear(feature_dim, dim)
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        self.positions = AbsolutePositions(position, max_len, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if embed_norm else None
        self.dropout = Dropout(dropout)
        self.reset_parameters()

    @property
    def max_len(self) -> int:
        return self.positions.max_len

    def reset_parameters(self) -> None:
        """The mask embedding drawn from N(0, 0.02) (linear layers follow the model's initialiser)."""
        with torch.no_grad():
            nn.init.normal_(self.mask_embedding, std=0.02)

    def fold_modality_vector(self, vector: torch.Tensor) -> None:
        """Absorb a constant ``vector`` added to every output token into the weights (exact in eval
        mode; called under ``torch.no_grad``): into the LayerNorm's bias when there is one (output =
        dropout(LN(x))), else into the projection's bias and the mask embedding."""
        if self.norm is not None and self.norm.bias is not None:
            self.norm.bias += vector
            return
        self.proj.bias += vector
        self.mask_embedding += vector

    def forward(self, features: torch.Tensor, position_ids: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, F) features, (N,) positions, (N,) bool mask (True = hidden) or None → (N, d).

        ``features`` is never modified (objectives regress it at the hidden rows).
        """
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"AudioEmbedder: features must be (N, {self.feature_dim}), got {tuple(features.shape)}")
        x = self.proj(self.feature_norm(features))  # (N, d)
        if mask is not None:
            x = torch.where(mask[:, None], self.mask_embedding.to(x.dtype), x)  # (N, d)
        pos = self.positions(position_ids)
        if pos is not None:
            x = x + pos.to(x.dtype)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


@dataclass
class AudioEncoderConfig:
    """A standalone audio encoder: the shared encoder plus the audio embedder's arguments."""

    encoder: EncoderConfig = _f(default_factory=EncoderConfig, help="shared encoder (its dim is the token size)")
    feature_dim: int = _f(256, "values per feature token (frames_per_token * n_mels, or patch_freq * patch_time)")
    max_len: int = _f(512, "size of the position table (tokens per sequence)")
    position: str = _f("learned", "absolute positions: learned, sinusoidal, none")
    embed_norm: bool = _f(True, "LayerNorm on the embedded tokens")
    norm_eps: float = _f(1e-12, "LayerNorm epsilon of the embedder")
    dropout: float = _f(0.0, "dropout on the embedded tokens")
    max_seconds: Optional[float] = _f(None, "encode_waveform: longest audio per sequence (as in training); "
                                      "null = only max_len limits")
    grid_rows: int = _f(1, "frequency rows of a token sequence: 1 for time tokens, n_mels // patch_freq for "
                        "spectrogram patches (a patch's position id is row * (max_len // grid_rows) + col)")

    def embedder_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :class:`AudioEmbedder` (``dim`` included)."""
        skip = ("encoder", "max_seconds", "grid_rows")
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return {"dim": self.encoder.dim, **kw}


class AudioEncoder(EmbedderEncoder):
    """Audio embedder + shared Transformer encoder: ``(B, T, F)`` feature tokens → ``(B, T, d)``.

    Args:
        embedder: an :class:`AudioEmbedder`.
        encoder: the shared :class:`~mmm.core.encoder.TransformerEncoder`.
        config: the configuration both were built from.
        frontend: the fitted :class:`~mmm.modalities.audio.frontend.AudioFrontend` the model was
            trained with (needed by :meth:`encode_waveform` only).
    """

    modality = "audio"

    def __init__(self, embedder: AudioEmbedder, encoder: TransformerEncoder, config: AudioEncoderConfig,
                 frontend: Optional[Any] = None) -> None:
        super().__init__(embedder, encoder, config)
        self.frontend = frontend

    @classmethod
    def from_config(cls, config: AudioEncoderConfig, frontend: Optional[Any] = None) -> "AudioEncoder":
        """A freshly initialised encoder from ``config``.

        Args:
            config: encoder configuration and embedder arguments.
            frontend: optional fitted front end to attach.
        """
        return cls(AudioEmbedder(**config.embedder_kwargs()), TransformerEncoder(config.encoder), config, frontend)

    def forward(self, features: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode a right-padded batch of feature tokens (nothing masked).

        Args:
            features: (B, T, F) float tokens.
            lengths: (B,) real tokens per row; or
            attention_mask: (B, T) with 1 on real tokens then 0 (right padding). Neither = all real.

        Returns:
            (B, T, d) hidden states; zeros at padded positions.
        """
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a (batch, tokens, feature_dim) tensor, got {shape}")
        b, t, f = features.shape
        if f != self.embedder.feature_dim:
            raise ValueError(f"features have {f} values per token, this encoder expects {self.embedder.feature_dim}")
        if not features.dtype.is_floating_point:
            raise TypeError(f"features must be floating point, got dtype {features.dtype}")
        if lengths is not None and attention_mask is not None:
            raise ValueError("give lengths or attention_mask, not both")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=features.device).long()
            if lengths.shape != (b,) or bool((lengths < 1).any()) or bool((lengths > t).any()):
                raise ValueError(f"lengths must be (B,) = ({b},) values in [1, {t}], got {lengths.tolist()}")
            attention_mask = torch.arange(t, device=features.device)[None, :] < lengths[:, None]
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.bool, device=features.device)
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must be (B, T) = {(b, t)}, got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.bool()
        seq = pack_padded(attention_mask)
        rows, limit = self.config.grid_rows, self.embedder.max_len
        if rows > 1:
            if any(n % rows for n in seq.lengths) or max(seq.lengths) // rows > limit // rows:
                raise ValueError(f"patch tokens come as {rows} frequency rows of at most {limit // rows} time columns "
                                 f"(the position table holds {limit}); got sequences of {list(seq.lengths)} tokens "
                                 f"(split the input: encode_waveform does)")
            counts = torch.tensor(seq.lengths, dtype=torch.long, device=features.device)
            per_token = counts.repeat_interleave(counts, output_size=seq.num_tokens)
            position_ids = grid_position_ids(seq.position_ids, per_token, rows, limit)
        else:
            if self.embedder.positions.weight is not None and seq.max_seqlen > limit:
                raise ValueError(f"a sequence has {seq.max_seqlen} tokens but the position table holds "
                                 f"{limit}; split the input (encode_waveform does)")
            position_ids = seq.position_ids
        x = self.embedder(features[attention_mask], position_ids)  # (N, d)
        hidden = seq.pad(self.encoder(x, seq))  # (B, T_max, d)
        if hidden.shape[1] < t:
            hidden = torch.cat([hidden, hidden.new_zeros(b, t - hidden.shape[1], hidden.shape[2])], dim=1)
        return hidden

    @torch.no_grad()
    def encode_waveform(self, waveform: Any, sr: int) -> torch.Tensor:
        """Hidden states of one clip, one row per token of ``frontend(waveform, sr)``.

        Clips longer than ``config.max_seconds`` or the position table are cut into consecutive
        sequences along time, as the training pipeline cuts them, and encoded separately.

        Args:
            waveform: (samples,) or (channels, samples), NumPy or torch, any sample rate.
            sr: its sample rate (Hz).

        Returns:
            (T_tokens, d) float tensor, tokens in the front end's order.
        """
        from mmm.modalities.audio.pipeline import max_columns, single_thread, split_columns

        if self.frontend is None:
            raise RuntimeError("AudioEncoder.encode_waveform needs the fitted front end (load the encoder from a "
                               "checkpoint, or pass frontend=)")
        with single_thread():
            tokens = self.frontend(waveform, sr)  # (T, F)
        rows, cols = self.frontend.token_grid(tokens.shape[0])
        chunks = split_columns(tokens, rows, max_columns(self.frontend, self.config.max_seconds, self.embedder.max_len))
        device = next(self.parameters()).device
        outs: List[torch.Tensor] = []
        for chunk in chunks:
            x = torch.from_numpy(chunk).to(device)[None]  # (1, t, F)
            outs.append(self.forward(x)[0].view(rows, -1, self.hidden_size))  # (rows, cols_chunk, d)
        return torch.cat(outs, dim=1).reshape(rows * cols, self.hidden_size)


__all__ = ["AudioEmbedder", "AudioEncoder", "AudioEncoderConfig"]
