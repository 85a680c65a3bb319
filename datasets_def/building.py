"""What every shard builder shares: finding inputs, the output folder, stable splits, atomic shard writers, the manifest.

One rule for every dataset definition (text, DNA, image, audio, image-text):

* **Inputs** are found by :func:`find_files`: folders are searched recursively in sorted order,
  symbolic links to folders are followed (as torchvision's ``ImageFolder`` does), and a folder
  reached a second time (a symlink loop, or two links to one folder) is not searched again but
  listed as skipped. Extensions match case-insensitively (``A.TXT`` is a text file). A folder
  that cannot be listed, or a file link pointing nowhere, is bad input: an error naming it, or
  skipped and listed with ``skip_bad``. Files of other kinds are counted as ignored.
* **The output folder** (:func:`prepare_output`) must not be, or lie under, a regular file; it
  must hold no shards or manifest unless ``overwrite``; temporary files a killed build left
  behind are removed.
* **Shards** (:class:`ShardWriters`) are ``{split}-{index:06d}.tar``, rotated on
  ``samples_per_shard`` only (every shard but a split's last is full, which ``mmm shards check``
  relies on). Each is written to a temporary name in the same folder, flushed to disk and then
  renamed, as checkpoints are: an interrupted or disk-full build never leaves a truncated shard
  under its final name. ``manifest.json`` is written the same way, last.
* **Splits** (:func:`stable_split`) come from a seeded hash, the same on every machine and run.
* **A build ends** with :func:`finish_build`: the manifest is written last (the shards are
  deleted when it cannot be) and skipped inputs are counted in the build output.
* **Embedded sets** (:func:`cached_build`) are built once into ``{cache_dir}/datasets/{name}``,
  in a temporary folder renamed into place when complete (a ``DONE`` marker written last).
* **Reading a split back** (:func:`read_split`) goes through :func:`mmm.data.tar.read_samples`,
  as training reads shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Type, Union

from datasets_def.skipper import BadInputSkipper

logger = logging.getLogger("mmm.data")

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_OURS = re.compile(r"^(?:.+-\d+\.tar|" + re.escape(MANIFEST) + r")$")
MAX_LISTED = 20
"""Ignored files named in a manifest (the count is always complete)."""
DONE_MARKER = "DONE"
"""Written last into an embedded set's folder: the set is complete."""
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(kw_only=True)
class BuildReport:
    """What every shard build reports; each dataset kind's report adds its own counts. Per-split dicts are
    keyed by ``"train"`` / ``"val"``.

    Args:
        output_dir: the shard folder.
        files: input files read.
        samples: shard samples per split.
        shards: shard file names per split.
        skipped: ``(where, reason)`` of each bad input skipped with ``skip_bad`` (and folders not searched again).
        ignored: files under the input folder of another kind.
    """

    output_dir: Path
    files: int
    samples: Dict[str, int]
    shards: Dict[str, List[str]]
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    ignored: int = 0

    @property
    def total_samples(self) -> int:
        """Shard samples over both splits."""
        return sum(self.samples.values())


def check_build_args(samples_per_shard: Any, val_fraction: Any, error: Type[Exception]) -> None:
    """Refuse a ``samples_per_shard`` that is not a positive int or a ``val_fraction`` outside [0, 1)."""
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise error(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise error(f"val_fraction must be in [0, 1), got {val_fraction!r}")


def stable_split(val_fraction: float, seed: int, *parts: Any) -> str:
    """``"train"`` or ``"val"`` for one input unit, by a seeded hash of ``parts`` (same everywhere, every run).

    Args:
        val_fraction: share of units that go to val.
        seed: salt of the hash.
        parts: what identifies the unit (e.g. source file and record id).
    """
    if val_fraction <= 0.0:
        return "train"
    return "val" if _stable_hash(seed, *parts) / 2.0**64 < val_fraction else "train"


def _stable_hash(seed: int, *parts: Any) -> int:
    """A 64-bit hash of ``(seed, *parts)``, the same on every machine and run (unlike Python's ``hash``)."""
    text = "\0".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def hash_order(items: List[Any], seed: int, key: Callable[[Any], str]) -> List[Any]:
    """``items`` in a seeded pseudo-random order: by a hash of ``(seed, key(item))``, the same everywhere, every run.

    A builder writes its input files in this order instead of sorted by path, so every shard mixes the classes of
    class folders (or the speakers of a speaker-sorted corpus), and the first samples of the shards, which fit the
    normalisation statistics and k-means codebooks (``target_clips``, ``stats_clips``, ``codebook_images``), are a
    sample of the whole set, as HuBERT's k-means subset is, not its first classes.
    """
    return sorted(items, key=lambda item: _stable_hash(seed, key(item)))


# --------------------------------------------------------------------------------------------
# inputs


def has_suffix(name: str, suffixes: Iterable[str]) -> bool:
    """Whether ``name`` ends with one of ``suffixes``, ignoring case (``A.TXT`` is a ``.txt``)."""
    low = name.lower()
    return any(low.endswith(s.lower()) for s in suffixes)


def find_files(root: Path, accept: Callable[[str], bool], skipper: BadInputSkipper, *,
               skip_hidden: bool = False) -> Tuple[List[Tuple[Path, str]], List[str]]:
    """The files under folder ``root`` whose name ``accept`` takes, and the names it does not take.

    Symbolic links to folders are followed; each real folder is searched once (a link back to a
    folder already searched, e.g. a loop, is listed with ``skipper.note``). A folder that cannot
    be listed, or a link whose target is missing, goes to ``skipper.bad`` (an error naming it, or
    skipped and listed with ``skip_bad``).

    Args:
        root: an existing folder.
        accept: file name -> whether the builder reads it.
        skipper: where bad and skipped inputs are reported.
        skip_hidden: pass over names starting with ``.`` (files and folders) without counting them.

    Returns:
        ``([(path, relative posix path)], [ignored relative paths])``, both sorted by relative path.
    """
    found: List[Tuple[Path, str]] = []
    ignored: List[str] = []
    searched: Dict[Tuple[int, int], str] = {}
    pending: List[Tuple[Path, str]] = [(root, "")]
    while pending:
        folder, rel = pending.pop()
        where = rel or str(root)
        try:
            st = folder.stat()
        except OSError as exn:
            skipper.bad(where, f"cannot open folder ({type(exn).__name__}: {exn.strerror or exn})")
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in searched:
            target = os.path.realpath(folder)
            skipper.note(where, f"symbolic link to folder {target} (reached before as {searched[ident]!r}): "
                                "not searched again (a symlink loop or a second link to one folder)")
            continue
        searched[ident] = rel or "."
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exn:
            skipper.bad(where, f"cannot list folder ({type(exn).__name__}: {exn.strerror or exn})")
            continue
        folders = []
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            path = Path(entry.path)
            try:
                mode = os.stat(entry.path).st_mode  # follows symbolic links
            except OSError as exn:  # a dangling link, a link loop, or no permission to look
                if entry.is_symlink() and accept(entry.name):
                    skipper.bad(child, f"symbolic link to {os.readlink(entry.path)!r} cannot be followed "
                                       f"({type(exn).__name__}: {exn.strerror or exn})")
                elif accept(entry.name):
                    skipper.bad(child, f"cannot read file ({type(exn).__name__}: {exn.strerror or exn})")
                else:
                    ignored.append(child)
                continue
            if stat.S_ISDIR(mode):
                folders.append((path, child))
            elif stat.S_ISREG(mode) and accept(entry.name):
                found.append((path, child))
            else:
                ignored.append(child)
        pending.extend(reversed(folders))  # depth first, in sorted order
    found.sort(key=lambda pair: pair[1])
    ignored.sort()
    return found, ignored


def find_inputs(input_path: Path, accept: Callable[[str], bool], kind: str, one: str, many: str,
                skipper: BadInputSkipper, error: Type[Exception], *, single_file: bool = True,
                skip_hidden: bool = False) -> Tuple[List[Tuple[Path, str]], List[str]]:
    """The input files of a build: ``input_path`` itself when it is one such file, else :func:`find_files` under it.

    Args:
        input_path: a file or a folder.
        accept: file name -> whether the builder reads it.
        kind: the dataset kind, in messages (``"text"``).
        one, many: what the builder reads, in messages (``"a .txt or .jsonl file"``, ``".txt or .jsonl files"``).
        skipper: where bad and skipped inputs are reported.
        error: raised when ``input_path`` is a file of another kind, or a folder holding none to read.
        single_file: whether one file may be given instead of a folder.
        skip_hidden: as :func:`find_files`.

    Returns:
        ``([(path, source name)], [ignored relative paths])``, sorted by relative path (a single file: its name).
    """
    if not input_path.exists():
        raise FileNotFoundError(f"{kind} input path does not exist: {input_path}")
    if not input_path.is_dir():
        if not single_file or not accept(input_path.name):
            raise error(f"{input_path}: expected {one + ' or a folder of them' if single_file else 'a folder of ' + many}")
        return [(input_path, input_path.name)], []
    found, ignored = find_files(input_path, accept, skipper, skip_hidden=skip_hidden)
    if not found:
        raise error(f"no {many} found under {input_path} (searched recursively, {len(ignored)} other file(s) "
                    f"ignored; skipped: {skipper.skipped[:3]})")
    return found, ignored


def log_ignored(kind: str, ignored: List[str], wanted: str) -> None:
    """One build-output line counting the files a builder does not read (only when there are some)."""
    if ignored:
        more = f" and {len(ignored) - 3} more" if len(ignored) > 3 else ""
        logger.warning("%s build: ignored %d file(s) that are not %s: %s%s", kind, len(ignored), wanted,
                       ", ".join(ignored[:3]), more)


def ignored_manifest(ignored: List[str]) -> Dict[str, Any]:
    """Manifest entries for ignored files: their count and the first few names."""
    return {"ignored_files": len(ignored), "ignored_examples": ignored[:MAX_LISTED]}


def read_file(path: Path, where: str, skipper: BadInputSkipper) -> Optional[bytes]:
    """The bytes of an input file, or None after telling ``skipper`` why it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exn:
        skipper.bad(where, f"cannot read file ({type(exn).__name__}: {exn.strerror or exn})")
        return None


# --------------------------------------------------------------------------------------------
# the output folder


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover (a failed earlier build in this process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def clean_temporaries(out: Path, error: Type[Exception]) -> List[str]:
    """Delete the temporary shard/manifest files (``.train-000000.tar.tmp-PID``) a killed build left in ``out``.

    A temporary file of a process that is still running means another build is writing into
    ``out``: that is an error naming the process. Returns the names removed.
    """
    removed = []
    for p in sorted(out.iterdir()):
        m = _TMP.match(p.name)
        if m is None or not _OURS.match(m.group("name")) or not p.is_file():
            continue
        pid = int(m.group("pid"))
        if _alive(pid):
            raise error(f"output_dir {out}: {p.name} is being written by process {pid}, another shard build into the "
                        "same folder; wait for it to finish, or delete the file if that process is not a build")
        try:
            p.unlink()
        except OSError as exn:
            raise error(f"output_dir {out}: cannot remove the leftover temporary file {p.name}: {exn}") from None
        removed.append(p.name)
    if removed:
        logger.warning("removed %d temporary file(s) an interrupted build left in %s: %s", len(removed), out,
                       ", ".join(removed[:3]) + (" ..." if len(removed) > 3 else ""))
    return removed


def prepare_output(out: Path, overwrite: bool, error: Type[Exception]) -> None:
    """Make ``out`` ready for a build: a folder (created if needed) with no shards or manifest.

    Raises ``error`` when ``out`` or a folder above it is a regular file, when it cannot be
    created, or when it already holds shards or a manifest and ``overwrite`` is False (with
    ``overwrite`` they are deleted). Temporary files of an interrupted build are removed.
    """
    for p in (out, *out.parents):
        if os.path.lexists(p):
            if not p.is_dir():
                what = "exists and is not a directory" if p == out else f"lies under {p}, which is a file, not a folder"
                raise error(f"output_dir {out} {what}")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise error(f"cannot create output_dir {out}: {type(exn).__name__}: {exn.strerror or exn}") from None
    clean_temporaries(out, error)
    old = sorted(out.glob("*.tar")) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])
    if old and not overwrite:
        raise error(f"output_dir {out} already holds shards or a manifest ({old[0].name}, {len(old)} file(s)); "
                    "use an empty directory or pass overwrite=True (--overwrite) to delete them first")
    for p in old:
        try:
            p.unlink()
        except OSError as exn:
            raise error(f"output_dir {out}: cannot delete the old {p.name} (overwrite): {exn}") from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_manifest(out: Path, manifest: Dict[str, Any], error: Type[Exception] = OSError) -> Path:
    """Write ``out/manifest.json`` atomically (temporary file, fsync, rename); errors name the file."""
    final = out / MANIFEST
    tmp = _temporary(final)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as exn:
        raise error(f"cannot write {final}: {type(exn).__name__}: {exn.strerror or exn}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(out)
    return final


# --------------------------------------------------------------------------------------------
# shard writers


class _Shard:
    """One shard being written: a tar stream into a temporary file next to its final name."""

    def __init__(self, final: Path) -> None:
        import webdataset as wds  # heavy import kept local: defining a dataset must stay cheap

        self.final = final
        self.tmp = _temporary(final)
        self.fh = open(self.tmp, "wb")
        self.tar = wds.TarWriter(self.fh, encoder=False, mtime=0)
        self.count = 0

    def finish(self) -> None:
        self.tar.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        for close in (self.tar.close, self.fh.close):
            try:
                close()
            except Exception:  # noqa: BLE001 - the stream may be half written (disk full): close what can be
                pass
        try:
            self.tmp.unlink()
        except OSError:
            pass


class ShardWriters:
    """``{out}/{split}-{index:06d}.tar`` shards of every split, written atomically.

    A split's first shard is opened with its first sample; a shard is finished (fsync, then
    renamed to its final name) when it holds ``samples_per_shard`` samples, or on :meth:`close`.
    An ``OSError`` while writing (disk full, ...) raises ``error`` naming the shard; call
    :meth:`abort` then (a builder's ``except BaseException``): it deletes the temporary file and
    the shards this build finished, so the folder is as the build found it.

    Args:
        out: the output folder (made ready by :func:`prepare_output`).
        samples_per_shard: samples per shard.
        error: the builder's error type.
    """

    def __init__(self, out: Path, samples_per_shard: int, error: Type[Exception] = OSError) -> None:
        self.out = out
        self.samples_per_shard = samples_per_shard
        self.error = error
        self.open: Dict[str, _Shard] = {}
        self.next_index = {s: 0 for s in SPLITS}
        self.written: Dict[str, List[str]] = {s: [] for s in SPLITS}
        self.samples = {s: 0 for s in SPLITS}

    def _fail(self, shard: Path, exn: OSError) -> Exception:
        return self.error(f"cannot write shard {shard}: {type(exn).__name__}: {exn.strerror or exn} "
                          "(nothing is left under a shard's final name; free space or choose another output_dir)")

    def write(self, split: str, sample: Dict[str, Any]) -> None:
        """Add one sample (``{"__key__", field: bytes, ...}``) to ``split``."""
        shard = self.open.get(split)
        if shard is None:
            final = self.out / f"{split}-{self.next_index.setdefault(split, 0):06d}.tar"
            try:
                shard = self.open[split] = _Shard(final)
            except OSError as exn:
                raise self._fail(final, exn) from None
            self.next_index[split] += 1
        try:
            shard.tar.write(sample)
        except OSError as exn:
            raise self._fail(shard.final, exn) from None
        shard.count += 1
        self.samples[split] = self.samples.get(split, 0) + 1
        if shard.count >= self.samples_per_shard:
            self._finish(split)

    def _finish(self, split: str) -> None:
        shard = self.open.pop(split)
        try:
            shard.finish()
        except OSError as exn:
            self.open[split] = shard  # abort() discards it
            raise self._fail(shard.final, exn) from None
        self.written.setdefault(split, []).append(shard.final.name)

    def close(self) -> Dict[str, List[str]]:
        """Finish every open shard; returns the shard names per split (every split of :data:`SPLITS` listed)."""
        for split in list(self.open):
            self._finish(split)
        if self.written:
            _fsync_dir(self.out)
        return {s: sorted(self.written.get(s, [])) for s in sorted(set(SPLITS) | set(self.written))}

    def abort(self) -> None:
        """Discard the open shards and delete the finished ones of this build."""
        for shard in self.open.values():
            shard.discard()
        self.open.clear()
        for names in self.written.values():
            for name in names:
                try:
                    (self.out / name).unlink()
                except OSError:
                    pass
        self.written = {s: [] for s in SPLITS}

    @property
    def total(self) -> int:
        """Samples written so far, over every split."""
        return sum(self.samples.values())

    def __enter__(self) -> "ShardWriters":
        return self

    def __exit__(self, kind: Any, exn: Any, tb: Any) -> None:
        if kind is not None:
            self.abort()  # the folder held no shards before: these are ours, incomplete


# --------------------------------------------------------------------------------------------
# the end of a build


def build_args(input_path: Path, samples_per_shard: int, val_fraction: float, seed: int, skip_bad: bool,
               **own: Any) -> Dict[str, Any]:
    """A manifest's ``build_args``: the arguments every builder takes, around the builder's ``own`` ones."""
    return {"input_path": str(input_path), **own, "samples_per_shard": samples_per_shard,
            "val_fraction": val_fraction, "seed": seed, "skip_bad": skip_bad}


def finish_build(kind: str, writers: ShardWriters, manifest: Dict[str, Any], skipped: List[Tuple[str, str]],
                 error: Type[Exception]) -> None:
    """Write ``manifest.json`` last, with the ``skipped`` inputs listed (if it cannot be written, the build's
    shards are deleted), then one build-output line counting the skipped inputs (only when there are some).

    Args:
        kind: the dataset kind, for the build output (``"text"``).
        writers: the build's closed shard writers.
        manifest: the manifest.
        skipped: ``(where, reason)`` of the inputs skipped with ``skip_bad``.
        error: the builder's error type.
    """
    manifest = {**manifest, "skipped": [list(s) for s in skipped]}
    try:
        write_manifest(writers.out, manifest, error)
    except BaseException:
        writers.abort()
        raise
    if skipped:
        logger.warning("%s build skipped %d input(s), listed in %s: %s", kind, len(skipped), writers.out / MANIFEST,
                       "; ".join(f"{w}: {r}" for w, r in skipped[:3]) + (" ..." if len(skipped) > 3 else ""))


# --------------------------------------------------------------------------------------------
# embedded sets: a cached, atomic build


def default_cache_dir() -> Path:
    """``$MMM_CACHE_DIR`` or ``~/.cache/mmm``."""
    return Path(os.environ.get("MMM_CACHE_DIR") or Path.home() / ".cache" / "mmm").expanduser()


def cached_build(name: str, cache_dir: Optional[PathLike], build: Callable[[Path], str],
                 error: Type[Exception]) -> Path:
    """``{cache_dir}/datasets/{name}``, built once by ``build(tmp_dir)`` and renamed into place.

    ``build`` writes the set into an empty temporary folder next to the final one and returns a
    few words for the build output (``"3000 windows"``); ``DONE`` is written after it, then the
    folder is renamed, so an interrupted build never leaves a partial set. When two processes
    build at once, the first rename wins and the other's copy is deleted.

    Args:
        name: the set's folder name (``"text-stdlib-docstrings-v1"``).
        cache_dir: cache root; None: :func:`default_cache_dir`.
        build: writes the set into the folder it is given.
        error: the builder's error type (a folder of that name that mmm did not build).
    """
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "datasets"
    final = root / name
    if (final / DONE_MARKER).is_file():
        return final
    if final.exists():
        if (final / DONE_MARKER).is_file():  # another process renamed its finished build into place just now
            return final
        raise error(f"{final} exists but has no {DONE_MARKER} marker (not built by mmm?); delete it to rebuild")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    start = time.perf_counter()
    try:
        tmp.mkdir(parents=True)
        summary = build(tmp)
        (tmp / DONE_MARKER).write_text("ok\n", encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / DONE_MARKER).is_file():  # lost a race only if the winner finished
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built embedded set %s: %s in %.1f s", final, summary, time.perf_counter() - start)
    return final


# --------------------------------------------------------------------------------------------
# reading a split back


def read_split(shard_dir: PathLike, split: str, options: Any, fields: Callable[[Dict[str, Any]], Optional[str]],
               error: Type[Exception]) -> Iterator[Tuple[Dict[str, Any], str, Dict[str, Any]]]:
    """``(raw sample, "url:key", json dict)`` of every sample of one split, in shard order, with no extraction to disk.

    Shards are read by :func:`mmm.data.tar.read_samples`, as training reads them: local paths,
    ``pipe:`` and ``http(s)://`` urls, the member-size guard and the read timeout of ``options``.

    Args:
        shard_dir: directory of shards (or anything :func:`mmm.data.stream.list_shards` accepts).
        split: ``"train"`` or ``"val"``.
        options: a :class:`mmm.data.tar.ReadOptions` (a run passes ``ReadOptions.from_config(cfg.data)``); None: defaults.
        fields: raw sample -> what is wrong with its fields (besides ``json``), or None.
        error: raised naming the sample when ``fields`` objects or ``json`` is missing or not UTF-8 JSON.
    """
    from mmm.data.stream import list_shards
    from mmm.data.tar import read_samples

    for sample in read_samples(list_shards(shard_dir, split=split), options):
        where = f"{sample['__url__']}:{sample['__key__']}"
        problem = fields(sample) or (None if "json" in sample else "lacks the 'json' field")
        if problem:
            raise error(f"{where}: {problem} (has {sorted(k for k in sample if not k.startswith('__'))})")
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise error(f"{where}: field 'json' is not UTF-8 JSON ({type(exn).__name__}: {exn})") from None
        yield sample, where, meta
