"""One tiny generic registry: a dict, a decorator and a factory (timm ``_registry`` style).

Each kind of pluggable part (tokenizers, embedders, maskers, objectives, step strategies, datasets,
attention backends, position encodings) has its own :class:`Registry`. Entries register themselves
when their module is imported; ``create(name, **kw)`` builds one and validates the keyword arguments
against the entry's signature so that a typo in a YAML config is reported by name instead of
being swallowed.

A registry is complete whichever module a user imports first: each one names the packages that
fill it (``plugins``) and imports them on its first lookup (``get`` / ``create`` / ``list`` /
``in``), so no caller has to remember to import a plugin package before asking for a name.
"""
from __future__ import annotations

import fnmatch
import importlib
import inspect
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown registry name or bad arguments for an entry; the message lists what is valid."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A named table of factories of one kind.

    Args:
        kind: human-readable kind ("masker", "objective", ...), used in error messages.
        plugins: module names whose import registers this kind's entries; imported on the first
            lookup, so the table is complete however the registry was reached.
    """

    def __init__(self, kind: str, plugins: Sequence[str] = ()) -> None:
        self.kind = kind
        self.plugins = tuple(plugins)
        self._entries: Dict[str, Callable[..., T]] = {}
        self._loaded = not self.plugins

    def load_plugins(self) -> None:
        """Import the plugin modules once (re-entrant: a plugin may look names up while importing)."""
        if self._loaded:
            return
        self._loaded = True  # set first: a plugin importing another plugin must not recurse here
        for module in self.plugins:
            importlib.import_module(module)

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@MASKERS.register("bert_random")`` on a class or factory function."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and self._entries[name] is not fn:
                raise RegistryError(f"{self.kind} {name!r} is already registered by {self._entries[name]!r}")
            self._entries[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        """The registered factory for ``name``; unknown names raise a :class:`RegistryError`."""
        if name not in self._entries:
            self.load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none registered)"
            raise RegistryError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}") from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Build entry ``name`` with ``kwargs``; unknown keyword names are reported, not ignored."""
        fn = self.get(name)
        check_kwargs(fn, kwargs, f"{self.kind} {name!r}")
        return fn(**kwargs)

    def list(self, pattern: str = "*") -> List[str]:
        """Sorted names matching a shell-style ``pattern``."""
        self.load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        if name not in self._entries:
            self.load_plugins()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"


def check_kwargs(fn: Callable[..., Any], kwargs: Dict[str, Any], what: str,
                 supplied: Optional[Dict[str, str]] = None) -> None:
    """Raise a :class:`RegistryError` naming any keyword that ``fn`` does not accept.

    ``supplied`` maps the keywords the caller passes itself (an objective's ``dim``, an optimizer's ``lr``)
    to where their value comes from: ``kwargs`` (a config's ``args``) may not set them, and they are not
    listed as accepted.
    """
    supplied = supplied or {}
    taken = [name for name in kwargs if name in supplied]
    if taken:
        raise RegistryError(f"{what}: {taken[0]!r} is set by mmm itself (from {supplied[taken[0]]}); remove it")
    sig = inspect.signature(fn)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self" and n not in supplied]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise RegistryError(f"{what} got unknown argument(s) {unknown}; "
                            + (f"accepted: {accepted}" if accepted else "it takes none"))


# One registry per kind of part. Modules register into these on import; each registry names the
# packages that fill it and imports them on first lookup. Dataset definitions live outside the
# library (``datasets_def``) and are reached by name only, never imported by a library module.
MODALITIES: Registry = Registry("modality", plugins=("mmm.modalities.builtin",))
TOKENIZERS: Registry = Registry("tokenizer", plugins=("mmm.modalities.builtin",))
EMBEDDERS: Registry = Registry("embedder", plugins=("mmm.modalities.builtin",))
MASKERS: Registry = Registry("masker", plugins=("mmm.masking", "mmm.modalities.builtin"))
OBJECTIVES: Registry = Registry("objective", plugins=("mmm.objectives",))
STEPS: Registry = Registry("step strategy", plugins=("mmm.steps",))
DATASETS: Registry = Registry("dataset", plugins=("datasets_def",))
ATTENTION_BACKENDS: Registry = Registry("attention backend", plugins=("mmm.core.attention",))
POSITIONS: Registry = Registry("position encoding", plugins=("mmm.core.position",))
OPTIMIZERS: Registry = Registry("optimizer", plugins=("mmm.optim",))
