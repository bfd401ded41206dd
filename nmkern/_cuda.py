"""CUDA C++ backend: the csrc/cuda kernels, loaded and launched through CuPy.

``setup.py`` compiles ``csrc/cuda/*.cu`` into ``nmkern/_lib/nmkern_cuda.fatbin`` (one cubin
per arch in ``NMKERN_CUDA_ARCHS`` plus PTX) and ships the sources in ``nmkern/_lib/cuda_src``.
At the first call this module loads the fatbin with ``cupy.RawModule``; if that fails (no
fatbin, or none of its code runs on the device) it compiles the shipped sources with NVRTC
through CuPy. Kernels run on torch's current stream and read torch tensors through their
data pointers, so no torch C++ ABI is involved.

Nothing here touches CuPy or the GPU at import time: :func:`available` answers without
raising, and the ops raise a helpful error only when called.

Public entry points (used by ``nmkern.dispatch`` for backend ``"cuda"``):

* :func:`sparse24_linear` ``(x2d, values, meta, bias=None) -> y``: ``y = x2d @ W.T + bias`` with
  W given by :func:`nmkern.compress_24`'s ``(values, meta)``; sparse tensor cores (mma.sp).
* :func:`prune_compress_24` ``(w) -> (values, meta)``: 2:4-prune and compress on the GPU, the
  same bytes as ``compress_24(apply_nm(w, 2, 4))``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from . import _validate as v
from .reference.semi24 import COL_ALIGN, META_GROUP, ROW_ALIGN

_PKG = Path(__file__).resolve().parent
FATBIN_PATH = _PKG / "_lib" / "nmkern_cuda.fatbin"
# Shipped sources (wheel / editable build) first, then the source checkout's csrc/cuda.
SOURCE_DIRS = (_PKG / "_lib" / "cuda_src", _PKG.parent / "csrc" / "cuda")
KERNEL_SOURCES = ("sparse24_gemm.cu", "compress24.cu")

MIN_CAPABILITY = (8, 0)  # mma.sp needs Ampere or newer
# mma.sp::ordered_metadata needs PTX ISA 8.5 (CUDA 12.5); older NVRTC gets plain mma.sp
# (csrc/cuda/sp24_device.cuh, NMKERN_SP_ORDERED_METADATA). setup.py applies the same rule to nvcc.
ORDERED_METADATA_MIN_CUDA = (12, 5)

# Tile geometry, mirrored from csrc/cuda/sp24_layout.cuh (GemmCfg); tests/test_cuda_host_emulation.py
# checks these numbers against the header compiled on the host.
BK = 64  # K per pipeline stage
STRIDE_A = BK // 2 + 8  # halves per smem row of the values tile (16-byte padding)
STRIDE_B = BK + 8  # halves per smem row of the X tile
EPI_PAD = 4  # floats of padding per row of the fp32 epilogue tile


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    name: str
    warps_n: int
    warps_m: int
    warp_m: int  # batch rows per warp
    stages: int

    @property
    def bn(self) -> int:  # W rows (output features) per block
        return 32 * self.warps_n

    @property
    def bm(self) -> int:  # batch rows per block
        return self.warps_m * self.warp_m

    @property
    def threads(self) -> int:
        return 32 * self.warps_n * self.warps_m

    @property
    def smem_bytes(self) -> int:
        stage = self.bn * STRIDE_A * 2 + self.bm * STRIDE_B * 2 + self.bn * (BK // 32) * 4
        epilogue = self.bm * (self.bn + EPI_PAD) * 4
        return max(self.stages * stage, epilogue)


CONFIGS = {
    "small": GemmConfig("small", warps_n=2, warps_m=1, warp_m=16, stages=4),
    "large": GemmConfig("large", warps_n=4, warps_m=2, warp_m=64, stages=3),
}
SMALL_M_MAX = 64  # batches up to this size use the 64 x 16 tile (decode-like shapes)
MIN_KTILES_PER_SPLIT = 4  # split-K keeps >= 4 k tiles (256 of K) per block to amortise the prologue

_DTYPE_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}


class CudaBackendUnavailable(RuntimeError):
    """The cuda backend cannot run here (no CuPy, no GPU, or a GPU older than sm_80)."""


# ---- availability ---------------------------------------------------------------------------


def _cupy():
    try:
        import cupy  # noqa: PLC0415 - lazy: CuPy is optional and slow to import
    except Exception as e:  # ImportError, or a broken CUDA install raising on import
        raise CudaBackendUnavailable(
            f"nmkern cuda backend: CuPy is not importable ({type(e).__name__}: {e}); "
            "install it with `pip install nmkern[cuda]` (cupy-cuda13x) or use backend='triton' / 'reference'"
        ) from e
    return cupy


def _source_dir() -> Path | None:
    for d in SOURCE_DIRS:
        if all((d / s).is_file() for s in KERNEL_SOURCES):
            return d
    return None


def available() -> bool:
    """True when CuPy imports, a CUDA GPU with sm_80+ is visible and kernels exist. Never raises."""
    try:
        if not torch.cuda.is_available():
            return False
        if torch.cuda.get_device_capability() < MIN_CAPABILITY:
            return False
        if not FATBIN_PATH.is_file() and _source_dir() is None:
            return False
        _cupy()
        return True
    except Exception:
        return False


def _require_device(op: str, t: torch.Tensor) -> None:
    if not t.is_cuda:
        raise ValueError(
            f"{op}: the cuda backend needs CUDA tensors, got one on {t.device}; "
            "move the tensors with .cuda() or use backend='reference'"
        )
    cap = torch.cuda.get_device_capability(t.device)
    if cap < MIN_CAPABILITY:
        raise CudaBackendUnavailable(
            f"{op}: {torch.cuda.get_device_name(t.device)} is sm_{cap[0]}{cap[1]}; 2:4 sparse tensor cores "
            "(mma.sp) need sm_80 or newer - use backend='triton' or 'reference'"
        )


# ---- module loading -------------------------------------------------------------------------

_lock = threading.Lock()
_modules: dict[int, object] = {}
_kernels: dict[tuple[int, str], object] = {}


def ordered_metadata_supported(version: tuple[int, ...]) -> bool:
    """True when a CUDA toolkit / NVRTC of ``version`` (major, minor) assembles mma.sp::ordered_metadata."""
    return tuple(version[:2]) >= ORDERED_METADATA_MIN_CUDA


def nvrtc_options(src: Path, nvrtc_version: tuple[int, ...] | None) -> tuple[str, ...]:
    """NVRTC options for the shipped sources: the include dir and the mma.sp variant for this NVRTC
    (no macro when its version is unknown: the header then reads __CUDACC_VER_MAJOR__/_MINOR__)."""
    opts = ("-std=c++17", f"-I{src}")
    if nvrtc_version is not None:
        opts += (f"-DNMKERN_SP_ORDERED_METADATA={int(ordered_metadata_supported(nvrtc_version))}",)
    return opts


def _nvrtc_version(cupy) -> tuple[int, int] | None:
    try:
        return tuple(cupy.cuda.nvrtc.getVersion())[:2]
    except Exception:  # no libnvrtc, or a CuPy without the binding
        return None


def _nvrtc_module(cupy):
    src = _source_dir()
    if src is None:
        raise CudaBackendUnavailable(
            f"nmkern cuda backend: neither {FATBIN_PATH} nor the CUDA sources ({', '.join(map(str, SOURCE_DIRS))}) "
            "exist; rebuild the package with nvcc on PATH (pip install . without NMKERN_SKIP_CUDA_BUILD=1)"
        )
    code = "".join(f'#include "{s}"\n' for s in KERNEL_SOURCES)
    return cupy.RawModule(code=code, options=nvrtc_options(src, _nvrtc_version(cupy)))


def _module(device_index: int):
    """The RawModule for one device: the fatbin if it has code for it, else an NVRTC build."""
    with _lock:
        mod = _modules.get(device_index)
        if mod is not None:
            return mod
        cupy = _cupy()
        with cupy.cuda.Device(device_index):
            errors = []
            if FATBIN_PATH.is_file():
                try:
                    mod = cupy.RawModule(path=str(FATBIN_PATH))
                    mod.get_function("nmkern_sp24_splitk_reduce_f16")  # forces the load: fails if no code fits
                except Exception as e:  # CUDA_ERROR_NO_BINARY_FOR_GPU and friends
                    errors.append(f"fatbin: {type(e).__name__}: {e}")
                    mod = None
            if mod is None:
                try:
                    mod = _nvrtc_module(cupy)
                    mod.get_function("nmkern_sp24_splitk_reduce_f16")
                except CudaBackendUnavailable:
                    raise
                except Exception as e:
                    errors.append(f"NVRTC: {type(e).__name__}: {e}")
                    raise CudaBackendUnavailable(
                        "nmkern cuda backend: could not load the CUDA kernels for device "
                        f"{device_index}: " + "; ".join(errors)
                    ) from e
        _modules[device_index] = mod
        return mod


def _kernel(device_index: int, name: str, smem_bytes: int = 0):
    key = (device_index, name)
    k = _kernels.get(key)
    if k is None:
        k = _module(device_index).get_function(name)
        if smem_bytes > 48 * 1024:  # above the default limit a kernel must opt in
            k.max_dynamic_shared_size_bytes = smem_bytes
        _kernels[key] = k
    return k


_streams: dict[tuple[int, int], object] = {}


def _cupy_stream(cupy, device_index: int, ptr: int):
    """CuPy view of a torch stream, cached: creating one costs more than a small GEMM."""
    s = _streams.get((device_index, ptr))
    if s is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # ExternalStream: deprecated in CuPy 14
            s = cupy.cuda.ExternalStream(ptr, device_index)
        _streams[(device_index, ptr)] = s
    return s


def _launch(kernel, device: torch.device, grid, block, args, smem_bytes: int = 0) -> None:
    cupy = _cupy()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(idx):
        with _cupy_stream(cupy, idx, torch.cuda.current_stream(device).cuda_stream):
            kernel(grid, block, args, shared_mem=smem_bytes)


def _ptr(t: torch.Tensor | None):
    return np.uint64(0 if t is None else t.data_ptr())


def _i32(x: int):
    return np.int32(x)


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels use 16-byte vector loads)."""
    t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(m: int) -> GemmConfig:
    return CONFIGS["small" if m <= SMALL_M_MAX else "large"]


def choose_split_k(m: int, n: int, k: int, cfg: GemmConfig, sm_count: int) -> int:
    """Split K when the output grid alone would leave SMs idle (e.g. M = 1 at N = 4096)."""
    blocks = math.ceil(n / cfg.bn) * math.ceil(m / cfg.bm)
    ktiles = math.ceil(k / BK)
    if blocks >= sm_count:
        return 1
    want = math.ceil(2 * sm_count / blocks)  # about two blocks per SM
    return max(1, min(want, ktiles // MIN_KTILES_PER_SPLIT))


# ---- ops ------------------------------------------------------------------------------------


def sparse24_linear(x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                    *, split_k: int | None = None) -> torch.Tensor:
    """``x2d @ W.T (+ bias)`` on 2:4 sparse tensor cores, W given as ``compress_24(W)``.

    x2d ``(M, K)`` fp16/bf16 on a CUDA device (sm_80+); values ``(N, K/2)`` same dtype; meta
    ``(N, K/16)`` int16 in the CUTLASS layout; bias ``(N,)`` same dtype or None. Returns
    ``(M, N)`` in x2d's dtype, accumulated in fp32. N % 32 == 0 and K % 32 == 0 (the layout's
    own requirement). ``split_k`` overrides the automatic K split (tests use it).
    """
    op = "sparse24_linear"
    v.check_tensor(op, "x2d", x2d, v.HALF_DTYPES, ndim=2)
    v.check_tensor(op, "values", values, v.HALF_DTYPES, ndim=2)
    v.check_tensor(op, "meta", meta, (torch.int16,), ndim=2)
    if values.dtype != x2d.dtype:
        raise TypeError(
            f"{op}: values dtype {values.dtype} differs from x2d dtype {x2d.dtype}; cast one of them "
            "(the kernel reads both as the same 16-bit type)"
        )
    m, k = x2d.shape
    n, half = values.shape
    if 2 * half != k:
        raise ValueError(
            f"{op}: x2d has {k} features but values {tuple(values.shape)} encode {2 * half}; "
            "values must be (out_features, in_features / 2) from compress_24"
        )
    if n % ROW_ALIGN or k % COL_ALIGN or n == 0 or k == 0:
        raise ValueError(
            f"{op}: W of shape ({n}, {k}) does not fit the 2:4 CUTLASS layout (out_features % {ROW_ALIGN} == 0, "
            f"in_features % {COL_ALIGN} == 0); pad the layer or use the dense path"
        )
    if tuple(meta.shape) != (n, k // META_GROUP):
        raise ValueError(
            f"{op}: meta has shape {tuple(meta.shape)}, expected ({n}, {k // META_GROUP}) for W ({n}, {k}); "
            "pass the metadata compress_24 returned with these values"
        )
    if bias is not None:
        v.check_tensor(op, "bias", bias, (x2d.dtype,), ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"{op}: bias has {bias.shape[0]} entries, expected out_features={n}")
    v.check_same_device(op, x2d=x2d, values=values, meta=meta, **({"bias": bias} if bias is not None else {}))
    _require_device(op, x2d)
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"{op}: split_k must be a positive int or None, got {split_k!r}")

    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    x2d, values, meta = _aligned16(x2d), _aligned16(values), _aligned16(meta)
    bias = _aligned16(bias) if bias is not None else None
    dev = x2d.device
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    cfg = choose_config(m)
    ktiles = math.ceil(k / BK)
    splits = split_k if split_k is not None else choose_split_k(m, n, k, cfg, _sm_count(idx))
    splits = min(splits, ktiles)
    kt_per_split = math.ceil(ktiles / splits)
    splits = math.ceil(ktiles / kt_per_split)  # no empty split
    suffix = _DTYPE_SUFFIX[x2d.dtype]
    kern = _kernel(idx, f"nmkern_sp24_gemm_{cfg.name}_{suffix}", cfg.smem_bytes)
    grid = (math.ceil(n / cfg.bn), math.ceil(m / cfg.bm), splits)
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=dev) if splits > 1 else None
    _launch(kern, dev, grid, (cfg.threads, 1, 1),
            (_ptr(x2d), _ptr(values), _ptr(meta), _ptr(bias), _ptr(y), _ptr(ws), _i32(m), _i32(n), _i32(k),
             _i32(kt_per_split)), cfg.smem_bytes)
    if splits > 1:
        red = _kernel(idx, f"nmkern_sp24_splitk_reduce_{suffix}")
        threads = 256
        blocks = min(math.ceil(m * n // 4 / threads), 8 * _sm_count(idx))
        _launch(red, dev, (blocks, 1, 1), (threads, 1, 1),
                (_ptr(ws), _ptr(bias), _ptr(y), _i32(m), _i32(n), _i32(splits)))
    return y


def prune_compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4-prune ``w`` (two largest |w| per group of 4, ties to the lower index) and compress it.

    Returns ``(values (N, K/2), meta (N, K/16) int16)``, byte-identical to
    ``nmkern.compress_24(nmkern.apply_nm(w, 2, 4))``. ``w`` is a CUDA fp16/bf16 ``(N, K)`` matrix
    with N % 32 == 0, K % 32 == 0 and finite entries.
    """
    op = "prune_compress_24"
    v.check_tensor(op, "w", w, v.HALF_DTYPES, ndim=2)
    n, k = w.shape
    if n == 0 or k == 0 or n % ROW_ALIGN or k % COL_ALIGN:
        raise ValueError(
            f"{op}: shape {tuple(w.shape)} does not fit the CUTLASS 2:4 layout, which needs rows % {ROW_ALIGN} == 0 "
            f"and columns % {COL_ALIGN} == 0; pad the weight with zero rows/columns"
        )
    _require_device(op, w)
    v.check_finite(op, "w", w)
    w = _aligned16(w)
    values = torch.empty((n, k // 2), dtype=w.dtype, device=w.device)
    meta = torch.empty((n, k // META_GROUP), dtype=torch.int16, device=w.device)
    idx = w.device.index if w.device.index is not None else torch.cuda.current_device()
    kern = _kernel(idx, f"nmkern_sp24_prune_compress_{_DTYPE_SUFFIX[w.dtype]}")
    threads = 256
    chunks = n * (k // 16)
    blocks = min(math.ceil(chunks / threads), 32 * _sm_count(idx))
    _launch(kern, w.device, (blocks, 1, 1), (threads, 1, 1), (_ptr(w), _ptr(values), _ptr(meta), _i32(n), _i32(k)))
    return values, meta
