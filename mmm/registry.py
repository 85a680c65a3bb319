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
        try:
            for module in self.plugins:
                importlib.import_module(module)
        except BaseException:
            self._loaded = False  # a failed import leaves the table incomplete: the next lookup tries again
            raise

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
            plural = self.kind[:-1] + "ies" if self.kind.endswith("y") and self.kind[-2:-1] not in "aeiou" else self.kind + "s"
            raise RegistryError(f"unknown {self.kind} {name!r}; known {plural}: {known} (a plug-in's {self.kind}: "
                                f"import its module first, e.g. `mmm --plugin MODULE ...` or MMM_PLUGINS=MODULE)") from None

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
                 supplied: Optional[Dict[str, str]] = None, types: bool = False) -> None:
    """Raise a :class:`RegistryError` naming any keyword that ``fn`` does not accept.

    ``supplied`` maps the keywords the caller passes itself (an objective's ``dim``, an optimizer's ``lr``)
    to where their value comes from: ``kwargs`` (a config's ``args``) may not set them, and they are not
    listed as accepted. With ``types`` (values from a config), a value must also fit its parameter's
    annotation when that is bool, int, float or str (optionally Optional): ``top_k: "3"`` or ``meap: "false"``
    (true, as a Python truth value) used to reach the callee.
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
    if not types:
        return
    hints = _type_hints(fn)
    for name, value in kwargs.items():
        expected = _simple_type(hints.get(name))
        if expected is not None and not _fits(value, expected):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            quoted = " (a quoted YAML value is a string)" if isinstance(value, str) else ""
            raise RegistryError(f"{what}: {name} must be {names}, got {value!r}{quoted}")


def _type_hints(fn: Callable[..., Any]) -> Dict[str, Any]:
    """The resolved annotations of ``fn`` (a class: its ``__init__``); {} when they cannot be resolved."""
    import typing

    try:
        return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: no type check, the callee decides
        return {}


def _simple_type(hint: Any) -> Optional[tuple]:
    """``(type, ...)`` a config value must be for an annotation of bool, int, float or str, optionally Optional;
    None (no check) for anything else (unions of other kinds, lists, mappings, modules)."""
    import typing

    simple = (bool, int, float, str)
    if hint in simple:
        return (hint,)
    if typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in simple and len(args) == 2:
            return (rest[0], type(None))
    return None


def _fits(value: Any, expected: tuple) -> bool:
    """Whether ``value`` is one of ``expected``: a bool is not a number, an int is a float, 2.0 is not an int."""
    for t in expected:
        if t is type(None) and value is None:
            return True
        if t is bool and isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is str and isinstance(value, str):
            return True
    return False


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
ALL_REGISTRIES = (MODALITIES, TOKENIZERS, EMBEDDERS, MASKERS, OBJECTIVES, STEPS, DATASETS, ATTENTION_BACKENDS,
                  POSITIONS, OPTIMIZERS)
