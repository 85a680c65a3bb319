"""Optional dependencies of the interop modules, imported on use with an install hint when missing."""
from __future__ import annotations

import importlib
from typing import Any


def require(package: str, purpose: str) -> Any:
    """The imported ``package``, or an ImportError saying what needs it and how to install it.

    Args:
        package: the module to import (``"timm"``).
        purpose: what needs it, for the message (``"timm interop"``).
    """
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"{purpose} needs the `{package}` package: pip install {package}") from None
