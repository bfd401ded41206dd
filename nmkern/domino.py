"""Deprecated path: :mod:`nmkern.methods.domino`."""

from ._moved import alias_module

alias_module(__name__, "nmkern.methods.domino")
