"""Tests for mmm.modalities.dna.masking: determinism, budgets, specials, and the k-mer leak that span masking closes."""
from __future__ import annotations

import numpy as np
import pytest

from mmm.masking.base import MaskedTokens
from mmm.modalities.dna.masking import DNARandomMasker, DNASpanMasker, hidden_bases, maskable_tokens
from mmm.modalities.dna.tokenizer import UNK_ID, DNACharTokenizer, DNAEncoding, DNAKmerTokenizer
from mmm.registry import MASKERS, RegistryError

K6 = DNAKmerTokenizer(6, overlapping=True)
TOKENIZERS = [DNACharTokenizer(), K6, DNAKmerTokenizer(6, overlapping=False)]


def random_seq(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list("ACGT"), size=n))


def make(name: str, tok, **kw):
    return MASKERS.create(name, vocab=tok.vocab(), **kw)


def leaking(enc: DNAEncoding, positions: np.ndarray) -> np.ndarray:
    """Masked positions all of whose bases some unmasked token shows (the DNABERT leak)."""
    hidden = hidden_bases(enc.starts, enc.ends, positions, enc.n_bases)
    return np.array([p for p in positions if not hidden[enc.starts[p] : enc.ends[p]].any()], dtype=np.int64)


def check_output(out: MaskedTokens, enc: DNAEncoding, tok) -> None:
    assert out.input_ids.dtype == np.int64 and out.input_ids.shape == enc.ids.shape
    assert out.positions.size >= 1 and (np.diff(out.positions) > 0).all()
    assert (out.labels == enc.ids[out.positions]).all()
    assert not np.isin(out.positions, np.flatnonzero(enc.starts < 0)).any()
    assert (enc.starts[out.positions] >= 0).all() and not np.isin(enc.ids[out.positions], list(tok.vocab().special_ids)).any()
    untouched = np.setdiff1d(np.arange(len(enc)), out.positions)
    assert (out.input_ids[untouched] == enc.ids[untouched]).all()


@pytest.mark.parametrize("name", ["dna_random", "dna_span"])
@pytest.mark.parametrize("tok", TOKENIZERS, ids=["char", "kmer6", "nt6"])
def test_deterministic_never_specials_at_least_one(name: str, tok) -> None:
    masker = make(name, tok, ratio=0.15)
    rng = np.random.default_rng(0)
    for n in [1, 2, 7, 64, 300]:
        enc = tok.encode(random_seq(rng, n))
        a = masker(enc, np.random.default_rng(n))
        b = masker(enc, np.random.default_rng(n))
        assert all((getattr(a, f) == getattr(b, f)).all() for f in ("input_ids", "positions", "labels"))
        check_output(a, enc, tok)


def test_ratio_of_tokens_and_of_bases() -> None:
    rng = np.random.default_rng(0)
    char = DNACharTokenizer()
    enc = char.encode(random_seq(rng, 1000))
    out = make("dna_random", char, ratio=0.2)(enc, rng)
    assert out.positions.size == 200
    # dna_span hides exactly round(ratio * L) bases; with characters tokens = bases.
    for dist in ["geometric", "fixed"]:
        out = make("dna_span", char, ratio=0.15, span_bases=5, distribution=dist)(enc, rng)
        assert out.positions.size == 150
    # With overlapping 6-mers each s-base span masks s + 5 tokens: more tokens than bases.
    enc6 = K6.encode(random_seq(rng, 1000))
    span = make("dna_span", K6, ratio=0.15, span_bases=10)
    chosen = span.choose_bases(1000, np.random.default_rng(1))
    assert chosen.sum() == 150
    out = span(enc6, np.random.default_rng(1))
    assert 150 < out.positions.size < 0.45 * len(enc6)


def test_span_masking_hides_ratio_of_the_bases_with_non_overlapping_tokens() -> None:
    """A masked non-overlapping token hides all its bases, so counting chosen bases before growing the spans to
    whole tokens hid 0.26 of the bases at ratio 0.15 with the Nucleotide Transformer's 6-mers (0.32 with BPE)."""
    from mmm.modalities.dna.tokenizer import train_dna_bpe

    rng = np.random.default_rng(0)
    motifs = ["ACGTTGCA", "GGGCCCAT", "TATAAA"]

    def motif_seq(n: int) -> str:
        parts = []
        while sum(map(len, parts)) < n:
            parts.append(motifs[rng.integers(3)] if rng.random() < 0.5 else random_seq(rng, 4))
        return "".join(parts)[:n]

    bpe = train_dna_bpe([motif_seq(500) for _ in range(100)], vocab_size=120)
    for tok, n in ((DNAKmerTokenizer(6, overlapping=False), 1002), (bpe, 300)):
        span = make("dna_span", tok, ratio=0.15, span_bases=6)
        shares = []
        for _ in range(300):
            enc = tok.encode(motif_seq(n))
            out = span(enc, rng)
            assert leaking(enc, out.positions).size == 0
            shares.append(hidden_bases(enc.starts, enc.ends, out.positions, enc.n_bases).mean())
        assert abs(np.mean(shares) - 0.15) < 0.006, (tok, np.mean(shares))


def test_80_10_10_per_run() -> None:
    char = DNACharTokenizer()
    enc = char.encode(random_seq(np.random.default_rng(0), 4000))
    out = make("dna_span", char, ratio=0.3, span_bases=4)(enc, np.random.default_rng(0))
    new = out.input_ids[out.positions]
    frac_mask = (new == char.mask_id).mean()
    assert 0.7 < frac_mask < 0.9
    assert not np.isin(new, [0, 1, 2, 3]).any()  # random replacements never draw specials
    only_mask = make("dna_span", char, ratio=0.3, mask_prob=1.0, random_prob=0.0)(enc, np.random.default_rng(0))
    assert (only_mask.input_ids[only_mask.positions] == char.mask_id).all()


def test_span_masking_never_leaks_with_overlapping_kmers() -> None:
    """Every token dna_span masks holds a base that no unmasked token covers."""
    rng = np.random.default_rng(0)
    for tok in [K6, DNAKmerTokenizer(3, True), DNACharTokenizer(), DNAKmerTokenizer(6, False)]:
        for span_bases, dist in [(1, "fixed"), (3, "geometric"), (6, "geometric"), (2, "fixed")]:
            masker = make("dna_span", tok, ratio=0.15, span_bases=span_bases, distribution=dist)
            for trial in range(20):
                enc = tok.encode(random_seq(rng, int(rng.integers(5, 400))))
                out = masker(enc, rng)
                assert leaking(enc, out.positions).size == 0, (tok, span_bases, trial)


def test_random_masking_leaks_with_overlapping_kmers() -> None:
    """The reason dna_span exists: BERT masking of overlapping 6-mers leaves masked k-mers spelled
    out by their neighbours (so the leak check above can fail)."""
    rng = np.random.default_rng(0)
    enc = K6.encode(random_seq(rng, 300))
    out = make("dna_random", K6, ratio=0.15)(enc, rng)
    leaks = leaking(enc, out.positions)
    assert leaks.size > 0.5 * out.positions.size
    # ... while with single nucleotides random masking hides every masked base.
    char = DNACharTokenizer()
    enc = char.encode(random_seq(rng, 300))
    assert leaking(enc, make("dna_random", char, ratio=0.15)(enc, rng).positions).size == 0


def test_unk_tokens_are_never_masked() -> None:
    seq = "ACGTAC" + "N" * 3 + "GGATCA" + "N" + "ACGTTTGACA"
    enc = K6.encode(seq)
    cand = maskable_tokens(enc.ids, enc.starts, K6.vocab())
    assert not np.isin(enc.ids[cand], [UNK_ID]).any()
    for name in ["dna_random", "dna_span"]:
        masker = make(name, K6, ratio=0.5)
        for s in range(30):
            out = masker(enc, np.random.default_rng(s))
            assert out.positions.size >= 1 and (enc.ids[out.positions] != UNK_ID).all()
    all_unk = K6.encode("NNNNNNNN")
    out = make("dna_span", K6, ratio=0.5)(all_unk, np.random.default_rng(0))
    assert out.positions.size == 0 and (out.input_ids == all_unk.ids).all()


def test_argument_errors() -> None:
    vocab = DNACharTokenizer().vocab()
    with pytest.raises(ValueError, match="ratio"):
        DNASpanMasker(ratio=1.5, vocab=vocab)
    with pytest.raises(ValueError, match="mask_prob \\+ random_prob"):
        DNARandomMasker(ratio=0.15, mask_prob=0.8, random_prob=0.5, vocab=vocab)
    with pytest.raises(ValueError, match="distribution"):
        DNASpanMasker(distribution="poisson", vocab=vocab)
    with pytest.raises(ValueError, match="span_bases"):
        DNASpanMasker(span_bases=0.5, vocab=vocab)
    with pytest.raises(ValueError, match="whole number"):
        DNASpanMasker(span_bases=2.5, distribution="fixed", vocab=vocab)
    with pytest.raises(TypeError, match="TokenVocab"):
        DNASpanMasker(vocab=None)  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="span_len"):
        MASKERS.create("dna_span", vocab=vocab, span_len=3)
    with pytest.raises(TypeError, match="DNAEncoding"):
        DNASpanMasker(vocab=vocab)(np.arange(5), np.random.default_rng(0))  # type: ignore[arg-type]
