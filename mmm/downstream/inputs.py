"""Raw input → encoder batch → hidden states → one vector per sample, for every modality :func:`mmm.load_encoder` builds.

An :class:`InputAdapter` wraps a loaded encoder and knows its modality's raw input:

* ``text``: a string, or a ``(first, second)`` pair, tokenized as ``[CLS] a [SEP]`` /
  ``[CLS] a [SEP] b [SEP]`` (mmm has no segment embeddings; the HF export's token-type table is
  zero, so HF gives the same result with any ``token_type_ids``), cut longest-first to the
  encoder's position table;
* ``dna``: a base string, tokenized by the encoder's DNA tokenizer, cut to the position table;
* ``image``: a PIL image, resized and centre-cropped to the encoder's size (the pretraining
  evaluation transform), ImageNet-normalised;
* ``audio``: a ``(waveform, sample_rate)`` pair through the encoder's fitted front end; a clip longer
  than the encoder is split into sequences as the pretraining pipeline splits it (:class:`AudioChunks`),
  every one is encoded, and mean pooling averages over the tokens of all of them: the whole clip counts.

Text and DNA batches are run packed: :meth:`InputAdapter.pooled` concatenates the token ids into
one flat stream that the embedder and the encoder read with ``cu_seqlens`` (block-diagonal
attention), as in pretraining, so no compute is spent on padding and no padded tensor is built. Every cut input
(text, DNA) is counted in :attr:`InputAdapter.truncated`; audio is never cut.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

POOLINGS = ("cls", "mean")


class AudioChunks(list):
    """One audio input's feature-token sequences, (T_i, F) arrays in time order: a clip longer than the encoder
    becomes several (the pretraining pipeline's ``split_columns``), each encoded, pooled together."""


class InputAdapter:
    """Turns raw inputs of one modality into pooled features of ``encoder``.

    Args:
        encoder: from :func:`mmm.encoders.load_encoder`.
        modality: ``text``, ``dna``, ``image`` or ``audio``.
        source: where the encoder came from (for messages).
    """

    def __init__(self, encoder: nn.Module, modality: str, source: str = "") -> None:
        self.encoder = encoder
        self.modality = modality
        self.source = source
        self.truncated = 0
        if modality in ("text", "dna"):
            self.tokenizer = getattr(encoder, "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError(f"{source}: the {modality} encoder has no tokenizer attached (an HF folder needs its "
                                 "tokenizer.json or vocab.txt next to config.json)")
            self.max_len = int(encoder.embedder.max_len)
        elif modality == "image":
            self.image_size = int(encoder.config.image_size)
        elif modality == "audio":
            if encoder.frontend is None:
                raise ValueError(f"{source}: the audio encoder has no fitted front end; load it from a checkpoint or "
                                 "a save_encoder folder that holds audio_frontend.json")
            from mmm.modalities.audio.pipeline import max_columns

            self.columns = max_columns(encoder.frontend, encoder.config.max_seconds, encoder.embedder.max_len)
        else:
            raise ValueError(f"unknown modality {modality!r}; supported: text, dna, image, audio")

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.hidden_size)

    @property
    def has_cls(self) -> bool:
        """Whether the first output token is a [CLS] token (text, DNA, an image encoder with one)."""
        if self.modality in ("text", "dna"):
            return True
        if self.modality == "image":
            return bool(self.encoder.config.cls_token)
        return False

    def check_pooling(self, pooling: str) -> str:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if pooling == "cls" and not self.has_cls:
            raise ValueError(f"{self.source}: the {self.modality} encoder has no [CLS] token; use --pooling mean")
        return pooling

    # ------------------------------------------------------------------ one sample
    def prepare(self, raw: Any, where: str = "") -> Any:
        """One raw input → what :meth:`forward` batches (token ids, pixels or feature tokens).

        Args:
            raw: see the module docstring.
            where: file/row/key of the input, for error messages.
        """
        if self.modality == "text":
            return self._text_ids(raw, where)
        if self.modality == "dna":
            if not isinstance(raw, str) or not raw:
                raise ValueError(f"{where}: a DNA input must be a non-empty string of bases")
            try:
                ids = self.tokenizer.encode(raw).ids
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if len(ids) > self.max_len:
                self.truncated += 1
                ids = np.concatenate([ids[: self.max_len - 1], ids[-1:]])
            return ids
        if self.modality == "image":
            from mmm.modalities.image.transforms import eval_transform, normalize

            return normalize(eval_transform(raw, self.image_size))  # (3, S, S)
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

    def _text_ids(self, raw: Any, where: str) -> np.ndarray:
        tok = self.tokenizer
        parts = list(raw) if isinstance(raw, (tuple, list)) else [raw]
        if not 1 <= len(parts) <= 2 or not all(isinstance(p, str) for p in parts):
            raise ValueError(f"{where}: a text input is a string or a pair of strings")
        ids = [tok.encode(p)[0] for p in parts]
        room = self.max_len - 1 - len(ids)  # [CLS] + one [SEP] per part
        keep = longest_first([len(x) for x in ids], room)
        if keep != [len(x) for x in ids]:
            self.truncated += 1
            ids = [x[:k] for x, k in zip(ids, keep)]
        out = [np.array([tok.cls_id])]
        for x in ids:
            out += [x, np.array([tok.sep_id])]
        return np.concatenate(out).astype(np.int64)

    # ------------------------------------------------------------------ batches
    def forward(self, items: Sequence[Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode prepared items (audio: single (T, F) token sequences, the parts of :class:`AudioChunks`):
        ``(hidden (B, T, d), mask (B, T) bool)``, mask True on real tokens."""
        device = next(self.encoder.parameters()).device
        if self.modality in ("text", "dna"):
            ids, mask = pad_ids(items, int(self.encoder.pad_id))
            ids, mask = ids.to(device), mask.to(device)
            return self.encoder(ids, mask), mask
        if self.modality == "image":
            hidden = self.encoder(torch.stack(list(items)).to(device))  # (B, T, d)
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=device)
            if self.encoder.config.cls_token:
                mask[:, 0] = False  # mean pooling over patch tokens (MAE's global pool); cls pooling reads row 0
            return hidden, mask
        lengths = torch.tensor([len(x) for x in items])
        feats = torch.zeros(len(items), int(lengths.max()), items[0].shape[1])
        for i, x in enumerate(items):
            feats[i, : len(x)] = torch.from_numpy(np.asarray(x, np.float32))
        mask = torch.arange(feats.shape[1])[None] < lengths[:, None]
        return self.encoder(feats.to(device), lengths.to(device)), mask.to(device)

    def pooled(self, items: Sequence[Any], pooling: str, cls_last_block: bool = True) -> torch.Tensor:
        """(B, d) one vector per item: the [CLS] token or the mean over real (patch) tokens.

        Text and DNA go through :meth:`encode_packed` (no padded tensor anywhere); the other
        modalities pool :meth:`forward`'s padded output. ``cls_last_block``: with ``cls`` pooling of
        text, DNA and images, run the encoder's last block for the [CLS] rows alone (MosaicBERT's
        final-layer subset; the same vectors); False runs it for every token (a benchmark's reference).
        """
        if self.modality in ("text", "dna"):
            from mmm.probe import pool

            if pooling == "cls" and cls_last_block:
                return self.encode_packed(items, first_tokens_only=True)[0]
            hidden, seq = self.encode_packed(items)
            return pool(hidden, seq.cu_seqlens, "first" if pooling == "cls" else "mean")
        if self.modality == "image" and pooling == "cls" and cls_last_block:  # [CLS] alone in the last block
            device = next(self.encoder.parameters()).device
            return self.encoder(torch.stack(list(items)).to(device), first_token_only=True)  # (B, d)
        if self.modality == "audio":  # every sequence of every clip in one batch, then one mean per clip
            owner = torch.tensor([i for i, clip in enumerate(items) for _ in clip])
            hidden, mask = self.forward([chunk for clip in items for chunk in clip])
            m = mask.to(hidden.dtype)[..., None]  # (C, T, 1)
            sums = torch.zeros(len(items), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
            sums = sums.index_add(0, owner.to(hidden.device), (hidden * m).sum(1))
            counts = torch.zeros(len(items), dtype=hidden.dtype, device=hidden.device)
            counts = counts.index_add(0, owner.to(hidden.device), m.sum((1, 2)))
            return sums / counts.clamp_min(1.0)[:, None]  # (B, d): the mean over all of each clip's tokens
        hidden, mask = self.forward(items)
        return pool_padded(hidden, mask, pooling)

    def encode_packed(self, items: Sequence[np.ndarray], first_tokens_only: bool = False) -> Tuple[torch.Tensor, Any]:
        """Text / DNA token-id arrays → ``(hidden (N, d), PackedSeqInfo)`` of one flat stream.

        The ids are concatenated and embedded and encoded as they are (as in pretraining), so
        unlike :meth:`forward` no padded (B, T) batch is built, checked, unpadded and padded back.
        Items come from :meth:`prepare`, which keeps every one within the position table.
        ``first_tokens_only``: return only each sequence's first token, (B, d), whose last block
        then runs for those rows alone (:class:`~mmm.core.output_rows.OutputRows`).
        """
        from mmm.core.output_rows import OutputRows
        from mmm.core.packing import PackedSeqInfo

        device = next(self.encoder.parameters()).device
        seq = PackedSeqInfo.from_seqlens([len(x) for x in items], device=device)
        ids = torch.from_numpy(np.concatenate([np.asarray(x, np.int64) for x in items])).to(device)  # (N,)
        rows = OutputRows.first_tokens(seq) if first_tokens_only else None
        return self.encoder.encoder(self.encoder.embedder(ids, seq.position_ids), seq, rows=rows), seq

    @torch.no_grad()
    def features(self, raws: Sequence[Any], pooling: str, *, batch_size: int = 64,
                 where: Optional[List[str]] = None, skipped: Optional[List[Tuple[int, str, str]]] = None) -> np.ndarray:
        """(n, d) float32 pooled features of raw inputs, in order (eval mode, no gradients).

        Args:
            raws: raw inputs.
            pooling: ``cls`` or ``mean``.
            batch_size: inputs per forward pass.
            where: a label per input for errors (file/row/key).
            skipped: None: an input :meth:`prepare` refuses is an error naming it; a list: such an input is left out
                of the result and ``(index, where, reason)`` appended (``mmm embed --skip_bad``).
        """
        self.check_pooling(pooling)
        was = self.encoder.training
        self.encoder.eval()
        out = []
        for lo in range(0, len(raws), batch_size):
            items = []
            for i, r in enumerate(raws[lo:lo + batch_size]):
                label = where[lo + i] if where else f"input {lo + i}"
                try:
                    items.append(self.prepare(r, label))
                except ValueError as e:
                    if skipped is None:
                        raise
                    skipped.append((lo + i, label, str(e).removeprefix(f"{label}: ")))
            if items:
                out.append(self.pooled(items, pooling).float().cpu().numpy())
        self.encoder.train(was)
        return np.concatenate(out) if out else np.zeros((0, self.hidden_size), np.float32)


def longest_first(lengths: Sequence[int], room: int) -> List[int]:
    """Kept lengths of one text or a text pair cut to ``room`` tokens in all, as HF's
    ``truncation="longest_first"`` (the tokenizers library behind every fast and, from transformers 5,
    every BERT tokenizer): the shorter text is kept whole when it fits in half of ``room`` and the
    longer takes the rest; otherwise both get half, the odd token going to the longer text (the
    second on a tie)."""
    room = max(room, 0)
    if sum(lengths) <= room:
        return list(lengths)
    if len(lengths) == 1:
        return [room]
    a, b = lengths
    if 2 * min(a, b) <= room:
        return [a, room - a] if a <= b else [room - b, b]
    half, odd = room // 2, room % 2
    return [half + odd, half] if a > b else [half, half + odd]


def pad_ids(items: Sequence[np.ndarray], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids (B, T) long, mask (B, T) bool)`` of 1-D id arrays."""
    width = max(len(x) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.bool)
    for i, x in enumerate(items):
        ids[i, : len(x)] = torch.as_tensor(np.asarray(x, np.int64))
        mask[i, : len(x)] = True
    return ids, mask


def pool_padded(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, d) hidden states → (B, d): row 0 (``cls``) or the mean over ``mask`` (``mean``)."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def load_adapter(source: str, modality: str, *, timm_model: Optional[str] = None) -> InputAdapter:
    """:func:`~mmm.encoders.load_encoder` (``source``: an mmm ``.ckpt``, a ``save_encoder`` folder, an
    HF BERT folder, a timm ViT file with ``timm_model``) wrapped in an :class:`InputAdapter`."""
    from mmm.encoders import load_encoder

    enc = load_encoder(source, modality, timm_model=timm_model)
    return InputAdapter(enc, modality, str(source))
