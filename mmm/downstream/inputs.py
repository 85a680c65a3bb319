"""Raw input → encoder batch → hidden states → one vector per sample: the downstream side of a modality.

An :class:`InputAdapter` wraps an encoder that :func:`mmm.load_encoder` built and knows its modality's raw
inputs: how to read them (shard samples, raw files, table cells), how to turn one into what the encoder
reads (:meth:`~InputAdapter.prepare`), and how to pool a batch of them into one vector each
(:meth:`~InputAdapter.pooled`). Each modality gives its own subclass through
:meth:`mmm.modalities.base.Modality.downstream_inputs`, so ``mmm embed`` and ``mmm finetune`` (and the probes,
from :meth:`~InputAdapter.features`) serve a plug-in modality as they serve the built-in ones
(:func:`adapter_class` looks it up); the downstream benchmark runs its embedded tasks, which are built-in ones:

* ``text`` (:mod:`mmm.modalities.text.downstream`): a string or a ``(first, second)`` pair;
* ``dna`` (:mod:`mmm.modalities.dna.downstream`): a base string;
* ``image`` (:mod:`mmm.modalities.image.downstream`): a PIL image;
* ``audio`` (:mod:`mmm.modalities.audio.downstream`): a ``(waveform, sample_rate)`` pair.

Token-id modalities (:class:`TokenIdInputs`: text, DNA) run packed: their ids are concatenated into one flat
stream that the embedder and the encoder read with ``cu_seqlens`` (block-diagonal attention), as in
pretraining, so no compute is spent on padding. Every input cut to the encoder's length is counted in
:attr:`InputAdapter.truncated`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from mmm.downstream.split import Split

POOLINGS = ("cls", "mean")


class RawFile(NamedTuple):
    """A raw input that is a whole file (an image, a recording), decoded again when :meth:`InputAdapter.prepare`
    reads it: reading a folder checks every file but keeps none decoded, so ``mmm embed`` on a folder holds one
    batch of decoded inputs at a time, not the folder."""

    path: str


class RawSample(NamedTuple):
    """A shard sample kept as its encoded members (``mmm embed`` on shards), decoded again by the modality's
    :meth:`InputAdapter.decode_sample` when its batch is prepared: a split is held as compressed bytes, not as
    decoded images or waveforms."""

    sample: Dict[str, Any]


class InputAdapter:
    """Turns raw inputs of one modality into pooled features of ``encoder`` (subclassed per modality).

    Args:
        encoder: from :func:`mmm.encoders.load_encoder`.
        source: where the encoder came from (for messages).

    A subclass sets :attr:`modality` and implements :meth:`prepare` and :meth:`pooled`; to read inputs from
    files it sets :attr:`file_suffixes` and implements :meth:`read_file`, from labelled shards
    :meth:`decode_sample`, from table cells :attr:`reads_tables`.
    """

    modality: str = ""
    default_pooling: str = "cls"
    """The pooling ``mmm finetune`` uses when none is given."""
    reads_tables: bool = False
    """Whether an input can be a ``.tsv``/``.csv``/``.jsonl`` cell (a string), read from ``--text_column``."""
    default_column: Optional[str] = None
    """The table column ``mmm embed`` / ``mmm finetune`` read when ``--text_column`` is not given (DNA: ``sequence``);
    None: it must be given."""
    file_suffixes: Tuple[str, ...] = ()
    """Suffixes of the raw files :meth:`read_file` reads (``mmm embed`` on a file or folder), lower case."""

    def __init__(self, encoder: nn.Module, source: str = "") -> None:
        self.encoder = encoder
        self.source = source
        self.truncated = 0

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.hidden_size)

    @property
    def has_cls(self) -> bool:
        """Whether the first output token is a [CLS] token (``cls`` pooling reads it)."""
        return False

    def check_pooling(self, pooling: str) -> str:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if pooling == "cls" and not self.has_cls:
            raise ValueError(f"{self.source}: the {self.modality} encoder has no [CLS] token; use --pooling mean")
        return pooling

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    # ------------------------------------------------------------------ reading raw inputs (class level)
    @classmethod
    def decode_sample(cls, sample: Dict[str, Any]) -> Tuple[Any, Optional[int]]:
        """``(raw input, label or None)`` of one raw WebDataset sample (its json ``label``); ValueError names
        what is wrong."""
        raise ValueError(f"the {cls.modality} modality reads no labelled shards downstream")

    @classmethod
    def decode_file(cls, path: Path) -> Any:
        """The raw input a whole file holds (an image, a recording); ValueError names the file."""
        raise ValueError(f"{path}: the {cls.modality} modality reads no raw files")

    @classmethod
    def read_file(cls, path: Path, rel: str, skip_bad: bool) -> "Split":
        """The raw inputs of one file whose suffix is in :attr:`file_suffixes` (``rel``: its name in keys, e.g.
        ``rel:row3``); with ``skip_bad`` a bad input is left out and listed in the split's ``skipped``,
        without it a ValueError names it. Default: the file is one input, checked by :meth:`decode_file` and kept
        as a :class:`RawFile` (decoded again when its batch is prepared); a file of several inputs (text lines,
        FASTA records) overrides this."""
        from mmm.downstream.split import Split

        cls.decode_file(path)
        return Split(str(path), [RawFile(str(path))], [None], [rel])

    def decoded(self, raw: Any) -> Any:
        """``raw`` itself, or the input a :class:`RawFile` / :class:`RawSample` holds, decoded."""
        if isinstance(raw, RawFile):
            return self.decode_file(Path(raw.path))
        if isinstance(raw, RawSample):
            return self.decode_sample(raw.sample)[0]
        return raw

    @classmethod
    def check_inputs(cls, split: "Split", skip_bad: bool) -> "Split":
        """Screen the raw inputs of a read split before :meth:`prepare` (e.g. DNA's alphabet under ``skip_bad``,
        so a bad row is skipped and counted as the shard readers skip it); default: as they are."""
        return split

    # ------------------------------------------------------------------ one sample, a batch
    def prepare(self, raw: Any, where: str = "") -> Any:
        """One raw input → what :meth:`pooled` batches (token ids, pixels, feature tokens); ValueError names
        ``where`` (file/row/key of the input)."""
        raise NotImplementedError(f"{type(self).__name__} must implement prepare")

    def pooled(self, items: Sequence[Any], pooling: str, cls_last_block: bool = True) -> torch.Tensor:
        """(B, d) one vector per prepared item: the [CLS] token (``cls``) or the mean over real tokens (``mean``).

        ``cls_last_block``: with ``cls`` pooling, an adapter may run the encoder's last block for the [CLS] rows
        alone (MosaicBERT's final-layer subset; the same vectors); False runs it for every token (a benchmark's
        reference)."""
        raise NotImplementedError(f"{type(self).__name__} must implement pooled")

    def prepare_all(self, raws: Sequence[Any], where: Optional[Sequence[str]] = None,
                    skipped: Optional[List[Tuple[int, str, str]]] = None, offset: int = 0) -> List[Any]:
        """:meth:`prepare` of each raw input (a :class:`RawFile` / :class:`RawSample` decoded first), in order.

        Args:
            raws: raw inputs.
            where: a label per input for errors (file/row/key); None: ``input <index>``.
            skipped: None: an input that is refused (a ValueError) stops with its error; a list: it is left out and
                ``(offset + index, where, reason)`` appended.
            offset: index of ``raws[0]`` in the caller's whole list.
        """
        items = []
        for i, r in enumerate(raws):
            label = where[i] if where else f"input {offset + i}"
            try:
                items.append(self.prepare(self.decoded(r), label))
            except ValueError as e:
                if skipped is None:
                    raise
                skipped.append((offset + i, label, str(e).removeprefix(f"{label}: ")))
        return items

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
            items = self.prepare_all(raws[lo:lo + batch_size], where[lo:lo + batch_size] if where else None, skipped,
                                     offset=lo)
            if items:
                out.append(self.pooled(items, pooling).float().cpu().numpy())
        self.encoder.train(was)
        return np.concatenate(out) if out else np.zeros((0, self.hidden_size), np.float32)


class TokenIdInputs(InputAdapter):
    """An adapter whose prepared items are 1-D token-id arrays of at most :attr:`max_len` ids, encoded packed.

    The encoder has an ``embedder(ids (N,), position_ids (N,))`` and a shared ``encoder(x, seq, rows=)`` (text, DNA
    and any plug-in built the same way). :attr:`max_len` is the embedder's ``max_len`` when it has one; otherwise a
    subclass sets it (in ``__init__``) to the longest sequence the position table holds. A subclass writes
    :meth:`prepare` (calling :meth:`cut`) and says whether the first token is a [CLS] token (:attr:`has_cls`)."""

    reads_tables = True

    def __init__(self, encoder: nn.Module, source: str = "") -> None:
        super().__init__(encoder, source)
        self.max_len = int(getattr(getattr(encoder, "embedder", None), "max_len", 0) or 0)

    def pooled(self, items: Sequence[Any], pooling: str, cls_last_block: bool = True) -> torch.Tensor:
        from mmm.probe import pool

        if pooling == "cls" and cls_last_block:
            return self.encode_packed(items, first_tokens_only=True)[0]
        hidden, seq = self.encode_packed(items)
        return pool(hidden, seq.cu_seqlens, "first" if pooling == "cls" else "mean")

    def encode_packed(self, items: Sequence[np.ndarray], first_tokens_only: bool = False) -> Tuple[torch.Tensor, Any]:
        """Token-id arrays → ``(hidden (N, d), PackedSeqInfo)`` of one flat stream.

        The ids are concatenated and embedded and encoded as they are (as in pretraining), so no padded (B, T)
        batch is built. ``first_tokens_only``: return only each sequence's first token, (B, d), whose last block
        then runs for those rows alone (:class:`~mmm.core.output_rows.OutputRows`).
        """
        from mmm.core.output_rows import OutputRows
        from mmm.core.packing import PackedSeqInfo

        seq = PackedSeqInfo.from_seqlens([len(x) for x in items], device=self.device)
        ids = torch.from_numpy(np.concatenate([np.asarray(x, np.int64) for x in items])).to(self.device)  # (N,)
        rows = OutputRows.first_tokens(seq) if first_tokens_only else None
        return self.encoder.encoder(self.encoder.embedder(ids, seq.position_ids), seq, rows=rows), seq

    def forward(self, items: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The padded reference path, for encoders called as ``encoder(ids (B, T), mask (B, T))`` with a
        ``pad_id`` (text, DNA): ``(hidden (B, T, d), mask (B, T) bool)``, mask True on real tokens."""
        ids, mask = pad_ids(items, int(self.encoder.pad_id))
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.encoder(ids, mask), mask

    def cut(self, ids: np.ndarray, keep_last: bool = True) -> np.ndarray:
        """``ids`` cut to :attr:`max_len`, counted in :attr:`truncated`; ``keep_last``: the last id (an end token)
        stays the last."""
        if not isinstance(self.max_len, int) or self.max_len < 1:
            raise ValueError(f"{type(self).__name__}.max_len is {self.max_len!r}: set it in __init__ to the longest "
                             "sequence the encoder's position table holds (its embedder has no max_len)")
        if len(ids) <= self.max_len:
            return ids
        self.truncated += 1
        return np.concatenate([ids[: self.max_len - 1], ids[-1:]]) if keep_last else ids[: self.max_len]


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


def downstream_modalities() -> List[str]:
    """The registered modalities that read downstream inputs (:meth:`Modality.downstream_inputs`), sorted."""
    from mmm.registry import MODALITIES

    return [n for n in MODALITIES.list() if MODALITIES.get(n).downstream_inputs() is not None]


def adapter_class(modality: str) -> Type[InputAdapter]:
    """The :class:`InputAdapter` subclass of registered modality ``modality``; an unknown modality, or one that
    reads no downstream inputs, is an error listing those that do."""
    from mmm.registry import MODALITIES

    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; supported: {downstream_modalities()} (a plug-in modality "
                         "is loaded with mmm --plugin MODULE)")
    cls = MODALITIES.get(modality).downstream_inputs()
    if cls is None:
        raise ValueError(f"modality {modality!r} reads no downstream inputs (its Modality.downstream_inputs gives "
                         f"none); supported: {downstream_modalities()}")
    if not (isinstance(cls, type) and issubclass(cls, InputAdapter)):
        raise ValueError(f"modality {modality!r}: downstream_inputs() gave {cls!r}, not an InputAdapter subclass "
                         "(mmm.downstream.inputs)")
    missing = [m for m in ("prepare", "pooled") if getattr(cls, m) is getattr(InputAdapter, m)]
    if missing:
        raise ValueError(f"modality {modality!r}: its adapter {cls.__name__} does not define {missing} (an "
                         "InputAdapter subclass writes prepare(raw, where) and pooled(items, pooling))")
    return cls


def make_adapter(encoder: nn.Module, modality: str, source: str = "") -> InputAdapter:
    """``encoder`` (of ``modality``) wrapped in its modality's :class:`InputAdapter`."""
    return adapter_class(modality)(encoder, source)


def load_adapter(source: str, modality: str, *, timm_model: Optional[str] = None) -> InputAdapter:
    """:func:`~mmm.encoders.load_encoder` (``source``: an mmm ``.ckpt``, a ``save_encoder`` folder, an
    HF BERT folder, a timm ViT file with ``timm_model``) wrapped in its modality's :class:`InputAdapter`."""
    from mmm.encoders import load_encoder

    cls = adapter_class(modality)  # before loading: an unknown modality is named first
    return cls(load_encoder(source, modality, timm_model=timm_model), str(source))
