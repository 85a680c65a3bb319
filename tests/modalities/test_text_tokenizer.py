"""Tests for mmm.modalities.text.tokenizer: training, save/load, encoding, chunking."""
from __future__ import annotations

import builtins
import codecs
import json
import re
from pathlib import Path
from typing import List

import numpy as np
import pytest

from mmm.masking.base import TokenVocab
from mmm.modalities.text.tokenizer import TextTokenizer, train_bpe, train_wordpiece
from mmm.registry import TOKENIZERS, RegistryError


def _corpus() -> List[str]:
    """A few hundred short English sentences from the Zen of Python and builtin docstrings."""
    import this  # noqa: F401  (prints the Zen once; pytest captures it)

    texts = re.split(r"(?<=[.!?])\s+|\n+", codecs.decode(this.s, "rot13"))
    for name in sorted(dir(builtins)):
        doc = getattr(getattr(builtins, name), "__doc__", None)
        if isinstance(doc, str):
            texts += re.split(r"(?<=[.!?])\s+|\n+", doc)
    for meth in sorted(dir(str)):
        doc = getattr(str, meth).__doc__
        if isinstance(doc, str):
            texts += re.split(r"(?<=[.!?])\s+|\n+", doc)
    return [t.strip() for t in texts if len(t.strip()) > 3]


CORPUS = _corpus()
LONG_TEXT = " ".join(CORPUS[:120]) + " Antidisestablishmentarianism notwithstanding, supercalifragilistic words persist."


@pytest.fixture(scope="module")
def wordpiece() -> TextTokenizer:
    return train_wordpiece(iter(CORPUS), vocab_size=500, min_frequency=2)


@pytest.fixture(scope="module")
def bpe() -> TextTokenizer:
    return train_bpe(iter(CORPUS), vocab_size=600, min_frequency=2)


def test_corpus_is_a_few_hundred_sentences() -> None:
    assert len(CORPUS) > 300


def test_wordpiece_special_ids_and_vocab(wordpiece: TextTokenizer) -> None:
    tok = wordpiece
    assert [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert [tok.tokenizer.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.special_ids == frozenset(range(5))
    assert 100 < tok.vocab_size <= 500
    assert tok.vocab() == TokenVocab(size=tok.vocab_size, mask_id=4, special_ids=frozenset(range(5)))
    assert any(t.startswith("##") for t in tok.tokenizer.get_vocab())


def test_bpe_special_ids(bpe: TextTokenizer) -> None:
    assert [bpe.tokenizer.id_to_token(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    assert (bpe.pad_id, bpe.cls_id, bpe.sep_id, bpe.mask_id) == (0, 2, 3, 4)
    assert 256 < bpe.vocab_size <= 600


def test_encode_has_no_specials_and_int64(wordpiece: TextTokenizer, bpe: TextTokenizer) -> None:
    for tok in (wordpiece, bpe):
        ids, word_ids = tok.encode("Return the number of items in a container.")
        assert ids.dtype == np.int64 and word_ids.dtype == np.int64 and ids.shape == word_ids.shape
        assert ids.size > 5
        assert not np.isin(ids, list(tok.special_ids)).any()
        assert word_ids[0] == 0 and (np.diff(word_ids) >= 0).all()


def test_encode_batch_matches_encode(wordpiece: TextTokenizer) -> None:
    batch = wordpiece.encode_batch(CORPUS[:50])
    for text, (ids, wids) in zip(CORPUS[:50], batch):
        ids1, wids1 = wordpiece.encode(text)
        np.testing.assert_array_equal(ids, ids1)
        np.testing.assert_array_equal(wids, wids1)


def test_decode_round_trip(wordpiece: TextTokenizer, bpe: TextTokenizer) -> None:
    text = "return the number of items in a container"
    assert bpe.decode(bpe.encode(text)[0]) == text
    assert wordpiece.decode(wordpiece.encode(text)[0]) == text
    ids = np.concatenate([[bpe.cls_id], bpe.encode(text)[0], [bpe.sep_id]])
    assert bpe.decode(ids) == text
    assert bpe.decode(ids, skip_special_tokens=False) == f"<s>{text}</s>"
    with pytest.raises(ValueError, match="99999"):
        bpe.decode([1, 99999])


def test_literal_special_token_in_text_has_no_word(wordpiece: TextTokenizer) -> None:
    ids, word_ids = wordpiece.encode("the [MASK] is here")
    assert wordpiece.mask_id in ids.tolist()
    assert word_ids[ids == wordpiece.mask_id].tolist() == [-1]


def test_bpe_multi_piece_word_gets_one_word_id(bpe: TextTokenizer) -> None:
    ids, word_ids = bpe.encode("the zyxwvquark returned")
    tokens = [bpe.tokenizer.id_to_token(int(i)) for i in ids]
    rare = [t for t, w in zip(tokens, word_ids) if w == 1]
    assert len(rare) > 1, tokens  # the made-up word is split into several byte-level pieces
    assert rare[0].startswith("\u0120") and not any(t.startswith("\u0120") for t in rare[1:])
    # Each new word (and only a new word) begins with the Ġ space marker after the first word.
    for t, w, prev in zip(tokens[1:], word_ids[1:], word_ids[:-1]):
        assert t.startswith("\u0120") == (w != prev)


def test_wordpiece_continuations_share_word_id(wordpiece: TextTokenizer) -> None:
    ids, word_ids = wordpiece.encode(LONG_TEXT)
    tokens = [wordpiece.tokenizer.id_to_token(int(i)) for i in ids]
    assert any(t.startswith("##") for t in tokens)
    for t, w, prev in zip(tokens[1:], word_ids[1:], word_ids[:-1]):
        assert t.startswith("##") == (w == prev), (t, w, prev)


@pytest.mark.parametrize("which", ["wordpiece", "bpe"])
def test_save_load_round_trip(which: str, wordpiece: TextTokenizer, bpe: TextTokenizer, tmp_path: Path) -> None:
    tok = wordpiece if which == "wordpiece" else bpe
    out = tok.save(tmp_path / "tok")
    assert (out / "tokenizer.json").is_file() and (out / "mmm_tokenizer.json").is_file()
    assert (out / "vocab.txt").is_file() == (which == "wordpiece")
    meta = json.loads((out / "mmm_tokenizer.json").read_text())
    assert meta["lowercase"] is True and meta["roles"]["mask"] == tok.roles["mask"]
    loaded = TextTokenizer.load(out)
    assert (loaded.kind, loaded.lowercase, loaded.vocab()) == (tok.kind, tok.lowercase, tok.vocab())
    for text in CORPUS[:100] + [LONG_TEXT]:
        a, b = tok.encode(text), loaded.encode(text)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_vocab_txt_matches_and_loads(wordpiece: TextTokenizer, tmp_path: Path) -> None:
    from tokenizers import BertWordPieceTokenizer

    out = wordpiece.save(tmp_path)
    lines = (out / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(lines) == wordpiece.vocab_size
    assert all(wordpiece.tokenizer.token_to_id(t) == i for i, t in enumerate(lines))
    reread = BertWordPieceTokenizer(str(out / "vocab.txt"), lowercase=True)
    for text in CORPUS[:100]:
        assert reread.encode(text, add_special_tokens=False).ids == wordpiece.encode(text)[0].tolist()


def test_vocab_txt_loads_in_transformers(wordpiece: TextTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = wordpiece.save(tmp_path)
    hf = transformers.BertTokenizer(str(out / "vocab.txt"), do_lower_case=True)
    for text in CORPUS[:50]:
        assert hf.encode(text, add_special_tokens=False) == wordpiece.encode(text)[0].tolist()


def test_load_errors_name_the_path(wordpiece: TextTokenizer, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        TextTokenizer.load(missing)
    out = wordpiece.save(tmp_path / "t")
    (out / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.load(out)
    out = wordpiece.save(tmp_path / "u")
    (out / "mmm_tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="mmm_tokenizer.json"):
        TextTokenizer.load(out)
    out = wordpiece.save(tmp_path / "v")
    (out / "tokenizer.json").write_text("[]")
    with pytest.raises(ValueError, match="tokenizer.json"):
        TextTokenizer.load(out)


def _check_chunks(tok: TextTokenizer, text: str, max_len: int) -> None:
    ids, word_ids = tok.encode(text)
    pieces = tok.encode_chunks(text, max_len)
    body = max_len - 2
    word_len = np.bincount(word_ids)
    assert len(pieces) >= int(np.ceil(ids.size / body))
    bodies = []
    for p_ids, p_wids in pieces:
        assert p_ids.dtype == np.int64 and p_wids.dtype == np.int64
        assert 3 <= p_ids.size <= max_len and p_ids.shape == p_wids.shape
        assert p_ids[0] == tok.cls_id and p_ids[-1] == tok.sep_id
        assert p_wids[0] == -1 and p_wids[-1] == -1
        inner = p_wids[1:-1]
        assert inner[0] == 0 and set(np.diff(inner).tolist()) <= {0, 1}
        bodies.append(p_ids[1:-1])
    np.testing.assert_array_equal(np.concatenate(bodies), ids)  # nothing dropped, order kept
    # A cut inside a word is only allowed for a word that cannot fit in one piece.
    cut = 0
    for b in bodies[:-1]:
        cut += b.size
        if word_ids[cut] == word_ids[cut - 1]:
            assert word_len[word_ids[cut]] > body, (max_len, cut)


@pytest.mark.parametrize("max_len", [3, 4, 5, 8, 17, 64, 100000])
def test_encode_chunks_cover_everything(max_len: int, wordpiece: TextTokenizer, bpe: TextTokenizer) -> None:
    for tok in (wordpiece, bpe):
        _check_chunks(tok, LONG_TEXT, max_len)


def test_encode_chunks_prefers_word_boundaries(wordpiece: TextTokenizer) -> None:
    ids, word_ids = wordpiece.encode(LONG_TEXT)
    longest = int(np.bincount(word_ids).max())
    assert longest > 1
    max_len = longest + 2 + 3
    pieces = wordpiece.encode_chunks(LONG_TEXT, max_len)
    cut = 0
    for p_ids, _ in pieces[:-1]:
        cut += p_ids.size - 2
        assert word_ids[cut] != word_ids[cut - 1]  # every word fits, so no word is split


def test_encode_chunks_edge_cases(wordpiece: TextTokenizer) -> None:
    assert wordpiece.encode_chunks("", 16) == []
    assert wordpiece.encode_chunks("   \n\t ", 16) == []
    pieces = wordpiece.encode_chunks("hello world", 512)
    assert len(pieces) == 1
    with pytest.raises(ValueError, match="max_len.*2"):
        wordpiece.encode_chunks("hello world", 2)


def test_registry_and_training_validation() -> None:
    tok = TOKENIZERS.create("wordpiece", texts=CORPUS[:200], vocab_size=300)
    assert isinstance(tok, TextTokenizer) and tok.kind == "wordpiece"
    with pytest.raises(RegistryError, match="vocab_sizes"):
        TOKENIZERS.create("bpe", texts=CORPUS, vocab_sizes=300)
    with pytest.raises(ValueError, match="vocab_size.*3"):
        train_wordpiece(CORPUS, vocab_size=3)
    with pytest.raises(ValueError, match="vocab_size.*100"):
        train_bpe(CORPUS, vocab_size=100)
    with pytest.raises(TypeError, match="single str"):
        train_bpe("just one string")
