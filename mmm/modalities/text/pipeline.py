"""Text stages of the streaming pipeline: decode → tokenize (chunk, never drop) → mask → pack.

Each stage is a generator wrapped with ``webdataset.pipelinefilter`` so it composes with the
shard → sample part built by :func:`mmm.data.stream.make_pipeline`.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional

import webdataset as wds

from mmm.batch import pack_masked
from mmm.data.epoch import EpochCounter, SeededMap
from mmm.data.errors import decode_each
from mmm.masking.base import TokenMasker
from mmm.modalities.text.codec import decode_text

if TYPE_CHECKING:  # the modalities package imports this module (its text plugin builds these stages)
    from mmm.modalities.text.tokenizer import TextTokenizer

Handler = Callable[[Exception], bool]


class _TextPieces:
    """A raw shard sample → its text's ``[CLS] ... [SEP]`` pieces (:func:`decode_text`, then the tokenizer).

    A text the tokenizer reduces to nothing (one that ``is_blank`` lets through, such as only combining accents,
    which lowercasing strips) is a ``ValueError`` naming the sample and shard, so ``decode_each`` gives it to the
    handler (counted, then skipped or raised), never dropped silently. A class, not a closure: pipelines are
    pickled into workers.
    """

    def __init__(self, tokenizer: TextTokenizer, max_len: int) -> None:
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, sample: dict) -> list:
        text = decode_text(sample)
        pieces = self.tokenizer.encode_chunks(text, self.max_len)
        if not pieces:
            raise ValueError(f"sample {sample.get('__key__', '?')}: 'txt' ({len(text)} character(s)) gave no token: "
                             f"the tokenizer's normalizer removes all of it (e.g. {text[:20]!r})",
                             sample.get("__url__", "?"))
        return pieces


def _each_piece(src: Iterator[list]) -> Iterator[tuple]:
    for pieces in src:
        yield from pieces


class _MaskTokens:
    """``(ids, word_ids), rng -> MaskedTokens`` (a class, not a lambda: pipelines are pickled into workers)."""

    def __init__(self, masker: TokenMasker) -> None:
        self.masker = masker

    def __call__(self, pair: tuple, rng) -> object:
        return self.masker(pair[0], pair[1], rng)


def text_stages(tokenizer: TextTokenizer, masker: TokenMasker, *, max_len: int, batch_size: int, seed: int,
                handler: Handler, fixed_masking: bool = False, epochs: Optional[EpochCounter] = None,
                modality: str = "text") -> List:
    """Pipeline stages turning text shard samples into :class:`~mmm.batch.PackedBatch` es.

    Args:
        tokenizer: trained text tokenizer.
        masker: token masker (registry entry).
        max_len: longest sequence; longer text is split into several sequences.
        batch_size: sequences per packed batch (the last batch of a pass may be smaller).
        seed: masking seed.
        handler: bad-sample handler (counts, and skips or raises).
        fixed_masking: the same masks on every pass (validation).
        epochs: the epoch counter of the pipeline these stages go into (pass the same object to
            :func:`~mmm.data.stream.make_pipeline`) so masks are keyed by its epoch; None: the
            masking stage counts its own passes from epoch 0.
        modality: the name batches key the tokens and targets under.
    """
    return [
        wds.pipelinefilter(decode_each)(_TextPieces(tokenizer, max_len), handler),
        wds.pipelinefilter(_each_piece)(),
        SeededMap(_MaskTokens(masker), seed, fixed_masking, epochs),
        wds.batched(batch_size, collation_fn=partial(pack_masked, modality=modality), partial=True),
    ]
