"""Per-call choice of how a packed sparse layer runs: one small function, tested with fakes.

Rule of the house: a sparse layer is never slower than its dense twin. Where no
sparse kernel would win (a CPU without nmkern's native kernels or where they lose,
a large batch on the GPU, a pattern too dense to save bytes, a device nmkern has
no kernel for) the layer runs the dense op on its cached, decompressed, masked
weight (:attr:`ExecPath.DENSE`).

The native kernels are optional and found lazily:

* ``nmkern._cpu`` (csrc/cpu through ctypes): ``available()``,
  ``prepare_cpu_linear(dense_masked_weight, kind, n, m, block)``,
  ``prepare_cpu_conv2d(dense_masked_weight, kind, n, m, block)`` (called with
  ``(x, bias, stride, padding, dilation)``), fp32 only,
  ``cpu_beats_dense(kind, n, m, block, sparsity, batch, out_features, in_features)``;
* ``nmkern._cuda`` (csrc/cuda through CuPy): ``available()``,
  ``sparse24_linear(x2d, values, meta, bias)``;
* torch's cuSPARSELt (``torch._cslt_sparse_mm``, used through
  ``torch.sparse.to_sparse_semi_structured``).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import os

import torch

from .backend import Backend, triton_interpret


class ExecPath(str, enum.Enum):
    """How one call of a packed layer runs."""

    REFERENCE = "reference"  # pure torch: decompress, then the dense op (every call)
    TRITON = "triton"  # nmkern.kernels (CUDA, or CPU under TRITON_INTERPRET=1)
    DENSE = "dense"  # the dense op on the cached decompressed masked weight
    CUDA = "cuda"  # nmkern._cuda 2:4 tensor-core GEMM
    CUSPARSELT = "cusparselt"  # torch's cuSPARSELt 2:4 GEMM
    CPU = "cpu"  # nmkern._cpu native kernels

    def __str__(self) -> str:
        return self.value


class LayerOp(str, enum.Enum):
    LINEAR = "linear"
    CONV2D = "conv2d"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What the decision needs to know about a packed layer (no tensors).

    ``in_features`` / ``out_features`` are the GEMM's K and N: for a conv,
    ``in_channels * kh * kw`` and ``out_channels``. ``pattern`` is ``"nm"`` or ``"1xn"``.
    """

    op: LayerOp
    pattern: str
    n: int
    m: int
    block: int
    sparsity: float
    in_features: int
    out_features: int
    dtype: torch.dtype
    semi24_fits: bool = False  # 2:4, fp16/bf16, rows and K multiples of 32 (CUTLASS layout)

    @property
    def kind(self) -> str:
        return self.pattern

    def packed_bytes_ratio(self) -> float:
        """Bytes a sparse kernel reads for the weight / bytes of the dense weight."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        if self.pattern == "nm":
            bits = max(1, (self.m - 1).bit_length())
            return (self.n / self.m) * (1 + bits / (8 * elem))
        # 1xN BSR: kept blocks of `block` values plus one int32 column index each.
        return (1 - self.sparsity) * (1 + 4 / (self.block * elem))


# Sparse kernels read fewer weight bytes; that only wins while the GEMM is bound by
# reading the weight: at most this many GEMM rows (decode-style batches).
SMALL_BATCH = 16
# ... and only if they read clearly fewer bytes (gathers cost more than streaming).
MAX_BYTES_RATIO = 0.75
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def parse_path(op: str, requested) -> ExecPath | None:
    """``backend=`` value -> ExecPath, or None for "auto"."""
    if isinstance(requested, Backend):
        requested = requested.value
    if isinstance(requested, ExecPath):
        return requested
    if not isinstance(requested, str):
        raise TypeError(f"{op}: backend must be a str, nmkern.Backend or nmkern.ExecPath, got {type(requested).__name__}")
    if requested.lower() == "auto":
        return None
    try:
        return ExecPath(requested.lower())
    except ValueError:
        choices = ["auto"] + [p.value for p in ExecPath]
        raise ValueError(f"{op}: unknown backend {requested!r}; choose one of {choices}") from None


def _why_not(path: ExecPath, x: torch.Tensor, layer: LayerInfo) -> str | None:
    """None if ``path`` can run this call, else the reason it cannot."""
    dev = x.device.type
    if path in (ExecPath.REFERENCE, ExecPath.DENSE):
        return None
    if path is ExecPath.TRITON:
        if not (dev == "cuda" or (dev == "cpu" and triton_interpret())):
            return f"the triton backend needs a CUDA tensor (got one on {dev}); set TRITON_INTERPRET=1 to run it on the CPU"
        if layer.dtype not in TRITON_DTYPES:
            return f"the triton kernels take fp16, bf16 or fp32, not {str(layer.dtype).replace('torch.', '')}"
        if layer.op is LayerOp.CONV2D and layer.pattern != "nm":
            return "there is no Triton 1xN conv kernel (1xN convs run the dense conv on the masked weight)"
        return None
    if path is ExecPath.CPU:
        if dev != "cpu":
            return f"the cpu backend needs a CPU tensor (got one on {dev})"
        if cpu_kernels() is None:
            return "nmkern's native CPU kernels (nmkern._cpu) are not built or do not load here"
        if layer.dtype != torch.float32:
            return f"the native CPU kernels take fp32, not {str(layer.dtype).replace('torch.', '')}"
        return None
    # CUDA and cuSPARSELt: 2:4 tensor cores only.
    if dev != "cuda":
        return f"the {path.value} backend needs a CUDA tensor (got one on {dev})"
    if layer.op is not LayerOp.LINEAR or not layer.semi24_fits:
        return (f"the {path.value} backend runs 2:4 Linear layers with fp16/bf16 weights whose out/in features are "
                "multiples of 32")
    if path is ExecPath.CUDA and cuda_kernels() is None:
        return "nmkern's CUDA kernels (nmkern._cuda) are not built or cannot run here"
    if path is ExecPath.CUSPARSELT and not cusparselt_available():
        return "this torch build has no cuSPARSELt"
    return None


def _auto(x: torch.Tensor, layer: LayerInfo, rows: int) -> ExecPath:
    dev = x.device.type
    if dev == "cpu":
        cpu = cpu_kernels()
        beats = getattr(cpu, "cpu_beats_dense", None)
        if beats is not None and layer.dtype == torch.float32 and beats(
            layer.kind, layer.n, layer.m, layer.block, layer.sparsity, rows, layer.out_features, layer.in_features
        ):
            return ExecPath.CPU
        return ExecPath.DENSE
    if dev != "cuda" or rows > SMALL_BATCH or layer.packed_bytes_ratio() > MAX_BYTES_RATIO:
        return ExecPath.DENSE
    if layer.semi24_fits and layer.pattern == "nm" and layer.op is LayerOp.LINEAR and cuda_kernels() is not None:
        return ExecPath.CUDA
    if _why_not(ExecPath.TRITON, x, layer) is None:
        return ExecPath.TRITON
    return ExecPath.DENSE


def choose_linear_backend(requested, x: torch.Tensor, layer: LayerInfo, rows: int | None = None) -> ExecPath:
    """How this call of a packed Linear / Conv2d runs.

    ``requested``: the layer's ``backend`` ("auto", or a :class:`Backend` /
    :class:`ExecPath` value, which is obeyed or refused with ``ValueError``).
    ``"auto"`` first looks at ``NMKERN_BACKEND`` (used when it can run this call),
    then: CPU -> the native kernel if ``nmkern._cpu`` says it beats dense at this
    shape, else dense; CUDA -> dense above :data:`SMALL_BATCH` GEMM rows or when
    the packed weight saves too few bytes, else the CUDA 2:4 kernel for 2:4
    fp16/bf16 Linear weights that fit the CUTLASS layout, else Triton; any other
    device -> dense. ``rows``: the GEMM's row count (default ``x.numel() //
    in_features``; a conv passes ``batch * out_h * out_w``).
    """
    op = f"nmkern.{layer.op.value}"
    if rows is None:
        rows = x.numel() // max(1, layer.in_features)
    path = parse_path(op, requested)
    if path is None:
        env = os.environ.get("NMKERN_BACKEND", "").strip()
        env_path = parse_path(f"{op} (NMKERN_BACKEND)", env) if env else None
        if env_path is not None and _why_not(env_path, x, layer) is None:
            return env_path
        return _auto(x, layer, rows)
    reason = _why_not(path, x, layer)
    if reason is not None:
        raise ValueError(f"{op}: backend {path.value!r} cannot run this layer: {reason}; use backend='auto'")
    return path
