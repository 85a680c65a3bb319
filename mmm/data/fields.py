"""Reading the fields of one raw shard sample (``{"__key__", "__url__", field: bytes}``), with errors naming it.

Every modality's decode stage reads its payload field (one of several accepted encodings) and the
optional ``json`` metadata the same way, so a bad sample reads the same whichever modality meets it.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Sequence, Type


def sample_where(sample: Mapping[str, Any]) -> str:
    """``"shard url:key"``: how errors name a raw sample."""
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def first_field(sample: Mapping[str, Any], fields: Sequence[str], what: str, error: Type[Exception]) -> str:
    """The first of ``fields`` the sample has (e.g. ``png`` of the image fields); ``error`` naming the sample if none.

    Args:
        sample: a raw shard sample.
        fields: the accepted field names, in order of preference.
        what: the payload, in the message (``"image"``).
        error: the exception raised.
    """
    for f in fields:
        if f in sample:
            return f
    have = sorted(k for k in sample if not k.startswith("__"))
    raise error(f"{sample_where(sample)}: no {what} field (expected one of {list(fields)}, has {have})")


def sample_json(sample: Mapping[str, Any], error: Type[Exception]) -> Dict[str, Any]:
    """The sample's ``json`` field as a dict (empty when it has none); ``error`` naming the sample when that
    field is not UTF-8 JSON or not an object."""
    if "json" not in sample:
        return {}
    where = sample_where(sample)
    try:
        meta = json.loads(bytes(sample["json"]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{where}: field 'json' is not valid UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict):
        raise error(f"{where}: field 'json' must be an object, got {type(meta).__name__}")
    return meta
