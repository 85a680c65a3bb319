"""DNA dataset definition: FASTA records cut into windows, written as WebDataset tar shards.

Each shard sample is ``{"__key__", "seq": ASCII bases, "json": {"record", "start", "end",
"strand", "label", "label_name", "source"}}``: ``seq`` is the window ``[start, end)`` (0-based,
half-open) of record ``record`` from file ``source``, uppercased (soft-masking dropped), IUPAC
ambiguity codes kept as written; ``label``/``label_name`` are null without a labels file.

Windowing. Windows start at 0, ``stride``, ``2*stride``, ... while they fit; when the last one ends
before the record does, one more window aligned to the record end is added (it overlaps the one
before), so every record's tail is kept at full length. A record shorter than ``window`` is one
shorter window if it has at least ``min_window`` bases; shorter records are counted and listed in
``manifest.json``, never silently lost. With ``stride > window`` the bases between windows are
skipped on request.

Splits. A record goes to ``val`` by a stable hash of (seed, source file, record id), so a record
never straddles splits and the assignment is the same on every machine.

Labels. An optional BED (chrom, start, end, name; 0-based half-open) or TSV (record, start, end,
label; an optional header line) file labels windows: each window takes the name of the interval it
overlaps by the most bases, ties going to the interval listed first; a window overlapping no
interval has label null. Names map to ints: as themselves when every name is an integer, else by
their sorted order.

:func:`embedded_default` builds a synthetic genome with planted motif classes, labelled per
window for linear-probe evaluation, locally and deterministically, with no download.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np

from mmm.modalities.dna.tokenizer import base_codes, find_invalid_base
from mmm.data.stream import list_shards
from mmm.data.tar import ReadOptions
from mmm.modalities.dna import codec as dna_codec
from mmm.modalities.dna.codec import FASTA_SUFFIXES, check_sample  # noqa: F401  (the dataset's sample check is the codec's)
from mmm.registry import DATASETS
from datasets_def.building import (BuildReport, DONE_MARKER, SPLITS, ShardWriters, build_args, cached_build, default_cache_dir,  # noqa: F401
                                   find_inputs, finish_build, ignored_manifest, log_ignored, prepare_output,
                                   stable_split)
from datasets_def.skipper import BadInputSkipper

logger = logging.getLogger("mmm.data")

EMBEDDED_NAME = "dna-synthetic-motifs-v1"
_MAX_LISTED = 100  # short records / unmatched label records listed by name in the manifest
PathLike = Union[str, "os.PathLike[str]"]


class DNABuildError(ValueError):
    """Bad input or output for a DNA shard build; the message names the file, record and position."""


# --------------------------------------------------------------------------------------------
# windows and labels


def window_starts(length: int, window: int, stride: int, min_window: int = 1) -> List[Tuple[int, int]]:
    """The ``[start, end)`` windows of a record (see the module docstring for the tail rule).

    Args:
        length: record length in bases.
        window: window length.
        stride: distance between window starts.
        min_window: a record shorter than ``window`` gives one window only if it has this many bases.
    """
    if length < window:
        return [(0, length)] if length >= min_window and length > 0 else []
    spans = [(s, s + window) for s in range(0, length - window + 1, stride)]
    if spans[-1][1] < length:
        spans.append((length - window, length))
    return spans


@dataclass
class LabelIntervals:
    """Labelled intervals read from a BED/TSV file, indexed per record.

    Args:
        path: the file they came from.
        names: label id -> label name.
        by_record: record -> (starts, ends, label ids, file order), sorted by start.
        max_len: longest interval per record (bounds the overlap search).
    """

    path: str
    names: Dict[int, str]
    by_record: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    max_len: Dict[str, int]

    def label(self, record: str, start: int, end: int) -> Optional[int]:
        """Label id of the interval overlapping ``[start, end)`` of ``record`` most; None if none.

        Args:
            record: record id.
            start: window start.
            end: window end.
        """
        if record not in self.by_record:
            return None
        s, e, lab, order = self.by_record[record]
        hi = int(np.searchsorted(s, end))  # intervals starting before the window ends
        lo = int(np.searchsorted(s, start - self.max_len[record] + 1))  # ... and long enough to reach into it
        if lo >= hi:
            return None
        overlap = np.minimum(e[lo:hi], end) - np.maximum(s[lo:hi], start)
        if overlap.max() <= 0:
            return None
        best = np.lexsort((order[lo:hi], -overlap))[0]  # most overlap, then earliest in the file
        return int(lab[lo + best])


def _is_gzip_name(path: Path) -> bool:
    """Whether the name ends with ``.gz`` in any case (``.FA.GZ`` as the file finder matches it)."""
    return path.name.lower().endswith(".gz")


def _open_text(path: Path) -> TextIO:
    """Text handle with universal newlines (CRLF read as LF); ``.gz`` (any case) decompressed."""
    if _is_gzip_name(path):
        return gzip.open(path, "rt", encoding="utf-8", newline=None)
    return open(path, "rt", encoding="utf-8", newline=None)


def read_labels(path: PathLike) -> LabelIntervals:
    """Read a BED (``.bed``) or TSV (``.tsv``/``.txt``) labels file; errors name the file and line.

    Args:
        path: the file, optionally gzipped.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"labels file does not exist: {p}")
    is_bed = p.name.lower().removesuffix(".gz").endswith(".bed")
    rows: List[Tuple[str, int, int, str]] = []
    try:
        with _open_text(p) as fh:
            first_data = True
            for lineno, line in enumerate(fh, start=1):
                text = line.rstrip("\n")
                if not text.strip() or text.startswith("#") or (is_bed and text.startswith(("track", "browser"))):
                    continue
                cols = text.split() if is_bed else text.split("\t")
                if len(cols) < 4:
                    raise DNABuildError(
                        f"{p}:{lineno}: expected 4 columns (record, start, end, label), got {len(cols)}: {text[:80]!r}"
                    )
                try:
                    start, end = int(cols[1]), int(cols[2])
                except ValueError:
                    if first_data and not is_bed:
                        first_data = False  # a header line
                        continue
                    raise DNABuildError(
                        f"{p}:{lineno}: start and end must be integers, got {cols[1]!r} and {cols[2]!r}"
                    ) from None
                first_data = False
                if not 0 <= start < end:
                    raise DNABuildError(f"{p}:{lineno}: need 0 <= start < end (0-based, half-open), got {start} and {end}")
                rows.append((cols[0], start, end, cols[3].strip()))
    except (UnicodeDecodeError, OSError, EOFError, zlib.error) as exn:
        raise DNABuildError(f"{p}: cannot read labels file: {type(exn).__name__}: {exn}") from exn
    if not rows:
        raise DNABuildError(f"{p}: labels file has no intervals")
    unique = sorted({r[3] for r in rows})
    try:
        ids = {n: int(n) for n in unique}
    except ValueError:
        ids = {n: i for i, n in enumerate(unique)}
    else:  # integer names are the label ids themselves: they must be valid class ids, one per name
        negative = [n for n in unique if ids[n] < 0]
        if negative:
            raise DNABuildError(f"{p}: label {negative[0]!r} is a negative integer; integer labels are class ids and "
                                f"must be >= 0 (or use names, numbered by their sorted order)")
        names_of_id = Counter(ids.values())
        alike = [n for n in unique if names_of_id[ids[n]] > 1]
        if alike:
            raise DNABuildError(f"{p}: labels {alike} name the same class id {ids[alike[0]]}; write each integer "
                                f"label one way")
    names = {i: n for n, i in ids.items()}
    grouped: Dict[str, List[Tuple[int, int, int, int]]] = {}
    for order, (rec, s, e, n) in enumerate(rows):
        grouped.setdefault(rec, []).append((s, e, ids[n], order))
    by_record, max_len = {}, {}
    for rec, items in grouped.items():
        arr = np.array(sorted(items), dtype=np.int64)  # (n, 4) sorted by start
        by_record[rec] = (arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
        max_len[rec] = int((arr[:, 1] - arr[:, 0]).max())
    return LabelIntervals(str(p), names, by_record, max_len)


# --------------------------------------------------------------------------------------------
# reading FASTA


def _is_fasta_name(name: str) -> bool:
    return name.lower().removesuffix(".gz").endswith(FASTA_SUFFIXES)


def _find_inputs(input_path: Path, skipper: BadInputSkipper) -> Tuple[List[Tuple[Path, str]], List[str]]:
    """((file, source name) pairs sorted by relative posix path, ignored files); see :func:`datasets_def.building.find_inputs`."""
    kinds = f"({', '.join(FASTA_SUFFIXES)}, optionally .gz)"
    return find_inputs(input_path, _is_fasta_name, "FASTA", f"a FASTA file {kinds}", f"FASTA files {kinds}", skipper,
                       DNABuildError)


def _iter_records(path: Path, source: str, skipper: BadInputSkipper) -> Iterator[Tuple[str, str]]:
    """Yield (record id, uppercase sequence) of one FASTA file; bad input goes to ``skipper``."""
    from Bio import SeqIO  # heavy import kept local: defining the dataset must stay cheap

    n_records = 0
    try:
        opened = _open_text(path)
    except OSError as exn:
        skipper.bad(source, f"cannot read file ({type(exn).__name__}: {exn.strerror or exn})")
        return
    try:
        with opened as fh:
            first = ""
            lineno = 0
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    first = line
                    break
            if not first:
                skipper.bad(source, "empty file (no FASTA records)")
                return
            if not first.startswith(">"):
                skipper.bad(source, f"not a FASTA file: line {lineno} starts with {first[:20]!r}, expected a '>' header line")
                return
            fh.seek(0)
            first_seen: Dict[str, int] = {}  # record id -> its 1-based ordinal in this file
            for record in SeqIO.parse(fh, "fasta"):
                n_records += 1
                where = f"{source}: record {record.id!r}"
                if record.id in first_seen:  # its windows' names (and BED labels) would be ambiguous
                    skipper.bad(where, f"duplicate record id: record {n_records} of the file repeats the id of "
                                       f"record {first_seen[record.id]}; record ids must be unique within a file")
                    continue
                first_seen[record.id] = n_records
                seq = str(record.seq)
                if not seq:
                    skipper.bad(where, "empty record (a header with no sequence)")
                    continue
                bad = find_invalid_base(seq)
                if bad is not None:
                    pos, char = bad
                    skipper.bad(where, f"invalid character {char!r} at position {pos} of the sequence (0-based, "
                                       "line breaks not counted); allowed: A C G T N and IUPAC codes R Y S W K M B D H V")
                    continue
                yield record.id, seq.upper()
    except DNABuildError:
        raise
    except (UnicodeDecodeError, EOFError, OSError, zlib.error, ValueError) as exn:  # incl. gzip.BadGzipFile
        after = f" after {n_records} record(s)" if n_records else ""
        skipper.bad(source, f"cannot read as FASTA{after}: {type(exn).__name__}: {exn}")


# --------------------------------------------------------------------------------------------
# building shards


@dataclass(kw_only=True)
class DNABuildReport(BuildReport):
    """What :func:`build_shards` wrote (:class:`datasets_def.building.BuildReport`; a sample is a window).

    Args:
        records: records per split.
        bases: bases in the windows per split (overlapping windows count bases twice).
        label_names: label id -> name, when a labels file was given.
        label_counts: per split, label name (or ``"null"``) -> windows.
        short_records: records dropped for being shorter than ``min_window``, as (source, record).
        windows_dropped_n: windows dropped for an ``N`` fraction above ``max_n_fraction``.
        bases_between_windows: record bases in no window because ``stride > window``.
    """

    records: Dict[str, int]
    bases: Dict[str, int]
    label_names: Optional[Dict[int, str]] = None
    label_counts: Dict[str, Dict[str, int]] = field(default_factory=dict)
    short_records: List[Tuple[str, str]] = field(default_factory=list)
    windows_dropped_n: int = 0
    bases_between_windows: int = 0

    @property
    def windows(self) -> Dict[str, int]:
        """Windows (samples) per split."""
        return self.samples

    @property
    def total_windows(self) -> int:
        """Samples over both splits."""
        return self.total_samples

    @property
    def total_records(self) -> int:
        """Records over both splits."""
        return sum(self.records.values())


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DNABuildError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def build_shards(
    input_path: PathLike,
    output_dir: PathLike,
    *,
    window: int = 1024,
    stride: Optional[int] = None,
    labels: Optional[PathLike] = None,
    min_window: int = 1,
    max_n_fraction: float = 1.0,
    samples_per_shard: int = 2000,
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> DNABuildReport:
    """Cut FASTA records into windows written to ``{output_dir}/{split}-{index:06d}.tar`` shards.

    Also writes ``{output_dir}/manifest.json`` (counts per split, label names and counts, short
    records, skipped inputs, build arguments).

    Args:
        input_path: a FASTA file (``.fa .fasta .fna .fas``, optionally ``.gz``) or a folder of them
            (searched recursively, sorted).
        output_dir: where shards go; must hold no shards/manifest unless ``overwrite``.
        window: window length in bases.
        stride: distance between window starts (default ``window``: no overlap). A stride larger
            than the window leaves the bases between windows out of every sample: the build
            warns with their count (also ``bases_between_windows`` in the manifest).
        labels: optional BED/TSV file labelling windows (see the module docstring).
        min_window: shortest record kept (as one window shorter than ``window``).
        max_n_fraction: drop (and count) windows with a larger fraction of N/ambiguous bases;
            1.0 keeps everything.
        samples_per_shard: windows per tar shard.
        val_fraction: fraction of records (by stable hash) put in the val split.
        seed: salt of the split hash.
        skip_bad: skip (and report) bad files and records instead of raising.
        overwrite: delete existing ``*.tar`` and manifest in ``output_dir`` first.
    """
    window = _check_int("window", window, 1)
    stride = window if stride is None else _check_int("stride", stride, 1)
    min_window = _check_int("min_window", min_window, 1)
    samples_per_shard = _check_int("samples_per_shard", samples_per_shard, 1)
    if not 0.0 <= val_fraction < 1.0:
        raise DNABuildError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not 0.0 <= max_n_fraction <= 1.0:
        raise DNABuildError(f"max_n_fraction must be in [0, 1], got {max_n_fraction!r}")
    src = Path(input_path).expanduser()
    out = Path(output_dir).expanduser()
    skipper = BadInputSkipper(skip_bad, DNABuildError)
    inputs, ignored = _find_inputs(src, skipper)
    intervals = read_labels(labels) if labels is not None else None
    prepare_output(out, overwrite, DNABuildError)
    log_ignored("dna", ignored, "FASTA (" + ", ".join(FASTA_SUFFIXES) + ", optionally .gz)")

    records = {s: 0 for s in SPLITS}
    windows = {s: 0 for s in SPLITS}
    bases = {s: 0 for s in SPLITS}
    record_bases = {s: 0 for s in SPLITS}
    label_counts: Dict[str, Dict[str, int]] = {s: {} for s in SPLITS}
    short: List[Tuple[str, str]] = []
    dropped_n = 0
    between = gaps = 0
    seen_records: set = set()
    ordinal = 0
    with ShardWriters(out, samples_per_shard, DNABuildError) as writers:
        for path, source in inputs:
            for rid, seq in _iter_records(path, source, skipper):
                seen_records.add(rid)
                spans = window_starts(len(seq), window, stride, min_window)
                if not spans:
                    short.append((source, rid))
                    continue
                split = stable_split(val_fraction, seed, source, rid)
                if stride > window:
                    lost = [b[0] - a[1] for a, b in zip(spans, spans[1:]) if b[0] > a[1]]
                    between += sum(lost)
                    gaps += len(lost)
                is_n = base_codes(seq) == 4 if max_n_fraction < 1.0 else None
                for i, (start, end) in enumerate(spans):
                    if is_n is not None and is_n[start:end].mean() > max_n_fraction:
                        dropped_n += 1
                        continue
                    label = intervals.label(rid, start, end) if intervals is not None else None
                    name = intervals.names[label] if label is not None else None
                    meta = {"record": rid, "start": start, "end": end, "strand": "+", "label": label,
                            "label_name": name, "source": source}
                    writers.write(split, {
                        "__key__": f"{ordinal:08d}_{i:06d}",
                        "seq": seq[start:end].encode("ascii"),
                        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                    })
                    windows[split] += 1
                    bases[split] += end - start
                    if intervals is not None:
                        key = "null" if name is None else name
                        label_counts[split][key] = label_counts[split].get(key, 0) + 1
                records[split] += 1
                record_bases[split] += len(seq)
                ordinal += 1
        shards = writers.close()
    if sum(windows.values()) == 0:
        writers.abort()
        raise DNABuildError(
            f"no windows written from {src}: {len(skipper.skipped)} skipped input(s) {skipper.skipped[:3]}, "
            f"{len(short)} record(s) shorter than min_window={min_window}, {dropped_n} window(s) over max_n_fraction"
        )

    report = DNABuildReport(
        output_dir=out, files=len(inputs), samples=windows, shards=shards, records=records, bases=bases,
        label_names=dict(intervals.names) if intervals is not None else None,
        label_counts=label_counts if intervals is not None else {},
        short_records=short, windows_dropped_n=dropped_n, skipped=skipper.skipped,
        bases_between_windows=between, ignored=len(ignored),
    )
    unmatched = sorted(set(intervals.by_record) - seen_records) if intervals is not None else []
    manifest = {
        "dataset": "dna",
        "fields": list(DNADatasetDef.fields),
        "files": len(inputs),
        **ignored_manifest(ignored),
        "splits": {
            s: {"records": records[s], "samples": windows[s], "shards": len(shards[s]), "bases": bases[s],
                "record_bases": record_bases[s]}
            for s in SPLITS
        },
        "shard_files": shards,
        "labels": None if intervals is None else {
            "file": intervals.path,
            "names": {str(i): n for i, n in sorted(intervals.names.items())},
            "counts": label_counts,
            "records_not_in_fasta": {"count": len(unmatched), "first": unmatched[:_MAX_LISTED]},
        },
        "short_records": {"count": len(short), "first": [list(s) for s in short[:_MAX_LISTED]]},
        "windows_dropped_n": dropped_n,
        "bases_between_windows": between,
        "build_args": build_args(src, samples_per_shard, val_fraction, seed, skip_bad, window=window, stride=stride,
                                 labels=None if labels is None else str(labels), min_window=min_window,
                                 max_n_fraction=max_n_fraction),
    }
    finish_build("dna", writers, manifest, skipper.skipped, DNABuildError)
    _warn_losses(report, window, stride, min_window, max_n_fraction, sum(record_bases.values()), gaps)
    return report


def _warn_losses(report: DNABuildReport, window: int, stride: int, min_window: int, max_n_fraction: float,
                 record_bases: int, gaps: int) -> None:
    """Build-output lines, with counts, for everything of the input that is in no sample (the manifest lists them
    too; skipped inputs are counted by :func:`datasets_def.building.finish_build`)."""
    if report.bases_between_windows:
        share = 100.0 * report.bases_between_windows / max(1, record_bases)
        logger.warning("dna build: stride=%d > window=%d: %d base(s) (%.1f%% of the records' bases) in %d gap(s) "
                       "between windows are in no sample (manifest: bases_between_windows)", stride, window,
                       report.bases_between_windows, share, gaps)
    if report.short_records:
        logger.warning("dna build: %d record(s) shorter than min_window=%d bases written as no window, e.g. %s "
                       "(manifest: short_records)", len(report.short_records), min_window, report.short_records[0])
    if report.windows_dropped_n:
        logger.warning("dna build: %d window(s) dropped for more than max_n_fraction=%g N/ambiguous bases "
                       "(manifest: windows_dropped_n)", report.windows_dropped_n, max_n_fraction)


# --------------------------------------------------------------------------------------------
# embedded default: a synthetic genome with planted motifs

CLASS_NAMES = ("background", "motif_1", "motif_2", "motif_3", "motif_4")
"""Window classes of the synthetic genome: label 0 has no motif, labels 1..4 one motif family each."""


@dataclass
class SyntheticGenome:
    """A generated genome and where its motifs were planted.

    Args:
        records: (record id, sequence) pairs; lowercase marks soft-masked segments.
        segments: (record, start, end, class name) of every ``segment``-long labelled piece.
        motifs: (record, start, end, class name) of every planted motif instance.
        pwms: class name -> (motif length, 4) position weight matrix over A C G T.
    """

    records: List[Tuple[str, str]]
    segments: List[Tuple[str, int, int, str]]
    motifs: List[Tuple[str, int, int, str]]
    pwms: Dict[str, np.ndarray]


def synthetic_genome(
    seed: int = 0, n_records: int = 40, segments_per_record: int = 75, segment: int = 256,
    motif_len: int = 12, instances: int = 3,
) -> SyntheticGenome:
    """Generate the embedded genome: segments of random background, each of one class.

    Every record has ``segments_per_record`` segments, equally many of each class in random order.
    Background bases are i.i.d. with a GC content drawn per segment from U(0.3, 0.7) (independent of
    the class, so GC is no shortcut); a motif segment gets ``instances`` motif instances sampled from
    its class's PWM, one in each equal part of the segment; 5% of segments hold a short N run and
    10% are lowercase (soft-masked), both independent of the class.

    Args:
        seed: seed of everything.
        n_records: number of records ("chromosomes") ``syn01``, ``syn02``, ...
        segments_per_record: labelled segments per record (a multiple of the 5 classes).
        segment: segment length in bases (windows of this size align with segments).
        motif_len: motif length in bases.
        instances: motif instances per motif segment.
    """
    if segments_per_record % len(CLASS_NAMES):
        raise ValueError(f"segments_per_record must be a multiple of {len(CLASS_NAMES)}, got {segments_per_record}")
    part = segment // instances
    if motif_len > part:
        raise ValueError(f"{instances} motifs of {motif_len} bases do not fit in a {segment}-base segment")
    rng = np.random.default_rng(seed)
    pwms = {name: rng.dirichlet(np.full(4, 0.2), size=motif_len) for name in CLASS_NAMES[1:]}
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    records, segments, motifs = [], [], []
    length = segments_per_record * segment
    for r in range(n_records):
        rid = f"syn{r + 1:02d}"
        classes = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), segments_per_record // len(CLASS_NAMES)))
        gc = np.repeat(rng.uniform(0.3, 0.7, size=segments_per_record), segment)  # (L,)
        u = rng.random(length)
        codes = (u >= (1 - gc) / 2).astype(np.uint8) + (u >= 0.5) + (u >= 0.5 + gc / 2)  # A, C, G, T
        chars = letters[codes]
        for j, c in enumerate(classes.tolist()):
            seg0 = j * segment
            name = CLASS_NAMES[c]
            segments.append((rid, seg0, seg0 + segment, name))
            if rng.random() < 0.05:
                n_len = int(rng.integers(1, 11))
                n0 = seg0 + int(rng.integers(0, segment - n_len + 1))
                chars[n0 : n0 + n_len] = ord("N")
            if c > 0:
                cum = np.cumsum(pwms[name], axis=1)  # (motif_len, 4)
                for i in range(instances):
                    m0 = seg0 + i * part + int(rng.integers(0, part - motif_len + 1))
                    draw = (rng.random((motif_len, 1)) > cum[:, :3]).sum(axis=1)
                    chars[m0 : m0 + motif_len] = letters[draw]
                    motifs.append((rid, m0, m0 + motif_len, name))
            if rng.random() < 0.10:
                chars[seg0 : seg0 + segment] |= 0x20  # ASCII lowercase
        records.append((rid, chars.tobytes().decode("ascii")))
    return SyntheticGenome(records, segments, motifs, pwms)


def write_fasta(records: Sequence[Tuple[str, str]], path: PathLike, width: int = 80) -> Path:
    """Write (id, sequence) pairs as FASTA with ``width``-base lines.

    Args:
        records: the records.
        path: output file.
        width: bases per line.
    """
    p = Path(path)
    with p.open("w", encoding="ascii", newline="\n") as fh:
        for rid, seq in records:
            fh.write(f">{rid}\n")
            fh.writelines(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
    return p


def _write_bed(rows: Sequence[Tuple[str, int, int, str]], path: Path) -> None:
    path.write_text("".join(f"{r}\t{s}\t{e}\t{n}\n" for r, s, e, n in rows), encoding="ascii")


def embedded_default(cache_dir: Optional[PathLike] = None) -> Path:
    """The embedded DNA corpus: a synthetic genome with planted motif classes, built once and cached.

    3000 windows of 256 bases (40 records of 75 segments, one window per segment), each labelled
    with its segment's class (:data:`CLASS_NAMES`, 600 windows per class), split by record into
    train and val (``val_fraction=0.2``). Built from :func:`synthetic_genome` with seed 0 at
    ``{cache_dir}/datasets/dna-synthetic-motifs-v1/`` in a temporary directory renamed into place
    once complete (``DONE`` written last). Next to the shards: ``labels.bed`` (segments),
    ``motifs.bed`` (planted instances) and ``source.json`` (generator settings and PWMs).

    Args:
        cache_dir: cache root; default ``$MMM_CACHE_DIR`` or ``~/.cache/mmm``.

    Returns:
        The directory holding ``train-*.tar``, ``val-*.tar`` and ``manifest.json``.
    """
    return cached_build(EMBEDDED_NAME, cache_dir, _build_synthetic, DNABuildError)


def _build_synthetic(out: Path) -> str:
    """Write the synthetic motif genome's windows into ``out`` (shards, beds, ``source.json``); returns the counts."""
    settings = {"seed": 0, "n_records": 40, "segments_per_record": 75, "segment": 256, "motif_len": 12, "instances": 3}
    genome = synthetic_genome(**settings)
    source = out / "source"
    source.mkdir(parents=True)
    fasta = write_fasta(genome.records, source / "synthetic.fa")
    _write_bed(genome.segments, out / "labels.bed")
    _write_bed(genome.motifs, out / "motifs.bed")
    report = build_shards(fasta, out, window=settings["segment"], labels=out / "labels.bed",
                          samples_per_shard=1000, val_fraction=0.2, seed=5)
    shutil.rmtree(source)
    if not (report.windows["train"] and report.windows["val"]):
        raise DNABuildError(f"synthetic genome split is degenerate: {report.windows}")
    info = {"generator": "datasets_def.dna.synthetic_genome", "settings": settings,
            "classes": list(CLASS_NAMES), "pwms": {k: np.round(v, 4).tolist() for k, v in genome.pwms.items()},
            "windows": report.windows, "label_counts": report.label_counts}
    (out / "source.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return f"{report.windows} windows"


# --------------------------------------------------------------------------------------------
# reading shards back


def iter_samples(shard_dir: PathLike, split: str = "train", *,
                 options: Optional[ReadOptions] = None) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Stream ``(seq, meta)`` of one split in shard order, with no extraction to disk, read as training reads
    them (:func:`mmm.modalities.dna.codec.iter_samples`); arguments as :func:`datasets_def.building.read_split`."""
    return dna_codec.iter_samples(list_shards(shard_dir, split=split), options)


def iter_sequences(shard_dir: PathLike, split: str = "train", *, options: Optional[ReadOptions] = None) -> Iterator[str]:
    """Stream the window sequences of one split (e.g. to train a BPE tokenizer); see :func:`iter_samples`."""
    return dna_codec.iter_sequences(list_shards(shard_dir, split=split), options)


def labels_of(shard_dir: PathLike, split: str = "train", *, options: Optional[ReadOptions] = None) -> np.ndarray:
    """Window labels of one split in shard order, -1 where a window has none (for linear probes).

    Args:
        shard_dir: directory of shards.
        split: ``"train"`` or ``"val"``.
        options: read settings (see :func:`iter_samples`).
    """
    return np.array([-1 if m.get("label") is None else m["label"]
                     for _, m in iter_samples(shard_dir, split, options=options)], dtype=np.int64)


@DATASETS.register("dna")
class DNADatasetDef:
    """The ``dna`` dataset: FASTA windows in WebDataset shards (fields ``seq`` and ``json``)."""

    name = "dna"
    fields = dna_codec.FIELDS

    build_shards = staticmethod(build_shards)
    embedded_default = staticmethod(embedded_default)
    check_sample = staticmethod(dna_codec.check_sample)
    iter_sequences = staticmethod(iter_sequences)
    iter_samples = staticmethod(iter_samples)
    labels_of = staticmethod(labels_of)
    read_labels = staticmethod(read_labels)
    window_starts = staticmethod(window_starts)
