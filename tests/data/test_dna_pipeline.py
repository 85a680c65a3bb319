"""DNA stages: every base reaches a batch once (long windows cut, none dropped), labels follow their
sequences, reverse complement only in training and seeded, masks, bad samples counted."""
import io
import json
import tarfile
from collections import defaultdict

import numpy as np
import pytest

from datasets_def.dna import build_shards, write_fasta
from mmm.modalities.dna.pipeline import DNAPiece, collate_dna, cut_bases, dna_stages, fit_pieces
from mmm.data.stream import SampleError, SampleErrorHandler, list_shards, make_pipeline
from mmm.masking.base import MaskedTokens
from mmm.modalities.dna.masking import DNASpanMasker
from mmm.modalities.dna.tokenizer import DNACharTokenizer, DNAKmerTokenizer, reverse_complement, train_dna_bpe


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Records of mixed lengths (one window each when short, several when long), labelled by a BED file."""
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("dna_src")
    records = []
    for i, n in enumerate([150, 90, 333, 41, 200, 7, 128]):
        seq = "".join(rng.choice(list("ACGT"), n))
        if i == 2:
            seq = seq[:50] + "NNRY" + seq[54:]  # ambiguity codes stay in the shards
        records.append((f"r{i}", seq))
    fasta = write_fasta(records, src / "g.fa")
    bed = src / "labels.bed"
    bed.write_text("".join(f"r{i}\t0\t{len(s)}\t{i % 3}\n" for i, (_, s) in enumerate(records) if i != 4))
    out = tmp_path_factory.mktemp("dna_shards")
    build_shards(fasta, out, window=100, labels=bed, samples_per_shard=4)
    raw = {s["__key__"]: (s["seq"].decode("ascii"), json.loads(s["json"]))
           for s in make_pipeline(list_shards(out, "train"), stages=[], shuffle_shards=False, shuffle_buffer=0)}
    return list_shards(out, "train"), raw


@pytest.fixture(scope="module")
def bpe(shards):
    _, raw = shards
    return train_dna_bpe([s for s, _ in raw.values()], vocab_size=40, min_frequency=1)


def _batches(urls, tok, masker=None, **kw):
    args = dict(max_len=32, batch_size=5, seed=0, handler=SampleErrorHandler(), fixed_masking=True, train=False)
    args.update(kw)
    return list(make_pipeline(urls, stages=dna_stages(tok, masker, **args), shuffle_shards=False, shuffle_buffer=0))


def _sequences(batch, modality="dna"):
    """(ids of each packed sequence, its extras) in packed order."""
    cu = batch.seq.cu_seqlens.tolist()
    ids = batch.inputs[modality].ids.numpy()
    ex = batch.extras
    return [(ids[a:b], ex["labels"][i].item(), ex["keys"][i], ex["offsets"][i].item(), ex["reverse"][i].item())
            for i, (a, b) in enumerate(zip(cu[:-1], cu[1:]))]


def test_cut_bases_makes_near_equal_pieces():
    assert cut_bases(10, 1) == [0] and cut_bases(11, 2) == [0, 5]  # 5 + 6, not 10 + 1
    for length in range(1, 60):
        for n in range(1, length + 1):
            sizes = np.diff(cut_bases(length, n) + [length])
            assert len(sizes) == n and sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    with pytest.raises(ValueError, match="pieces"):
        cut_bases(5, 0)


def test_fit_pieces_uses_the_fewest_pieces_that_fit(bpe):
    rng = np.random.default_rng(1)
    seq = "".join(rng.choice(list("ACGT"), 500))
    for tok in (DNACharTokenizer(), DNAKmerTokenizer(5, overlapping=True), DNAKmerTokenizer(3, overlapping=False), bpe):
        for max_len in (12, 40, 600):
            pieces = fit_pieces(seq, tok, max_len)
            assert [p[0] for p in pieces] == cut_bases(len(seq), len(pieces)) and pieces[-1][1] == len(seq)
            assert all(len(enc) <= max_len for *_, enc in pieces)
            assert len(pieces) <= -(-len(seq) // tok.max_bases(max_len))
            if len(pieces) > 1:  # one piece fewer would not fit
                fewer = cut_bases(len(seq), len(pieces) - 1) + [len(seq)]
                assert any(len(tok.encode(seq[a:b])) > max_len for a, b in zip(fewer, fewer[1:])) or tok is bpe
    # BPE tokens span several bases: far fewer pieces than the one-base-per-token bound
    assert len(fit_pieces(seq, bpe, 40)) < -(-len(seq) // bpe.max_bases(40))


@pytest.mark.parametrize("which", ["char", "kmer_overlapping", "kmer_3", "bpe"])
def test_every_base_reaches_a_batch_once_with_its_label(shards, bpe, which):
    urls, raw = shards
    tok = {"char": DNACharTokenizer(), "kmer_overlapping": DNAKmerTokenizer(4, overlapping=True),
           "kmer_3": DNAKmerTokenizer(3, overlapping=False), "bpe": bpe}[which]
    max_len = 24
    batches = _batches(urls, tok, max_len=max_len)
    pieces = defaultdict(list)
    for b in batches:
        lengths = np.diff(b.seq.cu_seqlens.numpy())
        assert (np.diff(lengths) <= 0).all() and lengths.max() <= max_len  # longest first, none too long
        assert b.targets["dna"].count == 0  # masker None: no masking
        for ids, label, key, offset, reverse in _sequences(b):
            assert not reverse
            pieces[key].append((offset, ids, label))
    assert sorted(pieces) == sorted(raw)  # every window, none twice
    cut = 0
    for key, parts in pieces.items():
        seq, meta = raw[key]
        parts.sort(key=lambda p: p[0])
        offsets = [p[0] for p in parts] + [len(seq)]
        assert offsets[0] == 0 and len(set(offsets)) == len(offsets)
        cut += len(parts) > 1
        for (start, ids, label), end in zip(parts, offsets[1:]):  # the pieces tile the window exactly
            np.testing.assert_array_equal(ids, tok.encode(seq[start:end]).ids)
            assert label == (-1 if meta["label"] is None else meta["label"])
    assert cut >= 3  # the long windows were cut into several sequences


def test_labels_follow_the_longest_first_order():
    pieces = [DNAPiece(MaskedTokens(np.arange(n, dtype=np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)),
                       label, f"k{label}", 0, False) for n, label in [(3, 0), (7, 1), (5, 2), (7, 3)]]
    batch = collate_dna(pieces)
    assert batch.extras["labels"].tolist() == [1, 3, 2, 0] and batch.extras["keys"] == ["k1", "k3", "k2", "k0"]
    assert np.diff(batch.seq.cu_seqlens.numpy()).tolist() == [7, 7, 5, 3]
    with pytest.raises(ValueError, match="empty"):
        collate_dna([])


def test_reverse_complement_only_in_training_and_seeded(shards):
    urls, raw = shards
    tok = DNACharTokenizer()

    def run(seed, train, p=0.5):
        out = []
        for b in _batches(urls, tok, seed=seed, train=train, reverse_complement=p, fixed_masking=False):
            out += [(key, off, rev, ids.tolist()) for ids, _, key, off, rev in _sequences(b)]
        return out

    assert not any(r for _, _, r, _ in run(0, train=False, p=1.0))  # evaluation streams are never flipped
    first, again, other = run(0, True), run(0, True), run(1, True)
    assert first == again  # the same seed draws the same strands
    assert [r for *_, r, _ in first] != [r for *_, r, _ in other]
    flips = [r for _, _, r, _ in first]
    assert 0 < sum(flips) < len(flips)
    for key, off, rev, ids in first:  # flipped pieces hold the reverse complement of their bases
        seq = raw[key][0]
        n = len(ids) - 2
        piece = seq[off:off + n]
        assert ids == tok.encode(reverse_complement(piece) if rev else piece).ids.tolist()


def test_masks_hide_bases_and_are_reproducible(shards):
    urls, _ = shards
    tok = DNAKmerTokenizer(3, overlapping=True)
    masker = DNASpanMasker(ratio=0.2, span_bases=3, vocab=tok.vocab())
    a = _batches(urls, tok, masker, max_len=40)
    b = _batches(urls, tok, masker, max_len=40)
    plain = _batches(urls, tok, max_len=40)
    for x, y, clean in zip(a, b, plain):
        assert x.targets["dna"].positions.tolist() == y.targets["dna"].positions.tolist()
        t = x.targets["dna"]
        assert t.count > 0
        assert x.extras["keys"] == clean.extras["keys"]
        # labels are the original ids at the predicted stream positions; the rest is untouched
        np.testing.assert_array_equal(t.labels.numpy(), clean.inputs["dna"].ids.numpy()[t.positions.numpy()])
        keep = np.ones(x.num_tokens, bool)
        keep[t.positions.numpy()] = False
        np.testing.assert_array_equal(x.inputs["dna"].ids.numpy()[keep], clean.inputs["dna"].ids.numpy()[keep])
        assert not np.isin(t.labels.numpy(), sorted(tok.special_ids)).any()


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_bad_samples_stop_by_default_and_are_counted_when_skipping(tmp_path):
    shard = tmp_path / "train-000000.tar"
    meta = json.dumps({"label": 1}).encode()
    _shard(shard, [
        ("a", {"seq": b"ACGTACGT", "json": meta}),
        ("b", {"seq": "ACGÄ".encode("utf-8"), "json": meta}),  # not ASCII
        ("c", {"seq": b"ACGXT", "json": meta}),  # not a base
        ("d", {"seq": b"ACGT", "json": b"{not json"}),
        ("e", {"json": meta}),  # no seq
        ("f", {"seq": b"ACGT", "json": json.dumps({"label": "x"}).encode()}),
        ("g", {"seq": b"TTTT"}),  # no json: unlabelled, fine
    ])
    tok = DNACharTokenizer()
    strict = SampleErrorHandler()
    with pytest.raises(SampleError, match=r"sample b: 'seq' is not ASCII") as err:
        _batches([str(shard)], tok, handler=strict)
    assert "train-000000.tar" in str(err.value)  # the shard is named
    lenient = SampleErrorHandler(skip_bad=True)
    batches = _batches([str(shard)], tok, handler=lenient, batch_size=10)
    assert sorted(k for b in batches for k in b.extras["keys"]) == ["a", "g"]
    assert sorted(l for b in batches for l in b.extras["labels"].tolist()) == [-1, 1]
    summary = lenient.summary()
    assert summary["total"] == 5
    text = " ".join(summary["messages"])
    for part in ("'seq' is not ASCII", "invalid base 'X' at position 3", "not valid UTF-8 JSON", "no 'seq' field",
                 "'label' must be a non-negative integer"):
        assert part in text


def test_reverse_complement_probability_is_checked():
    with pytest.raises(ValueError, match="reverse_complement"):
        dna_stages(DNACharTokenizer(), None, max_len=8, batch_size=2, seed=0, handler=SampleErrorHandler(),
                   reverse_complement=1.5)


def test_tokenizer_fitting_skips_and_counts_a_bad_window_when_skipping(tmp_path):
    """Fitting read every window strictly: one bad window raised even where training (data.skip_bad) skips it."""
    from mmm.data.tar import ReadOptions
    from mmm.modalities.dna.codec import iter_samples

    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, seq, meta in (("a", b"ACGTACGT", b"{}"), ("b", b"ACGT", b"[1, 2]"), ("c", b"TTGCA", b"{}")):
            for field, data in (("seq", seq), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"sample 'b': 'json' must be a JSON object"):
        list(iter_samples([str(shard)]))
    assert [seq for seq, _ in iter_samples([str(shard)], ReadOptions(skip_bad=True))] == ["ACGTACGT", "TTGCA"]
