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


def renamed_attribute(module: str, name: str, renames: dict):
    """For a module's ``__getattr__``: the value behind a renamed public name, with a DeprecationWarning.

    ``renames``: ``{old name: (value, "the new spelling")}``.
    """
    if name not in renames:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    value, new = renames[name]
    warnings.warn(f"{module}.{name} is deprecated; use {new} (the old name goes away in nmkern 0.3)",
                  DeprecationWarning, stacklevel=3)
    return value
