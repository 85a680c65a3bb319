"""The DNA codec: decode and validate one shard sample (fields ``seq`` and ``json``).

One set of rules, used by every side of a DNA shard: the training stages
(:mod:`mmm.modalities.dna.pipeline`), asset fitting (BPE on the training windows), ``mmm shards check``
(:func:`check_sample`) and the shard writer (:mod:`datasets_def.dna`), so what the builder writes,
the checker accepts and the reader decodes cannot drift apart.

A sample is ``{"seq": ASCII bases, "json": {"record", "start", "end", "label"?}}``: bases over
``A C G T N`` and the IUPAC ambiguity codes (upper case as written; the reader takes lower case too), ``end - start`` equal to the number of bases, and an
optional non-negative integer ``label`` (null = unlabelled).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mmm.data.tar import ReadOptions, read_decoded
from mmm.modalities.dna.tokenizer import find_invalid_base

FIELDS = ("seq", "json")
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas")
"""Suffixes of FASTA files (each optionally ``.gz``) read from folders (the DNA shard builder, ``mmm embed``)."""


@dataclass
class DNAWindow:
    """One decoded shard sample.

    Args:
        seq: the bases (as stored: uppercase ``ACGTN`` and IUPAC codes).
        label: the window's class from its json, -1 when absent or null.
        key: the shard sample's key.
    """

    seq: str
    label: int
    key: str


def decode_seq(raw: bytes, strict: bool = False) -> str:
    """The bases of a ``seq`` field; a ``ValueError`` says what is wrong (no sample prefix).

    Args:
        raw: the field's bytes.
        strict: refuse lower-case bases too (shards as the builder writes them, for
            :func:`check_sample`); the reader takes them, as the tokenizers do.
    """
    try:
        seq = bytes(raw).decode("ascii")
    except UnicodeDecodeError as e:
        raise ValueError(f"'seq' is not ASCII (byte offset {e.start})") from None
    if not seq:
        raise ValueError("'seq' is empty")
    bad = find_invalid_base(seq)
    if bad is None and strict and not seq.isupper():
        bad = next((i, c) for i, c in enumerate(seq) if c.islower())
    if bad is not None:
        case = "uppercase " if strict else ""
        raise ValueError(f"'seq' has invalid base {bad[1]!r} at position {bad[0]} "
                         f"(allowed: {case}A C G T N and IUPAC codes R Y S W K M B D H V)")
    return seq


def decode_meta(raw: bytes) -> Dict[str, Any]:
    """The window metadata of a ``json`` field (a JSON object); a ``ValueError`` says what is wrong."""
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"'json' is not valid UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"'json' must be a JSON object, got {type(meta).__name__}")
    return meta


def label_of(meta: Dict[str, Any]) -> int:
    """The window's class, -1 when absent or null; a ``ValueError`` for anything but a non-negative int."""
    label = meta.get("label")
    if label is None:
        return -1
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(f"json 'label' must be a non-negative integer or null, got {label!r}")
    return label


def span_problem(meta: Dict[str, Any], length: Optional[int]) -> Optional[str]:
    """What is wrong with the window's place in its record (``record``, ``start``, ``end``), or None."""
    problems = []
    if not isinstance(meta.get("record"), str):
        problems.append("'json' needs a string 'record'")
    start, end = meta.get("start"), meta.get("end")
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
        problems.append(f"'json' needs integers 0 <= start < end, got {start!r} and {end!r}")
    elif length is not None and end - start != length:
        problems.append(f"'json' says end - start = {end - start} but 'seq' has {length} bases")
    return "; ".join(problems) or None


def decode_window(sample: Dict[str, Any]) -> DNAWindow:
    """Decode one raw shard sample for training; errors are ``ValueError`` s naming the key (and the shard url).

    Args:
        sample: ``{"__key__", "__url__", "seq": bytes, "json": bytes}``; ``json`` is optional.
    """
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    if "seq" not in sample:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"sample {key}: no 'seq' field (has {fields})", url)
    try:
        seq = decode_seq(sample["seq"])
        label = label_of(decode_meta(sample["json"])) if "json" in sample else -1
    except ValueError as e:
        raise ValueError(f"sample {key}: {e}", url) from None
    return DNAWindow(seq, label, key)


def check_sample(sample: Dict[str, Any]) -> Optional[str]:
    """Say what is wrong with one raw shard sample's fields, or None when they decode.

    The rules of :func:`decode_window`, plus the window's span (``record``, ``start``, ``end``,
    written by the shard builder). Fields absent from ``sample`` are not checked here (the shard
    checker reports missing fields itself).

    Args:
        sample: ``{"<field>": bytes, ...}`` as read from a shard (``__key__`` etc. are ignored).
    """
    problems: List[str] = []
    length = None
    if sample.get("seq") is not None:
        try:
            length = len(decode_seq(sample["seq"], strict=True))
        except ValueError as e:
            problems.append(f"field {e}")
    if sample.get("json") is not None:
        try:
            meta = decode_meta(sample["json"])
            label_of(meta)
        except ValueError as e:
            problems.append(f"field {e}")
        else:
            problem = span_problem(meta, length)
            if problem:
                problems.append(f"field {problem}")
    return "; ".join(problems) or None


def iter_samples(urls: List[str], options: Optional[ReadOptions] = None) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """``(seq, meta)`` of every sample of ``urls`` in shard order (samples lacking ``seq`` or ``json``
    are passed over), read as training reads them (:func:`mmm.data.tar.read_samples`).

    Args:
        urls: shard paths or urls.
        options: read settings (a run passes ``ReadOptions.from_config(cfg.data)``); None: defaults.
    """
    return read_decoded(urls, options, _sample_window)


def _sample_window(sample: Dict[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
    if "seq" not in sample or "json" not in sample:
        return None
    try:
        return decode_seq(sample["seq"]), decode_meta(sample["json"])
    except ValueError as exn:
        raise ValueError(f"DNA shard {sample['__url__']} sample {sample['__key__']!r}: {exn}; run "
                         "`mmm shards check --dataset dna` to list every problem") from None


def iter_sequences(urls: List[str], options: Optional[ReadOptions] = None) -> Iterator[str]:
    """The window sequences of ``urls`` in shard order (e.g. to train a BPE tokenizer); see :func:`iter_samples`."""
    for seq, _ in iter_samples(urls, options):
        yield seq
