"""The one tar shard reader: training pipelines, asset fitting, shard check/stats and the dataset readers.

Every path that reads shards goes through this module, so they all accept the same URL forms,
apply the same guards and group members into samples the same way:

* **URL forms**: a local path, ``file:``, ``pipe:cmd`` (the command's stdout), ``http://`` /
  ``https://`` (``curl``, as WebDataset does), and every other scheme of WebDataset's
  :func:`~webdataset.gopen.gopen`.
* **Member-size guard** (``max_member_bytes``): each member's size is read from its tar header
  and an oversized member is refused *before* it is read, so a huge (or decompression-bomb)
  member never lands in memory.
* **Read timeout** (``read_timeout_s``): a stream fed by a command (``pipe:``, ``http(s)://``)
  that delivers no data for that many seconds stops with :class:`ShardTimeout` naming the url,
  instead of waiting forever. Local files are read directly (a regular file never stalls).
* **Grouping**: members are grouped into samples as WebDataset's ``tarfile_to_samples`` does:
  consecutive members with the same key (path up to the first dot of the basename) form one
  sample, the field is the rest of the name, lower-cased; names without an extension and
  ``__meta__``-style names are ignored.
* **Errors** go to one handler (:class:`~mmm.data.errors.SampleErrorHandler`): it stops with a
  message naming the shard, or (``skip_bad``) skips, counts and reports.

:class:`ReadOptions` carries the settings (``data.max_member_bytes``, ``data.read_timeout_s``,
``data.skip_bad``, ``data.max_errors``) from a run's config to every reader.
"""
from __future__ import annotations

import math
import os
import re
import select
import subprocess
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generator, Iterable, Iterator, Optional, Sequence, Tuple

from mmm.data.errors import SampleErrorHandler

Handler = Callable[[Exception], bool]

DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
"""The largest member (sample field) read by default: 256 MiB, as ``data.max_member_bytes``."""
DEFAULT_READ_TIMEOUT_S = 600.0
"""How long a ``pipe:`` / ``http(s)://`` stream may deliver nothing by default, as ``data.read_timeout_s``."""

_CHUNK = 1 << 18  # bytes asked of a pipe per system call


# --------------------------------------------------------------------------------------------
# errors


_CURL_EXITS = {  # webdataset reads http(s) urls through curl; what its exit status means to a user
    6: "curl could not resolve the host",
    7: "curl could not connect to the server",
    22: "the server answered with an HTTP error (404 not found, 403 forbidden, ...)",
    28: "curl timed out",
    35: "the TLS handshake failed",
    56: "the connection broke while receiving",
}


def _explain_exit(url: str, status: int) -> str:
    """`` (what it means)`` for a known curl exit status of an http(s) url, else ``""``."""
    if url.startswith(("http://", "https://")) and status in _CURL_EXITS:
        return f" ({_CURL_EXITS[status]})"
    return ""


class ShardReadError(ValueError):
    """A tar shard is truncated or corrupt, or its stream failed; the message says where.

    ``args`` are ``(message, where)``: ``where`` names the member being read or the last one read.
    """


class ShardTimeout(ShardReadError):
    """A shard stream delivered no data for ``read_timeout_s`` seconds (the url is in the message)."""


class MemberTooLarge(ValueError):
    """A tar member is larger than ``max_member_bytes``; it was not read."""


def _check_max_member_bytes(value: Any) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_member_bytes must be a positive int or None, got {value!r}")
    return value


def _check_read_timeout(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"read_timeout_s must be a positive number of seconds or None (wait forever), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ReadOptions:
    """How shards are read: the member-size guard, the stream timeout and the bad-sample policy.

    Args:
        max_member_bytes: refuse members (sample fields) larger than this many bytes, checked on
            the tar header before reading; None: no limit.
        read_timeout_s: a ``pipe:`` / ``http(s)://`` stream that delivers no data for this many
            seconds stops with :class:`ShardTimeout`; None: wait forever.
        skip_bad: skip (and count) refused samples and broken shards instead of stopping.
        max_errors: with ``skip_bad``, stop once more than this many errors were seen.
    """

    max_member_bytes: Optional[int] = DEFAULT_MAX_MEMBER_BYTES
    read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S
    skip_bad: bool = False
    max_errors: Optional[int] = None

    def __post_init__(self) -> None:
        _check_max_member_bytes(self.max_member_bytes)
        object.__setattr__(self, "read_timeout_s", _check_read_timeout(self.read_timeout_s))

    @classmethod
    def from_config(cls, data: Any) -> "ReadOptions":
        """The options of a run's ``data`` section (:class:`~mmm.config.DataConfig`); errors name the key."""
        try:
            return cls(max_member_bytes=data.max_member_bytes,
                       read_timeout_s=getattr(data, "read_timeout_s", DEFAULT_READ_TIMEOUT_S),
                       skip_bad=bool(data.skip_bad), max_errors=data.max_errors)
        except ValueError as e:
            raise ValueError(f"data.{e}") from None

    def handler(self) -> Any:
        """A new :class:`~mmm.data.errors.SampleErrorHandler` with this policy."""
        return SampleErrorHandler(skip_bad=self.skip_bad, max_errors=self.max_errors)


# --------------------------------------------------------------------------------------------
# member names -> (key, field), as webdataset groups them


def split_member_name(name: str) -> Tuple[Optional[str], Optional[str]]:
    """``"dir/000_01.txt"`` -> ``("dir/000_01", "txt")``: key up to the first dot of the basename.

    Same rule as WebDataset's grouping (the field is lower-cased); ``(None, None)`` for a name
    with no extension, which WebDataset readers ignore.

    Args:
        name: a tar member name.
    """
    head, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None, None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def is_meta(name: str) -> bool:
    """WebDataset skips members named like ``__meta__`` (and anything under such a folder)."""
    return re.match(r"__[^/]*__($|/)", name) is not None


# --------------------------------------------------------------------------------------------
# opening a url


class _PipeStream:
    """A WebDataset ``Pipe`` (``pipe:``, ``http(s)://`` via curl, ...) read with a timeout.

    Reads go to the pipe's file descriptor after a ``poll`` limited to ``timeout`` seconds, so a
    command that writes nothing can never block the reader for longer. At the end of the stream
    the command's exit status is checked as WebDataset does (status 0 and the Pipe's ignored
    statuses, e.g. 141 for SIGPIPE, are fine). Closing early stops the command.
    """

    def __init__(self, pipe: Any, url: str, timeout: Optional[float]) -> None:
        self.pipe = pipe
        self.url = url
        self.timeout = timeout
        self.fd = pipe.stream.fileno()
        self.buf = b""
        self.eof = False
        self.closed = False
        self.stalled = False
        self.name = url

    def _wait_readable(self) -> None:
        if self.timeout is None:
            return
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            ready = poller.poll(self.timeout * 1000.0)
        else:  # pragma: no cover - platforms without poll
            ready = select.select([self.fd], [], [], self.timeout)[0]
        if not ready:
            self.stalled = True
            raise ShardTimeout(f"no data from {self.url} for {self.timeout:g} s (read_timeout_s={self.timeout:g}); "
                               "the command or server stalled", "(stream)")

    def _fill(self) -> None:
        self._wait_readable()
        chunk = os.read(self.fd, _CHUNK)
        if chunk:
            self.buf += chunk
            return
        self.eof = True
        self._check_exit()

    def _check_exit(self) -> None:
        proc = self.pipe.proc
        try:
            status = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise ShardTimeout(f"{self.url}: the command closed its output but did not exit within "
                               f"{self.timeout:g} s (read_timeout_s)", "(stream)") from None
        self.pipe.status = status
        if status not in self.pipe.ignore_status and not self.pipe.ignore_errors:
            raise ShardReadError(f"{self.url}: the command exited with status {status}{_explain_exit(self.url, status)}",
                                 "(stream)")

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError(f"{self.url}: read from a closed stream")
        while not self.eof and (size is None or size < 0 or len(self.buf) < size):
            self._fill()
        if size is None or size < 0:
            out, self.buf = self.buf, b""
        else:
            out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        proc = self.pipe.proc
        try:
            self.pipe.stream.close()  # a command still writing gets SIGPIPE
        except OSError:
            pass
        if proc.poll() is None:
            try:
                proc.wait(timeout=0.0 if self.stalled else 1.0)
            except subprocess.TimeoutExpired:
                _kill_tree(proc)  # still running (stalled, or ignoring SIGPIPE): stop it and what it started
                proc.wait()


def _children(pid: int) -> list:
    """Process ids whose parent is ``pid`` (Linux ``/proc``; empty elsewhere)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a ``pipe:`` command's shell and the processes it started (``sh -c "a | b"`` forks them)."""
    pending, tree = [proc.pid], []
    while pending:
        pid = pending.pop()
        kids = _children(pid)
        tree.extend(kids)
        pending.extend(kids)
    proc.kill()  # the shell first: it would report its killed children on stderr
    for pid in tree:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def open_shard(url: str, read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S) -> Any:
    """Open one shard url for reading (see the module docstring for the forms).

    Args:
        url: local path or url.
        read_timeout_s: limit on each wait for data from a command-fed stream; None: no limit.

    Returns:
        A binary file-like object with ``read`` and ``close``.
    """
    from webdataset.gopen import Pipe, gopen

    stream = gopen(url, "rb")
    if isinstance(stream, Pipe):
        return _PipeStream(stream, url, _check_read_timeout(read_timeout_s))
    return stream


# --------------------------------------------------------------------------------------------
# members of one shard


class _TarInfo(tarfile.TarInfo):
    """Records on the TarFile why reading headers stopped.

    ``TarFile.next`` ends iteration silently on a truncated, empty or invalid header after the
    first member, exactly as it does on the end-of-archive block, so a shard cut at or inside a
    header would look complete. The recorded error tells them apart.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exn:
            tarfile_._mmm_stop = exn  # type: ignore[attr-defined]
            raise


def _data_after_end_block(tar: tarfile.TarFile, chunk: int = 1 << 20) -> Optional[int]:
    """The byte offset of the first non-zero byte after the zero block that ended ``tar``'s members, or None.

    A tar ends with zero blocks and zero padding only. ``tarfile`` stops at the first zero block it meets,
    so a member header zeroed by corruption, or a second tar appended to the first, would silently end the
    shard there; reading the rest of the stream (normally a few KiB of padding) tells them apart.
    """
    at = tar.offset + tarfile.BLOCKSIZE  # the zero block itself was read
    while True:
        block = tar.fileobj.read(chunk)
        if not block:
            return None
        rest = block.lstrip(b"\0")
        if rest:
            return at + len(block) - len(rest)
        at += len(block)


def _compressed_data_after_stream(tar: tarfile.TarFile, chunk: int = 1 << 20) -> bool:
    """Whether anything but zero padding follows the first compressed stream of a compressed shard.

    ``tarfile`` decompresses one gzip/bz2/xz stream; ``cat a.tar.gz b.tar.gz`` is a valid multi-stream file
    whose second stream it never reads. What the decompressor left over (past gzip's 8-byte trailer) and
    what the raw stream still holds tell them apart.
    """
    stream = tar.fileobj
    decompressor = getattr(stream, "cmp", None)
    if decompressor is None:  # an uncompressed tar
        return False
    left = bytes(getattr(decompressor, "unused_data", b""))
    if getattr(stream, "comptype", "") == "gz":
        left = left[8:]  # CRC-32 and size: the gzip trailer, not read by tarfile's raw-deflate stream
    if left.strip(b"\0"):
        return True
    raw = getattr(stream, "fileobj", None)
    while raw is not None:
        block = raw.read(chunk)
        if not block:
            return False
        if block.strip(b"\0"):
            return True
    return False


_STOP_REASONS = {
    "EmptyHeaderError": "the stream ends without the end-of-archive marker (truncated at a member boundary)",
    "TruncatedHeaderError": "the stream ends inside a member header (truncated)",
    "InvalidHeaderError": "invalid member header",
}


def iter_members(url: str, read: Callable[[tarfile.TarInfo], bool],
                 read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S,
                 ) -> Generator[Tuple[tarfile.TarInfo, Optional[bytes]], None, None]:
    """Stream ``(member, data)`` for the non-directory, non-meta members of one shard.

    ``data`` is the member's bytes when it is a regular file and ``read(member)`` is True, else
    None (the member is then skipped in the stream, never held in memory). A tar or stream
    failure raises :class:`ShardReadError` (:class:`ShardTimeout` for a stalled stream) naming
    the byte and member; the consumer's own code runs between yields, outside this generator, so
    its exceptions are never mistaken for tar failures. An url that cannot be opened raises the
    opener's error (e.g. ``FileNotFoundError``).

    Args:
        url: the shard.
        read: whether to read a (regular file) member's bytes.
        read_timeout_s: see :func:`open_shard`.
    """
    stream = open_shard(url, read_timeout_s)
    tar = None
    reading: Optional[tarfile.TarInfo] = None
    last: Optional[str] = None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TarInfo)
        for info in tar:
            tar.members = []  # streaming: keep no list of every TarInfo
            if info.isdir() or is_meta(info.name):
                continue
            data = None
            if info.isreg() and read(info):
                reading = info
                fh = tar.extractfile(info)
                data = fh.read() if fh is not None else b""
                reading = None
            last = info.name
            yield info, data
        stop = getattr(tar, "_mmm_stop", None)
        after = f"after member {last!r}" if last else "before any member"
        if not isinstance(stop, tarfile.EOFHeaderError):  # anything but the end-of-archive block
            name = type(stop).__name__
            raise ShardReadError(f"unreadable tar at byte {tar.offset}, {after}: {_STOP_REASONS.get(name, name)}",
                                 last or "(start of tar)")
        data_at = _data_after_end_block(tar)
        if data_at is not None:
            raise ShardReadError(f"unreadable tar: a zero block at byte {tar.offset} ({after}) ends the archive, but "
                                 f"data follows at byte {data_at} (a zeroed member header, or tars concatenated); the "
                                 f"rest of the shard would be lost", last or "(start of tar)")
        if _compressed_data_after_stream(tar):
            raise ShardReadError(f"unreadable tar: compressed data follows the end of its first "
                                 f"{getattr(tar.fileobj, 'comptype', '')} stream ({after}): compressed tars "
                                 f"concatenated (e.g. with cat), whose later members would be lost",
                                 last or "(start of tar)")
    except ShardReadError as exn:
        if exn.args[1:] != ("(stream)",):
            raise
        at = (f"while reading member {reading.name!r}" if reading is not None
              else f"after member {last!r}" if last else "before any member")
        raise type(exn)(f"{exn.args[0]} ({at})",
                        reading.name if reading is not None else (last or "(start of tar)")) from None
    except Exception as exn:  # noqa: BLE001 - tarfile/gzip/lzma raise many types for a broken stream
        if reading is not None:
            at = f"while reading member {reading.name!r} ({reading.size} bytes from byte {reading.offset_data})"
        else:
            offset = getattr(tar, "offset", 0) if tar is not None else 0
            at = f"at byte {offset}, " + (f"after member {last!r}" if last else "before any member")
        raise ShardReadError(f"unreadable tar {at}: {type(exn).__name__}: {exn or 'no detail'} (truncated or corrupt)",
                             reading.name if reading is not None else (last or "(start of tar)")) from exn
    finally:
        if tar is not None:
            tar.close()
        stream.close()


# --------------------------------------------------------------------------------------------
# samples: grouping, the size guard, and errors to a handler


class _Stop(Exception):
    """The handler said stop (returned False): end the whole stream."""


def _handle(handler: Handler, exn: Exception, url: str) -> None:
    """Give ``exn`` (tagged with the shard url, as webdataset does) to ``handler``; raise _Stop if it says stop."""
    exn.args = tuple(exn.args) + (url,)
    if not handler(exn):
        raise _Stop()


def _samples_of_shard(url: str, max_member_bytes: Optional[int], handler: Handler,
                      read_timeout_s: Optional[float]) -> Iterator[Dict[str, Any]]:
    """Group one shard's members into samples; refused samples and tar failures go to ``handler``."""
    fits: Callable[[tarfile.TarInfo], bool] = (
        (lambda info: True) if max_member_bytes is None else (lambda info: info.size <= max_member_bytes)
    )
    members = iter_members(url, fits, read_timeout_s)
    try:
        yield from _group(url, members, max_member_bytes, handler)
    finally:
        members.close()


def member_kind(info: tarfile.TarInfo) -> str:
    """What a non-regular tar member is, in words."""
    if info.islnk():
        return f"a hard link to {info.linkname!r}"
    if info.issym():
        return f"a symbolic link to {info.linkname!r}"
    return f"tar type {info.type!r}"


def _group(url: str, members: Iterator[Tuple[tarfile.TarInfo, Optional[bytes]]], max_member_bytes: Optional[int],
           handler: Handler) -> Iterator[Dict[str, Any]]:
    current: Optional[Dict[str, Any]] = None
    refused = False
    while True:
        try:
            info, data = next(members)
        except StopIteration:
            break
        except ShardReadError as exn:  # truncated/corrupt/stalled: the sample being read and the rest of the shard are dropped
            message, complete = exn.args[0], None
            if current is not None and not refused and len(current) > 2:
                broken_key = split_member_name(exn.args[1])[0] if len(exn.args) > 1 else None
                if broken_key is not None and broken_key != current["__key__"]:
                    complete = current  # the break is in the next sample's member: this one was read whole
                else:
                    message += f"; sample {current['__key__']!r} is dropped too (its fields may go on past the break)"
            if complete is not None:
                yield complete
            _handle(handler, type(exn)(message), url)
            return
        except Exception as exn:  # noqa: BLE001 - the opener failed (missing file, failing pipe: command, ...)
            _handle(handler, exn, url)
            return
        key, ext = split_member_name(info.name)
        if key is None or ext is None:
            continue
        if current is None or key != current["__key__"]:
            if current is not None and not refused and len(current) > 2:
                yield current
            current, refused = {"__key__": key, "__url__": url}, False
        if refused:
            continue  # the rest of a refused sample (each member within the size limit)
        if not info.isreg():  # a streamed tar cannot follow a link back to an earlier member
            refused = True
            _handle(handler, ValueError(
                f"sample {key!r} field {ext!r}: tar member {info.name!r} is not a regular file ({member_kind(info)}); "
                f"a streamed shard holds no file data for it, so the sample is refused. Rebuild the shard with the "
                f"files themselves (GNU tar: --hard-dereference --dereference)"), url)
        elif ext in current:
            refused = True
            _handle(handler, ValueError(f"sample {key!r}: field {ext!r} appears twice (tar member {info.name!r})"), url)
        elif data is None:
            refused = True
            _handle(handler, MemberTooLarge(
                f"sample {key!r} field {ext!r} is {info.size} bytes, over max_member_bytes={max_member_bytes} "
                f"(tar member {info.name!r}, not read)"), url)
        else:
            current[ext] = data
    if current is not None and not refused and len(current) > 2:
        yield current


def _guarded_samples(src: Iterable[Dict[str, Any]], max_member_bytes: Optional[int],
                     handler: Optional[Handler] = None,
                     read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S) -> Iterator[Dict[str, Any]]:
    if handler is None:
        handler = ReadOptions().handler()
    try:
        for source in src:
            yield from _samples_of_shard(source["url"], max_member_bytes, handler, read_timeout_s)
    except _Stop:
        return


def guarded_tarfile_to_samples(max_member_bytes: Optional[int], handler: Optional[Handler] = None,
                               read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S) -> Callable[..., Any]:
    """Pipeline stage: shard urls (``{"url": ...}`` dicts) -> raw samples, through this module's reader.

    A drop-in for ``webdataset.tarfile_to_samples``: samples are ``{"__key__", "__url__",
    "<field>": bytes}`` grouped by key (basename up to the first dot; fields lower-cased). Each
    member's size is taken from its tar header; a member over ``max_member_bytes`` is skipped
    in the stream without being read into memory, and its sample is refused with a
    :class:`MemberTooLarge` error naming shard, key, field and size. Errors go to ``handler``:
    the default :class:`~mmm.data.stream.SampleErrorHandler` stops with that message; with
    ``skip_bad=True`` the whole sample is skipped and counted. A field repeated within a sample
    is refused the same way; a truncated, corrupt or stalled shard drops the sample being read
    and the rest of that shard.

    Args:
        max_member_bytes: largest member (field) size in bytes; None: no limit.
        handler: error handler (None: a new strict ``SampleErrorHandler``).
        read_timeout_s: see :func:`open_shard`.
    """
    import webdataset as wds

    _check_max_member_bytes(max_member_bytes)
    return wds.pipelinefilter(_guarded_samples)(max_member_bytes, handler, _check_read_timeout(read_timeout_s))


def read_samples(urls: Sequence[str], options: Optional[ReadOptions] = None,
                 handler: Optional[Handler] = None) -> Iterator[Dict[str, Any]]:
    """Raw samples of ``urls`` in order (no shuffling, no workers), e.g. for fitting assets.

    The same reader, guard and grouping as the training pipeline. With the default (strict)
    handler the first refused sample or broken shard stops with a
    :class:`~mmm.data.stream.SampleError` naming the shard and member.

    Args:
        urls: shard paths or urls (e.g. from :func:`~mmm.data.stream.list_shards`).
        options: the read settings (None: the defaults, as ``data.*`` defaults).
        handler: error handler (None: ``options.handler()``).
    """
    opts = options if options is not None else ReadOptions()
    h = handler if handler is not None else opts.handler()
    try:
        yield from _guarded_samples(({"url": u} for u in urls), opts.max_member_bytes, h, opts.read_timeout_s)
    finally:
        log = getattr(h, "log_summary", None)
        if log is not None:
            log()


def read_decoded(urls: Sequence[str], options: Optional[ReadOptions], decode: Callable[[Dict[str, Any]], Any],
                 strict_hint: str = "") -> Iterator[Any]:
    """``decode(sample)`` of every sample of ``urls`` (:func:`read_samples`), for fitting assets under training's
    bad-sample policy; a sample ``decode`` returns None for is passed over.

    A ``ValueError`` from ``decode`` is raised as it is (``strict_hint`` appended), or, with ``options.skip_bad``,
    given to the options' handler with its shard: skipped, counted, in the summary logged at the end.

    Args:
        urls: shard paths or urls.
        options: the read settings (None: the defaults).
        decode: raw sample → what the fit reads, None to pass it over; a ``ValueError`` names what is wrong.
        strict_hint: appended to the message of an error that stops the fit.
    """
    opts = options if options is not None else ReadOptions()
    handler = opts.handler()
    for sample in read_samples(urls, opts, handler):
        try:
            out = decode(sample)
        except ValueError as exn:
            if opts.skip_bad:
                exn.args = tuple(exn.args) + (sample.get("__url__", "?"),)  # the shard, as the handler names it
                handler(exn)  # counts and logs; raises past data.max_errors
                continue
            if strict_hint:
                exn.args = (f"{exn.args[0]} {strict_hint}",) + tuple(exn.args[1:])
            raise
        if out is not None:
            yield out
