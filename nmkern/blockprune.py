"""Deprecated path: :mod:`nmkern.methods.blockprune`."""

from ._moved import alias_module

alias_module(__name__, "nmkern.methods.blockprune")
