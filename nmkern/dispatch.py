"""The one backend table: what every execution path can run, and the callables that run it.

In the spirit of torch's ``torch/sparse/semi_structured.py`` (its dtype/shape
constraints plus one dispatch table): each :class:`PathEntry` of :data:`TABLE` states
its constraints once (devices, dtypes, patterns, ops, a shape rule, whether its
native code is present) and provides the ``linear`` and ``conv2d`` callables a packed
layer runs. :func:`why_not` reads the constraints; :func:`choose` (packed layers) and
:func:`resolve_backend` (the functional ops and mask / pack kernels) decide with it.

Rule of the house: a sparse layer is never slower than its dense twin. Where no
sparse kernel would win (a CPU without nmkern's native kernels or where they lose,
a large batch on the GPU, a pattern too dense to save bytes, a device nmkern has no
kernel for) ``"auto"`` runs the dense op on the layer's cached, decompressed, masked
weight (:attr:`Backend.DENSE`). Whether a sparse kernel wins is measured: the first call of
each shape, pattern, dtype, device and row bucket times the paths side by side
(:mod:`nmkern.tuning`); the static rules below decide only with ``NMKERN_TUNE=0``, under
a trace with no eager plan, or where one path alone can run.

Adding a path (say an fp8 2:4 GEMM): its kernel and reference, one registered op in
:mod:`nmkern.ops`, one :class:`Backend` member and one row here.

The native kernels are optional and found lazily: :func:`cpu_kernels` (``nmkern._cpu``,
csrc/cpu through ctypes) and :func:`cuda_kernels` (``nmkern._cuda``, csrc/cuda through
CuPy); cuSPARSELt is torch's ``torch._cslt_sparse_mm``.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import Callable

import torch
import torch.nn.functional as F

from ._moved import renamed_attribute
from .backend import Backend, env_backend, parse_backend, triton_interpret
from .reference.linear import fold_rows_nchw, unfold_nhwc
from .spec import Pattern

__all__ = ["Backend", "Call", "LayerInfo", "LayerOp", "PathEntry", "TABLE", "choose", "choose_linear_backend",
           "callable_for", "cpu_kernels", "cuda_kernels", "cusparselt_available", "native_paths", "resolve_backend",
           "run", "why_not"]


class LayerOp(str, enum.Enum):
    LINEAR = "linear"
    CONV2D = "conv2d"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What the decision needs to know about a packed layer (no tensors).

    ``in_features`` / ``out_features`` are the GEMM's K and N: for a conv,
    ``in_channels * kh * kw`` and ``out_channels``. ``pattern``: a :class:`Pattern`
    (or its value, "nm" / "1xn").
    """

    op: LayerOp
    pattern: Pattern
    n: int
    m: int
    block: int
    sparsity: float
    in_features: int
    out_features: int
    dtype: torch.dtype
    semi24_fits: bool = False  # 2:4, fp16/bf16, rows and K multiples of 32 (CUTLASS layout)
    geometry: tuple = ()  # a conv's (kernel_size, stride, padding, dilation): part of its measured-dispatch key

    def __post_init__(self):
        object.__setattr__(self, "pattern", Pattern(self.pattern))

    @property
    def kind(self) -> str:
        return self.pattern.value

    def packed_bytes_ratio(self) -> float:
        """Bytes a sparse kernel reads for the weight / bytes of the dense weight."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        if self.pattern is Pattern.NM:
            bits = max(1, (self.m - 1).bit_length())
            return (self.n / self.m) * (1 + bits / (8 * elem))
        # 1xN BSR: kept blocks of `block` values plus one int32 column index each.
        return (1 - self.sparsity) * (1 + 4 / (self.block * elem))


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of a packed layer: the layer, the input's device type and the GEMM's row count."""

    layer: LayerInfo
    device: str
    rows: int


# Sparse kernels read fewer weight bytes; that only wins while the GEMM is bound by
# reading the weight: at most this many GEMM rows (decode-style batches).
SMALL_BATCH = 16
# ... and only if they read clearly fewer bytes (gathers cost more than streaming).
MAX_BYTES_RATIO = 0.75
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # nmkern._cpu.KERNEL_DTYPES: fp32 accumulation
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- native code, found lazily

def _native(name: str):
    try:
        mod = importlib.import_module(f"nmkern.{name}")
        return mod if mod.available() else None
    except (ImportError, AttributeError, OSError, RuntimeError):
        return None


# Looked up once per process. A plain dict, not functools.lru_cache: Dynamo traces
# through this lookup at every torch.compile, and it warns about lru_cache wrappers.
_NATIVE_CACHE: dict[str, object] = {}


def cpu_kernels():
    """``nmkern._cpu`` when it is importable and its library loads, else None."""
    if "_cpu" not in _NATIVE_CACHE:
        _NATIVE_CACHE["_cpu"] = _native("_cpu")
    return _NATIVE_CACHE["_cpu"]


def cuda_kernels():
    """``nmkern._cuda`` when it is importable and a GPU can run it, else None."""
    if "_cuda" not in _NATIVE_CACHE:
        _NATIVE_CACHE["_cuda"] = _native("_cuda")
    return _NATIVE_CACHE["_cuda"]


def cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available()) and hasattr(torch, "_cslt_sparse_mm")
    except AttributeError:
        return False


# ---------------------------------------------------------------- the callables of the table
# A ``linear`` callable takes (layer, x of shape (..., K)) and returns (..., N); a ``conv2d``
# callable takes (layer, NCHW x) and returns NCHW. ``layer`` is a packed SparseLinear /
# SparseConv2d: its buffers, its caches (``_dense_cached`` ...) and its geometry.

def _over_rows(x: torch.Tensor, op, *args) -> torch.Tensor:
    """Run a 2-D ``op(x2d, *args)`` over the leading dims of ``x``."""
    y = op(x.reshape(-1, x.shape[-1]), *args)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _packed_linear(impl: str) -> Callable:
    """The linear callable over nmkern's packed buffers through ``torch.ops.nmkern.*_<impl>``."""
    def linear(layer, x):
        if layer.pattern is Pattern.NM:
            return _over_rows(x, getattr(torch.ops.nmkern, f"nm_linear_{impl}"), layer.packed_values,
                              layer.packed_indices, layer.n, layer.m, layer.bias)
        return _over_rows(x, getattr(torch.ops.nmkern, f"bsr_linear_{impl}"), layer.bsr_crow, layer.bsr_col,
                          layer.bsr_values, layer.weight_shape[0], layer.bias)
    return linear


def _packed_conv2d(impl: str) -> Callable:
    def conv2d(layer, x):
        geometry = (list(layer.weight_shape), layer.bias, list(layer.stride), list(layer.padding),
                    list(layer.dilation))
        if layer.pattern is Pattern.NM:
            return getattr(torch.ops.nmkern, f"nm_conv2d_{impl}")(x, layer.packed_values, layer.packed_indices,
                                                                  layer.n, layer.m, *geometry)
        return getattr(torch.ops.nmkern, f"bsr_conv2d_{impl}")(x, layer.bsr_crow, layer.bsr_col, layer.bsr_values,
                                                               *geometry)
    return conv2d


def _dense_linear(layer, x):
    # A layer whose one resident form is the CPU layout decodes it per dense call (nmkern.nn._forms)
    if layer.__dict__.get("_decoded_dense"):
        return layer._decoded_linear(x)
    return F.linear(x, layer._dense_cached(), layer.bias)


def _dense_conv2d(layer, x):
    # as _dense_linear, in one piece into a reused buffer, unless autograd will keep the weight for x's gradient
    weight = (layer._decoded_weight(keep=torch.is_grad_enabled() and x.requires_grad)
              if layer.__dict__.get("_decoded_dense") else layer._dense_cached())
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)


def _kept_dense_linear(layer, x):
    return F.linear(x, layer._dense_cached(), layer.bias)


def _kept_dense_conv2d(layer, x):
    return F.conv2d(x, layer._dense_cached(), layer.bias, layer.stride, layer.padding, layer.dilation)


def measured_callable(path: Backend, op: LayerOp) -> Callable:
    """The callable a measurement times for ``path``: :func:`callable_for`'s, except that dense always reads a kept
    dense weight (every layer's samples of one shape measure the same thing; nmkern.nn._forms adds the decode of
    a layer holding only the CPU layout to the dense median itself), and a linear's CPU kernel is called as its
    bound calls will call it (:func:`_bound_cpu_linear`)."""
    if path is Backend.DENSE:
        return _kept_dense_conv2d if op is LayerOp.CONV2D else _kept_dense_linear
    if path is Backend.CPU and op is LayerOp.LINEAR:
        return _bound_cpu_linear
    return callable_for(path, op)


def _bound_cpu_linear(layer, x):
    """The CPU kernel as a packed linear's bound calls run it once its path is decided (``SparseLinear._rows_call``),
    so the samples do not count the checks those calls skip (~20 us a call, 10% of a 384x384 bf16 layer at 304
    rows); the checked path where the bound call steps aside (autograd, a NaN in x, a stand-in layout)."""
    entry = layer._kernel_entry_cached()
    y = entry(x) if entry is not None else None
    return y if y is not None else callable_for(Backend.CPU, LayerOp.LINEAR)(layer, x)


_CPU_IMPLS: tuple | None = None  # (nm, bsr): the registered CPU ops' implementations, imported on first use


def _cpu_impls() -> tuple:
    global _CPU_IMPLS
    if _CPU_IMPLS is None:
        from . import ops  # ops imports this module: not at import time

        _CPU_IMPLS = (ops._cpu_nm_linear, ops._cpu_bsr_linear)
    return _CPU_IMPLS


def _needs_registered_op(layer, x2d: torch.Tensor) -> bool:
    """A trace, or autograd through the call: the registered op (its fake and backward). Otherwise the op's
    implementation is called directly: the registered op's first call imports torch._dynamo (~890 modules,
    +150 MB of process memory, measured) and every call pays torch's custom-op dispatch."""
    if torch.compiler.is_compiling():
        return True
    bias = layer.bias
    return torch.is_grad_enabled() and (x2d.requires_grad or (bias is not None and bias.requires_grad))


def _cpu_rows(layer, x2d: torch.Tensor) -> torch.Tensor:
    """The native CPU kernel on (rows, K) fp32: the layer's prepared CPU layout, one registered op."""
    packed = layer._cpu_cached()
    t = packed.tensors
    registered = _needs_registered_op(layer, x2d)
    if packed.kind is Pattern.NM:
        fn = torch.ops.nmkern.cpu_nm_linear if registered else _cpu_impls()[0]
        return fn(x2d, t["values"], t["index"], packed.n, packed.m, packed.in_features, packed.out_features,
                  layer.bias)
    fn = torch.ops.nmkern.cpu_bsr_linear if registered else _cpu_impls()[1]
    return fn(x2d, t["values"], t["rowptr"], t["col"], packed.block, packed.in_features, packed.out_features,
              layer.bias)


def _as_conv2d(gemm_rows: Callable) -> Callable:
    """A conv2d callable from a GEMM one ``gemm_rows(layer, cols (B*OH*OW, K)) -> (B*OH*OW, out)``:
    im2col in NHWC order (the order N:M groups run along), the sparse GEMM, back to NCHW."""
    def conv2d(layer, x):
        cols, (batch, oh, ow) = unfold_nhwc(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        return fold_rows_nchw(gemm_rows(layer, cols), batch, oh, ow)
    return conv2d


def _cuda_rows(layer, x2d: torch.Tensor) -> torch.Tensor:
    values, meta = layer._semi24_cached()
    return torch.ops.nmkern.cuda_sparse24_linear(x2d, values, meta, layer.bias)


def _cusparselt_rows(layer, x2d: torch.Tensor) -> torch.Tensor:
    # NaN/Inf rule (see nmkern.ops): cuSPARSELt skips pruned weights, so an input holding NaN/Inf
    # runs the dense op on the decompressed weight. The check is a host sync; it is not a
    # registered op, so under torch.compile (which cannot trace the branch) it is skipped.
    from .ops import _finite  # ops imports this module: not at import time

    if not torch.compiler.is_compiling() and not _finite(x2d):
        return F.linear(x2d, layer._gemm_rows_weight().to(x2d.dtype), layer.bias)
    return F.linear(x2d, layer._cslt_cached(), layer.bias)


def _linear_of(gemm_rows: Callable) -> Callable:
    """A linear callable over any leading dims from a GEMM one on 2-D rows."""
    return lambda layer, x: _over_rows(x, lambda x2d: gemm_rows(layer, x2d))


# ---------------------------------------------------------------- rules that are not plain data

def _triton_device(device: str) -> str | None:
    """Why Triton cannot run on this device type (None: CUDA, or the CPU under the interpreter)."""
    if device == "cuda" or (device == "cpu" and triton_interpret()):
        return None
    return (f"the triton backend needs a CUDA tensor (got one on {device}); "
            "set TRITON_INTERPRET=1 to run it on the CPU")


def _cpu_present(call: Call) -> str | None:
    if cpu_kernels() is None:
        return "nmkern's native CPU kernels (nmkern._cpu) are not built or do not load here"
    return None


def _cuda_present(call: Call) -> str | None:
    if cuda_kernels() is None:
        return "nmkern's CUDA kernels (nmkern._cuda) are not built or cannot run here"
    return None


def _cusparselt_present(call: Call) -> str | None:
    return None if cusparselt_available() else "this torch build has no cuSPARSELt"


def _semi24_shape(path: Backend) -> Callable:
    def rule(layer: LayerInfo) -> str | None:
        if layer.semi24_fits:
            return None
        return (f"the {path.value} backend runs 2:4 layers with fp16/bf16 weights whose out features and GEMM K "
                "(in_features, or kh*kw*in_channels) are multiples of 32")
    return rule


@dataclasses.dataclass(frozen=True)
class PathEntry:
    """One execution path: its constraints (stated once) and its callables.

    ``devices`` / ``dtypes``: None means any. ``present``: None when the path's code
    can run this call on this machine (native library loaded, interpreter set), else
    why not. ``shape_rule``: None when the layer's geometry fits, else why not.
    ``conv2d`` None: the path has no conv kernel.
    """

    backend: Backend
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...] | None
    patterns: tuple[Pattern, ...]
    linear: Callable
    conv2d: Callable | None
    present: Callable[[Call], str | None] | None = None
    shape_rule: Callable[[LayerInfo], str | None] | None = None
    conv_note: str = ""

    def ops(self) -> tuple[LayerOp, ...]:
        return (LayerOp.LINEAR, LayerOp.CONV2D) if self.conv2d is not None else (LayerOp.LINEAR,)


_NM_1XN = (Pattern.NM, Pattern.BLOCK)
_NATIVE = (Backend.CPU, Backend.CUDA, Backend.CUSPARSELT)  # paths whose weight layout is built ahead of time

TABLE: dict[Backend, PathEntry] = {e.backend: e for e in (
    PathEntry(Backend.REFERENCE, None, None, _NM_1XN, _packed_linear("reference"), _packed_conv2d("reference")),
    PathEntry(Backend.DENSE, None, None, _NM_1XN, _dense_linear, _dense_conv2d),
    PathEntry(Backend.TRITON, ("cuda", "cpu"), TRITON_DTYPES, _NM_1XN, _packed_linear("triton"),
              _packed_conv2d("triton"), present=lambda call: _triton_device(call.device),
              shape_rule=lambda layer: ("there is no Triton 1xN conv kernel (1xN convs run the dense conv on the "
                                        "masked weight)" if layer.op is LayerOp.CONV2D
                                        and layer.pattern is Pattern.BLOCK else None)),
    PathEntry(Backend.CPU, ("cpu",), CPU_DTYPES, _NM_1XN, _linear_of(_cpu_rows), _as_conv2d(_cpu_rows),
              present=_cpu_present),
    PathEntry(Backend.CUDA, ("cuda",), HALF_DTYPES, (Pattern.NM,), _linear_of(_cuda_rows), _as_conv2d(_cuda_rows),
              present=_cuda_present, shape_rule=_semi24_shape(Backend.CUDA)),
    PathEntry(Backend.CUSPARSELT, ("cuda",), HALF_DTYPES, (Pattern.NM,), _linear_of(_cusparselt_rows),
              _as_conv2d(_cusparselt_rows), present=_cusparselt_present, shape_rule=_semi24_shape(Backend.CUSPARSELT)),
)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _reasons(entry: PathEntry, call: Call) -> list[str]:
    name, layer = entry.backend.value, call.layer
    out = []
    if entry.devices is not None and call.device not in entry.devices:
        out.append(f"the {name} backend needs a {' or '.join(d.upper() for d in entry.devices)}"
                   f" tensor (got one on {call.device})")
    elif entry.present is not None and (why := entry.present(call)) is not None:
        out.append(why)
    if entry.dtypes is not None and layer.dtype not in entry.dtypes:
        out.append(f"the {name} kernels take {', '.join(_dtype_name(d) for d in entry.dtypes)}, "
                   f"not {_dtype_name(layer.dtype)}")
    if layer.op not in entry.ops():
        out.append(f"the {name} backend has no {layer.op.value} kernel")
    if layer.pattern not in entry.patterns:
        out.append(f"the {name} backend runs {', '.join(p.value for p in entry.patterns)} patterns, "
                   f"not {layer.pattern.value}")
    if entry.shape_rule is not None and (why := entry.shape_rule(layer)) is not None:
        out.append(why)
    return out


def why_not(path: Backend | str, call: Call) -> str | None:
    """None if ``path`` can run ``call``, else every reason it cannot (joined with '; ')."""
    entry = TABLE[parse_backend("nmkern.dispatch.why_not", path)]
    reasons = _reasons(entry, call)
    return "; ".join(reasons) if reasons else None


def _auto(call: Call) -> Backend:
    if not torch.compiler.is_compiling():  # a trace reads the eager plan, which already holds measured winners
        measured = tuning.lookup(call)
        if measured is not None:
            return measured
    layer = call.layer
    if call.device == "cpu":
        beats = getattr(cpu_kernels(), "cpu_beats_dense", None)
        if beats is not None and why_not(Backend.CPU, call) is None and beats(
                layer.kind, layer.n, layer.m, layer.block, layer.sparsity, call.rows, layer.out_features,
                layer.in_features, dtype=layer.dtype):
            return Backend.CPU
        return Backend.DENSE
    if call.device != "cuda" or call.rows > SMALL_BATCH or layer.packed_bytes_ratio() > MAX_BYTES_RATIO:
        return Backend.DENSE
    for path in (Backend.CUDA, Backend.TRITON):
        if why_not(path, call) is None:
            return path
    return Backend.DENSE


def choose(requested, call: Call) -> Backend:
    """How ``call`` of a packed layer runs.

    ``requested``: the layer's ``backend`` ("auto", or a :class:`Backend` value, which is
    obeyed or refused with ``ValueError`` listing every reason). ``"auto"`` first takes
    ``NMKERN_BACKEND`` when that path can run the call, then the winner measured for this call's
    shape and row bucket (:mod:`nmkern.tuning`; off with ``NMKERN_TUNE=0``), then the static
    rules: CPU -> the native kernel
    where ``nmkern._cpu`` says it beats dense at this shape, else dense; CUDA -> dense
    above :data:`SMALL_BATCH` GEMM rows or when the packed weight saves too few bytes,
    else the CUDA 2:4 kernel where it fits, else Triton; any other device -> dense.
    """
    op = f"nmkern.{call.layer.op.value}"
    path = parse_backend(op, requested)
    if path is Backend.AUTO:
        env = env_backend(op)
        if env is not None and why_not(env, call) is None:
            return env
        return _auto(call)
    reason = why_not(path, call)
    if reason is not None:
        raise ValueError(f"{op}: backend {path.value!r} cannot run this layer: {reason}; use backend='auto'")
    return path


def native_paths(requested, layer: LayerInfo, device: str) -> list[Backend]:
    """The native paths (cpu, cuda, cusparselt) a layer with ``backend=requested`` may take on ``device``.

    These are the ones whose weight layouts a packed layer builds ahead of time: the forced
    path, or under "auto" the ``NMKERN_BACKEND`` path and what :func:`choose` picks at one GEMM
    row (the batch most favourable to a sparse kernel), when it can run here.
    """
    call = Call(layer, device, 1)
    path = parse_backend(f"nmkern.{layer.op.value}", requested)
    wanted = [path] if path is not Backend.AUTO else [env_backend(f"nmkern.{layer.op.value}"), _auto(call)]
    return [p for p in dict.fromkeys(wanted) if p in _NATIVE and why_not(p, call) is None]


def choose_linear_backend(requested, x: torch.Tensor, layer: LayerInfo, rows: int | None = None) -> Backend:
    """:func:`choose` for an input ``x`` (reads ``x.device`` and ``x.numel()``).

    ``rows``: the GEMM's row count (default ``x.numel() // in_features``; a conv passes
    ``batch * out_h * out_w``).
    """
    if rows is None:
        rows = x.numel() // max(1, layer.in_features)
    return choose(requested, Call(layer, x.device.type, rows))


def callable_for(path: Backend, op: LayerOp) -> Callable:
    """The table's ``linear`` or ``conv2d`` callable of ``path`` (``fn(layer, x) -> y``)."""
    entry = TABLE[path]
    return entry.conv2d if op is LayerOp.CONV2D else entry.linear


def run(path: Backend, layer, x: torch.Tensor) -> torch.Tensor:
    """Run a packed layer's call on ``path``: the table's ``linear`` or ``conv2d`` callable."""
    return callable_for(path, layer._op)(layer, x)


# ---------------------------------------------------------------- functional ops and kernels

def resolve_backend(op: str, backend, tensor: torch.Tensor,
                    supported=(Backend.REFERENCE, Backend.TRITON)) -> Backend:
    """The path of a functional op / mask or pack kernel (``supported``: the paths it has; an op lists
    ``Backend.CPU`` only when its native CPU kernel takes this tensor's dtype and the library loaded).

    auto: ``NMKERN_BACKEND`` when the op has that path and it can run here (the same rule
    as for layers), else Triton for CUDA tensors and for CPU tensors under
    ``TRITON_INTERPRET=1``, else the native CPU kernel for CPU tensors, else the reference.
    """
    b = parse_backend(op, backend)
    device = tensor.device.type

    def runs(path: Backend) -> bool:
        if path is Backend.TRITON:
            return path in supported and _triton_device(device) is None
        return path in supported and (path is not Backend.CPU or device == "cpu")

    if b is Backend.AUTO:
        env = env_backend(op)
        if env is not None and runs(env):
            return env
        return next((path for path in (Backend.TRITON, Backend.CPU) if runs(path)), Backend.REFERENCE)
    if b not in supported:
        raise ValueError(f"{op}: backend {b.value!r} is not available for this op; "
                         f"choose one of {[s.value for s in supported]}")
    if b is Backend.TRITON and (why := _triton_device(device)) is not None:
        raise ValueError(f"{op}: {why}, or use backend='reference'")
    if b is Backend.CPU and device != "cpu":
        raise ValueError(f"{op}: backend 'cpu' runs CPU tensors, got one on {tensor.device}; move it with .cpu() "
                         "or use backend='auto'")
    return b


def _parse_path(op: str, requested) -> Backend | None:
    """nmkern 0.1 helper: the Backend of ``requested``, None for "auto" (use :func:`parse_backend`)."""
    b = parse_backend(op, requested)
    return None if b is Backend.AUTO else b


from . import tuning  # noqa: E402  (last: tuning imports this module)


def __getattr__(name: str):
    return renamed_attribute(__name__, name, {
        "ExecPath": (Backend, "nmkern.Backend (one enum of execution paths)"),
        "parse_path": (_parse_path, "nmkern.backend.parse_backend"),
    })
