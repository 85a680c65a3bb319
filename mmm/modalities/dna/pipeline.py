"""DNA stages of the streaming pipeline: decode → strand → cut to fit, tokenize, mask → pack.

Shard samples (fields ``seq``: ASCII bases, ``json``: window metadata with an optional ``label``)
are decoded by the DNA codec (:mod:`mmm.modalities.dna.codec`). A window that needs more than ``max_len`` tokens is cut,
by bases, into the fewest near-equal pieces that fit (at most ``ceil(L / tokenizer.max_bases(max_len))``),
each its own sequence: every base reaches a batch exactly once, none is truncated or dropped.

In training, each window is reverse-complemented with probability ``reverse_complement`` (the
other strand carries the same information: the strand augmentation of DNA language models such
as Caduceus, Schiff et al. 2024). The strand draw and the masks share one generator keyed by
(seed, rank, worker, epoch) (:class:`~mmm.data.epoch.SeededMap`), so a resumed run sees the same
strands and masks. Batches carry the window labels in ``extras`` for linear probes, in the same
(longest-first) order as the packed sequences.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import webdataset as wds

from mmm.batch import PackedBatch, pack_masked
from mmm.data.epoch import EpochCounter, SeededMap
from mmm.data.errors import decode_each
from mmm.masking.base import MaskedTokens
from mmm.modalities.dna.codec import DNAWindow, decode_window
from mmm.modalities.dna.tokenizer import DNAEncoding, DNATokenizer, reverse_complement

Handler = Callable[[Exception], bool]

read_dna_sample = decode_window
"""Decode one raw shard sample (the DNA codec's :func:`~mmm.modalities.dna.codec.decode_window`)."""

__all__ = ["DNAWindow", "DNAPiece", "read_dna_sample", "cut_bases", "fit_pieces", "collate_dna", "dna_stages"]


@dataclass
class DNAPiece:
    """One tokenized (and possibly masked) sequence on its way to a batch.

    Args:
        tokens: corrupted ids and MLM targets (no targets when unmasked).
        label: the window's class, -1 when unlabelled.
        key: the shard sample's key.
        offset: first base, on the forward strand, of the bases the piece holds in its window.
        reverse: the piece holds the reverse complement of those bases.
    """

    tokens: MaskedTokens
    label: int
    key: str
    offset: int
    reverse: bool


def cut_bases(length: int, pieces: int) -> List[int]:
    """Start offsets of ``pieces`` near-equal pieces (sizes differ by at most one) covering ``length`` bases.

    Near-equal pieces avoid a tiny tail, which k-mer tokenizers would spell by single nucleotides.

    Args:
        length: bases in the window.
        pieces: number of pieces, at least 1.
    """
    if pieces < 1:
        raise ValueError(f"pieces must be >= 1, got {pieces}")
    return [length * i // pieces for i in range(pieces)]


def fit_pieces(seq: str, tokenizer: DNATokenizer, max_len: int) -> List[Tuple[int, int, DNAEncoding]]:
    """Tokenize ``seq``, cut by bases into the fewest near-equal pieces that each fit ``max_len`` tokens.

    ``ceil(L / tokenizer.max_bases(max_len))`` pieces always fit; fewer are tried first, which matters
    for BPE, whose tokens usually span several bases while ``max_bases`` assumes one base per token.

    Args:
        seq: the bases.
        tokenizer: DNA tokenizer.
        max_len: token budget per piece, ``[CLS]``/``[SEP]`` included.

    Returns:
        ``(start, end, encoding)`` of each piece ``seq[start:end]``, in order.
    """
    enc = tokenizer.encode(seq)
    if len(enc) <= max_len:
        return [(0, len(seq), enc)]
    length = len(seq)
    always = -(-length // tokenizer.max_bases(max_len))
    guess = -(-(len(enc) - 2) // (max_len - 2))  # pieces if the tokens split evenly
    for n in range(max(2, min(guess, always)), always + 1):
        starts = cut_bases(length, n)
        spans = list(zip(starts, starts[1:] + [length]))
        encs = [tokenizer.encode(seq[s:e]) for s, e in spans]
        if n == always or all(len(e) <= max_len for e in encs):
            return [(s, e, enc) for (s, e), enc in zip(spans, encs)]
    raise AssertionError("unreachable: the last try always fits")


class _StrandCutMask:
    """``DNAWindow, rng -> [DNAPiece]``: strand draw, cut to fit, tokenization and masks from one generator.

    One stage, so the strand and the masks never draw from twin generators; the strand comes first
    because a BPE reverse complement may need another cut. A class, not a lambda: pipelines are
    pickled into DataLoader workers.
    """

    def __init__(self, tokenizer: DNATokenizer, masker: Optional[Any], max_len: int, reverse_complement: float) -> None:
        self.tokenizer, self.masker, self.max_len, self.rc = tokenizer, masker, max_len, float(reverse_complement)

    def __call__(self, w: DNAWindow, rng: np.random.Generator) -> List[DNAPiece]:
        reverse = self.rc > 0 and bool(rng.random() < self.rc)
        seq = reverse_complement(w.seq) if reverse else w.seq
        out = []
        for start, end, enc in fit_pieces(seq, self.tokenizer, self.max_len):
            if self.masker is None:
                empty = np.zeros(0, dtype=np.int64)
                tokens = MaskedTokens(enc.ids, empty, empty)
            else:
                tokens = self.masker(enc, rng)
            # forward-strand offset of the piece (a reverse piece [s, e) is forward [L - e, L - s))
            offset = len(seq) - end if reverse else start
            out.append(DNAPiece(tokens, w.label, w.key, offset, reverse))
        return out


def _flatten(src: Iterator[Any]) -> Iterator[DNAPiece]:
    """One piece at a time (the seeded stage yields each window's pieces as one list)."""
    for item in src:
        if isinstance(item, list):
            yield from item
        else:
            yield item


def collate_dna(pieces: Sequence[DNAPiece], modality: str = "dna") -> PackedBatch:
    """Pack pieces into one :class:`PackedBatch`, longest first, with per-sequence ``extras``.

    ``extras``: ``labels`` (B,) int64 (-1 = unlabelled), ``keys``, ``offsets`` (B,) int64 first
    base (forward strand) of each piece in its window, ``reverse`` (B,) bool reverse-complemented;
    all in the packed order.

    Args:
        pieces: tokenized sequences.
        modality: name the input and targets are keyed under.
    """
    if not pieces:
        raise ValueError("cannot collate an empty list of DNA sequences")
    # Sort here, stably; pack_masked's own (stable) longest-first sort then keeps this order,
    # so extras line up with the packed sequences.
    pieces = sorted(pieces, key=lambda p: -len(p.tokens.input_ids))
    batch = pack_masked([p.tokens for p in pieces], modality=modality)
    batch.extras = {
        "labels": torch.tensor([p.label for p in pieces], dtype=torch.long),
        "keys": [p.key for p in pieces],
        "offsets": torch.tensor([p.offset for p in pieces], dtype=torch.long),
        "reverse": torch.tensor([p.reverse for p in pieces], dtype=torch.bool),
    }
    return batch


def dna_stages(tokenizer: DNATokenizer, masker: Optional[Any], *, max_len: int, batch_size: int, seed: int,
               handler: Handler, fixed_masking: bool = False, epochs: Optional[EpochCounter] = None,
               train: bool = True, reverse_complement: float = 0.0, modality: str = "dna") -> List:
    """Pipeline stages turning DNA shard samples into :class:`~mmm.batch.PackedBatch` es.

    Args:
        tokenizer: DNA tokenizer (char, k-mer or BPE).
        masker: DNA masker (``dna_random``, ``dna_span``); None = no masking (probe features).
        max_len: longest sequence in tokens, ``[CLS]``/``[SEP]`` included; longer windows are cut.
        batch_size: sequences per packed batch (the last batch of a pass may be smaller).
        seed: seed of strands and masks.
        handler: bad-sample handler (counts, and skips or raises).
        fixed_masking: the same strands and masks on every pass (validation).
        epochs: the pipeline's epoch counter (see :func:`mmm.modalities.text.pipeline.text_stages`).
        train: training stream; reverse complementing happens only here.
        reverse_complement: probability of reverse-complementing a training sequence.
        modality: the name batches key the tokens and targets under.
    """
    if not 0.0 <= reverse_complement <= 1.0:
        raise ValueError(f"reverse_complement must be a probability in [0, 1], got {reverse_complement}")
    tokenizer.max_bases(max_len)  # checks max_len
    return [
        wds.pipelinefilter(decode_each)(decode_window, handler),
        SeededMap(_StrandCutMask(tokenizer, masker, max_len, reverse_complement if train else 0.0), seed,
                  fixed_masking, epochs),
        wds.pipelinefilter(_flatten)(),
        wds.batched(batch_size, collation_fn=partial(collate_dna, modality=modality), partial=True),
    ]
