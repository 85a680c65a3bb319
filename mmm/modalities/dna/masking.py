"""DNA maskers over a :class:`~mmm.modalities.dna.tokenizer.DNAEncoding`, registered in :data:`mmm.registry.MASKERS`.

* ``"dna_random"`` -- BERT masking of tokens (Devlin et al. 2019), as DNABERT-2 and the Nucleotide
  Transformer use with non-overlapping tokens; delegates to the text ``bert_random`` masker.
* ``"dna_span"`` -- masks contiguous *base* spans, then every token overlapping a masked base.
  With overlapping k-mers, masking single tokens leaks: the k-mer at ``i`` is spelled by its
  unmasked neighbours at ``i-1`` and ``i+1``. DNABERT (Ji et al. 2021) therefore masks runs of k
  contiguous k-mers; masking by bases generalises that to any tokenizer: every masked token then
  holds at least one base that no unmasked token shows. Span lengths in bases are geometric with
  mean ``span_bases`` (SpanBERT, Joshi et al. 2020) or fixed.

Both apply the BERT 80/10/10 corruption (:func:`mmm.masking.token.corrupt_groups`); ``dna_span``
draws it once per run of adjacent masked tokens, so a kept run shows its bases consistently.
Special tokens, ``[UNK]`` included, are never masked. ``ratio`` counts tokens for ``dna_random``
and hidden bases for ``dna_span`` (an overlapping-6-mer span of s bases hides s + 5 tokens). With
non-overlapping tokens (Nucleotide Transformer's 6-mers, DNABERT-2's BPE) a masked token hides all its
bases, so ``dna_span`` grows each span to whole tokens and counts those bases: the share hidden is
``ratio`` there too (it was 1.7-2.1x that when spans were counted before growing to tokens).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import numpy as np

from mmm.masking.base import MaskedTokens, TokenVocab
from mmm.masking.token import BertRandomMasker, corrupt_groups
from mmm.registry import MASKERS

if TYPE_CHECKING:  # imported for type hints only: keeps mmm.masking free of modality imports
    from mmm.modalities.dna.tokenizer import DNAEncoding

__all__ = ["DNARandomMasker", "DNASpanMasker", "maskable_tokens", "hidden_bases"]


def _check_encoding(enc: "DNAEncoding") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        ids, starts, ends = (np.asarray(enc.ids), np.asarray(enc.starts), np.asarray(enc.ends))
    except AttributeError:
        raise TypeError(f"expected a DNAEncoding (ids, starts, ends), got {type(enc).__name__}") from None
    if ids.ndim != 1 or not ids.shape == starts.shape == ends.shape:
        raise ValueError(f"ids, starts and ends must be 1-D of equal length, got {ids.shape}, {starts.shape}, {ends.shape}")
    return ids.astype(np.int64, copy=False), starts.astype(np.int64, copy=False), ends.astype(np.int64, copy=False)


def maskable_tokens(ids: np.ndarray, starts: np.ndarray, vocab: TokenVocab) -> np.ndarray:
    """Sorted positions that cover bases (``start >= 0``) and are not special ids.

    Args:
        ids: (T,) token ids.
        starts: (T,) first base of each token, -1 for specials.
        vocab: vocabulary description (for ``special_ids``).
    """
    ok = starts >= 0
    if vocab.special_ids:
        ok &= ~np.isin(ids, np.fromiter(vocab.special_ids, dtype=np.int64, count=len(vocab.special_ids)))
    return np.flatnonzero(ok)


def hidden_bases(starts: np.ndarray, ends: np.ndarray, positions: np.ndarray, n_bases: int) -> np.ndarray:
    """Bases that no token outside ``positions`` covers: what masking those tokens truly hides.

    Args:
        starts: (T,) first base of each token, -1 for specials.
        ends: (T,) one past the last base, -1 for specials.
        positions: (M,) masked token positions.
        n_bases: sequence length.

    Returns:
        (n_bases,) bool.
    """
    visible = np.ones(starts.shape[0], dtype=bool)
    visible[positions] = False
    visible &= starts >= 0
    diff = np.zeros(n_bases + 1, dtype=np.int64)
    np.add.at(diff, starts[visible], 1)
    np.add.at(diff, ends[visible], -1)
    return np.cumsum(diff[:-1]) == 0


@MASKERS.register("dna_random")
class DNARandomMasker:
    """BERT token masking: ``max(1, round(ratio * n))`` of the n maskable tokens, uniformly.

    Leaks with overlapping k-mers (see the module docstring); use ``dna_span`` there.

    Args:
        ratio: fraction of maskable tokens to predict.
        mask_prob: fraction of chosen tokens replaced by ``[MASK]``.
        random_prob: fraction replaced by a random non-special token (the rest keep their id).
        vocab: vocabulary description (from ``DNATokenizer.vocab()``).
    """

    masks = "dna"  # the input kind it hides; a modality accepts the maskers of its kinds

    def __init__(self, ratio: float = 0.15, mask_prob: float = 0.8, random_prob: float = 0.1, *, vocab: TokenVocab) -> None:
        self._bert = BertRandomMasker(ratio, mask_prob, random_prob, vocab=vocab)  # validates the arguments
        self.ratio, self.mask_prob, self.random_prob, self.vocab = ratio, mask_prob, random_prob, vocab

    def __call__(self, enc: "DNAEncoding", rng: np.random.Generator) -> MaskedTokens:
        """Mask one encoded sequence.

        Args:
            enc: the tokenized sequence.
            rng: generator to draw from.
        """
        ids, starts, _ = _check_encoding(enc)
        word_ids = np.where(starts >= 0, np.arange(ids.size, dtype=np.int64), -1)  # every token its own word
        return self._bert(ids, word_ids, rng)

    def __repr__(self) -> str:
        return f"DNARandomMasker(ratio={self.ratio}, mask_prob={self.mask_prob}, random_prob={self.random_prob})"


@MASKERS.register("dna_span")
class DNASpanMasker:
    """Base-span masking: spans until ``max(1, round(ratio * L))`` of the L bases are hidden, then
    every maskable token overlapping a hidden base is masked.

    Span starts are uniform over the sequence; spans may overlap earlier ones, and the last one is
    trimmed so exactly the target number of bases is chosen. With non-overlapping tokens each span
    first grows to the whole tokens it touches (masking a token hides all its bases), and the token that
    would pass the target is taken with the probability that makes the expected share ``ratio``. If the chosen bases
    fall only under ``[UNK]`` tokens, one random maskable token's bases are chosen instead.

    Args:
        ratio: fraction of bases to hide.
        span_bases: mean span length in bases (an int when ``distribution="fixed"``).
        distribution: ``"geometric"`` (lengths 1, 2, ... with mean ``span_bases``) or ``"fixed"``.
        mask_prob: fraction of masked runs replaced by ``[MASK]``.
        random_prob: fraction of masked runs replaced by random non-special tokens.
        vocab: vocabulary description (from ``DNATokenizer.vocab()``).
    """

    masks = "dna"  # the input kind it hides; a modality accepts the maskers of its kinds

    def __init__(
        self,
        ratio: float = 0.15,
        span_bases: float = 6,
        distribution: str = "geometric",
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
        *,
        vocab: TokenVocab,
    ) -> None:
        BertRandomMasker(ratio, mask_prob, random_prob, vocab=vocab)  # the shared argument checks
        if distribution not in ("geometric", "fixed"):
            raise ValueError(f"distribution must be 'geometric' or 'fixed', got {distribution!r}")
        if isinstance(span_bases, bool) or not isinstance(span_bases, (int, float, np.integer)) or span_bases < 1:
            raise ValueError(f"span_bases must be a number >= 1, got {span_bases!r}")
        if distribution == "fixed" and int(span_bases) != span_bases:
            raise ValueError(f"span_bases must be a whole number with distribution='fixed', got {span_bases!r}")
        self.ratio, self.mask_prob, self.random_prob = float(ratio), float(mask_prob), float(random_prob)
        self.span_bases, self.distribution, self.vocab = float(span_bases), distribution, vocab
        specials = np.fromiter(vocab.special_ids, dtype=np.int64, count=len(vocab.special_ids))
        self._replace_pool = np.setdiff1d(np.arange(vocab.size, dtype=np.int64), specials)

    def _lengths(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if self.distribution == "fixed":
            return np.full(size, int(self.span_bases), dtype=np.int64)
        return rng.geometric(1.0 / self.span_bases, size=size).astype(np.int64)

    def choose_bases(self, n_bases: int, rng: np.random.Generator,
                     units: "Tuple[np.ndarray, np.ndarray] | None" = None) -> np.ndarray:
        """Pick spans until ``max(1, round(ratio * n_bases))`` bases are chosen.

        Args:
            n_bases: sequence length L.
            rng: generator to draw from.
            units: for non-overlapping tokens, ``(first, end)``, each (L,): the first base and one past the last
                of the token holding each base (the base itself outside tokens); a span is grown to them.

        Returns:
            (L,) bool, True at chosen bases.
        """
        chosen = np.zeros(n_bases, dtype=bool)
        if n_bases == 0:
            return chosen
        target = max(1, int(round(self.ratio * n_bases)))
        count = 0
        while count < target:
            batch = int(np.ceil((target - count) / self.span_bases)) + 1
            lengths = np.minimum(self._lengths(rng, batch), n_bases)
            offsets = (rng.random(batch) * (n_bases - lengths + 1)).astype(np.int64)
            for s, n in zip(offsets.tolist(), lengths.tolist()):
                if units is not None:
                    count = self._add_whole_tokens(chosen, count, target, units, s, s + n, rng)
                    if count >= target:
                        break
                    continue
                new = np.flatnonzero(~chosen[s : s + n])
                if count + new.size >= target:  # trim the last span to the target exactly
                    chosen[s + new[: target - count]] = True
                    count = target
                    break
                chosen[s : s + n] = True
                count += new.size
        return chosen

    @staticmethod
    def _add_whole_tokens(chosen: np.ndarray, count: int, target: int, units: Tuple[np.ndarray, np.ndarray],
                          lo: int, hi: int, rng: np.random.Generator) -> int:
        """Choose the bases of every token that bases ``[lo, hi)`` touch; once that would pass ``target``, token by
        token, the token that crosses it taken with the probability that makes the expected count the target
        (so long BPE tokens do not bias the share up). Returns the new count, ``target`` when done."""
        first, end = units
        lo, hi = int(first[lo]), int(end[hi - 1])
        new = int((~chosen[lo:hi]).sum())
        if count + new < target:
            chosen[lo:hi] = True
            return count + new
        b = lo
        while b < hi:
            e = int(end[b])
            add = int((~chosen[b:e]).sum())
            if count + add >= target:
                if add and rng.random() < (target - count) / add:
                    chosen[b:e] = True
                return target
            count += add
            chosen[b:e] = True
            b = e
        return count

    @staticmethod
    def token_units(starts: np.ndarray, ends: np.ndarray, lo: int, n_bases: int) -> "Tuple[np.ndarray, np.ndarray] | None":
        """``(first, end)`` of :meth:`choose_bases` when the real tokens do not overlap (each starts at or after
        the previous one's end), else None (overlapping k-mers: a base is hidden only when every token holding
        it is masked, which masking every token overlapping a chosen base already does)."""
        real = starts >= 0
        s, e = starts[real] - lo, ends[real] - lo
        if s.size and bool((s[1:] < e[:-1]).any()):
            return None
        first = np.arange(n_bases, dtype=np.int64)
        end = first + 1
        lens = e - s
        covered = np.repeat(s, lens) + np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        first[covered] = np.repeat(s, lens)
        end[covered] = np.repeat(e, lens)
        return first, end

    def choose(self, enc: "DNAEncoding", rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Chosen ``(positions, groups)`` before corruption; a group is a run of adjacent positions.

        Args:
            enc: the tokenized sequence.
            rng: generator to draw from.
        """
        ids, starts, ends = _check_encoding(enc)
        cand = maskable_tokens(ids, starts, self.vocab)
        if cand.size == 0:
            return cand, cand
        real = starts >= 0
        lo, hi = int(starts[real].min()), int(ends[real].max())
        chosen = self.choose_bases(hi - lo, rng, self.token_units(starts, ends, lo, hi - lo))  # (L,)
        prefix = np.concatenate([[0], np.cumsum(chosen)])
        positions = cand[prefix[ends[cand] - lo] > prefix[starts[cand] - lo]]
        if positions.size == 0:  # chosen bases lie only under [UNK]: take one token's bases
            j = int(cand[rng.integers(cand.size)])
            overlaps = (starts[cand] < ends[j]) & (ends[cand] > starts[j])
            positions = cand[overlaps]
        new_run = np.ones(positions.size, dtype=bool)
        new_run[1:] = positions[1:] != positions[:-1] + 1
        return positions, np.cumsum(new_run) - 1

    def __call__(self, enc: "DNAEncoding", rng: np.random.Generator) -> MaskedTokens:
        """Mask one encoded sequence.

        Args:
            enc: the tokenized sequence.
            rng: generator to draw from.
        """
        positions, groups = self.choose(enc, rng)
        ids = np.asarray(enc.ids).astype(np.int64, copy=False)
        return corrupt_groups(ids, positions, groups, self.vocab, self._replace_pool, self.mask_prob, self.random_prob, rng)

    def __repr__(self) -> str:
        return (f"DNASpanMasker(ratio={self.ratio}, span_bases={self.span_bases}, distribution={self.distribution!r}, "
                f"mask_prob={self.mask_prob}, random_prob={self.random_prob})")
