"""Text dataset definition: plain-text / JSONL documents -> chunked WebDataset tar shards.

Each shard sample is ``{"__key__", "txt": utf-8 chunk, "json": {"source", "doc", "chunk"}}``.
Documents are split into chunks of at most ``max_chars`` characters at the best boundary
available (paragraph, sentence, whitespace, hard cut), losing no non-whitespace content, and
assigned to train/val by a stable hash so a document never straddles splits.
:func:`embedded_default` builds a small English corpus from the standard library's docstrings,
so the text modality works with no download. It leaves out the text the text tasks hold out for
dev and test (:func:`mmm.downstream.tasks.held_out_stdlib_modules`), so no pretrained encoder or
tokenizer has read a task's held-out inputs.
"""
from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from mmm.data.stream import list_shards
from mmm.data.tar import ReadOptions
from mmm.modalities.text import codec as text_codec
from mmm.modalities.text.codec import check_sample  # noqa: F401  (the dataset's sample check is the codec's)
from mmm.registry import DATASETS
from datasets_def.building import (BuildReport, DONE_MARKER, SPLITS, ShardWriters, build_args, cached_build, check_build_args,  # noqa: F401
                                   default_cache_dir, find_inputs, finish_build, has_suffix, ignored_manifest,
                                   log_ignored, prepare_output, read_file, stable_split)
from datasets_def.skipper import BadInputSkipper

logger = logging.getLogger("mmm.data")

TEXT_SUFFIXES = (".txt", ".jsonl")
EMBEDDED_NAME = f"text-stdlib-docstrings-v2-py{sys.version.split()[0]}"
"""The cache folder of the embedded corpus: per Python version, since what the text tasks hold out (and the corpus
leaves out) depends on that Python's standard library: a corpus built under another version would hold this one's
held-out inputs (about 43% of ``docstring-signature``'s dev/test docstrings between 3.11 and 3.12 in one
measurement)."""
PathLike = Union[str, "os.PathLike[str]"]


class TextBuildError(ValueError):
    """Bad input or output for a text shard build; the message names the file, line and field."""


# --------------------------------------------------------------------------------------------
# chunking

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
_SENTENCE = re.compile(r"[.!?][\"')\]]*(?=\s)")
_SPACE = re.compile(r"\s+")
_NONSPACE = re.compile(r"\S")


def _last_cut(pattern: "re.Pattern[str]", window: str, use_end: bool, lo: int) -> int:
    """Position of the last ``pattern`` boundary in ``window`` that is >= ``lo`` (0 when none)."""
    best = 0
    for m in pattern.finditer(window):
        pos = m.end() if use_end else m.start()
        if lo <= pos <= len(window) and pos > best:
            best = pos
    return best


def split_text(text: str, max_chars: int) -> List[str]:
    """Split ``text`` into stripped, non-empty chunks of at most ``max_chars`` characters.

    Boundaries are tried in order paragraph break, sentence end, whitespace, each only when it
    leaves a chunk of at least half of ``max_chars``; then any whitespace; then a hard cut
    (one enormous token). Only whitespace at the cuts is dropped.

    Args:
        text: the document.
        max_chars: the largest chunk length, >= 1.
    """
    if max_chars < 1:
        raise ValueError(f"split_text: max_chars must be >= 1, got {max_chars}")
    chunks: List[str] = []
    half = max(1, max_chars // 2)
    pos, end = 0, len(text.rstrip())
    while True:
        start = _NONSPACE.search(text, pos, end)
        if start is None:
            break
        pos = start.start()
        if end - pos <= max_chars:
            chunks.append(text[pos:end])
            break
        window = text[pos : pos + max_chars + 1]  # a boundary right after max_chars still counts
        cut = (
            _last_cut(_PARAGRAPH, window, False, half)
            or _last_cut(_SENTENCE, window[:max_chars], True, half)
            or _last_cut(_SPACE, window, False, half)
            or _last_cut(_SPACE, window, False, 1)
            or max_chars
        )
        chunks.append(window[:cut].rstrip())
        pos += cut
    return chunks


# --------------------------------------------------------------------------------------------
# reading inputs


@dataclass(kw_only=True)
class TextBuildReport(BuildReport):
    """What :func:`build_shards` wrote (:class:`datasets_def.building.BuildReport`; a sample is a chunk), with
    the documents and characters per split."""

    documents: Dict[str, int]
    characters: Dict[str, int]
    blank_chunks: int = 0  # chunks of a non-blank document that held nothing a tokenizer keeps: not written

    @property
    def chunks(self) -> Dict[str, int]:
        """Chunks (samples) per split."""
        return self.samples

    @property
    def total_documents(self) -> int:
        """Documents over both splits."""
        return sum(self.documents.values())

    @property
    def total_chunks(self) -> int:
        """Samples over both splits."""
        return self.total_samples


def _find_inputs(input_path: Path, skipper: BadInputSkipper) -> Tuple[List[Tuple[Path, str]], List[str]]:
    """((file, source name) pairs sorted by relative posix path, ignored files); see :func:`datasets_def.building.find_inputs`."""
    return find_inputs(input_path, lambda name: has_suffix(name, TEXT_SUFFIXES), "text", "a .txt or .jsonl file",
                       ".txt or .jsonl files", skipper, TextBuildError)


def _decode(data: bytes, where: str, base_offset: int, skipper: BadInputSkipper) -> Optional[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exn:
        skipper.bad(where, f"not valid UTF-8 at byte offset {base_offset + exn.start} ({exn.reason})")
        return None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _iter_documents(path: Path, source: str, jsonl_field: str, skipper: BadInputSkipper) -> Iterator[Tuple[int, str]]:
    """Yield (doc index in file, text) for one input file; bad input goes to ``skipper``."""
    if path.suffix.lower() == ".txt":
        data = read_file(path, source, skipper)
        text = None if data is None else _decode(data, source, 0, skipper)
        if text is None:
            return
        if text_codec.is_blank(text):
            skipper.bad(source, f"empty file (only {text_codec.BLANK_KINDS})")
            return
        yield 0, text
        return
    doc = 0
    offset = 0
    any_content = False
    try:
        fh = path.open("rb")
    except OSError as exn:
        skipper.bad(source, f"cannot read file ({type(exn).__name__}: {exn.strerror or exn})")
        return
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            line_offset, offset = offset, offset + len(raw)
            where = f"{source}:{lineno}"
            line = _decode(raw, where, line_offset, skipper)
            if raw.strip():
                any_content = True
            if line is None or not line.strip():
                continue  # undecodable (reported above) or a blank separator line
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exn:
                skipper.bad(where, f"invalid JSON ({exn.msg} at column {exn.colno})")
                continue
            if not isinstance(record, dict):
                skipper.bad(where, f"expected a JSON object with field {jsonl_field!r}, got {type(record).__name__}")
                continue
            if jsonl_field not in record:
                skipper.bad(where, f"missing field {jsonl_field!r} (fields present: {sorted(record)[:10]})")
                continue
            value = record[jsonl_field]
            if not isinstance(value, str):
                skipper.bad(where, f"field {jsonl_field!r} must be a string, got {type(value).__name__}")
                continue
            if text_codec.is_blank(value):
                skipper.bad(where, f"field {jsonl_field!r} is empty (only {text_codec.BLANK_KINDS})")
                continue
            yield doc, value.replace("\r\n", "\n")
            doc += 1
    if not any_content:
        skipper.bad(source, "empty file (no JSON lines)")


# --------------------------------------------------------------------------------------------
# building shards


def build_shards(
    input_path: PathLike,
    output_dir: PathLike,
    *,
    max_chars: int = 2000,
    samples_per_shard: int = 5000,
    jsonl_field: str = "text",
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> TextBuildReport:
    """Chunk .txt / .jsonl documents into ``{output_dir}/{split}-{index:06d}.tar`` shards.

    One ``.txt`` file is one document; each ``.jsonl`` line is one document (field
    ``jsonl_field``). Also writes ``{output_dir}/manifest.json``. Inputs, the output folder and
    the shards follow the rules of :mod:`datasets_def.building` (symlinked folders followed, each
    folder once; extensions in any case; shards written atomically).

    Args:
        input_path: a folder (searched recursively, sorted) or a single .txt / .jsonl file.
        output_dir: where shards go; must hold no shards/manifest unless ``overwrite``.
        max_chars: largest chunk, in characters.
        samples_per_shard: chunks per tar shard.
        jsonl_field: JSON field holding the text in .jsonl files.
        val_fraction: fraction of documents (by stable hash) put in the val split.
        seed: salt of the split hash.
        skip_bad: skip (and report) bad files/lines instead of raising.
        overwrite: delete existing ``*.tar`` and manifest in ``output_dir`` first.
    """
    if not isinstance(max_chars, int) or max_chars < 1:
        raise TextBuildError(f"max_chars must be a positive int, got {max_chars!r}")
    check_build_args(samples_per_shard, val_fraction, TextBuildError)
    src = Path(input_path).expanduser()
    out = Path(output_dir).expanduser()
    skipper = BadInputSkipper(skip_bad, TextBuildError)
    inputs, ignored = _find_inputs(src, skipper)
    prepare_output(out, overwrite, TextBuildError)
    log_ignored("text", ignored, ".txt or .jsonl")

    documents = {s: 0 for s in SPLITS}
    chunks = {s: 0 for s in SPLITS}
    characters = {s: 0 for s in SPLITS}
    doc_ordinal = blank_chunks = 0
    with ShardWriters(out, samples_per_shard, TextBuildError) as writers:
        for path, source in inputs:
            for doc, text in _iter_documents(path, source, jsonl_field, skipper):
                split = stable_split(val_fraction, seed, source, doc)
                for i, chunk in enumerate(split_text(text, max_chars)):
                    if text_codec.is_blank(chunk):  # e.g. a paragraph an earlier lossy decoding left as U+FFFD
                        blank_chunks += 1
                        continue
                    meta = {"source": source, "doc": doc, "chunk": i}
                    writers.write(
                        split,
                        {
                            "__key__": f"{doc_ordinal:09d}_{i:05d}",
                            "txt": chunk.encode("utf-8"),
                            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                        }
                    )
                    chunks[split] += 1
                    characters[split] += len(chunk)
                documents[split] += 1
                doc_ordinal += 1
        shards = writers.close()
    if doc_ordinal == 0:
        raise TextBuildError(f"no documents found in {src} ({len(skipper.skipped)} skipped input(s): {skipper.skipped[:3]})")

    report = TextBuildReport(output_dir=out, files=len(inputs), samples=chunks, shards=shards, skipped=skipper.skipped,
                             ignored=len(ignored), documents=documents, characters=characters,
                             blank_chunks=blank_chunks)
    if blank_chunks:
        logger.warning("text build: %d chunk(s) held only %s and were not written (counted as blank_chunks in "
                       "manifest.json)", blank_chunks, text_codec.BLANK_KINDS)
    manifest = {
        "dataset": "text",
        "fields": list(TextDatasetDef.fields),
        "files": len(inputs),
        **ignored_manifest(ignored),
        "splits": {
            s: {"documents": documents[s], "samples": chunks[s], "shards": len(shards[s]), "characters": characters[s]}
            for s in SPLITS
        },
        "shard_files": shards,
        "blank_chunks": blank_chunks,
        "build_args": build_args(src, samples_per_shard, val_fraction, seed, skip_bad, max_chars=max_chars,
                                 jsonl_field=jsonl_field),
    }
    finish_build("text", writers, manifest, skipper.skipped, TextBuildError)
    return report


# --------------------------------------------------------------------------------------------
# embedded default corpus: standard-library docstrings

_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "__pycache__"}
)
_MIN_WORDS = 8


def _is_prose(doc: str) -> bool:
    """At least 8 words, at most a third of the lines doctest code/output, mostly letters."""
    if len(doc.split()) < _MIN_WORDS:
        return False
    lines = [ln.strip() for ln in doc.splitlines()]
    nonblank = [ln for ln in lines if ln]
    code = 0
    in_doctest = False
    for ln in lines:
        if ln.startswith(">>>") or (in_doctest and ln):
            code += 1
            in_doctest = True
        else:
            in_doctest = False
    if code * 3 > len(nonblank):
        return False
    visible = [c for c in doc if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= 0.6 * len(visible)


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Module, class and function docstrings (cleaned with ``inspect.cleandoc``) in source order."""
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    defs.sort(key=lambda n: (n.lineno, n.col_offset))
    for node in [tree, *defs]:
        raw = ast.get_docstring(node, clean=False)
        if raw:
            yield inspect.cleandoc(raw)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _stdlib_documents(stdlib: Path, held_out: frozenset = frozenset(), held_texts: Sequence[str] = ()
                      ) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]], int]:
    """([(module path, document)], [(file, reason) for unparsable files], docstrings left out) from the stdlib's
    docstrings. The ``held_out`` modules (paths relative to ``stdlib``) are left out, and so is any docstring of
    another module that one of them also has (the same text in two modules) or that holds the first
    :data:`HELD_PREFIX` characters of one of ``held_texts`` (whitespace collapsed)."""
    docs: List[Tuple[str, str]] = []
    unreadable: List[Tuple[str, str]] = []
    seen: set = set()
    for rel in sorted(held_out):  # their docstrings count as seen: no other module brings them back
        try:
            seen.update(_flat(t) for t in _docstrings(ast.parse((stdlib / rel).read_bytes(), filename=rel)))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            pass  # a task could not read it either
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(root) / name
            rel = path.relative_to(stdlib).as_posix()
            if rel in held_out:
                continue
            try:
                tree = ast.parse(path.read_bytes(), filename=rel)
            except (SyntaxError, ValueError, UnicodeDecodeError, OSError) as exn:
                unreadable.append((rel, f"{type(exn).__name__}: {exn}"))
                continue
            kept: List[str] = []
            for text in _docstrings(tree):
                if _flat(text) in seen or not _is_prose(text):
                    continue
                seen.add(_flat(text))
                kept.append(text)
            if kept:
                docs.append((rel, kept))
    left_out = _drop_holders(docs, held_texts)
    return [(rel, "\n\n".join(kept)) for rel, kept in docs if kept], unreadable, left_out


HELD_PREFIX = 200
"""Characters of a held-out task input that no pretraining docstring may contain."""


def _drop_holders(docs: List[Tuple[str, List[str]]], held_texts: Sequence[str]) -> int:
    """Remove, in place, every docstring that contains a held-out text's first :data:`HELD_PREFIX` characters (a
    longer docstring that includes a test input); returns how many were removed."""
    flat = [_flat(t) for _, kept in docs for t in kept]
    joined = "\0".join(flat)
    starts = np.cumsum([0] + [len(t) + 1 for t in flat])
    drop = set()
    for text in held_texts:
        probe, at = text[:HELD_PREFIX], 0
        while probe and (at := joined.find(probe, at)) >= 0:
            drop.add(int(np.searchsorted(starts, at, side="right")) - 1)
            at += 1
    i = 0
    for _, kept in docs:
        keep = [t for j, t in enumerate(kept, start=i) if j not in drop]
        i += len(kept)
        kept[:] = keep
    return len(drop)


def _build_stdlib(out: Path) -> str:
    """Write the stdlib-docstring corpus into ``out`` (shards, manifest, ``source.json``); returns its counts."""
    from mmm.downstream.tasks import held_out_stdlib_modules, held_out_stdlib_texts

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # the text tasks' dev/test modules, their docstrings wherever else they occur, and any docstring holding a
    # dev/test input, are never pretraining text
    held_out = held_out_stdlib_modules(stdlib)
    docs, unreadable, holders = _stdlib_documents(stdlib, held_out, held_out_stdlib_texts(stdlib))
    source_dir = out / "source"
    source_dir.mkdir(parents=True)
    jsonl = source_dir / "stdlib-docstrings.jsonl"
    with jsonl.open("w", encoding="utf-8") as fh:
        for module, text in docs:
            fh.write(json.dumps({"module": module, "text": text}, ensure_ascii=False) + "\n")
    report = build_shards(jsonl, out, val_fraction=0.1, seed=0)
    shutil.rmtree(source_dir)
    info = {
        "python": sys.version.split()[0],
        "stdlib": str(stdlib),
        "modules": len(docs),
        "task_modules_left_out": len(held_out),
        "docstrings_holding_task_inputs_left_out": holders,
        "unparsable_files": [list(u) for u in unreadable],
        "documents": report.documents,
        "characters": report.characters,
    }
    (out / "source.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return (f"{report.total_documents} documents, {report.total_chunks} chunks, "
            f"{sum(report.characters.values())} characters")


def embedded_default(cache_dir: Optional[PathLike] = None) -> Path:
    """The embedded default text corpus (stdlib docstrings), built once, cached, no download.

    Built at ``{cache_dir}/datasets/text-stdlib-docstrings-v2-py<version>/`` (:data:`EMBEDDED_NAME`) by
    :func:`datasets_def.building.cached_build` (a temporary directory renamed into place once
    complete, a ``DONE`` marker written last), so an interrupted build never leaves a partial
    corpus. Deterministic for a given Python installation.

    Args:
        cache_dir: cache root; default ``$MMM_CACHE_DIR`` or ``~/.cache/mmm``.

    Returns:
        The directory holding ``train-*.tar``, ``val-*.tar`` and ``manifest.json``.
    """
    return cached_build(EMBEDDED_NAME, cache_dir, _build_stdlib, TextBuildError)


# --------------------------------------------------------------------------------------------
# reading shards back


def iter_texts(shard_dir: PathLike, split: str = "train", *, options: Optional[ReadOptions] = None) -> Iterator[str]:
    """Stream the ``txt`` fields of one split (e.g. to train a tokenizer), with no extraction to disk, read as
    training reads them (:func:`mmm.modalities.text.codec.iter_texts`); arguments as
    :func:`datasets_def.building.read_split`."""
    return text_codec.iter_texts(list_shards(shard_dir, split=split), options)


@DATASETS.register("text")
class TextDatasetDef:
    """The ``text`` dataset: chunked UTF-8 text in WebDataset shards (fields ``txt`` and ``json``)."""

    name = "text"
    modality = "text"
    fields = text_codec.FIELDS

    build_shards = staticmethod(build_shards)
    embedded_default = staticmethod(embedded_default)
    check_sample = staticmethod(text_codec.check_sample)
    iter_texts = staticmethod(iter_texts)
    split_text = staticmethod(split_text)
