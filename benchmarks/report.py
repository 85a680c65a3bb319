"""Shared output of the benchmark scripts: print the markdown table, optionally save JSON and markdown."""
from __future__ import annotations

import json
from typing import Any, Optional


def emit(table: str, payload: Any, json_path: Optional[str] = None, markdown_path: Optional[str] = None) -> None:
    """Print ``table``; write ``payload`` as JSON and ``table`` as markdown where paths are given.

    Args:
        table: the markdown table.
        payload: JSON-able result.
        json_path: where to write the JSON (None = don't).
        markdown_path: where to write the markdown (None = don't).
    """
    print()
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(table + "\n")
