"""What every standalone single-modality encoder is made of: the modality's embedder, then the shared encoder.

``mmm.load_encoder(ckpt, modality=...)`` returns one (image: timm-style ``forward_features``;
audio: frame features; text and DNA: :class:`mmm.encoders.TextEncoder`); the modalities' encoder
classes add their ``forward`` and constructors.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from mmm.core.encoder import TransformerEncoder


class EmbedderEncoder(nn.Module):
    """``embedder`` → ``encoder``, with the ``config`` both were built from (kept for saving and export).

    Args:
        embedder: the modality's embedder (its ``dim`` is the encoder width).
        encoder: the shared :class:`~mmm.core.encoder.TransformerEncoder`.
        config: the modality's standalone-encoder config.
    """

    modality: str

    def __init__(self, embedder: nn.Module, encoder: TransformerEncoder, config: Any) -> None:
        super().__init__()
        if embedder.dim != encoder.cfg.dim:
            raise ValueError(f"embedder dim {embedder.dim} does not match encoder dim {encoder.cfg.dim}")
        self.embedder = embedder
        self.encoder = encoder
        self.config = config

    @property
    def hidden_size(self) -> int:
        """Width of the output hidden states."""
        return self.encoder.cfg.dim
