"""One split of a downstream task (raw inputs, labels, where each came from, what was skipped) and the error
that names bad downstream input; :mod:`mmm.downstream.data` reads splits, the modalities' input adapters
(:mod:`mmm.downstream.inputs`) fill them from their files."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple


class DownstreamDataError(ValueError):
    """Bad downstream input; the message names the file, row or sample, and the field."""


@dataclass
class Split:
    """One split of a task: raw inputs, raw labels, and where each came from.

    Args:
        path: the file or shard folder.
        inputs: raw inputs (text, text pair, base string, image, ``(waveform, rate)``).
        labels: raw labels as read (strings from tables, ints from shards).
        where: ``file:row`` or ``shard:key`` of each input.
        skipped: ``(where, reason)`` of rows skipped because ``skip_bad`` was set.
    """

    path: str
    inputs: List[Any]
    labels: List[Any]
    where: List[str]
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inputs)

    def skip(self, reasons: Dict[int, str]) -> "Split":
        """Move the inputs at the indices of ``reasons`` (index → why) to ``skipped``, keeping the others in order."""
        if reasons:
            self.skipped += [(self.where[i], why) for i, why in sorted(reasons.items())]
            keep = [i for i in range(len(self.inputs)) if i not in reasons]
            self.inputs = [self.inputs[i] for i in keep]
            self.labels = [self.labels[i] for i in keep]
            self.where = [self.where[i] for i in keep]
        return self

    def require_rows(self) -> "Split":
        """``self``, or a :class:`DownstreamDataError` naming the file when no input is left (how many were
        skipped, and the first reason)."""
        if not self.inputs:
            why = (f"{len(self.skipped)} skipped, e.g. {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped
                   else "it has no rows")
            raise DownstreamDataError(f"{self.path}: no usable rows ({why})")
        return self
