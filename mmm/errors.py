"""Errors a user can cause, and their one-line form for the ``mmm`` command.

Every error mmm raises about its input (a config value, a file, a checkpoint, a shard) derives
from :class:`UserError` or is one of the library's older errors that the CLI lists with it
(:class:`~mmm.config.ConfigError` is a ``UserError``; ``RegistryError`` and ``SampleError`` keep
their historic bases). Their message already names the file, key or value and says what was
expected, so the CLI prints it as is. Anything else is a bug or an environment failure: the CLI
prints its type and message on one line with a hint to rerun with ``--debug``
(:func:`one_line` gives that line for any exception).
"""
from __future__ import annotations

import errno
import re


class UserError(Exception):
    """Base of errors caused by what a user gave mmm (config, files, checkpoints, data)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read safely, or does not fit the run resuming from it."""


# torch re-raises an exception from a DataLoader worker with the worker's whole traceback as its message:
# "Caught X in DataLoader worker process N.\nOriginal <the formatted exception>", where a chained exception's
# formatting starts with its cause (a cause raised without a traceback starts with its own error line)
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"
_WORKER_HEAD = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal ")
_QUALIFIED_PREFIX = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt): ")


def describe_os_error(e: OSError) -> str:
    """``OSError`` as a sentence naming the path: ``no space left on device: /runs/a/last.ckpt``."""
    if e.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif e.strerror:
        reason = e.strerror[0].lower() + e.strerror[1:]
    else:
        return message_of(e)
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{reason}: {' -> '.join(paths)}" if paths else reason


def message_of(e: BaseException) -> str:
    """The message of ``e`` on one line (a DataLoader worker's traceback reduced to its final error line)."""
    text = str(e)
    from_worker = _WORKER_TRACEBACK in text or _WORKER_HEAD.match(text) is not None
    if isinstance(e, OSError) and e.errno is not None and e.strerror and not from_worker:
        return describe_os_error(e)
    if isinstance(e, KeyError) and type(e).__str__ is KeyError.__str__ and len(e.args) == 1:
        text = f"missing key {e.args[0]!r}"
    if from_worker:
        head = text.split("\n", 1)[0].strip()  # "Caught SampleError in DataLoader worker process 0."
        lines = [ln.strip() for ln in text.split("\n", 1)[1].splitlines() if ln.strip()]
        last = _QUALIFIED_PREFIX.sub("", lines[-1]) if lines else ""
        where = re.search(r"in DataLoader worker process \d+", head)
        text = f"{last} ({where.group(0) if where else head.rstrip('.')})" if last else head
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(e).__name__


def one_line(e: BaseException, known: bool) -> str:
    """The error line the CLI prints after ``mmm <command>: error:``.

    Args:
        e: the exception.
        known: ``e`` is a user error whose message says it all; otherwise its type is named and a
            hint to rerun with ``--debug`` is added.
    """
    if known:
        return message_of(e)
    return (f"{type(e).__name__}: {message_of(e)} (unexpected error; rerun with --debug or MMM_DEBUG=1 "
            f"for the traceback)")
