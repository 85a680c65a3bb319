"""Shard tools: validate shards (``check_shards``), measure them (``shard_stats``), and read them with a member-size limit.

* :func:`check_shards` reads every shard as a tar stream (nothing is extracted to disk), groups
  members into samples the way WebDataset does, and lists every problem it finds: unreadable or
  truncated tars, missing or unexpected fields, fields that do not decode (the dataset
  definition's ``check_sample``), duplicate keys, and counts that disagree with ``manifest.json``.
* :func:`shard_stats` counts samples, characters and tokens (or whitespace words when no
  tokenizer is given), with a power-of-two length histogram and percentiles.

Both read shards through :mod:`mmm.data.tar`, the reader training and asset fitting use: the same
url forms (local paths, ``pipe:``, ``http(s)://``), the same member-size guard (an oversized
member is reported, never read) and read timeout, and WebDataset's grouping of members into
samples. The reader's names (:func:`guarded_tarfile_to_samples`, :class:`MemberTooLarge`,
:func:`split_member_name`, ...) are re-exported here for existing callers.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from mmm.data.stream import ShardSpec, is_remote, list_shards, local_path
from mmm.data.tar import (DEFAULT_MAX_MEMBER_BYTES, DEFAULT_READ_TIMEOUT_S, MemberTooLarge, ShardReadError,  # noqa: F401
                          ShardTimeout, guarded_tarfile_to_samples, iter_members, member_kind, split_member_name)

MANIFEST = "manifest.json"
_SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d+)\.tar$")


def _split_of_shard(url: str) -> str:
    m = _SHARD_NAME.match(Path(url).name)
    return m.group("split") if m else "(unnamed)"


def _load_dataset(dataset: str) -> Any:
    from mmm.registry import DATASETS  # (its first lookup imports the dataset definitions)

    return DATASETS.create(dataset)


def _manifest_near(path: ShardSpec) -> Optional[Path]:
    """The ``manifest.json`` of a shard directory, or of the local folder holding a shard file or pattern."""
    if not isinstance(path, (str, Path)):
        return None
    spec = local_path(str(path))
    if is_remote(spec):
        return None
    p = Path(spec).expanduser()
    folder = p if p.is_dir() else p.parent
    return folder / MANIFEST if (folder / MANIFEST).is_file() else None


def resolve_dataset(path: ShardSpec, dataset: Optional[str]) -> str:
    """The dataset definition to read ``path`` with: ``dataset`` when given, else the ``dataset`` that the shards'
    ``manifest.json`` names (every ``mmm shards build`` writes it), else ``"text"``.

    Raises:
        ValueError: ``dataset`` differs from the one the manifest names (the shards would be checked against
            another dataset's fields: every sample a problem).
    """
    manifest_path = _manifest_near(path)
    named = None
    if manifest_path is not None:
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            manifest = None  # check_shards reports an unreadable manifest itself
        named = manifest.get("dataset") if isinstance(manifest, dict) else None
        named = named if isinstance(named, str) else None
    if dataset is None:
        return named or "text"
    if named is not None and dataset != named:
        raise ValueError(f"dataset {dataset!r} given, but {manifest_path} says these are {named!r} shards; "
                         f"drop --dataset (the manifest's is used) or pass --dataset {named}")
    return dataset


# --------------------------------------------------------------------------------------------
# check


class Problem(NamedTuple):
    """One thing wrong with a shard: the shard, where in it (sample key or member), and what."""

    shard: str
    where: str
    problem: str


@dataclass
class ShardCheckReport:
    """What :func:`check_shards` found. ``ok`` is True when ``problems`` is empty."""

    dataset: str
    path: str
    shards: List[str]
    samples: Dict[str, int]
    problems: List[Problem] = field(default_factory=list)
    manifest: Optional[str] = None

    @property
    def ok(self) -> bool:
        """No problems found."""
        return not self.problems

    @property
    def total_samples(self) -> int:
        """Samples over every split checked."""
        return sum(self.samples.values())

    def to_dict(self) -> Dict[str, Any]:
        """Plain-JSON form."""
        return {
            "dataset": self.dataset, "path": self.path, "ok": self.ok, "shards": list(self.shards),
            "samples": dict(self.samples), "manifest": self.manifest,
            "problems": [p._asdict() for p in self.problems],
        }

    def to_text(self, max_problems: Optional[int] = None) -> str:
        """Summary line(s) and one line per problem.

        Args:
            max_problems: list at most this many problems (None: all of them).
        """
        per_split = ", ".join(f"{s}: {n} samples" for s, n in sorted(self.samples.items())) or "no samples"
        manifest = f"compared with {self.manifest}" if self.manifest else "no manifest.json to compare with"
        lines = [f"{self.dataset} shards at {self.path}: {len(self.shards)} shard(s), {per_split}; {manifest}"]
        if self.ok:
            lines.append("ok: no problems found")
            return "\n".join(lines)
        lines.append(f"{len(self.problems)} problem(s):")
        shown = self.problems if max_problems is None else self.problems[:max_problems]
        lines += [f"  {Path(p.shard).name} [{p.where}]: {p.problem}" for p in shown]
        if len(shown) < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


def _check_one_shard(url: str, fields: Tuple[str, ...], check_sample: Optional[Callable[[Dict[str, Any]], Optional[str]]],
                     problems: List[Problem], optional: Tuple[str, ...] = (),
                     max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
                     read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S) -> Tuple[int, bool]:
    """Read one shard; append its problems. Returns (samples seen, whether the whole tar was read).

    ``fields`` must be in every sample; ``optional`` ones may be (e.g. one of an image's
    ``jpg``/``png``/``webp``; the dataset's ``check_sample`` says which combinations are valid).
    A member over ``max_member_bytes`` is a problem (training refuses its sample) and is not read.
    """
    expected = set(fields)
    allowed = expected | set(optional)
    samples = 0
    seen_keys: Dict[str, int] = {}
    current: Optional[Dict[str, Any]] = None

    def finish(sample: Optional[Dict[str, Any]]) -> None:
        nonlocal samples
        if sample is None:
            return
        samples += 1
        key = sample["__key__"]
        present = set(sample) - {"__key__"}
        missing, extra = sorted(expected - present), sorted(present - allowed)
        if missing:
            problems.append(Problem(url, key, f"missing field(s) {missing} (has {sorted(present)}; expected {sorted(expected)})"))
        if extra:
            problems.append(Problem(url, key, f"unexpected field(s) {extra} (expected {sorted(allowed)})"))
        if check_sample is not None:  # fields not read (over the size limit) are reported already
            bad = check_sample({k: v for k, v in sample.items() if k in allowed and v is not None})
            if bad:
                problems.append(Problem(url, key, bad))

    try:
        fits = (lambda _info: True) if max_member_bytes is None else (lambda info: info.size <= max_member_bytes)
        for info, data in iter_members(url, fits, read_timeout_s):
            if not info.isreg():
                problems.append(Problem(url, info.name, f"not a regular file ({member_kind(info)}); readers refuse its "
                                                         f"sample (a streamed tar holds no file data for it)"))
                continue
            key, ext = split_member_name(info.name)
            if key is None or ext is None:
                problems.append(Problem(url, info.name, "member name has no extension; readers skip it"))
                continue
            if current is None or key != current["__key__"]:
                finish(current)
                if key in seen_keys:
                    problems.append(Problem(url, key, f"duplicate key: sample {key!r} appears again "
                                                      f"(first as sample {seen_keys[key]} of this shard)"))
                seen_keys.setdefault(key, samples)
                current = {"__key__": key}
            if ext in current:
                problems.append(Problem(url, info.name, f"duplicate key: field {ext!r} of sample {key!r} appears twice"))
                continue
            if data is None:
                problems.append(Problem(url, info.name, f"{info.size} bytes, over max_member_bytes={max_member_bytes}: "
                                                        f"readers refuse sample {key!r} (member not read)"))
            current[ext] = data
    except ShardReadError as exn:
        problems.append(Problem(url, exn.args[1], f"{exn.args[0]}; the rest of this shard was not checked"))
        return samples, False
    except (OSError, ValueError) as exn:  # the shard could not be opened at all (missing file, unknown url scheme)
        problems.append(Problem(url, "(shard)", f"cannot open shard: {type(exn).__name__}: {exn}"))
        return samples, False
    finish(current)
    if samples == 0:
        problems.append(Problem(url, "(shard)", "holds no sample (an empty tar): training reads nothing from it"))
    return samples, True


def _load_manifest(directory: Path, problems: List[Problem]) -> Optional[Dict[str, Any]]:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exn:
        problems.append(Problem(str(path), MANIFEST, f"cannot read manifest: {type(exn).__name__}: {exn}"))
        return None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        problems.append(Problem(str(path), MANIFEST, "manifest must be a JSON object with a 'splits' object"))
        return None
    return manifest


def _compare_with_manifest(manifest: Dict[str, Any], manifest_path: str, split_shards: Dict[str, List[str]],
                           counts: Dict[str, int], complete: Dict[str, bool], problems: List[Problem]) -> None:
    """Shard lists and per-shard sample counts of each split against ``manifest.json``."""
    files = manifest.get("shard_files") if isinstance(manifest.get("shard_files"), dict) else {}
    per_shard = (manifest.get("build_args") or {}).get("samples_per_shard")
    for split, urls in sorted(split_shards.items()):
        info = manifest["splits"].get(split)
        if not isinstance(info, dict) or not isinstance(info.get("samples"), int):
            problems.append(Problem(manifest_path, split, f"split {split!r} has shards on disk but no sample count in the manifest"))
            continue
        on_disk = {Path(u).name: u for u in urls}
        listed = files.get(split)
        missing: List[str] = []
        if isinstance(listed, list):
            missing = sorted(set(listed) - set(on_disk))
            for name in missing:
                problems.append(Problem(manifest_path, name, f"shard listed in the manifest for split {split!r} is missing"))
            for name in sorted(set(on_disk) - set(listed)):
                problems.append(Problem(on_disk[name], name, f"shard is not listed in the manifest for split {split!r}"))
        expected_total = info["samples"]
        names = sorted(listed) if isinstance(listed, list) else sorted(on_disk)
        shard_reported = False
        if isinstance(per_shard, int) and per_shard > 0 and names:
            # the builder fills every shard but the last one to samples_per_shard
            for i, name in enumerate(names):
                if name not in on_disk or not complete.get(on_disk[name], False):
                    continue
                want = per_shard if i < len(names) - 1 else expected_total - per_shard * (len(names) - 1)
                got = counts[on_disk[name]]
                if got != want:
                    shard_reported = True
                    problems.append(Problem(on_disk[name], name, f"{got} samples, but the manifest implies {want} "
                                            f"(split {split!r}: {expected_total} samples in {len(names)} shard(s) "
                                            f"of {per_shard})"))
        got_total = sum(counts[u] for u in urls)
        if not shard_reported and not missing and all(complete.get(u, False) for u in urls) and got_total != expected_total:
            problems.append(Problem(manifest_path, split, f"split {split!r} has {got_total} samples in its shards, "
                                                          f"but the manifest says {expected_total}"))


def check_shards(path: ShardSpec, dataset: Optional[str] = None, split: Optional[str] = None, *,
                 max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
                 read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S) -> ShardCheckReport:
    """Read every shard and list what is wrong with it; nothing is extracted to disk.

    Args:
        path: a shard directory (its ``manifest.json``, if any, is compared too), a ``.tar``
            file, a pattern or a list (anything :func:`mmm.data.stream.list_shards` accepts).
        dataset: dataset definition name; its ``fields`` are the fields every sample must have,
            and its ``check_sample(sample) -> Optional[str]``, when it has one, checks they decode.
            None: the one ``manifest.json`` names (:func:`resolve_dataset`), else ``"text"``.
        split: only the shards of this split (``{split}-*.tar``) of a directory; None: all.
        max_member_bytes: a member larger than this is listed as a problem (training's reader
            refuses its sample with the same default ``data.max_member_bytes``) and not read; None: no limit.
        read_timeout_s: a ``pipe:`` / ``http(s)://`` stream silent this long is a problem; None: wait forever.

    Raises:
        FileNotFoundError: no shard matched ``path`` / ``split``.
        ValueError: ``dataset`` differs from the one ``manifest.json`` names.
    """
    dataset = resolve_dataset(path, dataset)
    ds = _load_dataset(dataset)
    urls = list_shards(path, split=split)
    problems: List[Problem] = []
    counts: Dict[str, int] = {}
    complete: Dict[str, bool] = {}
    samples: Dict[str, int] = {}
    split_shards: Dict[str, List[str]] = {}
    for url in urls:
        n, whole = _check_one_shard(url, tuple(ds.fields), getattr(ds, "check_sample", None), problems,
                                    tuple(getattr(ds, "optional_fields", ())), max_member_bytes, read_timeout_s)
        counts[url], complete[url] = n, whole
        s = _split_of_shard(url)
        samples[s] = samples.get(s, 0) + n
        split_shards.setdefault(s, []).append(url)
    manifest_path = None
    directory = Path(local_path(str(path))).expanduser() if isinstance(path, (str, Path)) else None
    if directory is not None and directory.is_dir():
        manifest = _load_manifest(directory, problems)
        if manifest is not None:
            manifest_path = str(directory / MANIFEST)
            _compare_with_manifest(manifest, manifest_path, split_shards, counts, complete, problems)
    return ShardCheckReport(dataset, str(path), urls, samples, problems, manifest_path)


# --------------------------------------------------------------------------------------------
# stats


def _length_bin(n: int) -> int:
    """Bin 0 holds 0; bin k >= 1 holds [2**(k-1), 2**k)."""
    return n.bit_length()


def _bin_label(b: int) -> str:
    if b == 0:
        return "0"
    lo, hi = 1 << (b - 1), (1 << b) - 1
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _percentile(lengths: Counter, total: int, q: float) -> int:
    """Nearest-rank percentile of a length histogram (exact; q in (0, 100])."""
    rank = max(1, math.ceil(q / 100.0 * total))
    seen = 0
    for length in sorted(lengths):
        seen += lengths[length]
        if seen >= rank:
            return length
    raise ValueError("empty histogram")


@dataclass
class ShardStats:
    """What :func:`shard_stats` measured. ``unit`` is ``"tokens"`` or ``"words"`` (whitespace-split); ``text`` is
    what one length counts: a ``"sample"`` (its ``txt``), or a ``"caption"`` for a dataset whose samples hold
    several texts that train as separate sequences (image-text: one caption per pair)."""

    dataset: str
    path: str
    shards: int
    samples: Dict[str, int]
    characters: int
    unit: str
    total_units: int
    lengths: Dict[int, int]
    tokenizer: Optional[str] = None
    max_len: Optional[int] = None
    sequences: Optional[int] = None
    samples_split: Optional[int] = None
    text: str = "sample"

    @property
    def total_texts(self) -> int:
        """Lengths counted: samples, or captions."""
        return sum(self.lengths.values())

    @property
    def total_samples(self) -> int:
        """Samples over every split read."""
        return sum(self.samples.values())

    def percentiles(self) -> Dict[str, int]:
        """``{"min", "p50", "p90", "p99", "max"}`` of the per-sample length in ``unit`` (nearest rank)."""
        hist = Counter(self.lengths)
        n = sum(hist.values())
        if n == 0:
            return {}
        return {"min": min(hist), "p50": _percentile(hist, n, 50), "p90": _percentile(hist, n, 90),
                "p99": _percentile(hist, n, 99), "max": max(hist)}

    def histogram(self) -> List[Tuple[str, int]]:
        """``[(bin label, samples), ...]`` over power-of-two length bins, from the shortest bin to the longest one used."""
        bins: Counter = Counter()
        for length, n in self.lengths.items():
            bins[_length_bin(length)] += n
        if not bins:
            return []
        return [(_bin_label(b), bins.get(b, 0)) for b in range(min(bins), max(bins) + 1)]

    def to_dict(self) -> Dict[str, Any]:
        """Plain-JSON form (histogram and percentiles included)."""
        return {
            "dataset": self.dataset, "path": self.path, "shards": self.shards, "samples": dict(self.samples),
            "total_samples": self.total_samples, "characters": self.characters, "unit": self.unit,
            "text": self.text, "total_texts": self.total_texts, "tokenizer": self.tokenizer,
            "total_units": self.total_units,
            "mean_units": self.total_units / self.total_texts if self.total_texts else 0.0,
            "percentiles": self.percentiles(), "histogram": [list(b) for b in self.histogram()],
            "max_len": self.max_len, "sequences": self.sequences, "samples_split": self.samples_split,
        }

    def to_markdown(self) -> str:
        """A markdown summary table, percentiles and the length histogram."""
        n, t = self.total_texts, self.text
        unit_note = (f"tokens of the tokenizer at {self.tokenizer} (no special tokens)" if self.unit == "tokens"
                     else "whitespace-separated words (no tokenizer given; pass one for token counts)")
        rows = [("shards", str(self.shards)),
                *[(f"samples ({s})", str(c)) for s, c in sorted(self.samples.items())],
                ("samples", str(self.total_samples)), *([(f"{t}s", str(n))] if t != "sample" else []),
                ("characters", str(self.characters)), (f"{self.unit}", str(self.total_units)),
                (f"{self.unit} per {t} (mean)", f"{self.total_units / n:.1f}" if n else "-")]
        rows += [(f"{self.unit} per {t} ({k})", str(v)) for k, v in self.percentiles().items()]
        if self.sequences is not None:
            rows.append((f"sequences at max_len={self.max_len}", str(self.sequences)))
            rows.append(("samples cut into several sequences" if t == "sample" else
                         f"{t}s cut at max_len (their ends are not trained)", str(self.samples_split)))
        lines = [f"## {self.dataset} shards at {self.path}", "", f"Lengths are in {unit_note}.", "",
                 "| | |", "|---|---:|", *[f"| {k} | {v} |" for k, v in rows], "",
                 f"| {self.unit} per {t} | {t}s | share |", "|---:|---:|---:|"]
        for label, count in self.histogram():
            lines.append(f"| {label} | {count} | {100.0 * count / n:.1f}% |")
        return "\n".join(lines) + "\n"


def _sample_text(sample: Dict[str, Any], where: str) -> str:
    """A text sample's ``txt``, decoded; a ValueError naming ``where`` when it is missing or not UTF-8."""
    if "txt" not in sample:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"{where}: no 'txt' field (has {have}); run `mmm shards check` for every problem")
    try:
        return sample["txt"].decode("utf-8")
    except UnicodeDecodeError as exn:
        raise ValueError(f"{where}: 'txt' is not UTF-8 at byte offset {exn.start}; "
                         "run `mmm shards check` for every problem") from None


def _stop_on_error(exn: Exception) -> bool:
    """Handler for :func:`shard_stats`: any read error stops with a ValueError naming the shard."""
    args = list(exn.args)
    url = args[-1] if len(args) > 1 and isinstance(args[-1], str) else "(unknown shard)"
    raise ValueError(f"shard {url}: {type(exn).__name__}: {args[0] if args else exn}; "
                     "run `mmm shards check` to list every problem") from exn


def shard_stats(path: ShardSpec, dataset: Optional[str] = None, split: Optional[str] = None,
                tokenizer: Optional[str] = None, max_len: Optional[int] = None, batch_size: int = 256, *,
                max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES,
                read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S) -> ShardStats:
    """Count samples, characters and tokens (or words) of a text dataset's shards.

    A dataset definition whose samples hold several texts that train separately gives ``texts_of(sample,
    where) -> list of str`` and ``text_name`` (image-text: its captions, each one pair cut at ``max_len``):
    lengths are then per text, and ``max_len`` counts the texts it cuts. A bad sample (missing ``txt``, not
    UTF-8) or an unreadable shard stops with an error naming the shard and key; ``mmm shards check`` lists
    every such problem.

    Args:
        path: shard directory, ``.tar`` file, pattern or list (as for :func:`list_shards`).
        dataset: dataset definition name; it must have a ``txt`` field. None: the one ``manifest.json`` names,
            else ``"text"``.
        split: only this split's shards of a directory; None: all.
        tokenizer: directory of a saved :class:`~mmm.modalities.text.tokenizer.TextTokenizer`;
            None counts whitespace-separated words instead of tokens.
        max_len: with a tokenizer, also count the sequences each sample becomes when cut at this
            many tokens including ``[CLS]``/``[SEP]`` (the training pipeline's ``encode_chunks``).
        batch_size: texts per tokenizer call.
        max_member_bytes: a member larger than this stops with an error naming it (not read); None: no limit.
        read_timeout_s: a ``pipe:`` / ``http(s)://`` stream silent this long stops with an error; None: wait forever.
    """
    dataset = resolve_dataset(path, dataset)
    ds = _load_dataset(dataset)
    texts_of = getattr(ds, "texts_of", None)
    if texts_of is None and "txt" not in ds.fields:
        raise ValueError(f"shard stats count text: dataset {dataset!r} has fields {list(ds.fields)}, no 'txt'")
    if max_len is not None and tokenizer is None:
        raise ValueError("shard stats: max_len needs a tokenizer (sequences are counted in tokens); pass tokenizer=DIR")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3):
        raise ValueError(f"shard stats: max_len must be an int >= 3 (room for [CLS], one token and [SEP]), got {max_len!r}")
    if batch_size < 1:
        raise ValueError(f"shard stats: batch_size must be >= 1, got {batch_size}")
    tok = None
    if tokenizer is not None:
        from mmm.modalities.text.tokenizer import TextTokenizer

        tok = TextTokenizer.load(tokenizer)
    urls = list_shards(path, split=split)
    samples: Dict[str, int] = {}
    lengths: Counter = Counter()
    totals = {"chars": 0, "units": 0, "sequences": 0, "split": 0}

    def flush(texts: List[str]) -> None:
        if tok is None:
            counted = [len(t.split()) for t in texts]
        else:
            encoded = tok.encode_batch(texts)
            counted = [len(ids) for ids, _ in encoded]
            if max_len is not None and texts_of is not None:  # each text is one sequence, cut at max_len
                totals["sequences"] += len(encoded)
                totals["split"] += sum(n + 2 > max_len for n in counted)
            elif max_len is not None:
                for ids, word_ids in encoded:
                    pieces = len(tok.chunk(ids, word_ids, max_len))
                    totals["sequences"] += pieces
                    totals["split"] += pieces > 1
        for n in counted:
            lengths[n] += 1
            totals["units"] += n
        texts.clear()

    batch: List[str] = []
    reader = guarded_tarfile_to_samples(max_member_bytes, handler=_stop_on_error, read_timeout_s=read_timeout_s)
    for sample in reader(iter([{"url": u} for u in urls])):
        where = f"shard {sample['__url__']} sample {sample['__key__']!r}"
        texts = texts_of(sample, where) if texts_of is not None else [_sample_text(sample, where)]
        s = _split_of_shard(sample["__url__"])
        samples[s] = samples.get(s, 0) + 1
        totals["chars"] += sum(len(x) for x in texts)
        batch.extend(texts)
        if len(batch) >= batch_size:
            flush(batch)
    if batch:
        flush(batch)
    return ShardStats(
        dataset=dataset, path=str(path), shards=len(urls), samples=samples, characters=totals["chars"],
        unit="tokens" if tok is not None else "words", total_units=totals["units"], lengths=dict(lengths),
        tokenizer=str(tokenizer) if tokenizer is not None else None, max_len=max_len,
        sequences=totals["sequences"] if max_len is not None else None,
        samples_split=totals["split"] if max_len is not None else None,
        text=getattr(ds, "text_name", "sample") if texts_of is not None else "sample",
    )
