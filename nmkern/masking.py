"""Deprecated path: :mod:`nmkern.methods.masking`."""

from ._moved import alias_module

alias_module(__name__, "nmkern.methods.masking")
