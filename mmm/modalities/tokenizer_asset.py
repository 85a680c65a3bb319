"""A tokenizer as a modality's asset (text, DNA): one order for finding it, its files in checkpoints.

Every token modality keeps its tokenizer the same way (:class:`TokenizerAsset`, mixed into the
modality), so a run resumes with the tokenizer it started with, whichever modality it is:

1. **The run folder holds one** (a resumed run): that one. It must be the one the config asks for:
   the tokenizer at ``model.<name>.tokenizer_path`` when that is set (compared file by file, as
   both save), otherwise the settings it was built with (the modality's :meth:`check_reused`).
2. **``model.<name>.tokenizer_path``**: loaded (:meth:`check_given` may warn), copied to the run folder.
3. **Otherwise** built or trained on the training shards (:meth:`train_tokenizer`) and saved to the
   run folder, with :meth:`fit_record` beside it when the modality keeps one.

Its files travel inside checkpoints as text (:func:`tokenizer_files` / :func:`tokenizer_from_files`),
so a checkpoint is self-contained.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

from mmm.config import ConfigError

if TYPE_CHECKING:  # a tokenizer module imports save_folder: this module stays free of torch
    from torch import nn

    from mmm.config import EncoderConfig
    from mmm.data.tar import ReadOptions

PathLike = Union[str, "os.PathLike[str]"]
FIT_FILE = "fitted_with.json"
"""Settings a run-folder tokenizer was trained with (compared when the folder is reused)."""


def save_folder(directory: PathLike) -> Path:
    """The folder a tokenizer's ``save`` writes into, created if needed; refused when it is a file."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"cannot save tokenizer: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


class SavedTokenizer:
    """A tokenizer saved as a folder: a metadata JSON (``meta_file``: ``format_version``, ``kind`` and the
    tokenizer's settings, :meth:`saved_meta`) beside the tokenizer's own files. Mixed into the text and
    DNA tokenizers, which save and load alike: a subclass gives :meth:`saved_meta` and
    :meth:`from_saved`, and extends :meth:`save` with its own files."""

    meta_file: str
    meta_keys: Tuple[str, ...] = ("kind",)
    meta_version: int = 1
    what: str = "tokenizer"
    kind: str

    def saved_meta(self) -> Dict[str, Any]:
        """The settings :meth:`from_saved` rebuilds this tokenizer from (``kind`` and ``meta_keys`` at least)."""
        raise NotImplementedError

    @classmethod
    def from_saved(cls, directory: Path, meta: Dict[str, Any]) -> "SavedTokenizer":
        """The tokenizer a checked metadata dict (and the folder's other files) describe.

        Args:
            directory: the saved folder.
            meta: its metadata, already checked by :meth:`load`.
        """
        raise NotImplementedError

    def save(self, directory: PathLike) -> Path:
        """Write the metadata JSON into ``directory`` (created if needed) and return the folder; a subclass
        writes its own files after it.

        Args:
            directory: output folder.
        """
        out = save_folder(directory)
        meta = {"format_version": self.meta_version, **self.saved_meta()}
        (out / self.meta_file).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, directory: PathLike) -> Any:
        """Restore a tokenizer written by :meth:`save`; it must be of this class (any of its kinds).

        Args:
            directory: the folder passed to :meth:`save`.
        """
        d = Path(directory)
        path = d / cls.meta_file
        if not path.is_file():
            why = "no such folder" if not d.is_dir() else f"not a folder saved by a {cls.what}?"
            raise FileNotFoundError(f"{cls.what} metadata {path} is missing ({why})")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exn:
            raise ValueError(f"cannot read {cls.what} metadata {path}: {exn}") from exn
        if not isinstance(meta, dict) or not set(cls.meta_keys) <= set(meta):
            raise ValueError(f"{cls.what} metadata {path} must be a JSON object with {', '.join(cls.meta_keys)}")
        if meta.get("format_version", cls.meta_version) > cls.meta_version:
            raise ValueError(f"{cls.what} metadata {path} has format_version {meta['format_version']}; this mmm "
                             f"reads up to {cls.meta_version}")
        tok = cls.from_saved(d, meta)
        if not isinstance(tok, cls):
            raise ValueError(f"{d} holds a {tok.kind!r} tokenizer, not a {cls.__name__}")
        return tok


def _role(name: str) -> property:
    return property(lambda self: self.role_ids[name], doc=f"Id of the {name} token.")


class RoleIds:
    """The ids of the five special-token roles masked modeling needs, read from the tokenizer's ``role_ids``
    (``{"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}``); mixed into the text and DNA tokenizers."""

    role_ids: Dict[str, int]
    pad_id, unk_id, cls_id, sep_id, mask_id = (_role(n) for n in ("pad", "unk", "cls", "sep", "mask"))

    @property
    def special_ids(self) -> frozenset:
        """Ids of the five role tokens (never masked, never drawn as random replacements)."""
        return frozenset(self.role_ids.values())


def tokenizer_files(directory: Path) -> Dict[str, str]:
    """The text files of a saved tokenizer, ``{file name: text}`` (embedded in checkpoints)."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.iterdir()) if p.is_file()}


def tokenizer_from_files(files: Dict[str, str], where: str, load: Callable[[str], Any], marker: str,
                         what: str = "tokenizer") -> Any:
    """Rebuild a tokenizer from :func:`tokenizer_files` output.

    Args:
        files: ``{file name: text}``.
        where: the source, named in errors (``"run.ckpt"``).
        load: reads a tokenizer from a folder (``TextTokenizer.load``).
        marker: a file every saved tokenizer of this kind holds.
        what: the tokenizer's name in errors (``"DNA tokenizer"``).
    """
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ValueError(f"{where}: {what} files must map file names to file text")
    if marker not in files:
        raise ValueError(f"{where}: the {what} files hold no {marker} (files: {sorted(files)})")
    with tempfile.TemporaryDirectory(prefix="mmm_tok_") as tmp:
        for name, text in files.items():
            if Path(name).name != name:
                raise ValueError(f"{where}: {what} file name {name!r} is not a plain file name")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        try:
            return load(tmp)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{where}: the embedded {what} cannot be loaded: {e}") from None


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers save to the same files (same vocabulary, merges, settings)."""
    with tempfile.TemporaryDirectory(prefix="mmm_tok_a_") as ta, tempfile.TemporaryDirectory(prefix="mmm_tok_b_") as tb:
        a.save(ta)
        b.save(tb)
        return tokenizer_files(Path(ta)) == tokenizer_files(Path(tb))


class TokenizerAsset:
    """The tokenizer handling of a token modality (mixed in: ``class TextModality(TokenizerAsset, ...)``).

    The modality sets :attr:`tokenizer_dir`, :attr:`saved_marker`, :attr:`what`, ``cfg`` (its config
    section, with ``tokenizer_path``, ``max_len``, ``position`` and ``embed_norm``) and
    ``load_tokenizer``, and implements :meth:`train_tokenizer` and :meth:`check_reused`. Its
    embedder is the token embedder over the tokenizer's ids (:meth:`build_embedder`).
    """

    name: str
    cfg: Any
    load_tokenizer: Callable[[PathLike], Any]
    tokenizer_dir: str
    """The run folder's subfolder holding the tokenizer (``"tokenizer"``)."""
    saved_marker: str
    """A file every saved tokenizer of this modality holds (its presence means the folder has one)."""
    what: str = "tokenizer"
    """The tokenizer's name in messages (``"DNA tokenizer"``)."""
    tokenizer: Optional[Any] = None

    # ------------------------------------------------------------------ what each modality supplies

    def train_tokenizer(self, train_urls: List[str], options: Optional["ReadOptions"]) -> Any:
        """A new tokenizer as the config describes, built or trained on ``train_urls``."""
        raise NotImplementedError

    def check_reused(self, tok: Any, own: Path) -> None:
        """Refuse the run folder's tokenizer ``tok`` (in ``own``) when the config asks for another one."""
        raise NotImplementedError

    def check_given(self, tok: Any) -> None:
        """Look at the tokenizer loaded from ``tokenizer_path`` before it is used (e.g. warn); default: nothing."""

    def fit_record(self) -> Optional[Dict[str, Any]]:
        """Settings to record beside a tokenizer trained here (``fitted_with.json``); default: none."""
        return None

    # ------------------------------------------------------------------ shared

    def prepare(self, train_urls: List[str], run_dir: Path, options: Optional["ReadOptions"] = None) -> None:
        """Find the tokenizer in the order of the module docstring and keep its files as the run's assets."""
        own, path = run_dir / self.tokenizer_dir, self.cfg.tokenizer_path
        if (own / self.saved_marker).is_file():  # a resumed run: keep the tokenizer it started with
            tok = self.load_tokenizer(own)
            if path:
                if not same_tokenizer(tok, self.load_tokenizer(path)):
                    raise ConfigError(f"model.{self.name}.tokenizer_path {path} differs from the {self.what} the run "
                                      f"folder already holds ({own}); use a new trainer.default_root_dir or delete "
                                      f"{own}")
            else:
                self.check_reused(tok, own)
        elif path:
            tok = self.load_tokenizer(path)
            self.check_given(tok)
            tok.save(own)
        else:
            tok = self.train_tokenizer(train_urls, options)
            tok.save(own)
            fit = self.fit_record()
            if fit is not None:
                (own / FIT_FILE).write_text(json.dumps(fit, indent=2) + "\n", encoding="utf-8")
        self.tokenizer = tok
        self._files = tokenizer_files(own)

    def assets(self) -> Dict[str, str]:
        return dict(self._files) if self.tokenizer is not None else {}

    def load_assets(self, files: Dict[str, str], where: str) -> None:
        self.tokenizer = tokenizer_from_files(files, where, self.load_tokenizer, self.saved_marker, self.what)
        self._files = dict(files)

    def build_embedder(self, encoder_cfg: "EncoderConfig") -> "nn.Module":
        """The token embedder (``EMBEDDERS["text"]``: token + position (+ segment) embeddings) over the tokenizer's ids."""
        from mmm.registry import EMBEDDERS

        c, tok = self.cfg, self._tok()
        return EMBEDDERS.create("text", vocab_size=tok.vocab_size, dim=encoder_cfg.dim, max_len=c.max_len,
                                position=c.position, embed_norm=c.embed_norm, norm_eps=encoder_cfg.norm_eps,
                                dropout=encoder_cfg.dropout, pad_id=tok.pad_id, segments=getattr(c, "segments", 0),
                                sep_id=getattr(tok, "sep_id", None))

    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError(f"{self.name} modality: call prepare() or load_assets() first (no tokenizer yet)")
        return self.tokenizer
