"""``nmkern.selftest``: which execution paths run on this machine, are they right, and are they fast.

1. **Availability**: for every :class:`~nmkern.Backend` (reference, cpu, triton, cuda,
   cusparselt, dense) whether it can run here, and why not (the presence rules of
   :data:`nmkern.dispatch.TABLE`, plus what is missing: a GPU, CuPy, the interpreter).
2. **Correctness**: each available path runs every op it implements on random and edge
   shapes (ragged M/N/K, K % 64 == 32, split-K shapes on the CUDA kernel, bias and none,
   fp16/bf16/fp32 where it takes them) against the fp64 dense op on the masked weight; the
   mask and pack ops must match exactly (:mod:`nmkern._selftest_checks`,
   :mod:`nmkern._selftest_masks`).
3. **Speed**: dense vs each sparse path, interleaved, as time ratios
   (:mod:`nmkern._selftest_bench`).

``quick=True`` keeps it to about 10 s on a 2-core CPU (Triton under its interpreter
gets tiny shapes only) and a few minutes on a GPU including the kernels' first compile.
"""

from __future__ import annotations

import dataclasses
import importlib
import time

import torch

from . import _selftest_bench as sb
from ._selftest_checks import Check, ConvGeom, Pat, layer_conv_check, layer_linear_check, op_conv_check, op_linear_check
from ._selftest_masks import cuda_mask_checks, reference_mask_checks, triton_mask_checks
from .backend import Backend, triton_interpret
from .dispatch import Call, LayerInfo, LayerOp, why_not

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ORDER = (Backend.REFERENCE, Backend.CPU, Backend.TRITON, Backend.CUDA, Backend.CUSPARSELT, Backend.DENSE)


@dataclasses.dataclass
class BackendStatus:
    """Whether ``backend`` runs here (``devices``: where its checks ran) and why not (``reason``)."""

    backend: str
    available: bool
    devices: list[str]
    reason: str = ""  # why not, when not available
    note: str = ""  # how it runs, when available

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _probe(dtype: torch.dtype) -> LayerInfo:
    """A 2:4 linear layer every path's shape rule accepts (32 x 32)."""
    return LayerInfo(LayerOp.LINEAR, "nm", 2, 4, 4, 0.5, 32, 32, dtype, semi24_fits=dtype in (F16, BF16))


def _no_gpu() -> str:
    built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"no CUDA GPU visible to torch (torch {torch.__version__}, {built})"


def _triton_status(gpu: bool) -> BackendStatus:
    try:
        importlib.import_module("triton")
    except Exception as e:  # noqa: BLE001 - any import failure means the path cannot run
        return BackendStatus("triton", False, [], f"the triton package does not import ({type(e).__name__}: {e})")
    if gpu:
        return BackendStatus("triton", True, ["cuda"], note="compiled for the GPU")
    if triton_interpret():
        return BackendStatus("triton", True, ["cpu"], note="no GPU: Triton's interpreter on the CPU "
                             "(TRITON_INTERPRET=1), tiny shapes only, not timed")
    return BackendStatus("triton", False, [], "no CUDA GPU here; Triton kernels run on the CPU only through "
                         "Triton's interpreter: rerun with TRITON_INTERPRET=1 to check them")


def _cuda_detail() -> str:
    """Why nmkern._cuda cannot run on a machine with a GPU: the capability, CuPy, or the kernels."""
    from . import _cuda

    cap = torch.cuda.get_device_capability()
    if cap < _cuda.MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name()} is sm_{cap[0]}{cap[1]}; mma.sp needs sm_80 or newer"
    try:
        _cuda._cupy()
    except Exception as e:  # noqa: BLE001
        return str(e)
    return "neither the built fatbin nor the CUDA sources (for NVRTC) were found"


def backend_status() -> list[BackendStatus]:
    """Every backend in :data:`ORDER`: available here or not, and why."""
    gpu = torch.cuda.is_available()
    out = [BackendStatus("reference", True, ["cpu"], note="pure torch (checked on the CPU)")]
    cpu_why = why_not(Backend.CPU, Call(_probe(F32), "cpu", 1))
    if cpu_why is None:
        from .dispatch import cpu_kernels

        out.append(BackendStatus("cpu", True, ["cpu"], note=f"nmkern's CPU library, ISA {cpu_kernels().isa()}"))
    else:
        out.append(BackendStatus("cpu", False, [], cpu_why))
    out.append(_triton_status(gpu))
    for name in ("cuda", "cusparselt"):
        why = _no_gpu() if not gpu else why_not(Backend(name), Call(_probe(F16), "cuda", 1))
        if gpu and why is not None and name == "cuda":
            why = f"{why} ({_cuda_detail()})"
        out.append(BackendStatus(name, why is None, ["cuda"] if why is None else [], why or ""))
    out.append(BackendStatus("dense", True, ["cpu"] + (["cuda"] if gpu else []),
                             note="F.linear / F.conv2d on the cached decompressed weight"))
    return out


# ---------------------------------------------------------------- what each path is checked on

NM_LINEAR = [(1, 24, 40, Pat(2, 4)), (3, 40, 96, Pat(2, 4)), (17, 33, 160, Pat(1, 8))]  # ragged M/N/K, K%64==32
SEMI24_LINEAR = [(1, 32, 32, Pat(2, 4)), (5, 64, 96, Pat(2, 4))]
BSR_LINEAR = [(3, 24, 40, Pat(block=4, sparsity=0.5)), (5, 32, 33, Pat(block=8, sparsity=0.75))]
CONVS = [ConvGeom(2, 8, 12, (5, 5), 3, padding=1), ConvGeom(1, 16, 8, (6, 7), 3, stride=2, dilation=2)]
CONV_1XN = [ConvGeom(2, 8, 12, (5, 5), 3, padding=1), ConvGeom(1, 6, 16, (6, 7), 3, stride=2)]
# The CUDA 2:4 kernel: ragged M across both tile configs (M <= 64 and above), K % 64 == 32, and
# shapes whose grid leaves SMs idle, so the kernel splits K (automatically, and forced below).
CUDA_LINEAR = [(1, 32, 32), (3, 96, 96), (17, 64, 160), (65, 128, 96), (1, 64, 4096), (2, 96, 1056)]
CUDA_LINEAR_FULL = [(130, 160, 352), (16, 1536, 384), (1, 4096, 4096), (256, 1024, 4096)]
CUDA_CONVS = [ConvGeom(2, 32, 32, (6, 6), 3, padding=1), ConvGeom(1, 64, 64, (5, 5), 1)]
CPU_EXTRA = [(70, 64, 96, Pat(2, 4)), (70, 48, 64, Pat(block=4, sparsity=0.5))]  # the large-batch kernels


def _cases(shapes, dtypes, quick: bool = True):
    """(index, shape, dtype, bias) over shapes x dtypes; quick: bias on alternate cases, checkerboard over
    shapes and dtypes (each op and dtype gets both when it has two shapes); full: every case with and without."""
    out = []
    for si, s in enumerate(shapes):
        for di, d in enumerate(dtypes):
            for bias in ([(si + di) % 2 == 0] if quick else [True, False]):
                out.append((len(out), s, d, bias))
    return out


def _op_checks(backend: str, device: str, quick: bool, conv_bsr: bool) -> list:
    """Thunks checking the public ops (``nmkern.ops``) on ``backend`` (reference or triton)."""
    dts = (F32, F16, BF16)
    out = []
    for op, shapes, dtypes in (("nm_linear", NM_LINEAR, dts), ("semi24_linear", SEMI24_LINEAR, (F16, BF16)),
                               ("bsr_linear", BSR_LINEAR, dts)):
        for i, (rows, n_out, k, pat), dt, bias in _cases(shapes, dtypes, quick):
            out.append(lambda a=(op, backend, rows, n_out, k, dt, bias, pat, device, i): op_linear_check(*a))
    conv_dts = (F32,) if quick else (F32, BF16)
    for i, geom, dt, bias in _cases(CONVS, conv_dts, quick):
        out.append(lambda a=("nm_conv2d", backend, geom, dt, bias, Pat(2, 4), device, i): op_conv_check(*a))
    if conv_bsr:
        for i, geom, dt, bias in _cases(CONV_1XN, conv_dts, quick):
            pat = Pat(block=4, sparsity=0.5)
            out.append(lambda a=("bsr_conv2d", backend, geom, dt, bias, pat, device, i): op_conv_check(*a))
    return out


def _layer_checks(backend: str, device: str, linears, convs, dtypes, quick: bool) -> list:
    """Thunks checking packed SparseLinear / SparseConv2d layers forced onto ``backend``."""
    out = []
    for i, (rows, n_out, k, pat), dt, bias in _cases(linears, dtypes, quick):
        out.append(lambda a=(backend, rows, n_out, k, dt, bias, pat, device, 10 + i): layer_linear_check(*a))
    for i, (geom, pat), dt, bias in _cases(convs, dtypes, quick):
        out.append(lambda a=(backend, geom, dt, bias, pat, device, 20 + i): layer_conv_check(*a))
    return out


def _cuda_split_k_check(rows: int, n_out: int, k: int, split_k: int, dtype: torch.dtype, bias: bool) -> Check:
    from . import _cuda
    from ._selftest_checks import linear_problem, linear_shape, run_gemm
    from .functional import compress_24

    def compute():
        x, w, b, answer = linear_problem(rows, n_out, k, dtype, bias, Pat(2, 4), "cuda", 30 + split_k)
        values, meta = compress_24(w, backend="reference")
        return (_cuda.sparse24_linear(x, values, meta, b, split_k=split_k), *answer())
    return run_gemm(f"cuda_sparse24_linear(split_k={split_k})", "cuda",
                    linear_shape(rows, n_out, k, Pat(2, 4)), dtype, bias, compute)


def _plan(status: BackendStatus, quick: bool) -> list:
    """Thunks (each returning a Check or a list of them) for one available backend."""
    name, dev = status.backend, (status.devices or ["cpu"])[0]
    nm24, b4 = Pat(2, 4), Pat(block=4, sparsity=0.5)
    if name == "reference":
        return [lambda: reference_mask_checks(quick)] + _op_checks("reference", "cpu", quick, conv_bsr=True)
    if name == "triton":
        return [lambda: triton_mask_checks(dev, quick)] + _op_checks("triton", dev, quick, conv_bsr=False)
    if name == "cpu":
        linears = NM_LINEAR + BSR_LINEAR + ([] if quick else CPU_EXTRA)
        convs = [(g, nm24) for g in CONVS] + [(g, b4) for g in CONV_1XN]
        return _layer_checks("cpu", "cpu", linears, convs, (F32,), quick)
    if name in ("cuda", "cusparselt"):
        linears = [(*s, nm24) for s in CUDA_LINEAR + ([] if quick else CUDA_LINEAR_FULL)]
        thunks = _layer_checks(name, "cuda", linears, [(g, nm24) for g in CUDA_CONVS], (F16, BF16), quick)
        if name == "cuda":
            thunks += [cuda_mask_checks, lambda: _cuda_split_k_check(5, 64, 1056, 3, F16, True),
                       lambda: _cuda_split_k_check(1, 32, 1056, 7, BF16, False)]
        return thunks
    thunks = []  # dense: the table's dense callables, on every device here
    for d in status.devices:
        dts = (F32, BF16) if d == "cpu" else (F16, BF16, F32)
        thunks += _layer_checks("dense", d, [NM_LINEAR[1], BSR_LINEAR[0]], [(CONVS[0], nm24), (CONV_1XN[0], b4)], dts,
                                quick)
    return thunks


def _versions() -> dict:
    from . import __version__

    out = {"nmkern": __version__, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": None, "cupy": None}
    for mod in ("triton", "cupy") if torch.cuda.is_available() else ("triton",):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - not installed, or broken: recorded as None
            pass
    return out


@dataclasses.dataclass
class SelftestReport:
    """What :func:`selftest` found. ``ok``: every check passed. ``to_dict()`` is the JSON the CLI writes;
    ``format()`` the text it prints."""

    quick: bool
    backends: list[BackendStatus]
    checks: list[Check]
    bench: dict | None
    machine: dict
    versions: dict
    seconds: float = 0.0

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not self.failures

    def counts(self, backend: str) -> tuple[int, int]:
        mine = [c for c in self.checks if c.backend == backend]
        return len(mine), sum(not c.ok for c in mine)

    def to_dict(self) -> dict:
        backends = [b.to_dict() | dict(zip(("checks", "failed"), self.counts(b.backend))) for b in self.backends]
        return {"format": "nmkern.selftest/1", "ok": self.ok, "quick": self.quick, "seconds": self.seconds,
                "checks_total": len(self.checks), "checks_failed": len(self.failures), "backends": backends,
                "checks": [c.to_dict() for c in self.checks], "benchmark": self.bench, "machine": self.machine,
                "versions": self.versions}

    def format(self) -> str:
        from ._selftest_bench import format_bench

        v, m = self.versions, self.machine
        lines = [f"nmkern selftest{' --quick' if self.quick else ''}: nmkern {v['nmkern']}, torch {v['torch']}, "
                 f"triton {v['triton'] or '-'}; {m.get('gpu') or m.get('cpu')}, {m.get('threads')} thread(s)",
                 f"{'backend':<11} {'available':<9} {'checks':>6} {'failed':>6}  notes"]
        for b in self.backends:
            n, bad = self.counts(b.backend)
            cells = (f"{n:>6} {bad:>6}" if b.available else f"{'-':>6} {'-':>6}")
            lines.append(f"{b.backend:<11} {'yes' if b.available else 'no':<9} {cells}  {b.note or b.reason}")
        lines += [f"MISMATCH {c.describe()}: {c.detail}" for c in self.failures]
        if self.bench is not None:
            lines += ["", format_bench(self.bench)]
        verdict = (f"OK: {len(self.checks)} checks passed" if self.ok else
                   f"FAILED: {len(self.failures)} of {len(self.checks)} checks")
        lines += ["", f"{verdict} in {self.seconds:.1f} s"]
        return "\n".join(lines)


def selftest(quick: bool = True, *, bench: bool = True, progress: bool = False) -> SelftestReport:
    """Check every execution path available here against the fp64 dense op, then time them.

    ``quick``: fewer shapes and cases, a shorter benchmark (about 10 s on a 2-core CPU).
    ``bench=False`` skips the timing. Returns a :class:`SelftestReport` (``.ok``, ``.format()``,
    ``.to_dict()``); it does not raise on a mismatch, it reports it.
    """
    from tqdm.auto import tqdm

    from .timing import machine_info

    start = time.perf_counter()
    statuses = backend_status()
    plans = [(s, _plan(s, quick)) for s in statuses if s.available]
    checks: list[Check] = []
    bar = tqdm(total=sum(len(p) for _, p in plans), desc="selftest", disable=not progress)
    for status, thunks in plans:
        bar.set_postfix_str(status.backend)
        for thunk in thunks:
            try:
                res = thunk()
            except Exception as e:  # noqa: BLE001 - a check's own setup failing is a failed check, not a crash
                res = Check("setup", status.backend, {}, "", None, "exact", False,
                            detail=f"raised {type(e).__name__}: {e}")
            checks += res if isinstance(res, list) else [res]
            bar.update(1)
    bar.close()
    result = None
    if bench:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        paths = {s.backend: None for s in statuses if s.backend in sb.SPARSE_PATHS and device in s.devices}
        if device == "cpu" and "triton" in paths:
            paths["triton"] = "interpreted on the CPU: timing Triton's interpreter says nothing about its kernels"
        result = sb.bench(device, paths, quick)
    report = SelftestReport(quick, statuses, checks, result, machine_info(), _versions())
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["BackendStatus", "SelftestReport", "backend_status", "selftest"]
