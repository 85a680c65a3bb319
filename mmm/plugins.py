"""Third-party plug-ins: modules outside mmm that register modalities, datasets, maskers, objectives, ...

A module registers its parts with the registries' decorators (:mod:`mmm.registry`) when it is imported. In Python
it is enough to import it before the config is built; the ``mmm`` command imports, before it reads any config:

* each ``--plugin MODULE`` (a dotted module name on ``sys.path``, or a path to a ``.py`` file, whose folder is put on
  ``sys.path`` so data-loader workers import it by the same name),
* each module named in the ``MMM_PLUGINS`` environment variable (comma-separated, same forms),
* each entry point of the ``mmm.plugins`` group of the installed packages (``[project.entry-points."mmm.plugins"]``
  in a package's ``pyproject.toml``: ``protein = "mmm_protein"``).

The built-in parts are registered first, so a plug-in that reuses a built-in name fails at its own decorator.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from mmm.errors import UserError

ENV = "MMM_PLUGINS"
ENTRY_POINT_GROUP = "mmm.plugins"


class PluginError(UserError, ImportError):
    """A plug-in module that cannot be found or fails while it is imported."""


def requested_plugins(cli: Sequence[str] = ()) -> List[Tuple[str, str]]:
    """``(module or file, where it was named)`` for each plug-in of the command line, ``MMM_PLUGINS`` and the
    ``mmm.plugins`` entry points, in that order, without repeats."""
    out: List[Tuple[str, str]] = [(m, "--plugin") for m in cli]
    out += [(m.strip(), ENV) for m in os.environ.get(ENV, "").split(",") if m.strip()]
    out += [(ep.value, f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP}")
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    seen, unique = set(), []
    for module, source in out:
        if module not in seen:
            seen.add(module)
            unique.append((module, source))
    return unique


def _module_of_file(path: Path) -> str:
    """The module name a plug-in file is imported under: its stem, which must be an identifier that no other module
    answers to (``code.py`` would silently be the standard library's ``code``)."""
    name = path.stem
    if not name.isidentifier():
        raise ValueError(f"{path}: a plug-in file's name must be a Python identifier (it is imported as a module "
                         f"of that name, also by the data-loader workers), got {name!r}")
    if name in sys.modules:
        origin = getattr(sys.modules[name], "__file__", None) or "built-in"
    elif name in sys.builtin_module_names:
        origin = "built-in"
    else:
        found = importlib.util.find_spec(name)
        origin = found.origin if found is not None else None
    if origin is not None and (origin in ("built-in", "frozen") or Path(origin).resolve() != path):
        raise ValueError(f"{path}: its module name {name!r} is already taken ({origin}); rename the plug-in file")
    return name


def _names_a_file(spec: str) -> bool:
    """Whether a plug-in spec is a path to a ``.py`` file (else a module name, or an entry point's ``module:attr``)."""
    return spec.endswith(".py") or os.sep in spec


def _source_file(spec: str) -> Optional[Path]:
    """The file a plug-in spec names or resolves to (None: not found as a file, e.g. a namespace package)."""
    if _names_a_file(spec):
        return Path(spec).expanduser().resolve()
    try:
        found = importlib.util.find_spec(spec.split(":")[0])
    except (ImportError, ValueError):
        return None
    return Path(found.origin).resolve() if found is not None and found.origin not in (None, "built-in", "frozen") else None


def _import(spec: str) -> None:
    if _names_a_file(spec):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file {path}")
        name = _module_of_file(path)  # before its folder goes on sys.path, where it would shadow a module
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))  # data-loader workers import it by the same name
        importlib.import_module(name)
    else:
        importlib.import_module(spec.split(":")[0])  # an entry point's "module:attr" imports the module


def load_plugins(cli: Sequence[str] = ()) -> List[str]:
    """Register the built-in parts, then import every requested plug-in (:func:`requested_plugins`).

    Returns:
        the plug-ins imported, as named.

    Raises:
        PluginError: a plug-in that cannot be found or raises while importing, naming it and where it was named.
    """
    from mmm import registry

    wanted = requested_plugins(cli)
    if not wanted:
        return []
    for reg in registry.ALL_REGISTRIES:
        reg.load_plugins()
    loaded, files = [], set()
    for spec, source in wanted:
        try:
            file = _source_file(spec)
            if file is not None and file in files:  # one plug-in named twice (a path and a module name)
                continue
            _import(spec)
            if file is not None:
                files.add(file)
        except Exception as exn:  # noqa: BLE001 - any failure of a user's module is reported as that module's
            raise PluginError(f"plug-in {spec!r} (from {source}) failed to import: {type(exn).__name__}: {exn}") from exn
        loaded.append(spec)
    return loaded
