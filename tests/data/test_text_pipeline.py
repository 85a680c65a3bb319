"""Text stages: every token reaches a batch (chunked, not dropped), masks are consistent, bad samples are handled."""
import io
import tarfile

import numpy as np
import pytest

import datasets_def  # noqa: F401
from datasets_def.text import build_shards, iter_texts
from mmm.data.stream import SampleError, SampleErrorHandler, list_shards, make_pipeline
from mmm.modalities.text.pipeline import text_stages
from mmm.masking.token import BertRandomMasker
from mmm.modalities.text.tokenizer import train_wordpiece

WORDS = "the quick brown fox jumps over a lazy dog while masked models predict hidden tokens".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("src")
    for i in range(12):
        n = int(rng.integers(5, 400))  # some documents are far longer than max_len tokens
        (src / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, n)) + ".", encoding="utf-8")
    out = tmp_path_factory.mktemp("shards")
    build_shards(src, out, max_chars=500, samples_per_shard=7)
    tok = train_wordpiece(iter_texts(out), vocab_size=60, min_frequency=1)
    return out, tok


def test_every_token_is_packed_exactly_once(corpus):
    out, tok = corpus
    masker = BertRandomMasker(ratio=0.15, vocab=tok.vocab())
    stages = text_stages(tok, masker, max_len=32, batch_size=5, seed=0, handler=SampleErrorHandler(), fixed_masking=True)
    batches = list(make_pipeline(list_shards(out, "train"), stages=stages, shuffle_shards=False, shuffle_buffer=0))
    expected = sum(len(tok.encode(t)[0]) for t in iter_texts(out))
    seqs = sum(b.num_sequences for b in batches)
    assert sum(b.num_tokens for b in batches) - 2 * seqs == expected  # everything but [CLS]/[SEP]
    for b in batches:
        lens = np.diff(b.seq.cu_seqlens.numpy())
        assert lens.max() <= 32 and b.seq.max_seqlen == lens.max()
        t = b.targets["text"]
        assert (b.inputs["text"].ids[b.seq.cu_seqlens[:-1].long()] == tok.cls_id).all()
        # masked positions hold mask/random/kept tokens and labels are never specials
        assert t.positions.numel() > 0
        assert not np.isin(t.labels.numpy(), list(tok.special_ids)).any()
        assert (t.positions < b.num_tokens).all()


def test_fixed_masking_is_reproducible(corpus):
    out, tok = corpus
    masker = BertRandomMasker(ratio=0.3, vocab=tok.vocab())

    def run():
        st = text_stages(tok, masker, max_len=32, batch_size=4, seed=7, handler=SampleErrorHandler(), fixed_masking=True)
        return [b.targets["text"].positions.tolist() for b in make_pipeline(list_shards(out, "train"), stages=st,
                                                                 shuffle_shards=False, shuffle_buffer=0)]

    assert run() == run()


def _shard_with_bad_sample(path, bad=b"\xff\xfe not utf8"):
    with tarfile.open(path, "w") as tar:
        for key, data in (("a", "good text here".encode()), ("b", bad), ("c", "more good text".encode())):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("bad, message", [(b"\xff\xfe not utf8", r"sample b: 'txt' is not UTF-8"),
                                          (b"  \n\t ", r"sample b: 'txt' is empty \(expected non-blank text: got 5"),
                                          ("\u200b \u200b".encode(), r"sample b: 'txt' is empty .*got 7 byte"),
                                          (b"\x00\x01", r"sample b: 'txt' is empty .*control, format"),
                                          ("\ufffd\ufffd".encode(), r"sample b: 'txt' is empty .*replacement \(U\+FFFD\)"),
                                          ("\u0301\u0300".encode(), r"train-000000.tar: sample b: 'txt' \(2 character\(s\)\) gave no token")],
                         ids=["not-utf8", "blank", "zero-width", "control", "replacement-chars", "accents-only"])
def test_a_bad_sample_stops_by_default_and_is_counted_when_skipping(corpus, tmp_path, bad, message):
    """A blank text would yield no sequence: it is a bad sample like undecodable bytes, never dropped silently."""
    _, tok = corpus
    shard = tmp_path / "train-000000.tar"
    _shard_with_bad_sample(shard, bad)
    masker = BertRandomMasker(vocab=tok.vocab())
    strict = SampleErrorHandler()
    st = text_stages(tok, masker, max_len=16, batch_size=10, seed=0, handler=strict)
    with pytest.raises(SampleError, match=message):
        list(make_pipeline([str(shard)], stages=st, shuffle_buffer=0, handler=strict))
    lenient = SampleErrorHandler(skip_bad=True)
    st = text_stages(tok, masker, max_len=16, batch_size=10, seed=0, handler=lenient)
    batches = list(make_pipeline([str(shard)], stages=st, shuffle_buffer=0, handler=lenient))
    assert sum(b.num_sequences for b in batches) == 2
    assert lenient.summary()["total"] == 1


def test_tokenizer_fitting_skips_and_counts_a_bad_text_when_skipping(tmp_path, caplog):
    """Fitting the tokenizer raised on a text that training (data.skip_bad) would skip and count."""
    import logging

    from mmm.data.tar import ReadOptions
    from mmm.modalities.text.codec import iter_texts as fit_texts

    shard = tmp_path / "train-000000.tar"
    _shard_with_bad_sample(shard)
    with pytest.raises(ValueError, match=r"sample 'b': 'txt' is not UTF-8 at byte offset 0"):
        list(fit_texts([str(shard)]))
    with caplog.at_level(logging.WARNING, logger="mmm.data"):
        assert list(fit_texts([str(shard)], ReadOptions(skip_bad=True))) == ["good text here", "more good text"]
    assert "1 bad sample(s)" in caplog.text
