"""Tests for the text dataset definition: chunking, shard building, bad input, embedded corpus."""
from __future__ import annotations

import json
import sys
import random
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import datasets_def  # noqa: F401  (registers "text")
from datasets_def import text as textdef
from datasets_def.text import TextBuildError, TextDatasetDef, build_shards, embedded_default, iter_texts, split_text
from mmm.data.stream import list_shards, make_pipeline
from mmm.registry import DATASETS


def nonspace(s: str) -> str:
    return "".join(s.split())


def random_document(rng: random.Random) -> str:
    words = ["alpha", "be", "gamma.", "delta!", "epsilon?", "zeta,", "(eta)", "théta", "日本語", "x" * rng.randint(1, 40)]
    paragraphs = []
    for _ in range(rng.randint(1, 6)):
        n = rng.randint(0, 120)
        sep = [" ", "  ", "\n", "\t"]
        paragraphs.append("".join(rng.choice(words) + rng.choice(sep) for _ in range(n)))
    if rng.random() < 0.3:
        paragraphs.append("y" * rng.randint(50, 700))  # one enormous token: needs hard cuts
    return rng.choice(["\n\n", "\n \n", "\n\n\n"]).join(paragraphs)


@pytest.mark.parametrize("max_chars", [1, 7, 50, 200])
def test_split_text_loses_no_content_and_respects_max(max_chars: int) -> None:
    rng = random.Random(max_chars)
    for _ in range(60):
        doc = random_document(rng)
        chunks = split_text(doc, max_chars)
        assert all(0 < len(c) <= max_chars and c == c.strip() for c in chunks)
        assert nonspace("".join(chunks)) == nonspace(doc)


def test_split_text_prefers_paragraph_then_sentence_boundaries() -> None:
    para = "First paragraph has words. " * 3
    doc = para.strip() + "\n\n" + "Second one is here. It has two sentences."
    assert split_text(doc, 100) == [para.strip(), "Second one is here. It has two sentences."]
    sentences = "One two three four. Five six seven eight. Nine ten eleven twelve."
    assert split_text(sentences, 45) == ["One two three four. Five six seven eight.", "Nine ten eleven twelve."]
    assert split_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert split_text("  \n ", 10) == []


def write_corpus(root: Path) -> Dict[Tuple[str, int], str]:
    """A folder of .txt and .jsonl files; returns the expected documents by (source, doc)."""
    rng = random.Random(0)
    docs: Dict[Tuple[str, int], str] = {}
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        doc = random_document(rng) + " end"
        (root / "sub" / f"doc{i}.txt").write_text(doc, encoding="utf-8")
        docs[(f"sub/doc{i}.txt", 0)] = doc
    lines = []
    for i in range(30):
        doc = random_document(rng) + " fin"
        lines.append(json.dumps({"text": doc, "id": i}))
        docs[("b.jsonl", i)] = doc
    (root / "b.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return docs


def test_build_shards_round_trip_and_manifest(tmp_path: Path) -> None:
    expected = write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    report = build_shards(tmp_path / "in", out, max_chars=60, samples_per_shard=50, val_fraction=0.3, seed=1)
    assert report.files == 5 and report.total_documents == len(expected) and not report.skipped
    assert report.documents["val"] > 0 and report.documents["train"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    for split in ("train", "val"):
        assert manifest["splits"][split]["samples"] == report.chunks[split]
        assert manifest["splits"][split]["shards"] == len(report.shards[split]) == len(list_shards(out, split))
        assert manifest["splits"][split]["characters"] == sum(len(t) for t in iter_texts(out, split))
    assert manifest["build_args"]["max_chars"] == 60 and manifest["skipped"] == []
    assert len(list_shards(out, "train")) > 1  # 50 samples per shard -> several shards

    # Read back through the generic pipeline: every document comes back whole, in one split.
    pieces: Dict[Tuple[str, int], List[Tuple[int, str, str]]] = defaultdict(list)
    for split in ("train", "val"):
        for s in make_pipeline(list_shards(out, split), stages=[], shuffle_buffer=10):
            meta = json.loads(s["json"])
            pieces[(meta["source"], meta["doc"])].append((meta["chunk"], s["txt"].decode(), split))
    assert set(pieces) == set(expected)
    for key, parts in pieces.items():
        parts.sort()
        assert [p[0] for p in parts] == list(range(len(parts)))
        assert len({p[2] for p in parts}) == 1, f"{key} straddles splits"
        assert nonspace("".join(p[1] for p in parts)) == nonspace(expected[key])


def test_single_file_input_and_registry(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("Just one short document with enough words.", encoding="utf-8")
    ds = DATASETS.create("text")
    assert isinstance(ds, TextDatasetDef) and ds.fields == ("txt", "json")
    report = ds.build_shards(f, tmp_path / "out")
    assert report.chunks == {"train": 1, "val": 0} and report.shards["val"] == []
    assert list(ds.iter_texts(tmp_path / "out")) == ["Just one short document with enough words."]


def test_output_dir_with_shards_needs_overwrite(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("hello world " * 50, encoding="utf-8")
    build_shards(f, tmp_path / "out", max_chars=100, samples_per_shard=2)
    n_old = len(list_shards(tmp_path / "out"))
    with pytest.raises(TextBuildError, match="overwrite=True"):
        build_shards(f, tmp_path / "out")
    report = build_shards(f, tmp_path / "out", overwrite=True)
    assert n_old > 1 and report.shards["train"] == ["train-000000.tar"]
    assert len(list_shards(tmp_path / "out")) == 1


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_shards(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.md").write_text("not text input")
    with pytest.raises(TextBuildError, match=r"no \.txt or \.jsonl"):
        build_shards(tmp_path / "empty_dir", tmp_path / "out")
    with pytest.raises(TextBuildError, match="expected a .txt or .jsonl"):
        build_shards(tmp_path / "empty_dir" / "notes.md", tmp_path / "out")


BAD_CASES = [
    ("empty.txt", b"  \n", r"empty\.txt: empty file"),
    ("latin1.txt", b"caf\xe9 ok", r"latin1\.txt: not valid UTF-8 at byte offset 3"),
    ("e.jsonl", b"", r"e\.jsonl: empty file"),
    ("bad.jsonl", b'{"text": "fine line here"}\n{"text": "x"\n', r"bad\.jsonl:2: invalid JSON \(.* column 13\)"),
    ("field.jsonl", b'{"body": "no text field"}\n', r"field\.jsonl:1: missing field 'text'"),
    ("type.jsonl", b'{"text": 42}\n', r"type\.jsonl:1: field 'text' must be a string"),
    ("blank.jsonl", b'{"text": "ok text"}\n{"text": "   "}\n', r"blank\.jsonl:2: field 'text' is empty"),
    ("lossy.jsonl", '{"text": "ok text"}\n{"text": "\\ufffd\\ufffd \\u200b"}\n'.encode(),
     r"lossy\.jsonl:2: field 'text' is empty \(only whitespace, control, format or replacement"),
    ("bytes.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"bytes\.jsonl:2: not valid UTF-8 at byte offset 25"),
]


@pytest.mark.parametrize("name,data,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises_naming_file_and_line(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(data)
    (tmp_path / "in" / "a_good.txt").write_text("Written before the bad file is reached.", encoding="utf-8")
    with pytest.raises(TextBuildError, match=message):
        build_shards(tmp_path / "in", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no half-written shards left behind


def test_bad_input_skipped_counted_and_reported(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for name, data, _ in BAD_CASES:
        (tmp_path / "in" / name).write_bytes(data)
    (tmp_path / "in" / "good.txt").write_text("A good document survives.", encoding="utf-8")
    report = build_shards(tmp_path / "in", tmp_path / "out", skip_bad=True)
    assert len(report.skipped) == len(BAD_CASES)
    assert report.total_documents == 5  # good.txt + the good first lines of bad, blank, lossy and bytes.jsonl
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [tuple(s) for s in manifest["skipped"]] == report.skipped
    assert ("latin1.txt", "not valid UTF-8 at byte offset 3 (invalid continuation byte)") in report.skipped


# ---------------------------------------------------------------- embedded default corpus


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedded_default(tmp_path_factory.mktemp("cache"))


def test_embedded_corpus_size_and_splits(embedded: Path) -> None:
    manifest = json.loads((embedded / "manifest.json").read_text())
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] >= 250
    assert splits["train"]["samples"] > 0 and splits["val"]["samples"] > 0
    assert (embedded / "DONE").is_file() and not (embedded / "source").exists()
    # per Python version: what the text tasks hold out, and the corpus leaves out, depends on its standard library
    assert embedded.name == f"text-stdlib-docstrings-v2-py{sys.version.split()[0]}"
    first = next(iter_texts(embedded, "val"))
    assert len(first.split()) >= 8


def test_no_text_task_dev_or_test_input_is_pretraining_text(embedded: Path) -> None:
    """The corpus held 87% of stdlib-package's test docstrings (and the tokenizer fitted on it read them): pretrained
    encoders had read the test inputs their "pretrained vs random init" gaps are measured on."""
    from mmm.downstream.tasks import docstring_signature_task, stdlib_package_task

    corpus = " ".join(" ".join(iter_texts(embedded, split)) for split in ("train", "val")).split()
    corpus = " ".join(corpus)
    package, pairs = stdlib_package_task(None, None), docstring_signature_task(None, None)
    assert sum(x[:200] in corpus for x in package["train"].inputs) > 0.5 * len(package["train"].inputs)
    for split in ("dev", "test"):
        found = [x for x in package[split].inputs if x[:200] in corpus]
        assert not found, (split, len(found), found[:2])
        found = [d for (_, d) in {x for x in pairs[split].inputs} if d[:200] in corpus]
        assert not found, (split, len(found), found[:2])
    info = json.loads((embedded / "source.json").read_text())
    assert info["task_modules_left_out"] > 100


def test_embedded_corpus_cached_and_deterministic(embedded: Path, tmp_path: Path) -> None:
    stamp = (embedded / "train-000000.tar").stat().st_mtime_ns
    assert embedded_default(embedded.parent.parent) == embedded  # DONE marker: no rebuild
    assert (embedded / "train-000000.tar").stat().st_mtime_ns == stamp
    again = embedded_default(tmp_path)
    assert json.loads((again / "manifest.json").read_text())["splits"] == json.loads((embedded / "manifest.json").read_text())["splits"]
    for shard in list_shards(embedded):
        assert (again / Path(shard).name).read_bytes() == Path(shard).read_bytes()


def test_embedded_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(textdef, "build_shards", killed)
    monkeypatch.setattr(textdef, "_stdlib_documents",
                        lambda stdlib, held_out, held_texts: ([("m.py", "Some prose words here for a doc.")], [], 0))
    with pytest.raises(KeyboardInterrupt):
        embedded_default(tmp_path)
    assert list((tmp_path / "datasets").iterdir()) == []


def test_a_blank_chunk_of_a_document_is_not_written_but_counted(tmp_path: Path) -> None:
    """A paragraph that a lossy decoding upstream left as U+FFFD became a chunk of its own: the build wrote it, and
    then `mmm shards check` flagged it and training stopped on it."""
    from mmm.data.shard_tools import check_shards

    (tmp_path / "in").mkdir()
    prose = "Plain prose that a tokenizer reads well enough. " * 3
    (tmp_path / "in" / "doc.txt").write_text(f"{prose}\n\n{chr(0xFFFD) * 150}\n\n{prose}", encoding="utf-8")
    report = build_shards(tmp_path / "in", tmp_path / "out", max_chars=200)
    assert report.blank_chunks == 1 and report.total_samples == 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["blank_chunks"] == 1
    assert check_shards(tmp_path / "out").ok


def test_a_stdlib_without_the_text_tasks_holds_nothing_out(tmp_path: Path) -> None:
    """The corpus build asks the text tasks for their held-out modules; a standard library too small for a task
    made that a RuntimeError, which would have stopped the text modality for everyone on such a Python."""
    from mmm.downstream.tasks import held_out_stdlib_modules, held_out_stdlib_texts

    (tmp_path / "small.py").write_text('def f():\n    """Return something useful for the caller here."""\n')
    assert held_out_stdlib_modules(tmp_path) == frozenset() and held_out_stdlib_texts(tmp_path) == []
