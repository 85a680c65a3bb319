"""Tests for mmm.data.shard_tools: shard checks, shard stats, and the member-size guard of the streaming reader."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
from pathlib import Path
from typing import Dict, List

import pytest
import webdataset as wds

from datasets_def.text import build_shards, check_sample
from mmm.cli import main
from mmm.data.shard_tools import (
    MemberTooLarge,
    check_shards,
    guarded_tarfile_to_samples,
    shard_stats,
    split_member_name,
)
from mmm.data.stream import SampleError, SampleErrorHandler, list_shards, make_pipeline

WORDS = [1, 2, 3, 5, 8]  # words per document in the hand-made corpus


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """Five one-chunk documents of 1, 2, 3, 5 and 8 words."""
    src = tmp_path / "corpus"
    src.mkdir()
    lines = [json.dumps({"text": " ".join(f"w{i}" for i in range(n))}) for n in WORDS]
    (src / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """Two splits, several shards of 3 samples each (the last one partly filled)."""
    src = tmp_path / "many"
    src.mkdir()
    for d in range(6):
        (src / f"d{d}.txt").write_text(f"Document {d} talks about masked modeling. " * 30, encoding="utf-8")
    out = tmp_path / "shards"
    build_shards(src, out, max_chars=300, samples_per_shard=3, val_fraction=0.3, seed=1)
    return out


def write_tar(path: Path, members: List[tuple]) -> Path:
    """A tar of (name, bytes) members in the given order (names may repeat)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good(key: str) -> List[tuple]:
    return [(f"{key}.json", b'{"doc": 0}'), (f"{key}.txt", f"text of {key}".encode())]


def problems_of(path: Path, **kw) -> List[tuple]:
    return [tuple(p) for p in check_shards(path, **kw).problems]


# ------------------------------------------------------------------------------- check


def test_split_member_name_follows_webdataset() -> None:
    assert split_member_name("a/b/000_1.seg.TXT") == ("a/b/000_1", "seg.txt")
    assert split_member_name("000.json") == ("000", "json")
    assert split_member_name("README") == (None, None)


def test_check_passes_on_built_shards(shards: Path) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    report = check_shards(shards)
    assert report.ok, report.to_text()
    assert report.samples == {s: manifest["splits"][s]["samples"] for s in ("train", "val")}
    assert len(report.shards) == sum(len(v) for v in manifest["shard_files"].values())
    assert "ok: no problems found" in report.to_text()
    val = check_shards(shards, split="val")
    assert val.ok and set(val.samples) == {"val"}


@pytest.mark.parametrize("cut,where,message", [
    (2600, "g.json", "unreadable tar at byte 3072, after member 'g.json': ReadError: unexpected end of data"),
    (2560, "g.json", "unreadable tar while reading member 'g.json' (10 bytes from byte 2560)"),
    (2100, "f.txt", "unreadable tar at byte 2048, after member 'f.txt': the stream ends inside a member header"),
    (3072, "g.json", "at byte 3072, after member 'g.json': the stream ends without the end-of-archive marker"),
    (4096, "g.txt", "at byte 4096, after member 'g.txt': the stream ends without the end-of-archive marker"),
])
def test_truncated_tar_names_shard_byte_and_member(tmp_path: Path, cut: int, where: str, message: str) -> None:
    bad = write_tar(tmp_path / "train-000000.tar", good("f") + good("g") + good("h"))
    write_tar(tmp_path / "train-000001.tar", good("i"))
    bad.write_bytes(bad.read_bytes()[:cut])  # members are 512-byte headers + data padded to 512
    report = check_shards(tmp_path)
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].shard == str(bad) and report.problems[0].where == where
    assert message in report.problems[0].problem and "the rest of this shard was not checked" in report.problems[0].problem
    assert len(report.shards) == 2 and report.samples["train"] >= 1  # the next shard was still read


def test_truncated_built_shard_is_one_problem(shards: Path) -> None:
    bad = sorted(shards.glob("train-*.tar"))[0]
    bad.write_bytes(bad.read_bytes()[:1700])
    report = check_shards(shards, split="train")
    assert [(p.shard, "unreadable tar" in p.problem) for p in report.problems] == [(str(bad), True)]


def test_garbage_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "train-000000.tar").write_bytes(b"not a tar" * 100)
    write_tar(tmp_path / "train-000001.tar", good("a") + good("b"))
    report = check_shards(tmp_path)
    assert [Path(p.shard).name for p in report.problems] == ["train-000000.tar"]
    assert "unreadable tar at byte 0, before any member" in report.problems[0].problem
    assert report.samples == {"train": 2}


@pytest.mark.parametrize("members,where,message", [
    ([("k.json", b"{}"), ("k.txt", b"ok \xff\xfe")] , "k", "field 'txt' is not valid UTF-8 at byte offset 3"),
    ([("k.json", b"{}"), ("k.txt", b"  \n ")], "k", "field 'txt' is empty"),
    ([("k.json", b"{}"), ("k.txt", " \ufffd\ufffd\n".encode())], "k",
     "field 'txt' is empty (expected non-blank text: got 8 byte(s) of whitespace, control, format or replacement"),
    ([("k.txt", b"only text")], "k", "missing field(s) ['json']"),
    ([("k.json", b"{bad json"), ("k.txt", b"hi")], "k", "field 'json' is not valid JSON"),
    ([("k.json", b"[1, 2]"), ("k.txt", b"hi")], "k", "field 'json' must be a JSON object, got list"),
    ([("k.json", b"{}"), ("k.txt", b"hi"), ("k.png", b"x")], "k", "unexpected field(s) ['png']"),
    (good("k") + good("z") + good("k"), "k", "duplicate key: sample 'k' appears again"),
    (good("k") + [("k.txt", b"again")], "k.txt", "duplicate key: field 'txt' of sample 'k' appears twice"),
    ([("noext", b"x")] + good("k"), "noext", "member name has no extension"),
])
def test_bad_samples_are_named(tmp_path: Path, members: List[tuple], where: str, message: str) -> None:
    shard = write_tar(tmp_path / "train-000000.tar", good("a") + members + good("b"))
    problems = problems_of(tmp_path)
    assert len(problems) == 1, problems
    assert problems[0][0] == str(shard) and problems[0][1] == where and message in problems[0][2]


def test_check_sample_on_the_dataset_definition() -> None:
    assert check_sample({"txt": b"hello", "json": b'{"a": 1}'}) is None
    both = check_sample({"txt": b"\xc3", "json": b"3"})
    assert "'txt' is not valid UTF-8" in both and "'json' must be a JSON object, got int" in both


def test_manifest_count_mismatch(shards: Path) -> None:
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["splits"]["train"]["samples"] += 1
    path.write_text(json.dumps(manifest))
    last = sorted(manifest["shard_files"]["train"])[-1]
    problems = problems_of(shards)
    assert len(problems) == 1
    assert problems[0][1] == last and "but the manifest implies" in problems[0][2]


def test_manifest_lists_a_missing_shard_and_total_check_without_samples_per_shard(shards: Path) -> None:
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    gone = sorted(manifest["shard_files"]["val"])[0]
    (shards / gone).unlink()
    del manifest["build_args"]["samples_per_shard"]
    manifest["splits"]["train"]["samples"] -= 2
    path.write_text(json.dumps(manifest))
    problems = problems_of(shards)
    assert (str(path), gone, "shard listed in the manifest for split 'val' is missing") in problems
    assert any(p[1] == "train" and "but the manifest says" in p[2] for p in problems)
    assert len(problems) == 2


def test_broken_manifest_is_a_problem(shards: Path) -> None:
    (shards / "manifest.json").write_text("{not json")
    problems = problems_of(shards)
    assert len(problems) == 1 and problems[0][1] == "manifest.json" and "cannot read manifest" in problems[0][2]


def test_check_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        check_shards(tmp_path / "nope")


# ------------------------------------------------------------------------------- stats


def test_stats_word_counts_are_exact(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_shards(corpus, out, samples_per_shard=2)
    stats = shard_stats(out)
    texts = [" ".join(f"w{i}" for i in range(n)) for n in WORDS]
    assert stats.unit == "words" and stats.shards == 3
    assert stats.samples == {"train": 5} and stats.total_samples == 5
    assert stats.characters == sum(len(t) for t in texts)
    assert stats.total_units == sum(WORDS) == 19
    assert stats.percentiles() == {"min": 1, "p50": 3, "p90": 8, "p99": 8, "max": 8}
    hist = stats.histogram()
    assert hist == [("1", 1), ("2-3", 2), ("4-7", 1), ("8-15", 1)]
    assert sum(n for _, n in hist) == stats.total_samples
    md = stats.to_markdown()
    assert "whitespace-separated words (no tokenizer given" in md and "| 8-15 | 1 | 20.0% |" in md
    assert stats.sequences is None


def test_stats_with_tokenizer_counts_tokens_and_sequences(shards: Path, tmp_path: Path) -> None:
    from datasets_def.text import iter_texts
    from mmm.modalities.text.tokenizer import train_wordpiece

    texts = list(iter_texts(shards, "train")) + list(iter_texts(shards, "val"))
    tok = train_wordpiece(texts, vocab_size=60, min_frequency=1)
    tok_dir = tok.save(tmp_path / "tok")
    stats = shard_stats(shards, tokenizer=str(tok_dir), max_len=16, batch_size=4)
    lengths = [len(tok.encode(t)[0]) for t in texts]
    pieces = [len(tok.encode_chunks(t, 16)) for t in texts]
    assert stats.unit == "tokens" and stats.total_samples == len(texts)
    assert stats.total_units == sum(lengths) and stats.percentiles()["max"] == max(lengths)
    assert stats.sequences == sum(pieces) > len(texts)
    assert stats.samples_split == sum(p > 1 for p in pieces)
    assert sum(n for _, n in stats.histogram()) == len(texts)
    assert json.loads(json.dumps(stats.to_dict()))["sequences"] == stats.sequences


def test_stats_of_image_text_shards_count_each_caption(tmp_path: Path, shards: Path) -> None:
    """Image-text samples hold several captions, each trained as its own pair: stats joined them into one text."""
    from datasets_def.text import iter_texts
    from mmm.modalities.text.tokenizer import train_wordpiece

    caps = [["a red square", "the square is red on the left"], ["blue circle"],
            ["two green triangles near a big yellow star", "stars", "a triangle"]]
    members = []
    for i, c in enumerate(caps):
        members += [(f"{i:03d}.png", b"not decoded by stats"), (f"{i:03d}.txt", "\n".join(c).encode()),
                    (f"{i:03d}.json", json.dumps({"label": 0}).encode())]
    (tmp_path / "vl").mkdir()
    write_tar(tmp_path / "vl" / "train-000000.tar", members)
    stats = shard_stats(tmp_path / "vl", dataset="image_text")
    flat = [x for c in caps for x in c]
    assert stats.text == "caption" and stats.total_samples == 3 and stats.total_texts == len(flat) == 6
    assert stats.total_units == sum(len(x.split()) for x in flat)
    assert stats.percentiles()["max"] == 8 and stats.percentiles()["min"] == 1
    md = stats.to_markdown()
    assert "| captions | 6 |" in md and "| words per caption (mean) | 3.8 |" in md
    tok = train_wordpiece(list(iter_texts(shards, "train")) + flat, vocab_size=80, min_frequency=1)
    with_tok = shard_stats(tmp_path / "vl", dataset="image_text", tokenizer=str(tok.save(tmp_path / "tok")), max_len=6)
    lengths = [len(tok.encode(x)[0]) for x in flat]
    assert with_tok.sequences == 6 and with_tok.samples_split == sum(n + 2 > 6 for n in lengths) > 0
    assert "captions cut at max_len (their ends are not trained)" in with_tok.to_markdown()


def test_stats_bad_input_is_a_named_error(tmp_path: Path, shards: Path) -> None:
    with pytest.raises(ValueError, match="max_len needs a tokenizer"):
        shard_stats(shards, max_len=64)
    write_tar(tmp_path / "train-000000.tar", good("a") + [("b.txt", b"\xff")])
    with pytest.raises(ValueError, match=r"train-000000.tar sample 'b': 'txt' is not UTF-8"):
        shard_stats(tmp_path)


# ------------------------------------------------------------------------------- member-size guard


def keys(pipeline) -> List[str]:
    return [s["__key__"] for s in pipeline]


def test_guarded_reader_matches_webdataset(shards: Path) -> None:
    urls = list_shards(shards)
    ours = list(make_pipeline(urls, stages=[], shuffle_shards=False, shuffle_buffer=0, max_member_bytes=10_000))
    theirs = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    assert len(ours) == len(theirs) > 0
    assert ours == theirs  # same keys, urls and field bytes
    assert list(make_pipeline(urls, stages=[], shuffle_shards=False, shuffle_buffer=0)) == theirs  # no limit


@pytest.fixture()
def oversized(tmp_path: Path) -> Path:
    return write_tar(tmp_path / "train-000000.tar",
                     good("a") + [("big.json", b"{}"), ("big.txt", b"x" * 5000)] + good("c"))


def test_guard_refuses_oversized_member_by_default(oversized: Path) -> None:
    pipe = make_pipeline([str(oversized)], stages=[], shuffle_buffer=0, max_member_bytes=1000)
    with pytest.raises(SampleError) as info:
        keys(pipe)
    message = str(info.value)
    for part in (oversized.name, "'big'", "'txt'", "5000 bytes", "max_member_bytes=1000", "skip_bad"):
        assert part in message


def test_guard_skips_and_counts_with_skip_bad(oversized: Path) -> None:
    handler = SampleErrorHandler(skip_bad=True)
    pipe = make_pipeline([str(oversized)], stages=[], handler=handler, shuffle_buffer=0, max_member_bytes=1000)
    assert keys(pipe) == ["a", "c"]
    assert handler.summary()["by_type"] == {"MemberTooLarge": 1}
    assert "5000 bytes" in handler.summary()["messages"][0]


def test_guard_drops_a_sample_with_a_repeated_field_and_truncated_shards(tmp_path: Path) -> None:
    write_tar(tmp_path / "train-000000.tar", good("a") + good("d") + [("d.txt", b"again")] + good("e"))
    cut = write_tar(tmp_path / "train-000001.tar", good("f") + good("g") + good("h"))
    cut.write_bytes(cut.read_bytes()[:2100])  # inside g.json's header: webdataset's reader would end the shard silently
    handler = SampleErrorHandler(skip_bad=True)
    pipe = make_pipeline(list_shards(tmp_path), stages=[], handler=handler, shuffle_shards=False,
                         shuffle_buffer=0, max_member_bytes=1000)
    got = keys(pipe)
    assert got == ["a", "e"]  # "f" was being assembled when its shard broke: dropped with the rest
    assert handler.summary()["by_type"] == {"ShardReadError": 1, "ValueError": 1}


def test_guard_never_reads_the_oversized_member_into_memory(tmp_path: Path) -> None:
    big = 64 * 2**20  # 64 MiB of zeros, gzip-compressed to ~64 KiB: a small decompression bomb
    raw = tmp_path / "bomb.tar"
    with tarfile.open(raw, "w") as tar:
        for name, data in good("a"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("bomb.txt")
        info.size = big
        tar.addfile(info, io.BytesIO(bytes(big)))
        for name, data in good("z"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = tmp_path / "train-000000.tar.gz"
    shard.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=1))
    raw.unlink()
    handler = SampleErrorHandler(skip_bad=True)
    stage = guarded_tarfile_to_samples(2**20, handler=handler)
    tracemalloc.start()
    try:
        got = [s["__key__"] for s in stage(iter([{"url": str(shard)}]))]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == ["a", "z"] and handler.total == 1
    # tarfile inflates one 10 KiB compressed block at a time (up to ~10 MiB of zeros); never the whole member
    assert peak < 16 * 2**20, f"peak {peak} bytes: the oversized member was read into memory"


def test_guard_argument_checked() -> None:
    with pytest.raises(ValueError, match="max_member_bytes must be a positive int"):
        guarded_tarfile_to_samples(0)
    stop_at_first: Dict[str, int] = {"calls": 0}

    def stop(exn: Exception) -> bool:
        stop_at_first["calls"] += 1
        return False

    assert list(guarded_tarfile_to_samples(None, handler=stop)(iter([{"url": "/nope.tar"}, {"url": "/nope2.tar"}]))) == []
    assert stop_at_first["calls"] == 1
    with pytest.raises(MemberTooLarge):
        raise MemberTooLarge("importable for callers that catch it")


# ------------------------------------------------------------------------------- CLI


def test_cli_check_exit_codes(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["shards", "check", str(shards)]) == 0
    assert "ok: no problems found" in capsys.readouterr().out
    (tmp_path / "bad").mkdir()
    write_tar(tmp_path / "bad" / "train-000000.tar", good("a") + [("b.txt", b"only")])
    assert main(["shards", "check", str(tmp_path / "bad"), "--split", "train"]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and "train-000000.tar [b]: missing field(s) ['json']" in out
    assert main(["shards", "check", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    assert main(["shards", "check", str(shards), "--dataset", "nope"]) == 2


def test_cli_stats_prints_and_writes_json(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    build_shards(corpus, out)
    assert main(["shards", "stats", str(out), "--json", str(tmp_path / "stats.json")]) == 0
    printed = capsys.readouterr().out
    assert "| words | 19 |" in printed and "| 2-3 | 2 | 40.0% |" in printed
    data = json.loads((tmp_path / "stats.json").read_text())
    assert data["total_units"] == 19 and data["percentiles"]["p50"] == 3
    assert main(["shards", "stats", str(out), "--max_len", "64"]) == 2
    assert "max_len needs a tokenizer" in capsys.readouterr().err


def test_check_accepts_the_embedded_image_shards():
    """Image shards carry one of jpg/png/webp (optional fields) beside the required json."""
    from mmm.data.shard_tools import check_shards
    from mmm.registry import DATASETS

    report = check_shards(DATASETS.create("image").embedded_default(), dataset="image", split="val")
    assert report.ok, report.to_text()


def test_check_and_stats_read_the_dataset_the_manifest_names(tmp_path: Path) -> None:
    """``mmm shards check DIR`` checked every folder as text unless given ``--dataset``: a sound DNA (image,
    audio, image-text) shard folder was all problems. The manifest every builder writes names the dataset."""
    from datasets_def.dna import build_shards as build_dna

    fasta = tmp_path / "g.fa"
    fasta.write_text(">chr1\n" + "ACGT" * 200 + "\n>chr2\n" + "TTGCA" * 150 + "\n", encoding="utf-8")
    build_dna(fasta, tmp_path / "dna", window=100, samples_per_shard=8)
    report = check_shards(tmp_path / "dna")
    assert report.ok and report.dataset == "dna", report.to_text()
    assert check_shards(tmp_path / "dna" / "train-000000.tar").dataset == "dna"  # a file: its folder's manifest
    assert check_shards(f"file:{tmp_path / 'dna'}").dataset == "dna"
    with pytest.raises(ValueError, match=r"dataset 'text' given, but .*manifest.json says these are 'dna' shards"):
        check_shards(tmp_path / "dna", dataset="text")
    with pytest.raises(ValueError, match="dataset 'dna' has fields"):  # stats count text: a clear refusal
        shard_stats(tmp_path / "dna")
