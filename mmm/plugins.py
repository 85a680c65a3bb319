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
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import List, Sequence, Tuple

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


def _import(spec: str) -> None:
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file {path}")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        importlib.import_module(path.stem)
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
    loaded = []
    for spec, source in wanted:
        try:
            _import(spec)
        except Exception as exn:  # noqa: BLE001 - any failure of a user's module is reported as that module's
            raise PluginError(f"plug-in {spec!r} (from {source}) failed to import: {type(exn).__name__}: {exn}") from exn
        loaded.append(spec)
    return loaded
