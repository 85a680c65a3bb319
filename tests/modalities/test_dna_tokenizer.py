"""Tests for mmm.modalities.dna.tokenizer: offsets, alphabet handling, each scheme, save/load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmm.masking.base import TokenVocab
from mmm.modalities.dna.tokenizer import (
    CLS_ID,
    SEP_ID,
    UNK_ID,
    DNABPETokenizer,
    DNACharTokenizer,
    DNAKmerTokenizer,
    DNASequenceError,
    DNATokenizer,
    load_dna_tokenizer,
    reverse_complement,
    soft_mask,
    train_dna_bpe,
)
from mmm.registry import TOKENIZERS


def random_seq(rng: np.random.Generator, n: int, alphabet: str = "ACGT") -> str:
    return "".join(rng.choice(list(alphabet), size=n))


@pytest.fixture(scope="module")
def bpe() -> DNABPETokenizer:
    rng = np.random.default_rng(0)
    motif = "TATAAAGGC"
    seqs = [random_seq(rng, 100) + motif + random_seq(rng, 100) for _ in range(60)]
    return train_dna_bpe(seqs, vocab_size=120)


def all_tokenizers(bpe: DNABPETokenizer):
    return [DNACharTokenizer(), DNAKmerTokenizer(6, True), DNAKmerTokenizer(6, False), DNAKmerTokenizer(3, False), bpe]


def check_offsets(tok: DNATokenizer, seq: str) -> None:
    """Specials at both ends with offsets -1; real tokens cover every base, in order, within bounds."""
    enc = tok.encode(seq)
    assert enc.ids.dtype == enc.starts.dtype == enc.ends.dtype == np.int64
    assert enc.ids[0] == CLS_ID and enc.ids[-1] == SEP_ID
    assert (enc.starts[[0, -1]] == -1).all() and (enc.ends[[0, -1]] == -1).all()
    s, e = enc.starts[1:-1], enc.ends[1:-1]
    assert (s >= 0).all() and (e > s).all() and (e <= len(seq)).all()
    assert (np.diff(s) > 0).all()
    covered = np.zeros(len(seq), dtype=bool)
    for a, b in zip(s, e):
        covered[a:b] = True
    assert covered.all() and enc.n_bases == len(seq)
    assert (enc.ids < tok.vocab_size).all()


def test_round_trip_and_offsets_every_scheme(bpe: DNABPETokenizer) -> None:
    rng = np.random.default_rng(1)
    for tok in all_tokenizers(bpe):
        for n in [1, 2, 5, 6, 7, 13, 200]:
            seq = random_seq(rng, n)
            check_offsets(tok, seq)
            assert tok.decode(tok.encode(seq).ids) == seq, (tok, seq)
        # Single-token pieces spell the bases of their offsets.
        seq = random_seq(rng, 50)
        enc = tok.encode(seq)
        for i, a, b in zip(enc.ids[1:-1], enc.starts[1:-1], enc.ends[1:-1]):
            assert tok.decode([i]) == seq[a:b]


def test_char_and_kmer_layout() -> None:
    char = DNACharTokenizer()
    assert char.vocab_size == 10 and char.encode("ACGTN").ids.tolist() == [2, 5, 6, 7, 8, 9, 3]
    k3 = DNAKmerTokenizer(3, overlapping=True)
    enc = k3.encode("ACGTA")
    assert k3.vocab_size == 10 + 64
    assert [k3.token_strings()[i] for i in enc.ids[1:-1]] == ["ACG", "CGT", "GTA"]
    assert enc.starts[1:-1].tolist() == [0, 1, 2] and enc.ends[1:-1].tolist() == [3, 4, 5]
    # Non-overlapping (Nucleotide Transformer): stride k, the tail as single nucleotides.
    nt = DNAKmerTokenizer(3, overlapping=False)
    enc = nt.encode("ACGTACGT")
    assert [nt.token_strings()[i] for i in enc.ids[1:-1]] == ["ACG", "TAC", "G", "T"]
    assert enc.starts[1:-1].tolist() == [0, 3, 6, 7] and enc.ends[1:-1].tolist() == [3, 6, 7, 8]
    # Shorter than k with overlapping k-mers: single nucleotides, nothing lost.
    assert k3.decode(k3.encode("AC").ids) == "AC" and len(k3.encode("AC")) == 4


def test_lowercase_n_and_iupac() -> None:
    char = DNACharTokenizer()
    assert char.encode("acgtn").ids.tolist() == char.encode("ACGTN").ids.tolist()
    # Every IUPAC ambiguity code reads as N.
    assert (char.encode("RYSWKMBDHVryswkmbdhv").ids[1:-1] == char.encode("N").ids[1]).all()
    assert soft_mask("ACgtN").tolist() == [False, False, True, True, False]
    # k-mers with any N are [UNK]; the others are ordinary k-mers.
    k3 = DNAKmerTokenizer(3, overlapping=True)
    ids = k3.encode("ACGNACG").ids[1:-1]
    assert ids.tolist() == [k3.encode("ACG").ids[1], UNK_ID, UNK_ID, UNK_ID, k3.encode("ACG").ids[1]]
    assert k3.decode(k3.encode("ACGNACG").ids) == "ACGNACG"  # N bases only under [UNK] read N
    nt = DNAKmerTokenizer(3, overlapping=False)
    assert nt.encode("ACRTTTN").ids[1:-1].tolist() == [UNK_ID, nt.encode("TTT").ids[1], 9]  # tail N is its own token


@pytest.mark.parametrize("bad, pos", [("ACG-T", 3), ("ACGU", 3), ("AC*", 2), ("A C", 1), ("ACG\n", 3), ("AC1", 2), ("ACé", 2)])
def test_invalid_characters_are_named(bad: str, pos: int) -> None:
    with pytest.raises(DNASequenceError) as info:
        DNACharTokenizer().encode(bad)
    msg = str(info.value)
    assert repr(bad[pos]) in msg and f"position {pos}" in msg and "A C G T N" in msg
    with pytest.raises(DNASequenceError, match="position"):
        DNAKmerTokenizer(6).encode(bad)


def test_empty_and_non_str_input() -> None:
    with pytest.raises(DNASequenceError, match="empty"):
        DNACharTokenizer().encode("")
    with pytest.raises(TypeError, match="str"):
        DNACharTokenizer().encode(b"ACGT")  # type: ignore[arg-type]


def test_reverse_complement() -> None:
    assert reverse_complement("AACGTN") == "NACGTT"
    assert reverse_complement("acgRYKMBDHVSW") == "WSBDHVKMRYcgt"
    rng = np.random.default_rng(0)
    seq = random_seq(rng, 100, "ACGTNRYSWKMBDHVacgt")
    assert reverse_complement(reverse_complement(seq)) == seq
    with pytest.raises(DNASequenceError, match="'-'"):
        reverse_complement("AC-")


@pytest.mark.parametrize(
    "tok", [DNACharTokenizer(), DNAKmerTokenizer(6, True), DNAKmerTokenizer(6, False), DNAKmerTokenizer(4, False)]
)
def test_max_bases_every_shorter_sequence_fits(tok: DNATokenizer) -> None:
    rng = np.random.default_rng(0)
    for max_tokens in [3, 4, 10, 33]:
        m = tok.max_bases(max_tokens)
        for n in range(1, m + 1):
            assert len(tok.encode(random_seq(rng, n))) <= max_tokens, (max_tokens, n)
        assert len(tok.encode(random_seq(rng, m + 1))) > max_tokens or isinstance(tok, DNAKmerTokenizer)
    assert DNAKmerTokenizer(6, True).max_bases(512) == 510 + 5
    with pytest.raises(ValueError, match="max_tokens"):
        tok.max_bases(2)


def test_bpe_learns_merges_and_keeps_offsets(bpe: DNABPETokenizer) -> None:
    assert bpe.vocab_size == 120
    enc = bpe.encode("TATAAAGGC")
    assert len(enc) < 9 + 2  # the planted motif is merged into fewer tokens than bases
    assert bpe.encode("acgtRN").ids.tolist() == bpe.encode("ACGTNN").ids.tolist()
    assert bpe.max_bases(10) == 8


def test_vocab_for_maskers(bpe: DNABPETokenizer) -> None:
    for tok in all_tokenizers(bpe):
        v = tok.vocab()
        assert isinstance(v, TokenVocab) and v.size == tok.vocab_size and v.mask_id == tok.mask_id == 4
        assert v.special_ids == frozenset(range(5)) and tok.pad_id == 0


def test_save_load_round_trip(tmp_path: Path, bpe: DNABPETokenizer) -> None:
    seq = "ACGTNACGGTTACGATCGATCGATTTACAGN" * 3
    for i, tok in enumerate(all_tokenizers(bpe)):
        d = tok.save(tmp_path / f"tok{i}")
        for f in d.iterdir():  # JSON / text only: embedded in checkpoints
            json.loads(f.read_text(encoding="utf-8"))
        back = load_dna_tokenizer(d)
        assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
        assert back.encode(seq).ids.tolist() == tok.encode(seq).ids.tolist()
        assert type(tok).load(d).vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="not a DNACharTokenizer"):
        DNACharTokenizer.load(tmp_path / "tok1")
    with pytest.raises(FileNotFoundError, match="mmm_dna_tokenizer.json"):
        load_dna_tokenizer(tmp_path / "missing")


def test_registry_and_argument_errors() -> None:
    assert {"dna_char", "dna_kmer", "dna_bpe"} <= set(TOKENIZERS.list("dna_*"))
    tok = TOKENIZERS.create("dna_kmer", k=4, overlapping=False)
    assert isinstance(tok, DNAKmerTokenizer) and tok.k == 4 and not tok.overlapping
    with pytest.raises(ValueError, match="k must be"):
        DNAKmerTokenizer(k=0)
    with pytest.raises(ValueError, match="vocab_size"):
        train_dna_bpe(["ACGT"], vocab_size=5)
    with pytest.raises(DNASequenceError, match="training sequence 1"):
        train_dna_bpe(["ACGT", "AC-GT"], vocab_size=20)
    with pytest.raises(ValueError, match="empty"):
        train_dna_bpe([], vocab_size=20)
    with pytest.raises(ValueError, match=r"range \[0, 99\]"):
        DNACharTokenizer().decode([0, 99])
