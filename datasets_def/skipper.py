"""Bad input during a shard build: stop with a message naming it, or skip it and keep a list for the manifest."""
from __future__ import annotations

import logging
from typing import List, Tuple, Type

logger = logging.getLogger("mmm.data")


class BadInputSkipper:
    """Raise ``error`` naming the bad input or, with ``skip_bad``, record ``(where, reason)`` and go on.

    Every dataset definition's builder uses one; ``skipped`` goes into ``manifest.json`` so nothing
    is lost silently.

    Args:
        skip_bad: record and continue instead of raising.
        error: the exception type raised (the dataset's ``*BuildError``).
    """

    def __init__(self, skip_bad: bool, error: Type[Exception]) -> None:
        self.skip_bad = skip_bad
        self.error = error
        self.skipped: List[Tuple[str, str]] = []

    def bad(self, where: str, reason: str) -> None:
        """Report bad input at ``where`` (file, line, field) for ``reason``."""
        if not self.skip_bad:
            raise self.error(f"{where}: {reason} (pass --skip_bad to `mmm shards build`, or skip_bad=True to build_shards, to skip and report such input)")
        logger.warning("skipping %s: %s", where, reason)
        self.skipped.append((where, reason))

    def note(self, where: str, reason: str) -> None:
        """Record input left out by rule, not for being bad (e.g. a folder reached again through a
        symbolic link): never raises, always listed in the build output and the manifest."""
        logger.warning("skipping %s: %s", where, reason)
        self.skipped.append((where, reason))
