"""The text codec: decode and validate one shard sample (fields ``txt`` and ``json``).

One set of rules for every side of a text shard: the training stages (:mod:`mmm.modalities.text.pipeline`),
tokenizer training on the training shards, ``mmm shards check`` (:func:`check_sample`) and the
shard writer (:mod:`datasets_def.text`).
"""
from __future__ import annotations

import json
import unicodedata
from typing import Any, Dict, Iterator, List, Optional

from mmm.data.tar import ReadOptions, read_decoded

FIELDS = ("txt", "json")


def decode_text(sample: Dict[str, Any]) -> str:
    """The ``txt`` field of one raw shard sample as text; errors are ``ValueError`` s naming the key
    (and the shard url).

    Args:
        sample: ``{"__key__", "__url__", "txt": bytes, ...}``.
    """
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    if "txt" not in sample:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"sample {key}: no 'txt' field (has {fields})", url)
    try:
        text = bytes(sample["txt"]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"sample {key}: 'txt' is not UTF-8 ({e})", url) from None
    if is_blank(text):  # it would yield no sequence: a bad sample, counted (as `mmm shards check` says)
        raise ValueError(f"sample {key}: 'txt' is empty (expected non-blank text: got {len(sample['txt'])} byte(s) "
                         f"of {BLANK_KINDS})", url)
    return text


BLANK_KINDS = "whitespace, control, format or replacement (U+FFFD) characters"


def is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing to learn from, whatever the tokenizer: only whitespace, control (Cc) or
    format (Cf) characters such as a zero-width space (which BERT's normalizer deletes), or U+FFFD replacement
    characters, what an earlier lossy decoding left of the text (BERT's normalizer deletes them too; byte-level BPE
    would learn their three bytes)."""
    return all(ch.isspace() or ch == "\ufffd" or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def json_object_problem(raw: bytes) -> Optional[str]:
    """What is wrong with a ``json`` field that must hold a UTF-8 JSON object, or None."""
    try:
        record = json.loads(bytes(raw).decode("utf-8"))
    except UnicodeDecodeError as exn:
        return f"field 'json' is not valid UTF-8 at byte offset {exn.start} ({exn.reason})"
    except json.JSONDecodeError as exn:
        return f"field 'json' is not valid JSON ({exn.msg} at line {exn.lineno} column {exn.colno})"
    if not isinstance(record, dict):
        return f"field 'json' must be a JSON object, got {type(record).__name__}"
    return None


def check_sample(sample: Dict[str, Any]) -> Optional[str]:
    """Say what is wrong with one raw shard sample's fields, or None when they decode.

    ``txt`` must be non-blank UTF-8 and ``json`` a UTF-8 JSON object; fields absent from
    ``sample`` are not checked here (the shard checker reports missing fields itself).

    Args:
        sample: ``{"<field>": bytes, ...}`` as read from a shard (``__key__`` etc. are ignored).
    """
    problems: List[str] = []
    txt = sample.get("txt")
    if txt is not None:
        try:
            text = bytes(txt).decode("utf-8")
        except UnicodeDecodeError as exn:
            problems.append(f"field 'txt' is not valid UTF-8 at byte offset {exn.start} ({exn.reason})")
        else:
            if is_blank(text):
                problems.append(f"field 'txt' is empty (expected non-blank text: got {len(txt)} byte(s) of "
                                f"{BLANK_KINDS})")
    if sample.get("json") is not None:
        problem = json_object_problem(sample["json"])
        if problem:
            problems.append(problem)
    return "; ".join(problems) or None


def iter_texts(urls: List[str], options: Optional[ReadOptions] = None) -> Iterator[str]:
    """The ``txt`` fields of ``urls`` in shard order (e.g. to train a tokenizer), read as training
    reads them (:func:`mmm.data.tar.read_samples`). Samples without ``txt`` are passed over.

    Args:
        urls: shard paths or urls.
        options: read settings (a run passes ``ReadOptions.from_config(cfg.data)``); None: defaults.
    """
    return read_decoded(urls, options, _sample_text)


def _sample_text(sample: Dict[str, Any]) -> Optional[str]:
    txt = sample.get("txt")
    if txt is None:
        return None
    try:
        return txt.decode("utf-8")
    except UnicodeDecodeError as exn:
        raise ValueError(f"text shard {sample['__url__']} sample {sample['__key__']!r}: 'txt' is not UTF-8 at byte "
                         f"offset {exn.start}; run `mmm shards check` to list every problem") from None
