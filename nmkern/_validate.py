"""Boundary checks shared by every public op.

Each check raises ``ValueError`` (bad value or shape) or ``TypeError`` (bad type or
dtype) with a message that names the op, what was given, and how to fix it. Kernels
and references behind the boundary assume these checks passed.
"""

from __future__ import annotations

from typing import Iterable

import torch

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
