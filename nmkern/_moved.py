"""Deprecated import paths of modules that moved (kept for one release)."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias_module(old: str, new: str) -> None:
    """Make ``import old`` return module ``new``, with a DeprecationWarning naming the new path."""
    warnings.warn(f"{old} moved to {new}; import it from there (the old path goes away in nmkern 0.3)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
