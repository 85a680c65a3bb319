"""Tests for the DNA dataset definition: windows, FASTA shards, labels, bad input, embedded genome."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from datasets_def import dna as dnadef
from datasets_def.dna import (
    DNABuildError,
    build_shards,
    check_sample,
    embedded_default,
    iter_samples,
    iter_sequences,
    labels_of,
    read_labels,
    window_starts,
)
from mmm.data.shard_tools import check_shards
from mmm.registry import DATASETS


def random_seq(rng: np.random.Generator, n: int, alphabet: str = "ACGT") -> str:
    return "".join(rng.choice(list(alphabet), size=n))


def fasta_text(records: List[Tuple[str, str]], width: int = 60, newline: str = "\n") -> str:
    lines = []
    for rid, seq in records:
        lines.append(f">{rid} some description")
        lines += [seq[i : i + width] for i in range(0, len(seq), width)]
    return newline.join(lines) + newline


def samples(out: Path, split: str = "train") -> List[Tuple[str, Dict]]:
    return list(iter_samples(out, split))


def test_window_starts_keep_the_tail() -> None:
    assert window_starts(10, 4, 4) == [(0, 4), (4, 8), (6, 10)]  # last window aligned to the end
    assert window_starts(12, 4, 4) == [(0, 4), (4, 8), (8, 12)]
    assert window_starts(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert window_starts(3, 4, 4) == [(0, 3)]  # shorter record: one shorter window
    assert window_starts(3, 4, 4, min_window=4) == []
    assert window_starts(20, 4, 8) == [(0, 4), (8, 12), (16, 20)]  # stride > window skips on request
    for length in range(1, 40):
        for window, stride in [(5, 5), (5, 3), (7, 2)]:
            spans = window_starts(length, window, stride)
            covered = np.zeros(length, dtype=bool)
            for a, b in spans:
                assert b - a == min(window, length)
                covered[a:b] = True
            assert covered.all()


def test_build_plain_gz_crlf_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    recs = {f"r{i}": random_seq(rng, int(rng.integers(20, 300)), "ACGTacgtNRY") for i in range(12)}
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    items = list(recs.items())
    (src / "a.fa").write_text(fasta_text(items[:4]), encoding="ascii")
    with gzip.open(src / "sub" / "b.fasta.gz", "wt", encoding="ascii") as fh:
        fh.write(fasta_text(items[4:8]))
    (src / "c.fna").write_bytes(fasta_text(items[8:], newline="\r\n").encode("ascii"))  # Windows line endings
    (src / "notes.txt").write_text("not read\n")
    out = tmp_path / "out"
    report = build_shards(src, out, window=50, stride=40, samples_per_shard=7, val_fraction=0.3, seed=3)
    assert report.files == 3 and report.total_records == 12 and not report.skipped
    assert report.records["val"] > 0 and report.records["train"] > 0
    seen: Dict[str, List[Tuple[int, int]]] = {}
    split_of: Dict[str, str] = {}
    for split in ("train", "val"):
        for seq, meta in samples(out, split):
            rid = meta["record"]
            assert split_of.setdefault(rid, split) == split  # a record never straddles splits
            assert seq == recs[rid][meta["start"] : meta["end"]].upper()
            assert meta["strand"] == "+" and meta["label"] is None and meta["source"].endswith((".fa", ".gz", ".fna"))
            seen.setdefault(rid, []).append((meta["start"], meta["end"]))
    for rid, seq in recs.items():
        assert seen[rid] == window_starts(len(seq), 50, 40)  # every window, tail included
    manifest = json.loads((out / "manifest.json").read_text())
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["samples"] == report.windows[split] == len(samples(out, split))
        assert info["records"] == report.records[split] and info["shards"] == len(report.shards[split])
        assert info["bases"] == sum(len(s) for s in iter_sequences(out, split))
    assert manifest["skipped"] == [] and manifest["build_args"]["window"] == 50
    assert check_shards(out, dataset="dna").ok  # the shared shard checker accepts them (uses check_sample)
    # Same input, same shards: deterministic.
    again = build_shards(src, tmp_path / "again", window=50, stride=40, samples_per_shard=7, val_fraction=0.3, seed=3)
    assert again.windows == report.windows
    assert [(s, m) for s, m in samples(tmp_path / "again")] == samples(out)


def test_labels_from_bed_take_the_largest_overlap(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "g.fa").write_text(fasta_text([("chr1", random_seq(rng, 100)), ("chr2", random_seq(rng, 30))]))
    bed = tmp_path / "l.bed"
    bed.write_text("track name=x\n# comment\nchr1\t0\t30\tpromoter\nchr1\t25\t60\tenhancer\nchr1 60 65 promoter\n"
                   "chr2\t0\t30\tenhancer\nchrX\t0\t5\tpromoter\n")
    report = build_shards(tmp_path / "g.fa", tmp_path / "out", window=20, labels=bed)
    got = {(m["record"], m["start"]): (m["label"], m["label_name"]) for _, m in samples(tmp_path / "out")}
    # names sorted: enhancer=0, promoter=1
    assert got[("chr1", 0)] == (1, "promoter")
    assert got[("chr1", 20)] == (0, "enhancer")  # promoter 20-30 (10 bases) < enhancer 25-40 (15)
    assert got[("chr1", 40)] == (0, "enhancer")
    assert got[("chr1", 60)] == (1, "promoter")
    assert got[("chr1", 80)] == (None, None)
    assert got[("chr2", 0)] == (0, "enhancer") and got[("chr2", 10)] == (0, "enhancer")
    assert report.label_names == {0: "enhancer", 1: "promoter"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["labels"]["counts"]["train"] == {"promoter": 2, "enhancer": 4, "null": 1}
    assert manifest["labels"]["records_not_in_fasta"] == {"count": 1, "first": ["chrX"]}
    assert labels_of(tmp_path / "out").tolist().count(-1) == 1


def test_labels_tsv_with_header_ties_and_errors(tmp_path: Path) -> None:
    tsv = tmp_path / "l.tsv"
    tsv.write_text("record\tstart\tend\tlabel\nr\t0\t10\t7\nr\t10\t20\t3\n")
    lab = read_labels(tsv)
    assert lab.names == {3: "3", 7: "7"}  # integer names keep their value
    assert lab.label("r", 5, 15) == 7  # tie: the interval listed first
    assert lab.label("r", 8, 20) == 3 and lab.label("r", 20, 30) is None and lab.label("q", 0, 5) is None
    bed = tmp_path / "l.bed"
    bed.write_text("chr1\t0\t10\t0\nchr1\t10\t20\t7\n")
    assert read_labels(bed).names == {0: "0", 7: "7"}


@pytest.mark.parametrize("rows,message", [
    ("chr1\t0\t10\tx\nchr1\t20\tten\tx\n", r"bad.bed:2: start and end must be integers"),
    ("chr1\t10\t5\tx\n", r"bad.bed:1: need 0 <= start < end"),
    ("chr1\t0\t5\n", "expected 4 columns"),
    # integer names are the class ids: -1 would be built, then refused by every reader of the shards (the
    # codec wants ids >= 0), and "01" beside "1" would merge two names into one class
    ("chr1\t0\t10\t-1\nchr1\t10\t20\t1\n", r"bad.bed: label '-1' is a negative integer"),
    ("chr1\t0\t10\t01\nchr1\t10\t20\t1\n", r"labels \['01', '1'\] name the same class id 1"),
])
def test_bad_labels_files_are_refused_naming_the_file(tmp_path: Path, rows: str, message: str) -> None:
    bad = tmp_path / "bad.bed"
    bad.write_text(rows)
    with pytest.raises(DNABuildError, match=message):
        read_labels(bad)


def test_bad_input_errors_and_skip_bad(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    good = random_seq(rng, 40)
    (src / "a.fa").write_text(f">ok1\n{good}\n>empty desc\n>gap\nACGT\nAC-GT\n>ok2\n{good}\n")
    (src / "b.fa").write_text("this is not fasta\nACGT\n")
    (src / "c.fa.gz").write_bytes(b"not gzip at all")
    (src / "d.fa").write_bytes(b">x\nAC\xff\xfeGT\n")
    with pytest.raises(DNABuildError) as info:
        build_shards(src, tmp_path / "o1", window=10)
    assert "a.fa: record 'empty': empty record" in str(info.value) and "skip_bad" in str(info.value)
    (src / "a.fa").write_text(f">gap\nACGT\nAC-GT\n")
    with pytest.raises(DNABuildError, match=r"a.fa: record 'gap': invalid character '-' at position 6"):
        build_shards(src, tmp_path / "o2", window=10)
    (src / "a.fa").write_text(f">ok1\n{good}\n>empty desc\n>gap\nACGT\nAC-GT\n>ok2\n{good}\n")
    out = tmp_path / "o3"
    report = build_shards(src, out, window=10, skip_bad=True)
    where = [w for w, _ in report.skipped]
    assert where == ["a.fa: record 'empty'", "a.fa: record 'gap'", "b.fa", "c.fa.gz", "d.fa"]
    reasons = dict(report.skipped)
    assert "not a FASTA file: line 1" in reasons["b.fa"] and "cannot read" in reasons["c.fa.gz"]
    assert report.total_records == 2 and report.total_windows == 8
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s[0] for s in manifest["skipped"]] == where and manifest["splits"]["train"]["samples"] == 8
    with pytest.raises(DNABuildError, match="already holds shards"):
        build_shards(src, out, window=10, skip_bad=True)
    assert build_shards(src, out, window=10, skip_bad=True, overwrite=True).total_windows == 8


def test_a_repeated_record_id_in_one_file_is_bad_input(tmp_path: Path) -> None:
    """Two records named alike in one FASTA file: their windows' record names, and the BED labels keyed by
    them, would be ambiguous. The same id in two files stays allowed (each file is its own source)."""
    rng = np.random.default_rng(1)
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.fa").write_text(f">chr1\n{random_seq(rng, 30)}\n>chr2 x\n{random_seq(rng, 30)}\n>chr1 again\n{random_seq(rng, 30)}\n")
    (src / "b.fa").write_text(f">chr1\n{random_seq(rng, 30)}\n")
    with pytest.raises(DNABuildError, match=r"a.fa: record 'chr1': duplicate record id: record 3 of the file repeats "
                                            r"the id of record 1"):
        build_shards(src, tmp_path / "o1", window=10)
    report = build_shards(src, tmp_path / "o2", window=10, skip_bad=True)
    assert [w for w, _ in report.skipped] == ["a.fa: record 'chr1'"]
    assert report.total_records == 3 and report.total_windows == 9


def test_short_records_n_windows_and_argument_errors(tmp_path: Path) -> None:
    (tmp_path / "g.fa").write_text(">tiny\nACG\n>long\n" + "ACGT" * 5 + "N" * 10 + "\n")
    report = build_shards(tmp_path / "g.fa", tmp_path / "o", window=10, min_window=5, max_n_fraction=0.5)
    assert report.short_records == [("g.fa", "tiny")] and report.windows_dropped_n == 1 and report.total_windows == 2
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["short_records"]["count"] == 1 and manifest["windows_dropped_n"] == 1
    with pytest.raises(DNABuildError, match="no windows written"):
        build_shards(tmp_path / "g.fa", tmp_path / "o2", window=100, min_window=50)
    with pytest.raises(DNABuildError, match="window must be"):
        build_shards(tmp_path / "g.fa", tmp_path / "o3", window=0)
    with pytest.raises(DNABuildError, match="expected a FASTA file"):
        build_shards(tmp_path / "o" / "manifest.json", tmp_path / "o4")
    with pytest.raises(FileNotFoundError):
        build_shards(tmp_path / "missing.fa", tmp_path / "o5")


def test_check_sample() -> None:
    meta = json.dumps({"record": "r", "start": 0, "end": 4, "strand": "+"}).encode()
    assert check_sample({"seq": b"ACGN", "json": meta}) is None
    assert "invalid base 'a' at position 2" in check_sample({"seq": b"ACaN", "json": meta})
    assert "end - start = 4 but 'seq' has 3" in check_sample({"seq": b"ACG", "json": meta})
    assert "not ASCII" in check_sample({"seq": "AC\u00e9".encode(), "json": meta})
    assert "JSON object" in check_sample({"seq": b"ACGT", "json": b"[1]"})
    assert "empty" in check_sample({"seq": b""})


def test_embedded_default_builds_once_with_balanced_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMM_CACHE_DIR", str(tmp_path / "cache"))
    ds = DATASETS.create("dna")
    assert ds.name == "dna" and ds.fields == ("seq", "json")
    path = ds.embedded_default()
    assert path == tmp_path / "cache" / "datasets" / "dna-synthetic-motifs-v1" and (path / "DONE").is_file()
    assert embedded_default() == path  # cached
    manifest = json.loads((path / "manifest.json").read_text())
    counts = manifest["labels"]["counts"]
    assert set(counts["train"]) == set(dnadef.CLASS_NAMES) and set(counts["val"]) == set(dnadef.CLASS_NAMES)
    for split in ("train", "val"):
        n = np.array(list(counts[split].values()))
        assert n.min() == n.max() > 0  # exactly balanced per split
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 3000
    val = samples(path, "val")
    assert all(len(s) == 256 and m["label"] is not None for s, m in val)
    # Motif windows carry their motifs at the positions motifs.bed lists.
    motifs = [line.split("\t") for line in (path / "motifs.bed").read_text().splitlines()]
    by_window = {(m["record"], m["start"]): (s, m) for s, m in val}
    checked = 0
    for rec, a, b, name in motifs:
        a, b = int(a), int(b)
        hit = by_window.get((rec, a - a % 256))
        if hit:
            assert hit[1]["label_name"] == name.strip()
            checked += 1
    assert checked > 0
    # Deterministic generator.
    g1, g2 = (dnadef.synthetic_genome(n_records=2, segments_per_record=5) for _ in range(2))
    assert g1.records == g2.records and g1.motifs == g2.motifs


def test_uppercase_gz_fasta_and_bed_are_decompressed_and_read_as_such(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    recs = [("chr1", random_seq(rng, 80)), ("chr2", random_seq(rng, 45))]
    src = tmp_path / "in"
    src.mkdir()
    with gzip.open(src / "GENOME.FA.GZ", "wt", encoding="ascii") as fh:  # found by the finder in any case
        fh.write(fasta_text(recs))
    with gzip.open(tmp_path / "PEAKS.BED.Gz", "wt", encoding="ascii") as fh:  # BED: track line, spaces
        fh.write("track name=peaks\nchr1 0 40 promoter\nchr2 0 45 enhancer\n")
    report = build_shards(src, tmp_path / "out", window=40, labels=tmp_path / "PEAKS.BED.Gz")
    assert not report.skipped and report.total_records == 2
    got = {(m["record"], m["start"]): (seq, m["label_name"]) for seq, m in samples(tmp_path / "out")}
    assert got[("chr1", 0)] == (recs[0][1][:40], "promoter") and got[("chr2", 0)] == (recs[1][1][:40], "enhancer")
