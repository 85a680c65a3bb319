"""Token maskers for masked language modeling, registered in :data:`mmm.registry.MASKERS`.

* ``"bert_random"`` -- independent token masking of BERT (Devlin et al. 2019, "BERT: Pre-training
  of Deep Bidirectional Transformers for Language Understanding"); ``ratio=0.3`` gives the MosaicBERT
  setting (Portes et al. 2023).
* ``"whole_word"`` -- whole-word masking (the 2019 revision of the BERT release): every piece of
  a chosen word is masked.
* ``"span"`` -- SpanBERT span masking (Joshi et al. 2020, "SpanBERT: Improving Pre-training by
  Representing and Predicting Spans"): span lengths in words drawn from a geometric distribution
  truncated to ``[1, max_span]``, spans start at word boundaries.
* ``"ngram"`` -- contiguous n-gram masking, n drawn with probability proportional to ``1/n``: the
  n-gram sampling of ERNIE-Gram (Xiao et al. 2021, "ERNIE-Gram: Pre-Training with Explicitly N-Gram
  Masked Language Modeling"), whose contiguous-MLM baseline this is. ERNIE-Gram itself replaces an
  n-gram by one ``[MASK]`` and predicts it as one unit from an n-gram vocabulary, with a generator
  proposing plausible n-grams; that explicit n-gram prediction is not built here (each token of a
  masked n-gram is its own ``[MASK]`` and label).

All of them use the BERT 80/10/10 corruption: of the chosen positions, ``mask_prob`` become the
mask token, ``random_prob`` a random non-special token and the rest keep their id. The word-level
maskers draw that decision once per group (word, span or n-gram), so a group is corrupted
consistently. The budget is ``max(1, round(ratio * n_maskable))`` tokens, where maskable tokens
are those with ``word_id >= 0`` and an id outside ``vocab.special_ids``. Word-level maskers never
exceed it: a word that would not fit in what is left is skipped, as Google's BERT
``create_masked_lm_predictions`` and HF's whole-word collator skip it, so they may fall short of it by
less than a word. Only when no word fits at all (every word longer than the budget) is one word
chosen anyway, so that every sequence with a maskable token has a target.

A "word" is a maximal run of adjacent maskable tokens sharing one word id; that makes grouping
independent of the tokenizer (``##`` pieces and ``Ġ`` pieces alike) and keeps groups from
crossing special tokens.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Tuple

import numpy as np

from mmm.masking.base import MaskedTokens, TokenVocab
from mmm.registry import MASKERS

__all__ = [
    "BertRandomMasker",
    "WholeWordMasker",
    "SpanMasker",
    "NgramMasker",
    "corrupt_groups",
    "find_words",
]


# ---------------------------------------------------------------------- shared helpers
def _check_inputs(ids: np.ndarray, word_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    word_ids = np.asarray(word_ids)
    if ids.ndim != 1 or ids.shape != word_ids.shape:
        raise ValueError(f"ids and word_ids must be 1-D of equal length, got shapes {ids.shape} and {word_ids.shape}")
    if ids.size and not (np.issubdtype(ids.dtype, np.integer) and np.issubdtype(word_ids.dtype, np.integer)):
        raise ValueError(f"ids and word_ids must be integer arrays, got dtypes {ids.dtype} and {word_ids.dtype}")
    return ids.astype(np.int64, copy=False), word_ids.astype(np.int64, copy=False)


def maskable_positions(ids: np.ndarray, word_ids: np.ndarray, vocab: TokenVocab) -> np.ndarray:
    """Sorted positions that may be masked: ``word_id >= 0`` and id not special.

    Args:
        ids: (T,) int64 token ids.
        word_ids: (T,) int64 word ids, -1 for specials.
        vocab: the vocabulary description (for ``special_ids``).
    """
    ok = word_ids >= 0
    if vocab.special_ids:
        ok &= ~np.isin(ids, np.fromiter(vocab.special_ids, dtype=np.int64, count=len(vocab.special_ids)))
    return np.flatnonzero(ok)


def find_words(positions: np.ndarray, word_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group maskable positions into words: maximal runs of adjacent positions with one word id.

    Args:
        positions: sorted maskable positions (from :func:`maskable_positions`).
        word_ids: (T,) word ids of the whole sequence.

    Returns:
        ``(starts, lengths, joined)``: first position and token count of each word, and for each
        word whether the next word follows it directly (no special token in between), shape (W,).
    """
    if positions.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=bool)
    w = word_ids[positions]
    new = np.ones(positions.size, dtype=bool)
    new[1:] = (w[1:] != w[:-1]) | (positions[1:] != positions[:-1] + 1)
    first = np.flatnonzero(new)
    starts = positions[first]
    lengths = np.diff(np.append(first, positions.size)).astype(np.int64)
    joined = np.zeros(starts.size, dtype=bool)
    joined[:-1] = starts[:-1] + lengths[:-1] == starts[1:]
    return starts, lengths, joined


def _expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """All positions ``starts[i] .. starts[i] + lengths[i] - 1``, concatenated."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total, dtype=np.int64) - offsets)


def corrupt_groups(
    ids: np.ndarray,
    positions: np.ndarray,
    groups: np.ndarray,
    vocab: TokenVocab,
    replace_pool: np.ndarray,
    mask_prob: float,
    random_prob: float,
    rng: np.random.Generator,
) -> MaskedTokens:
    """Apply the BERT 80/10/10 corruption to chosen positions, one decision per group.

    Args:
        ids: (T,) int64 original ids (not modified).
        positions: (M,) chosen positions, distinct.
        groups: (M,) group index of each position in ``[0, G)``; all positions of a group get the
            same decision (mask / random / keep). Random replacements are drawn per position.
        vocab: vocabulary description (for ``mask_id``).
        replace_pool: ids that random replacement draws from uniformly.
        mask_prob: probability that a group becomes the mask token.
        random_prob: probability that a group becomes random tokens; the rest keep their ids.
        rng: generator to draw from.
    """
    order = np.argsort(positions, kind="stable")
    positions = positions[order].astype(np.int64, copy=False)
    groups = groups[order]
    input_ids = ids.copy()
    labels = ids[positions]
    if positions.size:
        u = rng.random(int(groups.max()) + 1)[groups]
        to_mask = u < mask_prob
        to_random = (~to_mask) & (u < mask_prob + random_prob)
        input_ids[positions[to_mask]] = vocab.mask_id
        n_random = int(to_random.sum())
        if n_random:
            input_ids[positions[to_random]] = replace_pool[rng.integers(0, replace_pool.size, size=n_random)]
    return MaskedTokens(input_ids=input_ids, positions=positions, labels=labels)


def _check_ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _check_prob(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


class _Masker(ABC):
    """Hyperparameter checks, the budget and the 80/10/10 step shared by every masker.

    Subclasses implement :meth:`choose`, returning chosen positions and their group index.
    """

    masks = "token"  # the input kind it hides; a modality accepts the maskers of its kinds

    def __init__(self, ratio: float, mask_prob: float, random_prob: float, vocab: TokenVocab) -> None:
        if not isinstance(vocab, TokenVocab):
            raise TypeError(f"vocab must be a mmm.masking.base.TokenVocab, got {type(vocab).__name__}")
        self.ratio = _check_ratio("ratio", ratio)
        self.mask_prob = _check_prob("mask_prob", mask_prob)
        self.random_prob = _check_prob("random_prob", random_prob)
        if self.mask_prob + self.random_prob > 1.0 + 1e-9:
            raise ValueError(
                f"mask_prob + random_prob must be <= 1 (the rest keep their id), got {mask_prob} + {random_prob}"
            )
        if not 0 <= vocab.mask_id < vocab.size:
            raise ValueError(f"vocab.mask_id must be in [0, {vocab.size}), got {vocab.mask_id}")
        self.vocab = vocab
        specials = np.fromiter(vocab.special_ids, dtype=np.int64, count=len(vocab.special_ids))
        self._replace_pool = np.setdiff1d(np.arange(vocab.size, dtype=np.int64), specials)
        if self.random_prob > 0 and self._replace_pool.size == 0:
            raise ValueError(f"random_prob={random_prob} > 0 but the vocabulary of size {vocab.size} is all special ids")

    def budget(self, n_maskable: int) -> int:
        """Number of tokens to choose among ``n_maskable``: ``max(1, round(ratio * n))`` (0 if n is 0).

        Args:
            n_maskable: number of maskable tokens in the sequence.
        """
        return 0 if n_maskable == 0 else max(1, int(round(self.ratio * n_maskable)))

    def word_candidates(self, ids: np.ndarray, word_ids: np.ndarray):
        """The maskable positions, their words (starts, lengths, joined-to-next flags, from :func:`find_words`)
        and the token budget, for the maskers that choose whole words or word runs."""
        cand = maskable_positions(ids, word_ids, self.vocab)
        starts, lengths, joined = find_words(cand, word_ids)
        return cand, starts, lengths, joined, self.budget(cand.size)

    @abstractmethod
    def choose(self, ids: np.ndarray, word_ids: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Chosen ``(positions, groups)`` before corruption; see :func:`corrupt_groups`.

        Args:
            ids: (T,) int64 token ids.
            word_ids: (T,) int64 word ids, -1 for specials.
            rng: generator to draw from.
        """

    def __call__(self, ids: np.ndarray, word_ids: np.ndarray, rng: np.random.Generator) -> MaskedTokens:
        """Mask one sequence (see :class:`mmm.masking.base.TokenMasker`).

        Args:
            ids: (T,) int64 token ids, special tokens included.
            word_ids: (T,) int64 word ids; -1 for special tokens.
            rng: generator to draw from.
        """
        ids, word_ids = _check_inputs(ids, word_ids)
        positions, groups = self.choose(ids, word_ids, rng)
        return corrupt_groups(ids, positions, groups, self.vocab, self._replace_pool, self.mask_prob, self.random_prob, rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, mask_prob={self.mask_prob}, random_prob={self.random_prob})"


# ---------------------------------------------------------------------- maskers
@MASKERS.register("bert_random")
class BertRandomMasker(_Masker):
    """BERT masking: exactly ``max(1, round(ratio * n_maskable))`` tokens chosen uniformly.

    Args:
        ratio: fraction of maskable tokens to predict (0.15 BERT, 0.30 MosaicBERT).
        mask_prob: fraction of chosen tokens replaced by the mask token.
        random_prob: fraction replaced by a random non-special token.
        vocab: vocabulary description.
    """

    def __init__(self, ratio: float = 0.15, mask_prob: float = 0.8, random_prob: float = 0.1, *, vocab: TokenVocab) -> None:
        super().__init__(ratio, mask_prob, random_prob, vocab)

    def choose(self, ids: np.ndarray, word_ids: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        cand = maskable_positions(ids, word_ids, self.vocab)
        k = self.budget(cand.size)
        positions = np.sort(rng.choice(cand, size=k, replace=False)) if k else cand[:0]
        return positions, np.arange(positions.size, dtype=np.int64)


@MASKERS.register("whole_word")
class WholeWordMasker(_Masker):
    """Whole-word masking: words in random order, each taken if it fits in the token budget still left.

    Args:
        ratio: fraction of maskable tokens to predict.
        mask_prob: fraction of chosen words replaced by mask tokens.
        random_prob: fraction of chosen words replaced by random non-special tokens.
        vocab: vocabulary description.
    """

    def __init__(self, ratio: float = 0.15, mask_prob: float = 0.8, random_prob: float = 0.1, *, vocab: TokenVocab) -> None:
        super().__init__(ratio, mask_prob, random_prob, vocab)

    def choose(self, ids: np.ndarray, word_ids: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        cand, starts, lengths, _, budget = self.word_candidates(ids, word_ids)
        if budget == 0:
            return cand[:0], cand[:0]
        order = rng.permutation(starts.size)
        take = np.zeros(order.size, dtype=bool)
        left = budget
        for i, w in enumerate(order):  # skip a word that would not fit (Google's BERT, HF's collator)
            if lengths[w] <= left:
                take[i] = True
                left -= int(lengths[w])
                if left == 0:
                    break
        if not take.any():  # every word is longer than the budget: one word, so the sequence has a target
            take[0] = True
        chosen = order[take]
        positions = _expand(starts[chosen], lengths[chosen])
        groups = np.repeat(np.arange(chosen.size, dtype=np.int64), lengths[chosen])
        return positions, groups


class _ContiguousWordsMasker(_Masker):
    """Masks runs of adjacent words whose length (in words) follows :attr:`length_probs`.

    Each run starts at a word drawn uniformly among words not yet chosen that fit in the token budget
    still left, grows over following unchosen adjacent words up to the drawn length, and stops before
    a word that would not fit. Runs therefore never overlap, never cross a special token and never
    exceed the budget (unless no word fits at all: then one word is chosen).

    Args:
        ratio, mask_prob, random_prob, vocab: as for every masker.
        length_weights: (L,) unnormalised weights of run lengths 1..L in words.
    """

    def __init__(self, ratio: float, mask_prob: float, random_prob: float, vocab: TokenVocab,
                 length_weights: np.ndarray) -> None:
        super().__init__(ratio, mask_prob, random_prob, vocab)
        self.length_probs = length_weights / length_weights.sum()  # P(length = 1), P(length = 2), ...

    def sample_lengths(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Draw ``size`` run lengths (in words) from :attr:`length_probs`.

        Args:
            rng: generator to draw from.
            size: number of draws.
        """
        return rng.choice(np.arange(1, self.length_probs.size + 1), size=size, p=self.length_probs)

    def choose(self, ids: np.ndarray, word_ids: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        cand, starts, lengths, joined, budget = self.word_candidates(ids, word_ids)
        if budget == 0:
            return cand[:0], cand[:0]
        n_words = starts.size
        group_of_word = np.full(n_words, -1, dtype=np.int64)
        # One draw per run; budget draws always suffice since every run adds at least one token.
        run_lengths = self.sample_lengths(rng, budget)
        n_runs = 0
        total = 0
        while total < budget:
            free = np.flatnonzero((group_of_word < 0) & (lengths <= budget - total))  # words that still fit
            if free.size == 0:
                break
            want = int(run_lengths[n_runs])
            w = int(free[rng.integers(free.size)])
            taken = 0
            while True:
                group_of_word[w] = n_runs
                total += int(lengths[w])
                taken += 1
                if (total >= budget or taken == want or not joined[w] or group_of_word[w + 1] >= 0
                        or lengths[w + 1] > budget - total):
                    break
                w += 1
            n_runs += 1
        if n_runs == 0:  # every word is longer than the budget: one word, so the sequence has a target
            group_of_word[int(rng.integers(n_words))] = 0
        chosen = np.flatnonzero(group_of_word >= 0)
        positions = _expand(starts[chosen], lengths[chosen])
        groups = np.repeat(group_of_word[chosen], lengths[chosen])
        return positions, groups


@MASKERS.register("span")
class SpanMasker(_ContiguousWordsMasker):
    """SpanBERT masking: span lengths (words) ~ Geometric(p) truncated to ``[1, max_span]``.

    Args:
        ratio: fraction of maskable tokens to predict.
        p: geometric parameter (0.2 in SpanBERT, whose nominal mean span is 3.8 words). Realised spans are
            shorter, as a span stops at a word already chosen or one past the budget: measured mean 2.94 words
            at about 125 tokens, 3.41 at about 500 (SpanBERT's own masking loop gives 3.20 and 3.64).
        max_span: longest span in words (10 in SpanBERT).
        mask_prob: fraction of chosen spans replaced by mask tokens.
        random_prob: fraction of chosen spans replaced by random non-special tokens.
        vocab: vocabulary description.
    """

    def __init__(self, ratio: float = 0.15, p: float = 0.2, max_span: int = 10, mask_prob: float = 0.8,
                 random_prob: float = 0.1, *, vocab: TokenVocab) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:
            raise ValueError(f"p (geometric success probability) must be in (0, 1], got {p!r}")
        self.p = float(p)
        self.max_span = _check_positive_int("max_span", max_span)
        k = np.arange(1, self.max_span + 1)
        super().__init__(ratio, mask_prob, random_prob, vocab, self.p * (1.0 - self.p) ** (k - 1))


@MASKERS.register("ngram")
class NgramMasker(_ContiguousWordsMasker):
    """Contiguous n-gram masking, n in ``[1, max_n]`` with probability proportional to ``1/n`` (ERNIE-Gram's n-gram
    sampling; one ``[MASK]`` and one label per token, not its explicit n-gram prediction; see the module docstring).

    Args:
        ratio: fraction of maskable tokens to predict.
        max_n: longest n-gram in words.
        mask_prob: fraction of chosen n-grams replaced by mask tokens.
        random_prob: fraction of chosen n-grams replaced by random non-special tokens.
        vocab: vocabulary description.
    """

    def __init__(self, ratio: float = 0.15, max_n: int = 3, mask_prob: float = 0.8, random_prob: float = 0.1, *,
                 vocab: TokenVocab) -> None:
        self.max_n = _check_positive_int("max_n", max_n)
        super().__init__(ratio, mask_prob, random_prob, vocab, 1.0 / np.arange(1, self.max_n + 1))
