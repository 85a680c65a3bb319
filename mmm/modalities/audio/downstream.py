"""Audio inputs downstream (``mmm embed``, ``mmm finetune``, probes): a ``(waveform, sample_rate)`` pair.

The encoder's fitted front end turns the clip into feature tokens; a clip longer than the encoder is
split into sequences as the pretraining pipeline splits it (:class:`AudioChunks`), every one is encoded,
and mean pooling averages over the tokens of all of them: the whole clip counts (audio is never cut).
Raw files: ``.wav`` and ``.flac``. Embedded task (:func:`audio_tasks`): ``audio-sounds``, the synthesized
sounds of the ``audio`` dataset definition's embedded set, built into the cache on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from mmm.downstream.inputs import InputAdapter
from mmm.downstream.tasks import DownstreamTask, embedded_shards, shard_splits
from mmm.modalities.audio.frontend import AUDIO_SUFFIXES



class AudioChunks(list):
    """One audio input's feature-token sequences, (T_i, F) arrays in time order: a clip longer than the encoder
    becomes several (the pretraining pipeline's ``split_columns``), each encoded, pooled together."""


class AudioInputs(InputAdapter):
    """Waveforms → front-end feature tokens → the mean over all of a clip's hidden states."""

    modality = "audio"
    default_pooling = "mean"
    file_suffixes = AUDIO_SUFFIXES

    def __init__(self, encoder: nn.Module, source: str = "") -> None:
        super().__init__(encoder, source)
        if encoder.frontend is None:
            raise ValueError(f"{source}: the audio encoder has no fitted front end; load it from a checkpoint or "
                             "a save_encoder folder that holds audio_frontend.json")
        from mmm.modalities.audio.pipeline import max_columns

        self.columns = max_columns(encoder.frontend, encoder.config.max_seconds, encoder.embedder.max_len)

    def prepare(self, raw: Any, where: str = "") -> AudioChunks:
        from mmm.modalities.audio.pipeline import single_thread, split_columns

        wav, sr = raw
        front = self.encoder.frontend
        with single_thread():
            try:
                tokens = front(wav, sr)  # (T, F)
            except ValueError as e:  # e.g. a rate the front end refuses: name the input
                raise ValueError(f"{where}: {e}") from None
        rows, _ = front.token_grid(tokens.shape[0])
        return AudioChunks(split_columns(tokens, rows, self.columns))

    def forward(self, items: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode single (T, F) token sequences (the parts of :class:`AudioChunks`):
        ``(hidden (B, T, d), mask (B, T) bool)``, mask True on real tokens."""
        lengths = torch.tensor([len(x) for x in items])
        feats = torch.zeros(len(items), int(lengths.max()), items[0].shape[1])
        for i, x in enumerate(items):
            feats[i, : len(x)] = torch.from_numpy(np.asarray(x, np.float32))
        mask = torch.arange(feats.shape[1])[None] < lengths[:, None]
        return self.encoder(feats.to(self.device), lengths.to(self.device)), mask.to(self.device)

    def pooled(self, items: Sequence[AudioChunks], pooling: str, cls_last_block: bool = True) -> torch.Tensor:
        """Every sequence of every clip in one batch, then one mean per clip over all of its tokens."""
        owner = torch.tensor([i for i, clip in enumerate(items) for _ in clip])
        hidden, mask = self.forward([chunk for clip in items for chunk in clip])
        m = mask.to(hidden.dtype)[..., None]  # (C, T, 1)
        sums = torch.zeros(len(items), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        sums = sums.index_add(0, owner.to(hidden.device), (hidden * m).sum(1))
        counts = torch.zeros(len(items), dtype=hidden.dtype, device=hidden.device)
        counts = counts.index_add(0, owner.to(hidden.device), m.sum((1, 2)))
        return sums / counts.clamp_min(1.0)[:, None]  # (B, d)

    @classmethod
    def decode_sample(cls, sample: Dict[str, Any]) -> Tuple[Any, Optional[int]]:
        from mmm.modalities.audio.pipeline import read_audio_sample

        wav, sr, meta = read_audio_sample(sample)
        return (wav, sr), meta.get("label")

    @classmethod
    def decode_file(cls, path: Path) -> Tuple[np.ndarray, int]:
        """``(waveform (C, S) float32, sample rate)`` of a WAV/FLAC file; ValueError names the file."""
        from mmm.modalities.audio.frontend import decode_audio

        return decode_audio(path.read_bytes(), str(path))


def audio_tasks() -> Dict[str, DownstreamTask]:
    """The audio modality's embedded task (:meth:`~mmm.modalities.audio.modality.AudioModality.downstream_tasks`)."""
    return {"audio-sounds": DownstreamTask("audio", "synthetic", "synthesized sounds (sound class)",
                                           shard_splits(embedded_shards("audio"), "audio"))}
