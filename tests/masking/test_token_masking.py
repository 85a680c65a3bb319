"""Tests for mmm.masking.token: budgets, special tokens, 80/10/10, word/span/n-gram grouping."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import pytest

import mmm.masking  # noqa: F401  (registers the maskers)
from mmm.masking.base import MaskedTokens, TokenVocab
from mmm.masking.token import NgramMasker, SpanMasker, find_words, maskable_positions
from mmm.registry import MASKERS, RegistryError

SPECIALS = frozenset(range(5))  # pad, unk, cls, sep, mask as in the tokenizers
VOCAB = TokenVocab(size=30000, mask_id=4, special_ids=SPECIALS)
CLS, SEP = 2, 3
NAMES = ["bert_random", "whole_word", "span", "ngram"]


def make_sequence(rng: np.random.Generator, n_words: int, max_word_len: int = 3, pair: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """``[CLS] words [SEP]`` (or ``[CLS] a [SEP] b [SEP]``) with multi-token words and word ids."""
    lens = rng.integers(1, max_word_len + 1, size=n_words)
    wids = np.repeat(np.arange(n_words), lens)
    ids = rng.integers(5, VOCAB.size, size=wids.size)
    if pair:
        cut = int(np.searchsorted(wids, n_words // 2))
        ids = np.concatenate([[CLS], ids[:cut], [SEP], ids[cut:], [SEP]])
        wids = np.concatenate([[-1], wids[:cut], [-1], wids[cut:] - n_words // 2, [-1]])
    else:
        ids = np.concatenate([[CLS], ids, [SEP]])
        wids = np.concatenate([[-1], wids, [-1]])
    return ids.astype(np.int64), wids.astype(np.int64)


def word_table(ids: np.ndarray, wids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    return find_words(maskable_positions(ids, wids, VOCAB), wids)


def check_basic(out: MaskedTokens, ids: np.ndarray, wids: np.ndarray) -> None:
    assert out.input_ids is not ids and out.input_ids.dtype == np.int64 and out.input_ids.shape == ids.shape
    assert out.positions.dtype == np.int64 and out.labels.dtype == np.int64
    assert (np.diff(out.positions) > 0).all()
    np.testing.assert_array_equal(out.labels, ids[out.positions])
    special = (wids < 0) | np.isin(ids, list(SPECIALS))
    assert not special[out.positions].any()
    untouched = np.ones(ids.size, dtype=bool)
    untouched[out.positions] = False
    np.testing.assert_array_equal(out.input_ids[untouched], ids[untouched])


@pytest.mark.parametrize("name", NAMES)
def test_specials_never_masked_and_input_untouched(name: str) -> None:
    masker = MASKERS.create(name, ratio=0.5, vocab=VOCAB)
    for seed in range(300):
        rng = np.random.default_rng(seed)
        ids, wids = make_sequence(rng, int(rng.integers(1, 12)), pair=bool(seed % 2))
        ids[rng.integers(1, ids.size - 1)] = 1  # an [UNK] inside a word: special id, must stay
        before = ids.copy()
        out = masker(ids, wids, rng)
        np.testing.assert_array_equal(ids, before)
        check_basic(out, ids, wids)
        assert (out.positions.size >= 1) == (maskable_positions(ids, wids, VOCAB).size >= 1)
        assert not np.isin(out.input_ids[out.positions], list(SPECIALS - {VOCAB.mask_id})).any()


@pytest.mark.parametrize("name", NAMES)
def test_nothing_maskable_gives_empty(name: str) -> None:
    masker = MASKERS.create(name, vocab=VOCAB)
    rng = np.random.default_rng(0)
    for ids, wids in [
        (np.array([CLS, SEP]), np.array([-1, -1])),
        (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)),
        (np.array([CLS, 7, SEP]), np.array([-1, -1, -1])),  # a token outside any word
        (np.array([CLS, 1, SEP]), np.array([-1, 0, -1])),  # only a special id
    ]:
        out = masker(ids, wids, rng)
        assert out.positions.size == 0 and out.labels.size == 0
        np.testing.assert_array_equal(out.input_ids, ids)


@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.5])
def test_bert_random_exact_count(ratio: float) -> None:
    masker = MASKERS.create("bert_random", ratio=ratio, vocab=VOCAB)
    rng = np.random.default_rng(1)
    for n_words in [1, 2, 5, 33, 200]:
        ids, wids = make_sequence(rng, n_words)
        n_maskable = maskable_positions(ids, wids, VOCAB).size
        out = masker(ids, wids, rng)
        assert out.positions.size == max(1, round(ratio * n_maskable))


def test_bert_80_10_10_proportions() -> None:
    masker = MASKERS.create("bert_random", vocab=VOCAB)
    rng = np.random.default_rng(2)
    ids, wids = make_sequence(rng, 300)
    masked = randomized = kept = 0
    for _ in range(200):
        out = masker(ids, wids, rng)
        new = out.input_ids[out.positions]
        is_mask = new == VOCAB.mask_id
        is_rand = ~is_mask & (new != out.labels)
        masked += int(is_mask.sum())
        randomized += int(is_rand.sum())
        kept += int((new == out.labels).sum())
        assert ((new[is_rand] >= 5) & (new[is_rand] < VOCAB.size)).all()
    total = masked + randomized + kept
    assert total > 10000
    assert abs(masked / total - 0.8) < 0.015
    assert abs(randomized / total - 0.1) < 0.01
    assert abs(kept / total - 0.1) < 0.01


def test_custom_corruption_probabilities() -> None:
    masker = MASKERS.create("bert_random", ratio=0.3, mask_prob=0.0, random_prob=1.0, vocab=VOCAB)
    rng = np.random.default_rng(3)
    ids, wids = make_sequence(rng, 100)
    out = masker(ids, wids, rng)
    new = out.input_ids[out.positions]
    assert not (new == VOCAB.mask_id).any() and (new >= 5).all()
    assert (new != out.labels).mean() > 0.95
    keep = MASKERS.create("whole_word", mask_prob=0.0, random_prob=0.0, vocab=VOCAB)(ids, wids, rng)
    np.testing.assert_array_equal(keep.input_ids, ids)
    assert keep.positions.size > 0


def test_whole_word_masks_complete_words_within_budget() -> None:
    masker = MASKERS.create("whole_word", ratio=0.2, vocab=VOCAB)
    for seed in range(200):
        rng = np.random.default_rng(seed)
        ids, wids = make_sequence(rng, int(rng.integers(2, 80)), max_word_len=4, pair=bool(seed % 3 == 0))
        out = masker(ids, wids, rng)
        check_basic(out, ids, wids)
        n_maskable = maskable_positions(ids, wids, VOCAB).size
        budget = max(1, round(0.2 * n_maskable))
        starts, lengths, _ = word_table(ids, wids)
        if lengths.min() <= budget:  # never over the budget; short of it by less than a word
            assert budget - 4 < out.positions.size <= budget
        else:  # no word fits: one word, so the sequence has a target
            assert out.positions.size in lengths
        chosen = np.zeros(ids.size, dtype=bool)
        chosen[out.positions] = True
        for s, n in zip(starts, lengths):
            part = chosen[s : s + n]
            assert part.all() or not part.any(), "a word was masked partially"
            if part.all():  # one decision per word: all masked, or none masked
                is_mask = out.input_ids[s : s + n] == VOCAB.mask_id
                assert is_mask.all() or not is_mask.any()


def test_whole_word_works_with_any_word_ids() -> None:
    # Byte-level BPE style: word ids come from the tokenizer, not from "##" prefixes.
    ids = np.array([CLS, 100, 101, 102, 200, 300, 301, SEP], dtype=np.int64)
    wids = np.array([-1, 0, 0, 0, 1, 2, 2, -1], dtype=np.int64)
    masker = MASKERS.create("whole_word", ratio=0.5, vocab=VOCAB)  # budget 3 of 6 tokens
    seen = set()
    for seed in range(100):
        out = masker(ids, wids, np.random.default_rng(seed))
        seen.add(tuple(out.positions.tolist()))
    assert seen == {(1, 2, 3), (4, 5, 6)}  # word 0 alone, or words 1 and 2: never 3 + 1 tokens
    masker = MASKERS.create("whole_word", ratio=0.1, vocab=VOCAB)  # budget 1: only the one-token word fits
    assert {tuple(masker(ids, wids, np.random.default_rng(seed)).positions.tolist()) for seed in range(50)} == {(4,)}


@pytest.mark.parametrize("name, args", [("whole_word", {}), ("span", {"p": 0.2, "max_span": 10}),
                                        ("ngram", {"max_n": 3})])
def test_word_level_maskers_never_exceed_the_token_budget(name, args) -> None:
    """Long words overshot the budget: 7% of sequences over it, 0.152 overall at ratio 0.15. Google's BERT
    and HF's whole-word collator skip a word that would not fit."""
    masker = MASKERS.create(name, ratio=0.15, vocab=VOCAB, **args)
    chosen = maskable = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        ids, wids = make_sequence(rng, int(rng.integers(20, 120)), max_word_len=6)
        budget = max(1, round(0.15 * maskable_positions(ids, wids, VOCAB).size))
        out = masker(ids, wids, rng)
        _, lengths, _ = word_table(ids, wids)
        assert out.positions.size <= budget or lengths.min() > budget
        chosen += out.positions.size
        maskable += maskable_positions(ids, wids, VOCAB).size
    assert 0.13 < chosen / maskable <= 0.15


def _group_sizes(masker: SpanMasker | NgramMasker, n_words: int, seeds: int) -> np.ndarray:
    ids = (np.arange(n_words) % 20000 + 10).astype(np.int64)
    wids = np.arange(n_words, dtype=np.int64)  # one token per word: sizes in tokens = in words
    sizes = []
    for seed in range(seeds):
        _, groups = masker.choose(ids, wids, np.random.default_rng(seed))
        counts = np.bincount(groups)
        sizes.append(counts[counts > 0][:-1])  # the last run may be cut by the budget
    return np.concatenate(sizes)


def test_span_lengths_are_truncated_geometric() -> None:
    masker = MASKERS.create("span", ratio=0.05, vocab=VOCAB)
    sizes = _group_sizes(masker, 4000, 30)
    assert sizes.size > 1000 and sizes.max() <= 10
    expected_mean = float((masker.length_probs * np.arange(1, 11)).sum())
    assert abs(expected_mean - 3.8) < 0.05  # SpanBERT's reported mean for p=0.2, max 10
    assert abs(sizes.mean() - expected_mean) < 0.25
    freq = np.bincount(sizes, minlength=11)[1:] / sizes.size
    assert freq[0] > freq[2] > freq[5] > freq[9]  # decaying like a geometric
    draws = masker.sample_lengths(np.random.default_rng(0), 20000)
    assert abs(draws.mean() - expected_mean) < 0.08


def test_span_respects_max_span_and_word_boundaries() -> None:
    masker = MASKERS.create("span", ratio=0.4, max_span=2, vocab=VOCAB)
    for seed in range(100):
        rng = np.random.default_rng(seed)
        ids, wids = make_sequence(rng, 60, max_word_len=3, pair=True)
        positions, groups = masker.choose(ids, wids, rng)
        starts, lengths, _ = word_table(ids, wids)
        for g in np.unique(groups):
            pos = positions[groups == g]
            assert (np.diff(pos) == 1).all(), "a span must be contiguous and cannot cross a special token"
            assert np.unique(wids[pos]).size <= 2  # max_span words
        chosen = np.zeros(ids.size, dtype=bool)  # every word is masked completely or not at all
        chosen[positions] = True
        for s, n in zip(starts, lengths):
            assert chosen[s : s + n].all() or not chosen[s : s + n].any()


def test_ngram_lengths_follow_inverse_n() -> None:
    masker = MASKERS.create("ngram", ratio=0.05, vocab=VOCAB)
    np.testing.assert_allclose(masker.length_probs, np.array([6, 3, 2]) / 11)
    sizes = _group_sizes(masker, 4000, 30)
    assert sizes.size > 2000 and sizes.max() <= 3
    freq = np.bincount(sizes, minlength=4)[1:] / sizes.size
    np.testing.assert_allclose(freq, [6 / 11, 3 / 11, 2 / 11], atol=0.03)


@pytest.mark.parametrize("name", ["span", "ngram"])
def test_contiguous_maskers_budget_and_group_decisions(name: str) -> None:
    masker = MASKERS.create(name, ratio=0.15, vocab=VOCAB)
    for seed in range(100):
        rng = np.random.default_rng(seed)
        ids, wids = make_sequence(rng, int(rng.integers(3, 150)), max_word_len=3)
        n_maskable = maskable_positions(ids, wids, VOCAB).size
        positions, groups = masker.choose(ids, wids, np.random.default_rng(seed))
        budget = max(1, round(0.15 * n_maskable))
        assert budget <= positions.size < budget + 3
        out = masker(ids, wids, np.random.default_rng(seed))
        np.testing.assert_array_equal(out.positions, np.sort(positions))
        for g in np.unique(groups):  # one 80/10/10 decision per span
            is_mask = out.input_ids[np.sort(positions[groups == g])] == VOCAB.mask_id
            assert is_mask.all() or not is_mask.any()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed(name: str) -> None:
    masker = MASKERS.create(name, vocab=VOCAB)
    ids, wids = make_sequence(np.random.default_rng(4), 120)
    a = masker(ids, wids, np.random.default_rng(123))
    b = masker(ids, wids, np.random.default_rng(123))
    c = masker(ids, wids, np.random.default_rng(124))
    for x, y in [(a.input_ids, b.input_ids), (a.positions, b.positions), (a.labels, b.labels)]:
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.positions, c.positions) or not np.array_equal(a.input_ids, c.input_ids)


def test_registry_errors() -> None:
    with pytest.raises(RegistryError) as err:
        MASKERS.create("no_such_masker", vocab=VOCAB)
    for name in NAMES:
        assert name in str(err.value)
    with pytest.raises(RegistryError) as err:
        MASKERS.create("span", vocab=VOCAB, max_spam=3)
    assert "max_spam" in str(err.value) and "max_span" in str(err.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ratio", [0, 0.0, 1.0, 1.5, -0.1, "0.15", True])
def test_invalid_ratio(name: str, ratio: object) -> None:
    with pytest.raises(ValueError, match="ratio"):
        MASKERS.create(name, ratio=ratio, vocab=VOCAB)


def test_invalid_hyperparameters() -> None:
    with pytest.raises(ValueError, match=r"mask_prob \+ random_prob"):
        MASKERS.create("bert_random", mask_prob=0.8, random_prob=0.3, vocab=VOCAB)
    with pytest.raises(ValueError, match="random_prob.*-0.1"):
        MASKERS.create("whole_word", random_prob=-0.1, vocab=VOCAB)
    with pytest.raises(ValueError, match="max_span.*0"):
        MASKERS.create("span", max_span=0, vocab=VOCAB)
    with pytest.raises(ValueError, match="p .*1.5"):
        MASKERS.create("span", p=1.5, vocab=VOCAB)
    with pytest.raises(ValueError, match="max_n"):
        MASKERS.create("ngram", max_n=0, vocab=VOCAB)
    with pytest.raises(TypeError, match="TokenVocab"):
        MASKERS.create("ngram", vocab={"size": 10})
    with pytest.raises(TypeError):
        MASKERS.create("bert_random")  # vocab is required
    masker = MASKERS.create("bert_random", vocab=VOCAB)
    with pytest.raises(ValueError, match="equal length"):
        masker(np.array([CLS, 7, SEP]), np.array([-1, 0]), np.random.default_rng(0))
