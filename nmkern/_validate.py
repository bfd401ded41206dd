"""Boundary checks shared by every public op.

Each check raises ``ValueError`` (bad value or shape) or ``TypeError`` (bad type or
dtype) with a message that names the op, what was given, and how to fix it. Kernels
and references behind the boundary assume these checks passed.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .reference.nm_pack import index_bits, indices_per_word, unpack_words

MAX_M = 16

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, name: str, t, dtypes: Iterable[torch.dtype] | None = None, ndim: int | tuple | None = None):
    """``t`` is a torch.Tensor of one of ``dtypes`` with ``ndim`` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            hint = " (cast with .float() or .half())" if not t.dtype.is_floating_point else ""
            raise TypeError(
                f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; "
                f"supported dtypes are {_dtype_names(dtypes)}{hint}"
            )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(
                f"{op}: {name} must have {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {tuple(t.shape)}"
            )
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}; call .to_dense() first")
    return t


def check_nm(op: str, n, m, max_m: int = MAX_M) -> tuple[int, int]:
    """1 <= n < m <= max_m, both Python ints."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__} {v!r}")
    if m < 2 or m > max_m:
        raise ValueError(f"{op}: m={m} is out of range; N:M sparsity needs 2 <= m <= {max_m}")
    if n < 1 or n >= m:
        raise ValueError(
            f"{op}: n={n}, m={m} is not an N:M pattern; need 1 <= n < m "
            f"(n={m} would keep every weight, n=0 would drop them all)"
        )
    return n, m


def normalize_dim(op: str, t: torch.Tensor, dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    if t.dim() == 0:
        raise ValueError(f"{op}: a 0-dimensional tensor has no dimension to group along; pass a 1-D or larger tensor")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"{op}: dim={dim} is out of range for a tensor of shape {tuple(t.shape)}")
    return dim % t.dim()


def check_group_dim(op: str, t: torch.Tensor, dim: int, m: int) -> int:
    """Size along ``dim`` is a multiple of the group size ``m``; returns the normalized dim."""
    dim = normalize_dim(op, t, dim)
    size = t.shape[dim]
    if size == 0 or size % m != 0:
        raise ValueError(
            f"{op}: size {size} along dim {dim} of shape {tuple(t.shape)} is not divisible by m={m}; "
            f"pad that dimension to a multiple of {m} or choose an m that divides {size}"
        )
    return dim


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """NaN/Inf make 'the n largest magnitudes' meaningless: nmkern rejects them."""
    if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(
            f"{op}: {name} contains NaN or Inf (first at index {tuple(bad)}); "
            "masking needs finite magnitudes - fix the diverged weights (e.g. torch.nan_to_num) first"
        )


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"{op}: tensors are on different devices ({listing}); move them to one device with .to(device)")


def check_fraction(op: str, name: str, x, *, allow_zero: bool = True, allow_one: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{op}: {name} must be a float in [0, 1), got {type(x).__name__}")
    x = float(x)
    lo_ok = x >= 0 if allow_zero else x > 0
    hi_ok = x <= 1 if allow_one else x < 1
    if not (lo_ok and hi_ok) or x != x:
        lo = "[0" if allow_zero else "(0"
        hi = "1]" if allow_one else "1)"
        raise ValueError(f"{op}: {name}={x} must lie in {lo}, {hi}")
    return x


# ---------------------------------------------------------------- packed tensors (corruption checks)
# Shapes and dtypes are checked always; the contents (index ranges, metadata nibbles,
# BSR pointers) with one fused reduction and one host sync, skipped for meta tensors and
# while torch.compile traces (data-dependent checks cannot be traced; the layers validate
# their buffers when they are loaded, outside the hot path).


def data_checkable(*tensors) -> bool:
    """True when the contents of ``tensors`` can be read here: not meta, not under torch.compile."""
    if torch.compiler.is_compiling():
        return False
    return not any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)


def reject_meta(op: str, name: str, t: torch.Tensor, why: str) -> None:
    """Ops whose result shape depends on the values cannot run on the meta device."""
    if isinstance(t, torch.Tensor) and t.is_meta:
        raise ValueError(f"{op}: {name} is on the meta device (shape {tuple(t.shape)}, no values); {why} - "
                         "materialize it first (e.g. module.to_empty(device='cpu') and load the weights)")


def nm_rows_geometry(shape, dim: int, m: int) -> tuple[int, int]:
    """(rows, K) of the 2-D view :func:`nmkern.reference.nm_pack.as_rows` gives a tensor of ``shape``."""
    moved = [s for i, s in enumerate(shape) if i != dim] + [shape[dim]]
    numel = math.prod(moved)
    if len(moved) < 2:
        return 1, numel
    return moved[0], math.prod(moved[1:])


def nm_group_fault(indices: torch.Tensor, n: int, m: int, kept: int) -> tuple[int, int, list[int]] | None:
    """The first ``(row, group, in-group indices)`` whose n indices are not distinct, increasing and ``< m``
    (the order :func:`nmkern.pack_nm` writes), or None. One host sync; the op entry and load-time checks share it."""
    fields = unpack_words(indices, m, kept).reshape(indices.shape[0], kept // n, n)
    bad = fields >= m
    if n > 1:
        bad[..., 1:] |= fields[..., 1:] <= fields[..., :-1]
    if not bool(bad.any()):
        return None
    row, group = (int(i) for i in bad.any(-1).nonzero()[0])
    return row, group, fields[row, group].tolist()


def check_nm_packed(op: str, packed, dtypes: Iterable[torch.dtype]) -> None:
    """An :class:`nmkern.NMPacked` whose tensors match its shape, n, m and dim, with valid indices.

    Every group's n in-group indices must be increasing (distinct) and ``< m``, the order
    :func:`nmkern.pack_nm` writes; anything else is a corrupted or foreign buffer.
    """
    n, m = check_nm(op, packed.n, packed.m)
    check_tensor(op, "packed.values", packed.values, dtypes, ndim=2)
    check_tensor(op, "packed.indices", packed.indices, (torch.int32,), ndim=2)
    check_same_device(op, values=packed.values, indices=packed.indices)
    shape = tuple(int(s) for s in packed.shape)
    dim = packed.dim
    if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < max(1, len(shape)) or not shape:
        raise ValueError(f"{op}: packed.dim={dim!r} is not a dimension of packed.shape {shape}")
    rows, k = nm_rows_geometry(shape, dim, m)
    kept = k // m * n
    want = ((rows, kept), (rows, -(-kept // indices_per_word(m))))
    got = (tuple(packed.values.shape), tuple(packed.indices.shape))
    if shape[dim] % m or got != want:
        raise ValueError(f"{op}: packed tensors do not match a {n}:{m} packing of shape {shape} along dim {dim}: "
                         f"values {got[0]} and indices {got[1]}, expected {want[0]} and {want[1]} - the buffers are "
                         "truncated or belong to another tensor; re-pack the weight with nmkern.pack_nm")
    if not rows * kept or not data_checkable(packed.values, packed.indices):
        return
    fault = nm_group_fault(packed.indices, n, m, kept)
    if fault is not None:
        row, group, held = fault
        raise ValueError(f"{op}: packed.indices are corrupted: row {row}, group {group} holds in-group indices "
                         f"{held}; each group's n={n} indices must be distinct, increasing "
                         f"and < m={m} - re-pack the weight with nmkern.pack_nm")


def check_meta_24(op: str, meta: torch.Tensor) -> None:
    """Every 4-bit nibble of 2:4 metadata names two distinct slots in increasing order (``idx0 < idx1``)."""
    if not meta.numel() or not data_checkable(meta):
        return
    shifts = torch.arange(0, 16, 4, device=meta.device, dtype=torch.int32)
    nib = ((meta.to(torch.int32) & 0xFFFF).unsqueeze(-1) >> shifts) & 0xF
    bad = (nib & 3) >= (nib >> 2)
    if bool(bad.any()):  # one host sync
        r, c, g = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{op}: meta is corrupted: int16 element ({r}, {c}) (CUTLASS order) holds the nibble "
                         f"{int(nib[r, c, g]):#06b}; each nibble must encode two distinct slots idx0 < idx1 "
                         "(idx0 | idx1 << 2) - pass the metadata nmkern.compress_24 returned")


def bsr_buffers_ok(crow: torch.Tensor, col: torch.Tensor, nnzb: int, k: int) -> bool:
    """``crow[0] == 0``, non-decreasing, ``crow[-1] == nnzb``; ``0 <= col < k`` strictly increasing per block
    row. One host sync; the op entry and load-time checks share it."""
    c = crow.to(torch.int64)
    bad = (c[0] != 0) | (c[-1] != nnzb) | (c[1:] < c[:-1]).any()
    if nnzb:
        cl = col.to(torch.int64)
        bad = bad | (cl.min() < 0) | (cl.max() >= k)
        starts = torch.zeros(nnzb + 1, dtype=torch.bool, device=col.device)
        starts[c.clamp(0, nnzb)] = True  # positions where a block row begins
        bad = bad | ((cl[1:] <= cl[:-1]) & ~starts[1:nnzb]).any()
    return not bool(bad)


def check_bsr_buffers(op: str, crow: torch.Tensor, col: torch.Tensor, nnzb: int, k: int) -> None:
    """BSR pointers: ``crow[0] == 0``, non-decreasing, ``crow[-1] == nnzb``; ``0 <= col < k`` increasing per row."""
    if data_checkable(crow, col) and not bsr_buffers_ok(crow, col, nnzb, k):
        c = crow.to(torch.int64)
        raise ValueError(f"{op}: BSR buffers are corrupted: need crow[0] == 0, crow non-decreasing with "
                         f"crow[-1] == {nnzb} (one col per block), and col in [0, {k}) strictly increasing within "
                         f"each block row; got crow {_head(c)}, col {_head(col)} - rebuild them with "
                         "nmkern.to_bsr_1xn")


def _head(t: torch.Tensor, count: int = 8) -> str:
    vals = t.reshape(-1)[:count].tolist()
    return f"{vals}{' ...' if t.numel() > count else ''}"
