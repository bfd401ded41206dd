"""Triton kernels, one op per file (shipped as ``nmkern.kernels``).

Each file holds the ``@triton.jit`` kernel and its launcher (validate, allocate,
launch). Launchers assume the public op in :mod:`nmkern.functional` already
checked its input.
"""
