"""Sparse GEMM / conv ops registered with ``torch.library`` (``torch.ops.nmkern.*``).

Every op has a real implementation (pure-torch reference or Triton kernel, picked
by its ``backend`` string argument) and a fake one, so modules that call them
trace under ``torch.compile`` and pass ``torch.library.opcheck``.

The Python wrappers below are the public boundary: they validate (``ValueError``
/ ``TypeError`` naming the op, the shapes/dtypes and the fix), flatten leading
batch dims, resolve ``backend="auto"`` (:func:`nmkern.backend.resolve_backend`:
Triton on CUDA and under ``TRITON_INTERPRET=1``, the reference otherwise) and
call the registered op.

Registered ops (2-D ``x`` for the linears, NCHW ``x`` for the convs):

* ``nmkern::nm_linear(x, values, indices, n, m, bias, backend)``
* ``nmkern::semi24_linear(x, values, meta, bias, backend)``
* ``nmkern::bsr_linear(x, crow, col, values, out_features, bias, backend)``
* ``nmkern::nm_conv2d(x, values, indices, n, m, weight_shape, bias, stride, padding, dilation, backend)``
* ``nmkern::bsr_conv2d(x, crow, col, values, weight_shape, bias, stride, padding, dilation)`` (reference only)
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _validate as v
from .backend import Backend, resolve_backend
from .formats import NMPacked
from .reference import linear as ref
from .reference.semi24 import COL_ALIGN, META_GROUP, ROW_ALIGN

LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel(module: str):
    import importlib

    return importlib.import_module(f"nmkern.kernels.{module}")


# ---------------------------------------------------------------- registered ops


@torch.library.custom_op("nmkern::nm_linear", mutates_args=())
def _nm_linear_op(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                  bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernel("nm_linear").nm_linear_triton(x, values, indices, n, m, bias)
    return ref.nm_linear_ref(x, values, indices, n, m, bias)


@_nm_linear_op.register_fake
def _(x, values, indices, n, m, bias, backend):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("nmkern::semi24_linear", mutates_args=())
def _semi24_linear_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                      backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernel("nm_linear").semi24_linear_triton(x, values, meta, bias)
    return ref.semi24_linear_ref(x, values, meta, bias)


@_semi24_linear_op.register_fake
def _(x, values, meta, bias, backend):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("nmkern::bsr_linear", mutates_args=())
def _bsr_linear_op(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
                   bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernel("bsr_linear").bsr_linear_triton(x, crow, col, values, out_features, bias)
    return ref.bsr_linear_ref(x, crow, col, values, out_features, bias)


@_bsr_linear_op.register_fake
def _(x, crow, col, values, out_features, bias, backend):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("nmkern::nm_conv2d", mutates_args=())
def _nm_conv2d_op(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                  weight_shape: Sequence[int], bias: torch.Tensor | None, stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int], backend: str) -> torch.Tensor:
    if backend == "triton":
        y = _kernel("sparse_conv2d").nm_conv2d_triton(x, values, indices, n, m, weight_shape, bias, stride, padding,
                                                      dilation)
        return y.contiguous()
    return ref.nm_conv2d_ref(x, values, indices, n, m, weight_shape, bias, stride, padding, dilation).contiguous()


def _conv_fake(x, weight_shape, stride, padding, dilation):
    oh = ref.conv_out_size(x.shape[2], weight_shape[2], stride[0], padding[0], dilation[0])
    ow = ref.conv_out_size(x.shape[3], weight_shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty(x.shape[0], weight_shape[0], oh, ow)


@_nm_conv2d_op.register_fake
def _(x, values, indices, n, m, weight_shape, bias, stride, padding, dilation, backend):
    return _conv_fake(x, weight_shape, stride, padding, dilation)


@torch.library.custom_op("nmkern::bsr_conv2d", mutates_args=())
def _bsr_conv2d_op(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                   weight_shape: Sequence[int], bias: torch.Tensor | None, stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    return ref.bsr_conv2d_ref(x, crow, col, values, weight_shape, bias, stride, padding, dilation).contiguous()


@_bsr_conv2d_op.register_fake
def _(x, crow, col, values, weight_shape, bias, stride, padding, dilation):
    return _conv_fake(x, weight_shape, stride, padding, dilation)


# ---------------------------------------------------------------- public wrappers


def _backend(op: str, backend, x: torch.Tensor) -> Backend:
    b = resolve_backend(op, backend, x)
    if b is Backend.TRITON and x.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: the triton backend takes fp16, bf16 or fp32 inputs, got {x.dtype}; "
                        "use backend='reference' for fp64")
    return b


def _check_x(op: str, x, weight_dtype: torch.dtype, in_features: int, where: str = "last") -> None:
    v.check_tensor(op, "x", x, LINEAR_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least 1 dimension, got a scalar")
    if x.dtype != weight_dtype:
        raise TypeError(f"{op}: x has dtype {x.dtype} but the weight is {weight_dtype}; cast x with .to({weight_dtype})")
    if x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)} but the weight has in_features={in_features}; "
                         f"the last dimension of x must be {in_features}")


def _check_bias(op: str, bias, dtype: torch.dtype, out_features: int) -> None:
    if bias is None:
        return
    v.check_tensor(op, "bias", bias, (dtype,), ndim=1)
    if bias.shape[0] != out_features:
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({out_features},)")


def _flat(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k)


def nm_linear(x: torch.Tensor, packed: NMPacked, bias: torch.Tensor | None = None, *, backend="auto") -> torch.Tensor:
    """``x @ W^T + bias`` with W an N:M-packed ``(out, in)`` weight (``pack_nm(w, n, m)`` with dim=-1/1)."""
    op = "nm_linear"
    if not isinstance(packed, NMPacked):
        raise TypeError(f"{op}: packed must be an nmkern.NMPacked (from nmkern.pack_nm), got {type(packed).__name__}")
    if len(packed.shape) != 2 or packed.dim != 1:
        raise ValueError(f"{op}: packed must hold a 2-D (out, in) weight grouped along in (dim=1), "
                         f"got shape {tuple(packed.shape)} grouped along dim {packed.dim}")
    out_f, in_f = packed.shape
    _check_x(op, x, packed.dtype, in_f)
    _check_bias(op, bias, packed.dtype, out_f)
    v.check_same_device(op, x=x, values=packed.values, indices=packed.indices, bias=bias)
    b = _backend(op, backend, x)
    y = torch.ops.nmkern.nm_linear(_flat(x, in_f), packed.values, packed.indices, packed.n, packed.m, bias, b.value)
    return y.reshape(*x.shape[:-1], out_f)


def semi24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend="auto") -> torch.Tensor:
    """``x @ W^T + bias`` with W given as :func:`nmkern.compress_24` output (CUTLASS 2:4 layout)."""
    op = "semi24_linear"
    v.check_tensor(op, "values", values, v.HALF_DTYPES, ndim=2)
    v.check_tensor(op, "meta", meta, (torch.int16,), ndim=2)
    out_f, half = values.shape
    in_f = 2 * half
    if out_f % ROW_ALIGN or in_f % COL_ALIGN or meta.shape != (out_f, in_f // META_GROUP):
        raise ValueError(f"{op}: values {tuple(values.shape)} and meta {tuple(meta.shape)} do not match the CUTLASS "
                         f"2:4 layout (meta ({out_f}, {in_f // META_GROUP}), rows % {ROW_ALIGN} == 0); "
                         "pass what nmkern.compress_24 returned")
    _check_x(op, x, values.dtype, in_f)
    _check_bias(op, bias, values.dtype, out_f)
    v.check_same_device(op, x=x, values=values, meta=meta, bias=bias)
    b = _backend(op, backend, x)
    y = torch.ops.nmkern.semi24_linear(_flat(x, in_f), values.contiguous(), meta.contiguous(), bias, b.value)
    return y.reshape(*x.shape[:-1], out_f)


def _check_bsr(op: str, crow, col, values, out_features: int) -> int:
    v.check_tensor(op, "crow", crow, (torch.int32, torch.int64), ndim=1)
    v.check_tensor(op, "col", col, (torch.int32, torch.int64), ndim=1)
    v.check_tensor(op, "values", values, LINEAR_DTYPES, ndim=2)
    block = values.shape[1]
    if block < 1 or out_features % block or crow.shape[0] != out_features // block + 1 or col.shape[0] != values.shape[0]:
        raise ValueError(f"{op}: crow {tuple(crow.shape)}, col {tuple(col.shape)}, values {tuple(values.shape)} are not "
                         f"BSR buffers of a ({out_features}, K) matrix with blocksize ({block}, 1); expected crow of "
                         f"length out_features/block + 1 and one col per values row")
    return block


def bsr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
               bias: torch.Tensor | None = None, *, backend="auto") -> torch.Tensor:
    """``x @ W^T + bias`` with W a 1xN block-sparse ``(out_features, in)`` matrix in BSR form.

    ``crow``/``col``/``values (nnzb, block)`` are the BSR buffers with blocksize
    ``(block, 1)`` (:func:`nmkern.to_bsr_1xn` gives them as a torch BSR tensor).
    """
    op = "bsr_linear"
    _check_bsr(op, crow, col, values, out_features)
    in_f = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else 0
    _check_x(op, x, values.dtype, in_f)
    _check_bias(op, bias, values.dtype, out_features)
    v.check_same_device(op, x=x, crow=crow, col=col, values=values, bias=bias)
    b = _backend(op, backend, x)
    y = torch.ops.nmkern.bsr_linear(_flat(x, in_f), crow, col, values.contiguous(), out_features, bias, b.value)
    return y.reshape(*x.shape[:-1], out_features)


def _pair(op: str, name: str, val) -> list[int]:
    if isinstance(val, int) and not isinstance(val, bool):
        return [val, val]
    if isinstance(val, (tuple, list)) and len(val) == 2 and all(isinstance(e, int) for e in val):
        return list(val)
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {val!r}")


def _check_conv_x(op: str, x, dtype: torch.dtype, weight_shape, stride, padding, dilation) -> None:
    v.check_tensor(op, "x", x, LINEAR_DTYPES, ndim=4)
    if x.dtype != dtype:
        raise TypeError(f"{op}: x has dtype {x.dtype} but the weight is {dtype}; cast x with .to({dtype})")
    if x.shape[1] != weight_shape[1]:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)} ({x.shape[1]} channels) but the weight "
                         f"{tuple(weight_shape)} expects {weight_shape[1]} input channels")
    for d, name in ((0, "height"), (1, "width")):
        if ref.conv_out_size(x.shape[2 + d], weight_shape[2 + d], stride[d], padding[d], dilation[d]) < 1:
            raise ValueError(f"{op}: input {name} {x.shape[2 + d]} is too small for kernel {weight_shape[2 + d]} "
                             f"with padding {padding[d]} and dilation {dilation[d]}")


def nm_conv2d(x: torch.Tensor, packed: NMPacked, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, *,
              backend="auto") -> torch.Tensor:
    """``conv2d(x, W, bias)`` (groups=1, zero padding) with W ``(O, I, kh, kw)`` packed N:M along ``I`` (dim=1).

    ``packed`` is ``nmkern.pack_nm(w, n, m, dim=1)``: its rows are the NHWC
    ``(O, kh*kw*I)`` view the kernels read.
    """
    op = "nm_conv2d"
    if not isinstance(packed, NMPacked):
        raise TypeError(f"{op}: packed must be an nmkern.NMPacked (from nmkern.pack_nm(w, n, m, dim=1)), "
                        f"got {type(packed).__name__}")
    if len(packed.shape) != 4 or packed.dim != 1:
        raise ValueError(f"{op}: packed must hold a 4-D conv weight grouped along input channels (dim=1), "
                         f"got shape {tuple(packed.shape)} grouped along dim {packed.dim}")
    stride, padding, dilation = (_pair(op, k, val) for k, val in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")
    _check_conv_x(op, x, packed.dtype, packed.shape, stride, padding, dilation)
    _check_bias(op, bias, packed.dtype, packed.shape[0])
    v.check_same_device(op, x=x, values=packed.values, indices=packed.indices, bias=bias)
    b = _backend(op, backend, x)
    return torch.ops.nmkern.nm_conv2d(x, packed.values, packed.indices, packed.n, packed.m, list(packed.shape), bias,
                                      stride, padding, dilation, b.value)


def bsr_conv2d(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, weight_shape,
               bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """``conv2d(x, W, bias)`` with W a 1xN block-sparse conv weight in BSR form over ``(O, I*kh*kw)`` (reference)."""
    op = "bsr_conv2d"
    weight_shape = [int(s) for s in weight_shape]
    if len(weight_shape) != 4:
        raise ValueError(f"{op}: weight_shape must be (O, I, kh, kw), got {weight_shape}")
    _check_bsr(op, crow, col, values, weight_shape[0])
    stride, padding, dilation = (_pair(op, k, val) for k, val in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    _check_conv_x(op, x, values.dtype, weight_shape, stride, padding, dilation)
    _check_bias(op, bias, values.dtype, weight_shape[0])
    v.check_same_device(op, x=x, crow=crow, col=col, values=values, bias=bias)
    return torch.ops.nmkern.bsr_conv2d(x, crow, col, values.contiguous(), weight_shape, bias, stride, padding, dilation)


__all__ = ["bsr_conv2d", "bsr_linear", "nm_conv2d", "nm_linear", "semi24_linear"]
