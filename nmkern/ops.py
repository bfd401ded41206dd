"""Sparse GEMM / conv ops registered with ``torch.library`` (``torch.ops.nmkern.*``), one per kernel.

Every kernel - pure-torch reference, Triton, the native CPU kernels (ctypes) and the
CUDA 2:4 GEMM (CuPy) - is its own custom op with a fake implementation, so packed
modules trace into one graph under ``torch.compile(fullgraph=True)`` and pass
``torch.library.opcheck``. No op takes a backend string: which op runs is decided
by the table in :mod:`nmkern.dispatch`.

The Python wrappers below (``nm_linear``, ``semi24_linear``, ``bsr_linear``,
``nm_conv2d``, ``bsr_conv2d``) are the public boundary: they validate (``ValueError``
/ ``TypeError`` naming the op, the shapes/dtypes and the fix), flatten leading batch
dims, resolve ``backend`` (:func:`nmkern.dispatch.resolve_backend`) and call the op.

Registered ops (2-D ``x`` for the linears, NCHW ``x`` for the convs; ``<impl>`` is
``reference`` or ``triton``):

* ``nmkern::nm_linear_<impl>(x, values, indices, n, m, bias)``
* ``nmkern::semi24_linear_<impl>(x, values, meta, bias)``
* ``nmkern::bsr_linear_<impl>(x, crow, col, values, out_features, bias)``
* ``nmkern::nm_conv2d_<impl>(x, values, indices, n, m, weight_shape, bias, stride, padding, dilation)``
* ``nmkern::bsr_conv2d_reference(x, crow, col, values, weight_shape, bias, stride, padding, dilation)``
* ``nmkern::cpu_nm_linear(x, values, index, n, m, in_features, out_features, bias)`` and
  ``nmkern::cpu_bsr_linear(x, values, rowptr, col, block, in_features, out_features, bias)``: fp32,
  bf16 or fp16 (x, values and bias in one dtype; fp32 accumulation) on the CPU, weights in the
  layouts of :class:`nmkern._cpu.CpuLinear`;
* ``nmkern::cuda_sparse24_linear(x, values, meta, bias)``: fp16/bf16 on sm_80+.

Gradients: every op is differentiable in ``x`` and ``bias`` on every implementation
(:mod:`nmkern._op_autograd`: ``grad_out @ W`` / ``conv2d_input`` with the weight
decompressed from the packed tensors); the packed tensors get no gradient (a packed
weight is a frozen base; weight gradients are not supported).

NaN/Inf: non-finite inputs propagate exactly as the dense op on the masked weight does
(``0 * inf = NaN``). The sparse kernels (Triton, CPU, CUDA) skip pruned weights, so
each checks its input first (Triton, CUDA: a finite ``x.sum()``, see ``_finite``; CPU: the C kernel
scans x itself, ``NMKERN_FLAG_CHECK_FINITE``) and runs that call as the
dense op on the decompressed weight when it holds NaN/Inf; the reference ops are that
dense op already. The result then does not depend on which path dispatch picks.

Corrupted packed tensors: the public wrappers check shapes, dtypes and index ranges
(N:M indices, 2:4 metadata nibbles, BSR pointers) before any kernel reads them and raise
``ValueError``; the contents check is one reduction and one host sync per call (skipped
under ``torch.compile``). Packed layers call the registered ops directly and validate
their buffers when loaded instead.
"""

from __future__ import annotations

import importlib

import torch

from . import _op_autograd
from . import _validate as v
from .backend import Backend
from . import dispatch
from .dispatch import resolve_backend
from .formats import NMPacked
from .reference import linear as ref
from .reference.semi24 import COL_ALIGN, META_GROUP, ROW_ALIGN

LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CONV_ARGS = "int[] weight_shape, Tensor? bias, int[] stride, int[] padding, int[] dilation"
SCHEMAS = {
    "nm_linear": "(Tensor x, Tensor values, Tensor indices, int n, int m, Tensor? bias) -> Tensor",
    "semi24_linear": "(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor",
    "bsr_linear": "(Tensor x, Tensor crow, Tensor col, Tensor values, int out_features, Tensor? bias) -> Tensor",
    "nm_conv2d": f"(Tensor x, Tensor values, Tensor indices, int n, int m, {_CONV_ARGS}) -> Tensor",
    "bsr_conv2d": f"(Tensor x, Tensor crow, Tensor col, Tensor values, {_CONV_ARGS}) -> Tensor",
    "cpu_nm_linear": ("(Tensor x, Tensor values, Tensor index, int n, int m, int in_features, int out_features, "
                      "Tensor? bias) -> Tensor"),
    "cpu_bsr_linear": ("(Tensor x, Tensor values, Tensor rowptr, Tensor col, int block, int in_features, "
                       "int out_features, Tensor? bias) -> Tensor"),
}


def _module(name: str):
    return importlib.import_module(f"nmkern.{name}")


def _define(name: str, schema: str, impl, fake) -> None:
    """Register ``nmkern::<name>`` with ``impl`` and its fake (shapes only)."""
    op = torch.library.custom_op(f"nmkern::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)


def _conv_fake(x, weight_shape, stride, padding, dilation):
    oh = ref.conv_out_size(x.shape[2], weight_shape[2], stride[0], padding[0], dilation[0])
    ow = ref.conv_out_size(x.shape[3], weight_shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty(x.shape[0], weight_shape[0], oh, ow)


def _finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN/Inf. One reduction over the input; on CUDA also a host sync
    (the price of giving the dense op's NaN/Inf on every path; the dense path does not pay it).

    A sum, not ``isfinite(x).all()``: a NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum
    proves a finite input; a finite input whose sum overflows only sends that call to the dense op, which
    is right too. fp16 sums in fp32 (an fp16 result overflows at 65504: 256x4096 activations of mean 0.5
    would). Measured, 2-core Xeon, 2 threads: bf16 64x576 61 -> 10 us, fp32 256x4096 1.44 ms -> 48 us
    (isfinite().all() then cost a quarter of the bf16 kernel at 64 rows)."""
    total = x.sum(dtype=torch.float32) if x.dtype == torch.float16 else x.sum()
    return bool(torch.isfinite(total))


def _triton(name: str, module: str, fn: str, contiguous: bool = False):
    def impl(*args):
        if not _finite(args[0]):  # the kernel skips pruned weights: 0 * inf would not give NaN
            return _op_autograd.dense_op(name, *args).contiguous()
        y = getattr(_module(f"kernels.{module}"), fn)(*args)
        return y.contiguous() if contiguous else y
    return impl


def _reference(fn, contiguous: bool = False):
    def impl(*args):
        y = fn(*args)
        return y.contiguous() if contiguous else y
    return impl


# (op, reference or triton implementation, fake): one registered op per implementation.
_GEMMS = (
    ("nm_linear", ref.nm_linear_ref, ("nm_linear", "nm_linear_triton"),
     lambda x, values, indices, n, m, bias: x.new_empty(x.shape[0], values.shape[0])),
    ("semi24_linear", ref.semi24_linear_ref, ("nm_linear", "semi24_linear_triton"),
     lambda x, values, meta, bias: x.new_empty(x.shape[0], values.shape[0])),
    ("bsr_linear", ref.bsr_linear_ref, ("bsr_linear", "bsr_linear_triton"),
     lambda x, crow, col, values, out_features, bias: x.new_empty(x.shape[0], out_features)),
    ("nm_conv2d", ref.nm_conv2d_ref, ("sparse_conv2d", "nm_conv2d_triton"),
     lambda x, values, indices, n, m, ws, bias, stride, padding, dilation: _conv_fake(x, ws, stride, padding, dilation)),
    ("bsr_conv2d", ref.bsr_conv2d_ref, None,
     lambda x, crow, col, values, ws, bias, stride, padding, dilation: _conv_fake(x, ws, stride, padding, dilation)),
)
for _name, _ref_fn, _triton_fn, _fake in _GEMMS:
    _conv = _name.endswith("conv2d")
    _define(f"{_name}_reference", SCHEMAS[_name], _reference(_ref_fn, _conv), _fake)
    if _triton_fn is not None:
        _define(f"{_name}_triton", SCHEMAS[_name], _triton(_name, *_triton_fn, contiguous=_conv), _fake)


def _cpu_nm_linear(x, values, index, n, m, in_features, out_features, bias):
    cpu = _module("_cpu")
    x, bias = cpu.check_rows_input("nmkern::cpu_nm_linear", x, bias, in_features, out_features, values.dtype)
    run = cpu.nm_linear_f32 if x.dtype == torch.float32 else cpu.nm_linear  # fp32 | bf16, fp16
    y = run(x, values, index, n, m, out_features, bias, check_finite=True)  # None: x holds a NaN / Inf
    if y is None:  # see _triton
        return _op_autograd.dense_op("cpu_nm_linear", x, values, index, n, m, in_features, out_features, bias)
    return y


def _cpu_bsr_linear(x, values, rowptr, col, block, in_features, out_features, bias):
    cpu = _module("_cpu")
    x, bias = cpu.check_rows_input("nmkern::cpu_bsr_linear", x, bias, in_features, out_features, values.dtype)
    run = cpu.bsr_linear_f32 if x.dtype == torch.float32 else cpu.bsr_linear
    y = run(x, values, rowptr, col, block, out_features, bias, check_finite=True)
    if y is None:  # see _triton
        return _op_autograd.dense_op("cpu_bsr_linear", x, values, rowptr, col, block, in_features, out_features, bias)
    return y


def _cuda_sparse24_linear(x, values, meta, bias):
    if not _finite(x):  # see _triton (a host sync on CUDA)
        return _op_autograd.dense_op("cuda_sparse24_linear", x, values, meta, bias)
    return _module("_cuda").sparse24_linear(x, values, meta, bias)


_define("cpu_nm_linear", SCHEMAS["cpu_nm_linear"], _cpu_nm_linear,
        lambda x, values, index, n, m, in_features, out_features, bias: x.new_empty(x.shape[0], out_features))
_define("cpu_bsr_linear", SCHEMAS["cpu_bsr_linear"], _cpu_bsr_linear,
        lambda x, values, rowptr, col, block, in_features, out_features, bias: x.new_empty(x.shape[0], out_features))
_define("cuda_sparse24_linear", SCHEMAS["semi24_linear"], _cuda_sparse24_linear,
        lambda x, values, meta, bias: x.new_empty(x.shape[0], values.shape[0]))
_op_autograd.register([f"{name}_{impl}" for name, _, triton_fn, _ in _GEMMS
                       for impl in ("reference", "triton") if impl == "reference" or triton_fn is not None]
                      + ["cpu_nm_linear", "cpu_bsr_linear", "cuda_sparse24_linear"])


def _op(name: str, backend: Backend):
    """The registered op of kernel ``name`` for ``backend`` (reference or triton)."""
    return getattr(torch.ops.nmkern, f"{name}_{backend.value}")


# ---------------------------------------------------------------- public wrappers


def _backend(op: str, backend, x: torch.Tensor) -> Backend:
    b = resolve_backend(op, backend, x)
    if b is Backend.TRITON and x.dtype not in dispatch.TRITON_DTYPES:
        raise TypeError(f"{op}: the triton backend takes fp16, bf16 or fp32 inputs, got {x.dtype}; "
                        "use backend='reference' for fp64")
    return b


def _check_x(op: str, x, weight_dtype: torch.dtype, in_features: int, where: str = "last") -> None:
    v.check_tensor(op, "x", x, LINEAR_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least 1 dimension, got a scalar")
    if x.dtype != weight_dtype:
        raise TypeError(f"{op}: x has dtype {x.dtype} but the weight is {weight_dtype}; cast x with .to({weight_dtype})")
    if in_features == 0:
        raise ValueError(f"{op}: the weight has in_features=0; a layer with no inputs has nothing to sparsify "
                         "(use F.linear, which returns the bias)")
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
    """``x @ W^T + bias`` with W an N:M-packed ``(out, in)`` weight (``pack_nm(w, n, m)`` with dim=-1/1).

    Differentiable in ``x`` and ``bias`` (not in the packed weight); ``packed`` is validated
    (shapes, dtypes, indices) first.
    """
    op = "nm_linear"
    if not isinstance(packed, NMPacked):
        raise TypeError(f"{op}: packed must be an nmkern.NMPacked (from nmkern.pack_nm), got {type(packed).__name__}")
    v.check_nm_packed(op, packed, LINEAR_DTYPES)
    if len(packed.shape) != 2 or packed.dim != 1:
        raise ValueError(f"{op}: packed must hold a 2-D (out, in) weight grouped along in (dim=1), "
                         f"got shape {tuple(packed.shape)} grouped along dim {packed.dim}")
    out_f, in_f = packed.shape
    _check_x(op, x, packed.dtype, in_f)
    _check_bias(op, bias, packed.dtype, out_f)
    v.check_same_device(op, x=x, values=packed.values, indices=packed.indices, bias=bias)
    b = _backend(op, backend, x)
    y = _op("nm_linear", b)(_flat(x, in_f), packed.values, packed.indices, packed.n, packed.m, bias)
    return y.reshape(*x.shape[:-1], out_f)


def semi24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend="auto") -> torch.Tensor:
    """``x @ W^T + bias`` with W given as :func:`nmkern.compress_24` output (CUTLASS 2:4 layout).

    Differentiable in ``x`` and ``bias`` (not in ``values``); ``meta`` is validated first.
    """
    op = "semi24_linear"
    v.check_tensor(op, "values", values, v.HALF_DTYPES, ndim=2)
    v.check_tensor(op, "meta", meta, (torch.int16,), ndim=2)
    out_f, half = values.shape
    in_f = 2 * half
    if out_f % ROW_ALIGN or in_f % COL_ALIGN or meta.shape != (out_f, in_f // META_GROUP):
        raise ValueError(f"{op}: values {tuple(values.shape)} and meta {tuple(meta.shape)} do not match the CUTLASS "
                         f"2:4 layout (meta ({out_f}, {in_f // META_GROUP}), rows % {ROW_ALIGN} == 0); "
                         "pass what nmkern.compress_24 returned")
    v.check_meta_24(op, meta)
    _check_x(op, x, values.dtype, in_f)
    _check_bias(op, bias, values.dtype, out_f)
    v.check_same_device(op, x=x, values=values, meta=meta, bias=bias)
    b = _backend(op, backend, x)
    y = _op("semi24_linear", b)(_flat(x, in_f), values.contiguous(), meta.contiguous(), bias)
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
    ``(block, 1)`` (:func:`nmkern.to_bsr_1xn` gives them as a torch BSR tensor). Differentiable
    in ``x`` and ``bias`` (not in ``values``); the buffers are validated first.
    """
    op = "bsr_linear"
    _check_bsr(op, crow, col, values, out_features)
    in_f = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else 0
    _check_x(op, x, values.dtype, in_f)
    _check_bias(op, bias, values.dtype, out_features)
    v.check_same_device(op, x=x, crow=crow, col=col, values=values, bias=bias)
    v.check_bsr_buffers(op, crow, col, values.shape[0], in_f)
    b = _backend(op, backend, x)
    y = _op("bsr_linear", b)(_flat(x, in_f), crow, col, values.contiguous(), out_features, bias)
    return y.reshape(*x.shape[:-1], out_features)


def _pair(op: str, name: str, val) -> list[int]:
    if isinstance(val, int) and not isinstance(val, bool):
        return [val, val]
    if isinstance(val, (tuple, list)) and len(val) == 2 and all(isinstance(e, int) for e in val):
        return list(val)
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {val!r}")


def _conv_params(op: str, stride, padding, dilation) -> tuple[list[int], list[int], list[int]]:
    stride, padding, dilation = (_pair(op, k, val) for k, val in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")
    return stride, padding, dilation


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
    ``(O, kh*kw*I)`` view the kernels read. Differentiable in ``x`` and ``bias`` (not in the
    packed weight); ``packed`` is validated (shapes, dtypes, indices) first.
    """
    op = "nm_conv2d"
    if not isinstance(packed, NMPacked):
        raise TypeError(f"{op}: packed must be an nmkern.NMPacked (from nmkern.pack_nm(w, n, m, dim=1)), "
                        f"got {type(packed).__name__}")
    v.check_nm_packed(op, packed, LINEAR_DTYPES)
    if len(packed.shape) != 4 or packed.dim != 1:
        raise ValueError(f"{op}: packed must hold a 4-D conv weight grouped along input channels (dim=1), "
                         f"got shape {tuple(packed.shape)} grouped along dim {packed.dim}")
    stride, padding, dilation = _conv_params(op, stride, padding, dilation)
    _check_conv_x(op, x, packed.dtype, packed.shape, stride, padding, dilation)
    _check_bias(op, bias, packed.dtype, packed.shape[0])
    v.check_same_device(op, x=x, values=packed.values, indices=packed.indices, bias=bias)
    b = _backend(op, backend, x)
    return _op("nm_conv2d", b)(x, packed.values, packed.indices, packed.n, packed.m, list(packed.shape), bias, stride,
                               padding, dilation)


def bsr_conv2d(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, weight_shape,
               bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """``conv2d(x, W, bias)`` with W a 1xN block-sparse conv weight in BSR form over ``(O, I*kh*kw)`` (reference).

    Differentiable in ``x`` and ``bias`` (not in ``values``); the buffers are validated first.
    """
    op = "bsr_conv2d"
    weight_shape = [int(s) for s in weight_shape]
    if len(weight_shape) != 4:
        raise ValueError(f"{op}: weight_shape must be (O, I, kh, kw), got {weight_shape}")
    _check_bsr(op, crow, col, values, weight_shape[0])
    stride, padding, dilation = _conv_params(op, stride, padding, dilation)
    _check_conv_x(op, x, values.dtype, weight_shape, stride, padding, dilation)
    _check_bias(op, bias, values.dtype, weight_shape[0])
    v.check_same_device(op, x=x, crow=crow, col=col, values=values, bias=bias)
    v.check_bsr_buffers(op, crow, col, values.shape[0], weight_shape[1] * weight_shape[2] * weight_shape[3])
    return torch.ops.nmkern.bsr_conv2d_reference(x, crow, col, values.contiguous(), weight_shape, bias, stride, padding,
                                                 dilation)


__all__ = ["bsr_conv2d", "bsr_linear", "nm_conv2d", "nm_linear", "semi24_linear"]
