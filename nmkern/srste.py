"""Deprecated path: :mod:`nmkern.methods.srste`."""

from ._moved import alias_module

alias_module(__name__, "nmkern.methods.srste")
