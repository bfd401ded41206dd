"""N:M masks and packing on the CPU through the native library (csrc/cpu/nm_mask.cpp, nm_pack.cpp).

The references they must equal bit for bit are :func:`nmkern.reference.nm_mask.nm_mask_ref` and
:func:`nmkern.reference.nm_pack.pack_nm_ref` (tests/test_cpu_nm_pack.py). Why native: packing four
2048x2048 fp32 layers took 1.2 s through the references on a 2-core AMD EPYC, 0.6 s of it in
``torch.sort`` over groups of four (the mask's and the pack's), 0.15 s more in shifting int64 indices into
words.

Callers (:mod:`nmkern.functional`, :mod:`nmkern.autograd`) validate dtype, n, m and the group
dimension first; these take the 2-D ``(rows, K)`` view with the groups along K.
"""

from __future__ import annotations

import ctypes

import torch

from . import _cpu
from .backend import Backend, parse_backend
from .dispatch import resolve_backend
from .reference.nm_pack import indices_per_word

# NMKERN_DTYPE_* in csrc/cpu/nmkern_cpu.h.
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def runs(t: torch.Tensor) -> bool:
    """True when these kernels take ``t``: a CPU tensor in fp32, bf16 or fp16, with the library loaded."""
    return t.device.type == "cpu" and t.dtype in _DTYPE_CODE and _cpu.available()


def resolve_path(op: str, backend, w: torch.Tensor) -> Backend:
    """:func:`nmkern.dispatch.resolve_backend` for the N:M mask and pack ops, with these kernels among the paths
    where they take ``w`` ("auto" picks them for CPU tensors unless Triton interprets, ``TRITON_INTERPRET=1``)."""
    if runs(w):
        return resolve_backend(op, backend, w, supported=(Backend.REFERENCE, Backend.TRITON, Backend.CPU))
    if parse_backend(op, backend) is Backend.CPU:
        why = "" if _cpu.available() else f"; the nmkern CPU library is unavailable ({_cpu._state['error']})"
        raise ValueError(f"{op}: backend 'cpu' takes fp32, bf16 or fp16 tensors on the CPU; w is "
                         f"{str(w.dtype).replace('torch.', '')} on {w.device}{why}; use backend='reference'")
    return resolve_backend(op, backend, w)


def nm_mask_rows(w2: torch.Tensor, n: int, m: int, *, check_finite: bool = False) -> torch.Tensor | None:
    """Boolean mask of ``w2`` ``(rows, K)``: the n largest |w| of each group of m along K, ties to the lower
    index, NaN largest (the reference's stable descending sort). None where ``check_finite`` and ``w2``
    holds a NaN or an Inf (the caller then raises its message)."""
    op = "nmkern cpu nm_mask"
    lib = _cpu._require(op)
    w2 = w2.contiguous()
    keep = torch.empty(w2.shape, dtype=torch.bool)
    if keep.numel() == 0:  # no group (0 rows): the C side takes at least one
        return keep
    rc = lib.nmkern_nm_mask(_cpu._ptr(w2), _DTYPE_CODE[w2.dtype], w2.numel() // m, n, m, _cpu._ptr(keep),
                            _cpu.CHECK_FINITE if check_finite else 0, torch.get_num_threads())
    if rc == _cpu.NONFINITE and check_finite:
        return None
    _cpu._check_status(op, rc)
    return keep


def pack_nm_rows(w2: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """``(values (rows, K/m*n), indices int32 (rows, words), first_bad)`` of ``w2`` ``(rows, K)``, the format of
    :func:`nmkern.reference.nm_pack.pack_nm_ref`; ``first_bad`` is -1, or the flat index ``row * (K/m) + group``
    of the first group with more than n non-zeros (values and indices are then None)."""
    op = "nmkern cpu pack_nm"
    lib = _cpu._require(op)
    w2 = w2.contiguous()
    rows, k = w2.shape
    kept = k // m * n
    words = -(-kept // indices_per_word(m))
    values = torch.empty(rows, kept, dtype=w2.dtype)
    indices = torch.empty(rows, words, dtype=torch.int32)
    first_bad = ctypes.c_int64(-1)
    if rows == 0:
        return values, indices, -1
    rc = lib.nmkern_nm_pack(_cpu._ptr(w2), w2.element_size(), rows, k, n, m, _cpu._ptr(values), _cpu._ptr(indices),
                            words, ctypes.byref(first_bad), torch.get_num_threads())
    _cpu._check_status(op, rc)
    if first_bad.value >= 0:
        return None, None, int(first_bad.value)
    return values, indices, -1


__all__ = ["nm_mask_rows", "pack_nm_rows", "resolve_path", "runs"]
