"""CPU sparse kernels (csrc/cpu) through ctypes: N:M (incl. 2:4) and 1xN linear / conv2d.

fp32, bf16 and fp16 (``KERNEL_DTYPES``): a layout keeps its weight's dtype (fp64 weights
are rounded to fp32 once), x and bias must come in that dtype, and the kernels
accumulate in fp32 whatever the storage.

``setup.py`` builds ``nmkern/_lib/libnmkern_cpu_<isa>.so`` for ``avx512``, ``avx2``
and ``generic``; :func:`available` loads the best one the running CPU supports
(asked through the generic library's cpuid query), or the one named by
``NMKERN_CPU_ISA=avx512|avx2|generic``; ``NMKERN_CPU_THREADING=auto|pool|openmp``
picks the threading of the C kernels (see ``ENV_THREADING`` and :func:`threading_mode`). A missing or
broken library makes :func:`available` return False with one warning; nothing here raises at import.

Every pointer handed to C comes from a tensor this module checked (dtype, device,
shape) and made contiguous; the C side re-checks its scalar arguments.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from . import _validate as v
from ._openmp import openmp_runtimes, shares_torch_openmp  # noqa: F401  (re-exported)
from .reference.cpu_layouts import bsr_1xn_pack_ref, nm_tile_pack_ref
from .reference.linear import conv_out_size, fold_rows_nchw, unfold_nhwc
from .reference.nm_pack import first_overfull_group_ref
from .spec import Pattern, pattern_in

ABI_VERSION = 6  # NMKERN_CPU_ABI_VERSION in csrc/cpu/nmkern_cpu.h
LIB_DIR = Path(__file__).resolve().parent / "_lib"
ENV_ISA = "NMKERN_CPU_ISA"
# Threading of the C kernels (NMKERN_CPU_THREADING; README, "CPU kernels"): "openmp", an OpenMP parallel
# for, runs on torch's own team when the runtime is shared, whose threads still spin from the op before
# (4096x4096 2:4 fp32 batch 1 after a small torch op, 2-core Xeon: 0.66 ms, against 1.28 ms for the pool,
# whose worker waits for the core a spinning torch thread holds); "pool", nmkern's work-claiming pool, never
# waits for a thread the OS has not scheduled and survives fork(); "auto" (default): "openmp" when
# shares_torch_openmp(), else "pool" (two runtimes would keep two teams spinning on the same cores).
ENV_THREADING = "NMKERN_CPU_THREADING"
THREADING_MODES = {"pool": 0, "openmp": 1}
# The dtypes the kernels take, and the suffix of their C entry points.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class CpuIsa(str, enum.Enum):
    AVX512 = "avx512"
    AVX2 = "avx2"
    GENERIC = "generic"

    def __str__(self) -> str:
        return self.value


# The kinds the C kernels run: nmkern.spec.Pattern.NM (n kept of every m along in_features) and
# Pattern.BLOCK (ONE_BY_N: blocks of `block` output channels x 1 input column).
SparseKind = Pattern  # the 0.1 name of these kinds
_KINDS = (Pattern.NM, Pattern.BLOCK)


class Algo(enum.IntEnum):
    """Kernel choice (NMKERN_ALGO_* in nmkern_cpu.h)."""

    AUTO = 0
    SMALL_BATCH = 1
    LARGE_BATCH = 2
    AMX = 3  # bf16 / fp16 2:4 / 1:4 with K % 32 == 0 on AMX-BF16 tiles (fp16 as bf16 hi + lo; amx_available())


# NMKERN_FLAG_CHECK_FINITE (OR'ed into algo) and the status it returns when x holds a NaN or an Inf.
CHECK_FINITE, NONFINITE = 0x100, 4
_ERRORS = {1: "invalid argument", 2: "out of memory", NONFINITE: "x holds a NaN or an Inf",
           3: "Algo.AMX needs bf16 or fp16, m = 4 with n <= 2, in_features % 32 == 0 and a CPU with AMX-BF16 "
              "(nmkern._cpu.amx_available())"}
# Below this many multiply-adds per call the kernel runs on one thread: ~0.1 ms of
# single-core work, less than an OpenMP wake-up on a busy 2-core machine
# (1536x384 2:4 at batch 1: 0.08 ms on 1 thread, 0.15 ms median on 2).
SINGLE_THREAD_MACS = 1 << 20
_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "isa": None, "error": None}


def _lib_path(isa: CpuIsa) -> Path:
    return LIB_DIR / f"libnmkern_cpu_{isa.value}.so"


def _declare(lib) -> None:
    c_i64, c_int, c_vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.nmkern_cpu_abi_version.restype = c_int
    lib.nmkern_cpu_abi_version.argtypes = []
    lib.nmkern_cpu_isa.restype = ctypes.c_char_p
    lib.nmkern_cpu_isa.argtypes = []
    for name in ("nmkern_cpu_supports_avx2", "nmkern_cpu_supports_avx512", "nmkern_cpu_supports_amx_bf16"):
        getattr(lib, name).restype = c_int
        getattr(lib, name).argtypes = []
    lib.nmkern_cpu_set_threading.restype = c_int
    lib.nmkern_cpu_set_threading.argtypes = [c_int]
    lib.nmkern_cpu_get_threading.restype = c_int
    lib.nmkern_cpu_get_threading.argtypes = []
    for suffix in _SUFFIX.values():
        nm, bsr = getattr(lib, f"nmkern_nm_linear_{suffix}"), getattr(lib, f"nmkern_bsr_linear_{suffix}")
        nm.restype = bsr.restype = c_int
        nm.argtypes = [c_vp, c_i64, c_i64, c_vp, c_vp, c_i64, c_int, c_int, c_vp, c_vp, c_int, c_int]
        bsr.argtypes = [c_vp, c_i64, c_i64, c_vp, c_vp, c_vp, c_int, c_i64, c_i64, c_int, c_vp, c_vp, c_int, c_int]
    lib.nmkern_nm_mask.restype = lib.nmkern_nm_pack.restype = c_int
    lib.nmkern_nm_mask.argtypes = [c_vp, c_int, c_i64, c_int, c_int, c_vp, c_int, c_int]
    lib.nmkern_nm_pack.argtypes = [c_vp, c_int, c_i64, c_i64, c_int, c_int, c_vp, c_vp, c_i64, c_vp, c_int]
    lib.nmkern_nm_tiles_from_packed.restype = lib.nmkern_nm_words_from_tiles.restype = c_int
    lib.nmkern_nm_tiles_from_packed.argtypes = [c_vp, c_vp, c_int, c_i64, c_i64, c_int, c_int, c_i64, c_vp, c_vp, c_int]
    lib.nmkern_nm_words_from_tiles.argtypes = [c_vp, c_i64, c_i64, c_int, c_int, c_i64, c_vp, c_int]
    lib.nmkern_nm_decode.restype = lib.nmkern_bsr_decode.restype = c_int
    lib.nmkern_nm_decode.argtypes = [c_vp, c_vp, c_int, c_i64, c_i64, c_int, c_int, c_i64, c_i64, c_vp, c_int]
    lib.nmkern_bsr_decode.argtypes = [c_vp, c_vp, c_vp, c_int, c_int, c_i64, c_i64, c_int, c_i64, c_i64, c_vp, c_int]


def _open(isa: CpuIsa):
    path = _lib_path(isa)
    if not path.exists():
        raise OSError(f"{path} is missing (build it with `pip install -e .` or setup.build_native)")
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if lib.nmkern_cpu_abi_version() != ABI_VERSION:
        raise OSError(f"{path} has ABI {lib.nmkern_cpu_abi_version()}, expected {ABI_VERSION}; rebuild it")
    return lib


def _best_isa(generic) -> CpuIsa:
    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    if is_x86 and generic.nmkern_cpu_supports_avx512() and _lib_path(CpuIsa.AVX512).exists():
        return CpuIsa.AVX512
    if is_x86 and generic.nmkern_cpu_supports_avx2() and _lib_path(CpuIsa.AVX2).exists():
        return CpuIsa.AVX2
    return CpuIsa.GENERIC


def _load():
    if _state["tried"]:  # loaded once: no lock, so torch.compile can trace through available()
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        try:
            forced = os.environ.get(ENV_ISA, "").strip().lower()
            generic = _open(CpuIsa.GENERIC)
            if forced:
                try:
                    isa = CpuIsa(forced)
                except ValueError:
                    raise OSError(f"{ENV_ISA}={forced!r} is not one of {[i.value for i in CpuIsa]}") from None
                supported = {
                    CpuIsa.GENERIC: True,
                    CpuIsa.AVX2: bool(generic.nmkern_cpu_supports_avx2()),
                    CpuIsa.AVX512: bool(generic.nmkern_cpu_supports_avx512()),
                }[isa]
                if not supported:
                    raise OSError(f"{ENV_ISA}={forced}: this CPU does not support {forced}")
            else:
                isa = _best_isa(generic)
            lib = generic if isa is CpuIsa.GENERIC else _open(isa)
            threading_name = os.environ.get(ENV_THREADING, "auto").strip().lower() or "auto"
            if threading_name not in (*THREADING_MODES, "auto"):
                raise OSError(f"{ENV_THREADING}={threading_name!r} is not one of {['auto', *THREADING_MODES]}")
            if threading_name == "auto":
                threading_name = "openmp" if shares_torch_openmp(lib=lib) else "pool"
            lib.nmkern_cpu_set_threading(THREADING_MODES[threading_name])
            _state.update(lib=lib, isa=isa)
        except OSError as e:
            _state["error"] = str(e)
            warnings.warn(f"nmkern: the cpu backend is unavailable ({e}); dense / reference paths are used", RuntimeWarning,
                          stacklevel=3)
        finally:
            _state["tried"] = True  # last: the unlocked check above must never see a half-loaded state
        return _state["lib"]


def threading_mode() -> str | None:
    """"openmp" or "pool": how the loaded library runs its threads (None when unavailable)."""
    if not available():
        return None
    code = _state["lib"].nmkern_cpu_get_threading()
    return next(name for name, c in THREADING_MODES.items() if c == code)


def _reset() -> None:
    """Forget the loaded library so the next call re-reads NMKERN_CPU_ISA (tests)."""
    with _lock:
        _state.update(tried=False, lib=None, isa=None, error=None)


def available() -> bool:
    """True when a CPU kernel library is loaded (never raises)."""
    try:
        return _load() is not None
    except Exception:  # pragma: no cover - defensive: available() must never raise
        return False


def isa() -> CpuIsa | None:
    """The instruction set of the loaded library, None when unavailable."""
    return _state["isa"] if available() else None


def library_id() -> str | None:
    """The loaded library's identity: its ISA build and the first 16 hex digits of its file's SHA-256 (None when
    unavailable). Measured dispatch keys its cache file with it: a rebuilt kernel is measured again, not judged
    by the timings of the one it replaced (a cache written before the AMX kernel kept bf16 at 64 rows dense)."""
    if not available():
        return None
    if "library_id" not in _state:
        digest = hashlib.sha256(_lib_path(_state["isa"]).read_bytes()).hexdigest()[:16]
        _state["library_id"] = f"{_state['isa'].value}-{digest}"
    return _state["library_id"]


def amx_available() -> bool:
    """True when the loaded library can run bf16 / fp16 N:M on AMX tiles (Algo.AMX): the CPU has AMX-BF16 and
    Linux granted this process the tile state. Never raises."""
    return available() and bool(_state["lib"].nmkern_cpu_supports_amx_bf16())


def amx_runs(kind, n: int, m: int, in_features: int, dtype: torch.dtype) -> bool:
    """True where ``Algo.AMX`` (and AUTO from 8 rows) runs this layer: bf16 or fp16 N:M with m = 4, n <= 2 and
    ``in_features % 32 == 0`` (csrc/cpu/nm_linear_amx.cpp; fp16 as exact bf16 hi + lo parts), on a CPU with
    AMX-BF16."""
    return (kind is Pattern.NM and dtype in (torch.bfloat16, torch.float16) and m == 4 and n in (1, 2)
            and in_features % 32 == 0 and amx_available())


def _require(op: str):
    lib = _load()
    if lib is None:
        raise RuntimeError(f"{op}: the nmkern CPU library is unavailable ({_state['error']}); use the dense path")
    return lib


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check_status(op: str, rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"{op}: CPU kernel failed ({_ERRORS.get(rc, rc)})")


def _parse_kind(op: str, kind) -> Pattern:
    parsed = pattern_in(kind, _KINDS)
    if parsed is None:
        raise ValueError(f"{op}: kind must be one of {[k.value for k in _KINDS]}, got {kind!r}")
    return parsed


def _check_block(op: str, block, out_features: int) -> int:
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"{op}: block must be an int, got {type(block).__name__} {block!r}")
    if not 1 <= block <= 64:
        raise ValueError(f"{op}: block={block} must lie in [1, 64]")
    if out_features % block:
        raise ValueError(
            f"{op}: out_features={out_features} is not divisible by block={block}; "
            f"1xN blocks span {block} consecutive output channels"
        )
    return block


def _check_nm_sparse(op: str, w2: torch.Tensor, n: int, m: int, first_bad: int | None = None) -> None:
    """ValueError naming the first group of ``w2`` with more than n non-zeros (``first_bad``: its flat index when
    the caller found it, -1 for none)."""
    if first_bad is None:
        first_bad = first_overfull_group_ref(w2, n, m)
    if first_bad >= 0:
        row, group = divmod(first_bad, w2.shape[1] // m)
        count = int((w2[row, group * m:(group + 1) * m] != 0).sum())
        raise ValueError(
            f"{op}: weight is not {n}:{m} sparse: row {row}, group {group} has {count} "
            f"non-zeros (at most {n} allowed); mask it first with nmkern.apply_nm(w, {n}, {m})"
        )


class CpuLinear:
    """A packed sparse weight plus its kernel: ``y = layer(x2d, bias)``.

    Build with :func:`prepare_cpu_linear`. ``x2d`` is ``(B, in_features)`` on the CPU in
    the layout's :attr:`dtype` (fp32, bf16 or fp16); the result is ``(B, out_features)``
    in that dtype, accumulated in fp32.
    """

    def __init__(self, kind: Pattern, n: int, m: int, block: int, out_features: int, in_features: int,
                 tensors: dict[str, torch.Tensor]):
        self.kind, self.n, self.m, self.block = kind, n, m, block
        self.out_features, self.in_features = out_features, in_features
        self._t = tensors

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (values + indices)."""
        return sum(t.numel() * t.element_size() for t in self._t.values())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the packed values, which x, bias and the result share."""
        return self._t["values"].dtype

    @property
    def kept_macs_per_row(self) -> int:
        """Multiply-adds per input row (stored weights)."""
        if self.kind is Pattern.NM:
            return self.out_features * self.in_features * self.n // self.m
        return self._t["values"].numel()

    @property
    def density(self) -> float:
        """Stored weights / dense weights (1xN: stored blocks; N:M: n/m)."""
        if self.kind is Pattern.NM:
            return self.n / self.m
        return self._t["values"].numel() / max(1, self.out_features * self.in_features)

    def __repr__(self) -> str:
        pat = f"{self.n}:{self.m}" if self.kind is Pattern.NM else f"1x{self.block}"
        return f"CpuLinear({pat}, out={self.out_features}, in={self.in_features}, nbytes={self.nbytes})"

    @property
    def algos(self) -> tuple[Algo, ...]:
        """The kernel choices this layer runs on this machine (AMX only where :func:`amx_runs`)."""
        amx = amx_runs(self.kind, self.n, self.m, self.in_features, self.dtype)
        return tuple(a for a in Algo if a is not Algo.AMX or amx)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed layout: NM ``values``, ``index``; 1xN ``values``, ``rowptr``, ``col``."""
        return self._t

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, algo: Algo = Algo.AUTO,
                 num_threads: int | None = None) -> torch.Tensor:
        x, bias = check_rows_input("nmkern cpu sparse linear", x, bias, self.in_features, self.out_features,
                                   self.dtype)
        t = self._t
        if self.kind is Pattern.NM:
            return nm_linear(x, t["values"], t["index"], self.n, self.m, self.out_features, bias, algo=algo,
                             num_threads=num_threads)
        return bsr_linear(x, t["values"], t["rowptr"], t["col"], self.block, self.out_features, bias, algo=algo,
                          num_threads=num_threads)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_rows_input(op: str, x, bias, in_features: int, out_features: int, dtype: torch.dtype = torch.float32):
    """``(x, bias)`` made contiguous after checking them for a kernel call: the C side reads raw pointers,
    so a wrong dtype, device or width would read the wrong memory. ``dtype``: the packed weight's (one of
    ``KERNEL_DTYPES``); x ``(B, in_features)`` on the CPU and bias ``(out_features,)`` or None, both in it."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: the packed values have dtype {_dtype_name(dtype)}; the CPU kernels take "
                        f"{', '.join(map(_dtype_name, KERNEL_DTYPES))} layouts (pack the weight with "
                        "nmkern._cpu.prepare_cpu_linear)")
    v.check_tensor(op, "x", x, None, ndim=2)
    if x.dtype != dtype:
        fix = f"cast x with .to(torch.{_dtype_name(dtype)})"
        if x.dtype in KERNEL_DTYPES:
            fix += f", or pack the weight in {_dtype_name(x.dtype)}"
        raise TypeError(f"{op}: x has dtype {_dtype_name(x.dtype)} (shape {tuple(x.shape)}) but the packed weight "
                        f"is {_dtype_name(dtype)}; the CPU kernels take x in the weight's dtype "
                        f"({', '.join(map(_dtype_name, KERNEL_DTYPES))}): {fix}")
    if x.device.type != "cpu":
        raise ValueError(f"{op}: x is on {x.device}; the cpu backend needs a CPU tensor (x.cpu())")
    if x.shape[1] != in_features:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)} but the weight has in_features={in_features}; "
                         f"pass x of shape (batch, {in_features})")
    if bias is not None:
        v.check_tensor(op, "bias", bias, (dtype,), ndim=1)
        if bias.device.type != "cpu":
            raise ValueError(f"{op}: bias is on {bias.device}; the cpu backend needs a CPU tensor")
        if bias.shape[0] != out_features:
            raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        bias = bias.contiguous()
    return x.contiguous(), bias


def _threads(macs: int, num_threads: int | None) -> int:
    if num_threads is not None:
        return int(num_threads)
    # Waking an OpenMP worker costs more than the work below SINGLE_THREAD_MACS (and on a
    # loaded machine a sleeping worker can wait milliseconds for a core).
    return 1 if macs < SINGLE_THREAD_MACS else torch.get_num_threads()


def _run_kernel(x: torch.Tensor, out_features: int, macs_per_row: int, num_threads: int | None, launch,
                check_finite: bool = False) -> torch.Tensor | None:
    """y ``(B, out_features)`` in x's dtype from ``launch(lib, y, threads, flags)``, the C call returning its status;
    None where ``check_finite`` and x holds a NaN or an Inf (the kernel's own scan)."""
    op = "nmkern cpu sparse linear"
    lib = _require(op)
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    if x.shape[0] == 0:
        return y
    with torch.no_grad():
        rc = launch(lib, y, _threads(macs_per_row * x.shape[0], num_threads), CHECK_FINITE if check_finite else 0)
    if rc == NONFINITE and check_finite:
        return None
    _check_status(op, rc)
    return y


def _entry(lib, name: str, dtype: torch.dtype):
    """The C entry point ``nmkern_<name>_<f32|bf16|f16>`` for ``dtype``."""
    return getattr(lib, f"nmkern_{name}_{_SUFFIX[dtype]}")


def nm_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, n: int, m: int, out_features: int,
              bias: torch.Tensor | None = None, *, algo: Algo = Algo.AUTO, num_threads: int | None = None,
              check_finite: bool = False) -> torch.Tensor | None:
    """``x @ W.T + bias`` with W in the CPU N:M tile layout (``CpuLinear.tensors``), in x's dtype.

    x: contiguous ``(B, K)`` on the CPU in the values' dtype (fp32, bf16 or fp16); bias the same
    dtype ``(out_features,)`` or None. The caller (:class:`CpuLinear`, the registered op
    ``nmkern::cpu_nm_linear``) checked them with :func:`check_rows_input`. ``check_finite``: the kernel scans x
    first and the call returns None when it holds a NaN or an Inf (the registered op then runs the dense op).
    """
    batch, k = x.shape
    return _run_kernel(x, out_features, out_features * k * n // m, num_threads, lambda lib, y, threads, flags: (
        _entry(lib, "nm_linear", x.dtype)(_ptr(x), batch, k, _ptr(values), _ptr(index), out_features, n, m,
                                          _ptr(bias), _ptr(y), threads, int(algo) | flags)), check_finite)


def bsr_linear(x: torch.Tensor, values: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor, block: int,
               out_features: int, bias: torch.Tensor | None = None, *, algo: Algo = Algo.AUTO,
               num_threads: int | None = None, check_finite: bool = False) -> torch.Tensor | None:
    """``x @ W.T + bias`` with W in the CPU 1xN layout (``CpuLinear.tensors``), in x's dtype; checked by the
    caller as for :func:`nm_linear`."""
    batch, k = x.shape
    return _run_kernel(x, out_features, values.numel(), num_threads, lambda lib, y, threads, flags: (
        _entry(lib, "bsr_linear", x.dtype)(_ptr(x), batch, k, *_bsr_args(values, rowptr, col), out_features, block,
                                           _ptr(bias), _ptr(y), threads, int(algo) | flags)), check_finite)


def _bsr_args(values: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor) -> tuple:
    """The 1xN layout's arguments of the C entry points, values to nnzb (empty tensors as NULL)."""
    return (_ptr(values) if values.numel() else None, _ptr(rowptr), _ptr(col) if col.numel() else None,
            col.element_size(), col.numel())


def nm_linear_f32(x, values, index, n, m, out_features, bias=None, **kwargs) -> torch.Tensor:
    """:func:`nm_linear` on fp32 x (the name the registered op calls for fp32; tests hook it)."""
    return nm_linear(x, values, index, n, m, out_features, bias, **kwargs)


def bsr_linear_f32(x, values, rowptr, col, block, out_features, bias=None, **kwargs) -> torch.Tensor:
    """:func:`bsr_linear` on fp32 x (the name the registered op calls for fp32)."""
    return bsr_linear(x, values, rowptr, col, block, out_features, bias, **kwargs)


def _weight_rows(op: str, w, ndim: int) -> torch.Tensor:
    v.check_tensor(op, "weight", w, v.FLOAT_DTYPES, ndim=ndim)
    if w.device.type != "cpu":
        raise ValueError(f"{op}: weight is on {w.device}; pack CPU weights (w.cpu())")
    if w.numel() == 0:
        raise ValueError(f"{op}: weight of shape {tuple(w.shape)} is empty")
    if w.dtype == torch.float64:  # rounded once, like a .float() call; fp16/bf16 keep half layouts
        w = w.to(torch.float32)
    return w.detach()


def _prepare_rows(op: str, w2: torch.Tensor, kind, n, m, block) -> CpuLinear:
    kind = _parse_kind(op, kind)
    out_features, in_features = w2.shape
    if kind is Pattern.NM:
        n, m = v.check_nm(op, n, m)
        if in_features % m:
            raise ValueError(
                f"{op}: in_features={in_features} is not divisible by m={m}; N:M groups run along in_features"
            )
        if available():  # the native pack and layout kernels (the references' result, bit for bit)
            return _nm_layout_native(op, w2, n, m)
        _check_nm_sparse(op, w2, n, m)
        values, index = nm_tile_pack_ref(w2, n, m)
        return CpuLinear(kind, n, m, 0, out_features, in_features, _owned({"values": values, "index": index}))
    block = _check_block(op, block, out_features)
    rowptr, col, values = bsr_1xn_pack_ref(w2.contiguous(), block)
    return CpuLinear(kind, 0, 0, block, out_features, in_features,
                     _owned({"values": values, "rowptr": rowptr, "col": col}))


def _nm_layout_native(op: str, w2: torch.Tensor, n: int, m: int) -> CpuLinear:
    from ._cpu_layout import layout_from_nm_packed  # both import this module
    from ._cpu_nm_pack import pack_nm_rows

    values, indices, first_bad = pack_nm_rows(w2, n, m)
    _check_nm_sparse(op, w2, n, m, first_bad)
    return layout_from_nm_packed(values, indices, n, m, w2.shape[1])


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Views keep their base alive (the whole BSR tensor, or the dense weight), and torch.compile
    # treats a view's base as a graph input too: give every layout tensor its own storage.
    return {k: t.clone() if t._base is not None else t for k, t in tensors.items()}


def prepare_cpu_linear(dense_masked_weight: torch.Tensor, kind, n: int = 0, m: int = 0, block: int = 0) -> CpuLinear:
    """Pack a masked dense ``(out, in)`` weight for the CPU kernel (lossless).

    The layout keeps the weight's dtype (fp32, bf16 or fp16; fp64 is rounded to fp32) and the
    layer then takes x in that dtype.

    ``kind="nm"``: every group of ``m`` along ``in`` holds at most ``n`` non-zeros
    (2:4 is n=2, m=4). ``kind="1xn"``: blocks of ``block`` consecutive output rows
    x 1 input column; all-zero blocks are dropped.
    """
    op = "prepare_cpu_linear"
    w2 = _weight_rows(op, dense_masked_weight, 2)
    return _prepare_rows(op, w2, kind, n, m, block)


def _pair(op: str, name: str, value, minimum: int) -> tuple[int, int]:
    vals = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value) if isinstance(
        value, (tuple, list)) else None
    if vals is None or len(vals) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in vals):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if any(x < minimum for x in vals):
        raise ValueError(f"{op}: {name}={value!r} must be >= {minimum}")
    return vals


class CpuConv2d:
    """Sparse conv2d (groups=1) as NHWC im2col + the sparse linear kernel.

    The weight ``(O, I, kh, kw)`` is flattened to ``(O, kh*kw*I)`` (input channels
    innermost, the NHWC order N:M groups run along), and the unfolded input is
    reordered to match.
    """

    def __init__(self, weight_shape, linear: CpuLinear):
        self.out_channels, self.in_channels, self.kh, self.kw = weight_shape
        self.linear = linear

    @property
    def nbytes(self) -> int:
        return self.linear.nbytes

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                 **kwargs) -> torch.Tensor:
        op = "nmkern cpu sparse conv2d"
        v.check_tensor(op, "x", x, (self.linear.dtype,), ndim=4)
        if x.device.type != "cpu":
            raise ValueError(f"{op}: x is on {x.device}; the cpu backend needs a CPU tensor (x.cpu())")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{op}: x has {x.shape[1]} channels (shape {tuple(x.shape)}) but the weight expects "
                f"{self.in_channels}; pass NCHW input"
            )
        stride = _pair(op, "stride", stride, 1)
        padding = _pair(op, "padding", padding, 0)
        dilation = _pair(op, "dilation", dilation, 1)
        h, w = x.shape[2:]
        if min(conv_out_size(size, k, s, p, d) for size, k, s, p, d in
               zip((h, w), (self.kh, self.kw), stride, padding, dilation)) < 1:
            raise ValueError(
                f"{op}: input {h}x{w} with kernel {self.kh}x{self.kw}, padding {padding}, dilation {dilation} "
                "gives an empty output; pad the input or use a smaller kernel"
            )
        cols, (batch, oh, ow) = unfold_nhwc(x, (self.kh, self.kw), stride, padding, dilation)
        return fold_rows_nchw(self.linear(cols, bias, **kwargs), batch, oh, ow)


def prepare_cpu_conv2d(dense_masked_weight: torch.Tensor, kind, n: int = 0, m: int = 0, block: int = 0) -> CpuConv2d:
    """Pack a masked conv weight ``(O, I, kh, kw)``; N:M groups run along input channels (dim 1)."""
    op = "prepare_cpu_conv2d"
    w = _weight_rows(op, dense_masked_weight, 4)
    kind = _parse_kind(op, kind)
    if kind is Pattern.NM:
        v.check_nm(op, n, m)
        if w.shape[1] % m:
            raise ValueError(
                f"{op}: in_channels={w.shape[1]} is not divisible by m={m}; conv N:M groups run along input channels"
            )
    rows = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    return CpuConv2d(tuple(w.shape), _prepare_rows(op, rows, kind, n, m, block))


# The static dispatch rules (NMKERN_TUNE=0) live in _cpu_rules.py; imported last, as they read this module.
from ._cpu_rules import AMX_MAX_ROWS, HALF_MAX_ROWS, LARGE_WEIGHTS, MIN_WEIGHTS, cpu_beats_dense  # noqa: E402,F401
