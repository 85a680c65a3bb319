"""Labelled downstream data, read and checked: GLUE-style tables (TSV / CSV / JSONL), labelled
WebDataset shards (``mmm shards build ... --labels``), DNA ``sequence,label`` CSV, and folders or
files of unlabelled raw inputs for ``mmm embed``.

Every error names the file, the row (1-based line of the file; the header is line 1) or sample key,
and the field. Nothing is dropped silently: rows are only skipped with ``skip_bad=True``, and
then counted in :attr:`Split.skipped`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from mmm.data.jsonl import json_objects
from mmm.data.utf8 import NotUTF8, decode_utf8
from mmm.downstream.split import DownstreamDataError, Split  # noqa: F401  (re-exported: callers import them here)

PathLike = Union[str, Path]
TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl")


# ----------------------------------------------------------------------------- tables


def read_text(path: Path) -> str:
    """A UTF-8 text file (a leading BOM dropped, Windows and old Mac line ends read as newlines; a ``.gz`` name is
    decompressed); otherwise an error naming the file, the byte offset and the line of the first bad byte."""
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        import gzip

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DownstreamDataError(f"{path}: not a readable gzip file ({e})") from None
    try:
        text = decode_utf8(data)
    except NotUTF8 as e:
        raise DownstreamDataError(f"{path}: not UTF-8 text (byte {e.offset}, line {e.line}: "
                                  f"{e.byte!r}); save the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _lift_csv_field_limit() -> None:
    """Let csv read fields of any length (its default stops at 131072 characters), as far as the
    platform's C long allows."""
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:  # a 32-bit C long (Windows)
        csv.field_size_limit(2**31 - 1)


def _csv_error(path: Path, start: int, line: int, e: csv.Error) -> DownstreamDataError:
    """A csv parse error as a message naming the file and the line where the record started."""
    span = f"line {start}" if line <= start else f"the record starting on line {start} (read up to line {line})"
    if "unexpected end of data" in str(e):
        return DownstreamDataError(
            f"{path}: {span}: a quoted field opened in this record is never closed, so the rest of the file "
            f"would be read as one cell; look for a stray or unbalanced '\"' on line {start}")
    return DownstreamDataError(f"{path}: {span}: malformed CSV ({e}); a quoted field must end with '\"' "
                               "followed by the delimiter or the line end, and a quote inside it is written '\"\"'")


def _table_rows(path: Path, skipped: Optional[List[Tuple[str, str]]] = None) -> List[Tuple[int, Dict[str, Any]]]:
    """(line number where the row starts, row dict) of a .tsv/.csv (header line) or .jsonl file.

    With ``skipped`` (a list), rows with the wrong number of cells and lines that are not a JSON
    object are appended to it as ``(where, reason)`` instead of raising.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DownstreamDataError(f"{path}: unsupported table format {suffix!r}; use one of {list(TABLE_SUFFIXES)}")
    text = read_text(path)
    if not text.strip():
        raise DownstreamDataError(f"{path}: the file is empty")
    rows: List[Tuple[int, Dict[str, Any]]] = []
    skip = None if skipped is None else (lambda where, why: skipped.append((where, why)))
    if suffix == ".jsonl":
        rows = list(json_objects(text.split("\n"), lambda n: f"{path}:row {n}", DownstreamDataError, skip))
        if not rows:
            raise DownstreamDataError(f"{path}: no JSON object lines ({len(skipped or [])} skipped)")
        return rows
    _lift_csv_field_limit()
    delimiter = "\t" if suffix == ".tsv" else ","
    quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL  # GLUE TSVs hold bare quotes
    # strict: an unclosed quote is an error at the end of the file, not the rest of the file in one cell
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting, strict=suffix == ".csv")
    start = 1  # the line the record being read starts on
    try:
        header = next(reader)
        if len(set(header)) != len(header):
            raise DownstreamDataError(f"{path}: duplicate column names in the header {header}")
        start = reader.line_num + 1
        for cells in reader:
            n, start = start, reader.line_num + 1
            if not cells:
                continue
            if len(cells) != len(header):
                problem = f"{len(cells)} cell(s), the header has {len(header)} ({header})"
                if skip is None:
                    raise DownstreamDataError(f"{path}: row {n}: {problem} (pass --skip_bad to skip such rows, "
                                              "counted)")
                skip(f"{path}:row {n}", problem)
                continue
            rows.append((n, dict(zip(header, cells))))
    except csv.Error as e:
        raise _csv_error(path, start, reader.line_num, e) from None
    if not rows:
        extra = f" ({len(skipped)} skipped)" if skipped else ""
        raise DownstreamDataError(f"{path}: the file has a header but no rows{extra}")
    return rows


def _shown(v: Any) -> str:
    """``repr`` of a value, cut to 60 characters, with its type."""
    r = repr(v)
    return f"{r[:57] + '...' if len(r) > 60 else r} ({type(v).__name__})"


def _row_problem(row: Dict[str, Any], input_columns: Sequence[str], label_column: Optional[str]) -> Optional[str]:
    """What makes a row unusable (an empty, missing or non-string input; an empty, missing or
    non-scalar label), or None."""
    for c in input_columns:
        v = row.get(c)
        if v is None or (isinstance(v, str) and not v.strip()):
            return f"field {c!r} is empty or missing"
        if not isinstance(v, str):
            return f"field {c!r} is {_shown(v)}; a string was expected"
    if label_column:
        label = row.get(label_column)
        if label is None or (isinstance(label, str) and not label.strip()):
            return f"field {label_column!r} (the label) is empty or missing"
        if not isinstance(label, (str, int, float)):
            return f"field {label_column!r} (the label) is {_shown(label)}; a string or a number was expected"
    return None


def read_table(path: PathLike, input_columns: Sequence[str], label_column: Optional[str], *,
               skip_bad: bool = False) -> Split:
    """Read a GLUE-style table.

    Args:
        path: ``.tsv`` / ``.csv`` (header line) or ``.jsonl`` (one object per line).
        input_columns: one column (single text / sequence) or two (a text pair).
        label_column: the label column, or None (unlabelled, e.g. a test file).
        skip_bad: skip bad rows (an empty, missing or non-string input, an empty label, the wrong
            number of cells, a line that is not a JSON object; counted in ``skipped``) instead of failing.
    """
    p = Path(path)
    out = Split(str(p), [], [], [])
    rows = _table_rows(p, out.skipped if skip_bad else None)
    columns = set().union(*(r.keys() for _, r in rows))
    wanted = [c for c in (*input_columns, label_column) if c is not None]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DownstreamDataError(f"{p}: no column(s) {missing}; the file has columns {sorted(columns)}")
    for n, row in rows:
        where = f"{p}:row {n}"
        label = row.get(label_column) if label_column else None
        if isinstance(label, str) and ("\n" in label or "\r" in label):  # never skipped: rows were swallowed
            hint = (f"; a quoted field opened on line {n} swallowed the lines after it: look for a stray '\"'"
                    if p.suffix.lower() == ".csv" else "")
            raise DownstreamDataError(f"{where}: the label {label_column!r} holds a line break "
                                      f"({label[:40]!r}{'...' if len(label) > 40 else ''}){hint}")
        problem = _row_problem(row, input_columns, label_column)
        if problem:
            if skip_bad:
                out.skipped.append((where, problem))
                continue
            raise DownstreamDataError(f"{where}: {problem} (pass --skip_bad to skip such rows, counted)")
        values = [row[c] for c in input_columns]
        out.inputs.append(values[0] if len(values) == 1 else (values[0], values[1]))
        out.labels.append(label.strip() if isinstance(label, str) else label)
        out.where.append(where)
    if not out.inputs:
        raise DownstreamDataError(f"{p}: no usable rows ({len(out.skipped)} skipped)")
    return out


# ----------------------------------------------------------------------------- labels


@dataclass
class Labels:
    """The label encoding of a task, fixed by its training split.

    Args:
        task_type: ``classification`` or ``regression``.
        names: class names in id order (classification); empty for regression.
    """

    task_type: str
    names: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def fit(cls, train: Split, task_type: str) -> "Labels":
        """Class names of the training labels (numeric order when all are integers, else sorted);
        regression checks that every label is a finite number."""
        if task_type == "regression":
            targets = encode_labels(train, cls("regression", []))
            if len(set(targets)) < 2:
                raise DownstreamDataError(f"{train.path}: every regression target is {targets[0]!r} "
                                          f"({len(targets)} rows); regression needs targets that vary")
            return cls("regression", [])
        if task_type != "classification":
            raise ValueError(f"task type must be 'classification' or 'regression', got {task_type!r}")
        values = sorted({label_key(v) for v in train.labels})
        if all(_is_int(v) for v in values):
            values = sorted(values, key=int)
        if len(values) < 2:
            raise DownstreamDataError(f"{train.path}: the training labels hold a single class {values}; "
                                      "classification needs at least 2")
        return cls("classification", values)

    def to_dict(self) -> Dict[str, Any]:
        return {"task_type": self.task_type, "names": self.names}


def label_key(v: Any) -> str:
    """A class label as the name it is compared by: the text of a string label as written, a number by its
    value (JSON ``1`` and ``1.0`` are one class; the strings ``"1"`` and ``"1.0"`` stay two)."""
    if isinstance(v, float) and not isinstance(v, bool) and v.is_integer():
        return str(int(v))
    return str(v)


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


def encode_labels(split: Split, labels: Labels) -> List[Union[int, float]]:
    """Class ids (or floats for regression) of ``split``'s labels; a label training never saw, or
    a non-numeric regression target, is an error naming its row."""
    out: List[Union[int, float]] = []
    if labels.task_type == "regression":
        for v, where in zip(split.labels, split.where):
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise DownstreamDataError(f"{where}: regression target {v!r} is not a number") from None
            if not math.isfinite(x):
                raise DownstreamDataError(f"{where}: regression target {v!r} is not finite")
            out.append(x)
        return out
    index = {n: i for i, n in enumerate(labels.names)}
    for v, where in zip(split.labels, split.where):
        if label_key(v) not in index:
            raise DownstreamDataError(f"{where}: label {v!r} never occurs in the training split "
                                      f"(training classes: {labels.names})")
        out.append(index[label_key(v)])
    return out


# ----------------------------------------------------------------------------- shards


def read_shards(path: PathLike, modality: str, split: Optional[str] = None, *, labelled: bool = True,
                max_samples: Optional[int] = None, skip_bad: bool = False, keep_encoded: bool = False) -> Split:
    """Samples of WebDataset shards in shard order.

    Args:
        path: a shard folder, a ``.tar`` file or pattern (:func:`mmm.data.stream.list_shards`).
        modality: decodes a sample (its :meth:`InputAdapter.decode_sample <mmm.downstream.inputs.InputAdapter.decode_sample>`).
        split: ``train`` / ``val`` shards only (None: all).
        labelled: every sample must carry a json ``label`` (an integer); else an error naming it.
        max_samples: stop after this many.
        skip_bad: skip undecodable or unlabelled samples (counted in ``skipped``).
        keep_encoded: each input is a :class:`~mmm.downstream.inputs.RawSample` (the sample's encoded members,
            decoded here to check it and again when embedded) instead of the decoded input: ``mmm embed`` holds
            a split as compressed bytes.
    """
    from mmm.data.stream import list_shards, make_pipeline
    from mmm.downstream.inputs import RawSample, adapter_class

    decode = adapter_class(modality).decode_sample
    urls = list_shards(str(path), split)
    out = Split(str(path), [], [], [])
    errors: List[Exception] = []

    def handler(exn: Exception) -> bool:  # tar-level errors: stop unless skipping
        if skip_bad:
            out.skipped.append((str(path), f"{type(exn).__name__}: {exn}"))
            return True
        errors.append(exn)
        return False

    for sample in make_pipeline(urls, stages=[], shuffle_shards=False, shuffle_buffer=0, handler=handler):
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            raw, label = decode(sample)
            if labelled and (label is None or isinstance(label, bool) or not isinstance(label, int) or label < 0):
                raise DownstreamDataError(f"{where}: json field 'label' is {label!r}; a labelled task needs a "
                                          "non-negative integer (build shards with --labels)")
        except (ValueError, OSError) as e:
            if skip_bad:
                out.skipped.append((where, str(e)))
                continue
            raise DownstreamDataError(str(e) if where in str(e) else f"{where}: {e}") from None
        out.inputs.append(RawSample(dict(sample)) if keep_encoded else raw)
        out.labels.append(label)
        out.where.append(where)
        if max_samples is not None and len(out.inputs) >= max_samples:
            break
    if errors:
        raise DownstreamDataError(f"{path}: {errors[0]}")
    if not out.inputs:
        raise DownstreamDataError(f"{path}: no {'labelled ' if labelled else ''}samples"
                                  f"{f' in split {split!r}' if split else ''} ({len(out.skipped)} skipped)")
    return out


# ----------------------------------------------------------------------------- raw files for embed


def read_lines(path: Path, rel: str) -> Split:
    """One input per non-empty line of a UTF-8 text file (stripped), keyed ``rel:row<n>``."""
    out = Split(str(path), [], [], [])
    for n, line in enumerate(read_text(path).split("\n"), start=1):
        if line.strip():
            out.inputs.append(line.strip())
            out.where.append(f"{rel}:row{n}")
    out.labels = [None] * len(out.inputs)
    return out


def read_fasta(path: Path, rel: str, skip_bad: bool) -> Split:
    """One upper-cased sequence per record of a FASTA file (gzipped too), keyed ``rel:<record name>``; a record
    without a sequence is an error naming it, or skipped and listed with ``skip_bad``."""
    out = Split(str(path), [], [], [])
    name, seq = None, []
    lines = read_text(path).split("\n")
    for n, line in enumerate(lines + [">"], start=1):
        if line.startswith(">"):
            if name is not None:
                if seq:
                    out.inputs.append("".join(seq).upper())
                    out.where.append(f"{rel}:{name}")
                elif skip_bad:
                    out.skipped.append((f"{rel}:{name}", "the record has no sequence"))
                else:
                    raise DownstreamDataError(f"{path}: record {name!r} has no sequence (pass --skip_bad to "
                                              f"skip such records, counted)")
            if n <= len(lines) and not line[1:].strip():  # (n = len(lines) + 1: the closing sentinel)
                raise DownstreamDataError(f"{path}: line {n}: a '>' header without a record name")
            name, seq = line[1:].split()[0] if line[1:].strip() else None, []
        elif line.strip():
            if name is None:
                raise DownstreamDataError(f"{path}: line {n}: sequence line before the first '>' header")
            seq.append(line.strip())
    out.labels = [None] * len(out.inputs)
    return out


def read_raw_inputs(path: PathLike, modality: str, *, text_column: Optional[str] = None,
                    skip_bad: bool = False) -> Split:
    """Unlabelled raw inputs of a file or folder (searched recursively), keyed by relative path (and line /
    record): the files the modality reads (its adapter's ``file_suffixes`` and ``read_file``; e.g. ``.txt``
    lines for text, FASTA records for DNA, image files, wav/flac) and, for a modality that reads table cells,
    the ``text_column`` of ``.tsv``/``.csv``/``.jsonl`` tables.

    Tables found without ``text_column`` are an error naming them, not skipped. With ``skip_bad``, a bad input
    (an empty table cell, an undecodable image or audio file, a FASTA record without a sequence) is skipped and
    listed in ``skipped``; without it, it is an error naming it. Other files are not inputs and are ignored.
    """
    from mmm.downstream.inputs import adapter_class

    reader = adapter_class(modality)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    root = p.parent if p.is_file() else p
    tables = [f.relative_to(root).as_posix() for f in files if f.suffix.lower() in TABLE_SUFFIXES]
    if reader.reads_tables and tables and not text_column:  # never skip them silently
        raise DownstreamDataError(f"{p}: {len(tables)} table file(s) {tables[:5]}{' ...' if len(tables) > 5 else ''} "
                                  "need --text_column COLUMN (the column to embed); pass it, or move the tables "
                                  "out of the input")
    out = Split(str(p), [], [], [])
    for f in files:
        rel = f.relative_to(root).as_posix()
        table = reader.reads_tables and f.suffix.lower() in TABLE_SUFFIXES and text_column
        if not table and not f.name.lower().endswith(reader.file_suffixes):
            continue  # not an input of this modality
        try:
            if table:
                got = read_table(f, [text_column], None, skip_bad=skip_bad)
                got.where = [f"{rel}:{w.rsplit(':', 1)[1].replace(' ', '')}" for w in got.where]
            else:
                got = reader.read_file(f, rel, skip_bad)
        except ValueError as e:  # the whole file is unreadable (undecodable, not UTF-8, malformed, no such column)
            if not skip_bad:
                raise
            out.skipped.append((rel, str(e)))
            continue
        out.inputs += got.inputs
        out.where += got.where
        out.skipped += got.skipped
    out.labels = [None] * len(out.inputs)
    out = reader.check_inputs(out, skip_bad)
    if not out.inputs:
        kinds = list(reader.file_suffixes) + (list(TABLE_SUFFIXES) if reader.reads_tables else [])
        hint = " (tables need --text_column)" if reader.reads_tables and not text_column else ""
        skipped = f" ({len(out.skipped)} skipped)" if out.skipped else ""
        raise DownstreamDataError(f"{p}: no {modality} inputs found (looked for {kinds}){hint}{skipped}")
    return out


# ----------------------------------------------------------------------------- a task's splits


def is_shard_path(path: Path) -> bool:
    """A ``.tar`` file or a folder holding ``.tar`` shards (at its top level)."""
    return (path.is_file() and path.suffix == ".tar") or (path.is_dir() and any(path.glob("*.tar")))


def load_split(path: PathLike, modality: str, *, shard_split: Optional[str] = None,
               columns: Sequence[str] = (), label_column: Optional[str] = "label", skip_bad: bool = False) -> Split:
    """One labelled split: shards (``.tar`` / folder of them) or a table (``.tsv``/``.csv``/``.jsonl``).

    Args:
        path: the split's file or shard folder.
        modality: the encoder's modality (shards are decoded by it; tables are read for a modality whose inputs
            are strings: text, DNA).
        shard_split: with a shard folder, only its ``train`` / ``val`` shards.
        columns: table input column(s); one, or two for a text pair.
        label_column: table label column.
        skip_bad: skip bad rows / samples, counted.
    """
    from mmm.downstream.inputs import adapter_class

    reader = adapter_class(modality)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if is_shard_path(p):
        return read_shards(p, modality, shard_split, skip_bad=skip_bad)
    if p.is_dir():
        raise DownstreamDataError(f"{p} is a folder without .tar shards; pass shards or a .tsv/.csv/.jsonl file")
    if not reader.reads_tables:
        raise DownstreamDataError(f"{p}: {modality} fine-tuning reads labelled shards (mmm shards build ... --labels), "
                                  "not tables")
    if not columns:
        raise DownstreamDataError(f"{p}: name the input column (--text_column)")
    return reader.check_inputs(read_table(p, columns, label_column, skip_bad=skip_bad), skip_bad).require_rows()
