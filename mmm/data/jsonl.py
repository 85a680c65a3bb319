"""JSON Lines input: one JSON object per line, blank lines skipped, errors naming the line.

Shared by every reader of a JSONL table (shard builders' label and caption files, fine-tuning
tables), so a bad line reads the same everywhere.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, Type


def json_objects(lines: Iterable[str], where: Callable[[int], str], error: Type[Exception],
                 skip: Optional[Callable[[str, str], None]] = None) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line (numbered from 1).

    Args:
        lines: the text lines (an open file, ``text.splitlines()``).
        where: line number -> how errors name it (``lambda n: f"{path}:{n}"``).
        error: raised, naming the line, for a line that is not JSON or not a JSON object.
        skip: when given, a bad line is passed to it as ``(where, reason)`` and left out instead
            of raising ``error`` (the caller counts it: ``--skip_bad``).
    """
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e.msg})"
        else:
            if isinstance(obj, dict):
                yield n, obj
                continue
            problem = f"expected a JSON object, got {type(obj).__name__}"
        if skip is None:
            raise error(f"{where(n)}: {problem}")
        skip(where(n), problem)
