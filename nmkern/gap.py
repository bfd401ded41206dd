"""Deprecated path: :mod:`nmkern.methods.gap`."""

from ._moved import alias_module

alias_module(__name__, "nmkern.methods.gap")
