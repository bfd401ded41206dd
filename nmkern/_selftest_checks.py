"""The correctness checks of :func:`nmkern.selftest`: every op of every available path against torch.

Two kinds of check:

* **exact** (mask and pack ops): bit-equal to the reference op, or - for the reference ops
  themselves - to an independent statement of the format (n largest of every m kept, packing
  round trips, torch's own CUTLASS 2:4 converter, the 1xN block rule);
* **GEMM** (linear and conv ops): the fp64 dense op on the masked weight is the answer; the
  error allowed is :data:`TOL` times torch's own same-precision error against it, floored at one
  eps of the dtype times the magnitude scale ``max(|x| @ |w|^T + |b|)`` - the rule of the fuzz
  tests (``tests/_fuzz_strategies.py::assert_close``).

A check that raises is a failed check carrying the exception's text.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

TOL = 4.0  # a GEMM may be off the fp64 answer by TOL x torch's own same-precision error (as the fuzz tests)


@dataclasses.dataclass
class Check:
    """One check: what ran (op, backend, shape, dtype, bias) and how it compared."""

    op: str
    backend: str
    shape: dict
    dtype: str
    bias: bool | None
    kind: str  # "gemm" or "exact"
    ok: bool
    max_error: float | None = None  # gemm: max |out - fp64 answer|; exact: number of differing elements
    tolerance: float | None = None  # gemm: allowed max error; exact: 0
    torch_error: float | None = None  # gemm: max |torch same-precision op - fp64 answer|
    detail: str = ""

    def describe(self) -> str:
        """One line: op [backend] shape dtype bias."""
        shape = " ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in self.shape.items())
        bias = "" if self.bias is None else " bias" if self.bias else " no bias"
        return f"{self.op} [{self.backend}] {shape} {self.dtype}{bias}"

    def to_dict(self) -> dict:
        """Plain data for JSON (a non-finite error becomes None; ``detail`` says what went wrong)."""
        out = dataclasses.asdict(self)
        for key in ("max_error", "tolerance", "torch_error"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
        return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _abs64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double().abs()


def compare_gemm(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor,
                 scale: torch.Tensor) -> tuple[float, float, float, str]:
    """(max error, tolerance, torch's error, problem or ""): the fuzz tests' rule for a GEMM result."""
    if tuple(out.shape) != tuple(ref64.shape):
        return float("nan"), 0.0, 0.0, f"shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    if out.dtype != torch_out.dtype:
        return float("nan"), 0.0, 0.0, f"dtype {out.dtype}, expected {torch_out.dtype}"
    o = out.detach().double().cpu()
    ref64, t = ref64.cpu(), torch_out.detach().double().cpu()
    err = float((o - ref64).abs().max()) if o.numel() else 0.0
    terr = float((t - ref64).abs().max()) if o.numel() else 0.0
    floor = torch.finfo(out.dtype).eps * (float(scale.max()) if scale.numel() else 0.0)
    tol = TOL * max(terr, floor)
    if err != err:  # NaN: finite inputs gave a non-finite output
        return err, tol, terr, "the output holds NaN/Inf for finite inputs"
    return err, tol, terr, ("" if err <= tol else f"error {err:.3g} > tolerance {tol:.3g} = {TOL:g} x max(torch's "
                                                  f"{terr:.3g}, floor {floor:.3g})")


def run_gemm(op: str, backend: str, shape: dict, dtype: torch.dtype, bias: bool,
             compute: Callable[[], tuple]) -> Check:
    """A GEMM check; ``compute() -> (out, ref64, torch_out, scale)``."""
    base = dict(op=op, backend=backend, shape=shape, dtype=dtype_name(dtype), bias=bias, kind="gemm")
    try:
        with torch.no_grad():
            err, tol, terr, problem = compare_gemm(*compute())
    except Exception as e:  # noqa: BLE001 - a path that raises on a call its table accepts is a failure
        return Check(**base, ok=False, detail=f"raised {type(e).__name__}: {e}")
    return Check(**base, ok=not problem, max_error=err, tolerance=tol, torch_error=terr, detail=problem)


def _differ(a, b) -> int:
    """Number of differing elements (``!=``; a shape or dtype mismatch counts every element, at least 1)."""
    if isinstance(a, (tuple, list)):
        return sum(_differ(x, y) for x, y in zip(a, b, strict=True))
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return max(1, a.numel(), b.numel())
    return int((a.cpu() != b.cpu()).sum())


def run_exact(op: str, backend: str, shape: dict, dtype: torch.dtype, compute: Callable[[], object]) -> Check:
    """An exact check; ``compute()`` returns ``(out, expected)`` (tensors or tuples of them, compared
    element by element) or a string naming what is wrong ("" when nothing is)."""
    base = dict(op=op, backend=backend, shape=shape, dtype=dtype_name(dtype), bias=None, kind="exact", tolerance=0.0)
    try:
        with torch.no_grad():
            res = compute()
        if isinstance(res, str):
            return Check(**base, ok=not res, max_error=float(bool(res)), detail=res)
        bad = _differ(*res)
    except Exception as e:  # noqa: BLE001
        return Check(**base, ok=False, detail=f"raised {type(e).__name__}: {e}")
    return Check(**base, ok=bad == 0, max_error=float(bad),
                 detail="" if bad == 0 else f"{bad} element(s) differ from the expected result")


# ---------------------------------------------------------------- weights and answers


@dataclasses.dataclass(frozen=True)
class Pat:
    """A pattern to check: N:M (``n``, ``m``) or 1xN (``block``, ``sparsity``)."""

    n: int = 0
    m: int = 0
    block: int = 0
    sparsity: float = 0.0

    @property
    def nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.nm else f"1x{self.block}:{self.sparsity:g}"

    def layer_kwargs(self) -> dict:
        if self.nm:
            return {"n": self.n, "m": self.m}
        return {"pattern": "1xn", "block": self.block, "sparsity": self.sparsity}


def masked(w: torch.Tensor, pat: Pat) -> torch.Tensor:
    """``w`` (dense, (out, in) or (O, I, kh, kw)) with ``pat`` applied by the reference ops (N:M along dim 1)."""
    from .functional import apply_nm, block_mask_1xn

    if pat.nm:
        return apply_nm(w, pat.n, pat.m, dim=1, backend="reference")
    return w * block_mask_1xn(w, pat.block, pat.sparsity, backend="reference")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_problem(rows: int, out_f: int, in_f: int, dtype: torch.dtype, bias: bool, pat: Pat, device: str,
                   seed: int):
    """(x, masked w, b, answer) with answer ``() -> (ref64, torch_out, scale)``."""
    g = _gen(seed)
    w = masked(torch.randn(out_f, in_f, generator=g).to(dtype), pat).to(device)
    x = torch.randn(rows, in_f, generator=g).to(device, dtype)
    b = torch.randn(out_f, generator=g).to(device, dtype) if bias else None

    def answer():
        ref64 = F.linear(x.double(), w.double(), None if b is None else b.double())
        return ref64, F.linear(x, w, b), F.linear(_abs64(x), _abs64(w), _abs64(b))
    return x, w, b, answer


@dataclasses.dataclass(frozen=True)
class ConvGeom:
    batch: int
    cin: int
    cout: int
    hw: tuple[int, int]
    k: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    def shape(self) -> dict:
        return {"x": [self.batch, self.cin, *self.hw], "w": [self.cout, self.cin, self.k, self.k],
                "stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)


def conv_problem(geom: ConvGeom, dtype: torch.dtype, bias: bool, pat: Pat, device: str, seed: int):
    """(x, masked w, b, answer) for a conv; answer as :func:`linear_problem`'s."""
    g = _gen(seed)
    w = masked(torch.randn(geom.cout, geom.cin, geom.k, geom.k, generator=g).to(dtype), pat).to(device)
    x = torch.randn(geom.batch, geom.cin, *geom.hw, generator=g).to(device, dtype)
    b = torch.randn(geom.cout, generator=g).to(device, dtype) if bias else None

    def answer():
        ref64 = geom.conv(x.double(), w.double(), None if b is None else b.double())
        return ref64, geom.conv(x, w, b), geom.conv(_abs64(x), _abs64(w), _abs64(b))
    return x, w, b, answer


def linear_shape(rows: int, out_f: int, in_f: int, pat: Pat) -> dict:
    return {"M": rows, "N": out_f, "K": in_f, "pattern": str(pat)}


def conv_shape(geom: ConvGeom, pat: Pat) -> dict:
    return geom.shape() | {"pattern": str(pat)}


# ---------------------------------------------------------------- packed layers (the table's callables)


def layer_linear_check(backend: str, rows: int, out_f: int, in_f: int, dtype: torch.dtype, bias: bool, pat: Pat,
                       device: str, seed: int, op: str = "SparseLinear") -> Check:
    """A packed :class:`~nmkern.SparseLinear` forced onto ``backend`` vs the fp64 linear on its masked weight."""
    from .nn import SparseLinear

    def compute():
        x, w, b, answer = linear_problem(rows, out_f, in_f, dtype, bias, pat, device, seed)
        lin = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype)
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
        layer = SparseLinear.from_dense(lin, **pat.layer_kwargs()).pack().eval()
        layer.backend = backend
        return (layer(x), *answer())
    return run_gemm(op, backend, linear_shape(rows, out_f, in_f, pat), dtype, bias, compute)


def layer_conv_check(backend: str, geom: ConvGeom, dtype: torch.dtype, bias: bool, pat: Pat, device: str,
                     seed: int) -> Check:
    """A packed :class:`~nmkern.SparseConv2d` forced onto ``backend`` vs the fp64 conv on its masked weight."""
    from .nn import SparseConv2d

    def compute():
        x, w, b, answer = conv_problem(geom, dtype, bias, pat, device, seed)
        conv = nn.Conv2d(geom.cin, geom.cout, geom.k, geom.stride, geom.padding, geom.dilation, bias=bias,
                         device=device, dtype=dtype)
        conv.weight.copy_(w)
        if b is not None:
            conv.bias.copy_(b)
        layer = SparseConv2d.from_dense(conv, **pat.layer_kwargs()).pack().eval()
        layer.backend = backend
        return (layer(x), *answer())
    return run_gemm("SparseConv2d", backend, conv_shape(geom, pat), dtype, bias, compute)


# ---------------------------------------------------------------- the public ops (reference / triton)


def op_linear_check(op: str, backend: str, rows: int, out_f: int, in_f: int, dtype: torch.dtype, bias: bool,
                    pat: Pat, device: str, seed: int) -> Check:
    """``nmkern.ops.<op>(..., backend=backend)`` for op nm_linear / semi24_linear / bsr_linear."""
    from . import ops
    from .functional import compress_24, pack_nm, to_bsr_1xn

    def compute():
        x, w, b, answer = linear_problem(rows, out_f, in_f, dtype, bias, pat, device, seed)
        if op == "nm_linear":
            out = ops.nm_linear(x, pack_nm(w, pat.n, pat.m, backend="reference"), b, backend=backend)
        elif op == "semi24_linear":
            values, meta = compress_24(w, backend="reference")
            out = ops.semi24_linear(x, values, meta, b, backend=backend)
        else:
            bsr = to_bsr_1xn(w, pat.block)
            out = ops.bsr_linear(x, bsr.crow_indices(), bsr.col_indices(), bsr.values().reshape(-1, pat.block),
                                 out_f, b, backend=backend)
        return (out, *answer())
    return run_gemm(op, backend, linear_shape(rows, out_f, in_f, pat), dtype, bias, compute)


def op_conv_check(op: str, backend: str, geom: ConvGeom, dtype: torch.dtype, bias: bool, pat: Pat, device: str,
                  seed: int) -> Check:
    """``nmkern.ops.nm_conv2d(..., backend=backend)`` or ``nmkern.ops.bsr_conv2d`` (reference only)."""
    from . import ops
    from .functional import pack_nm, to_bsr_1xn

    def compute():
        x, w, b, answer = conv_problem(geom, dtype, bias, pat, device, seed)
        conv_args = (geom.stride, geom.padding, geom.dilation)
        if op == "nm_conv2d":
            packed = pack_nm(w, pat.n, pat.m, dim=1, backend="reference")
            out = ops.nm_conv2d(x, packed, b, *conv_args, backend=backend)
        else:
            bsr = to_bsr_1xn(w, pat.block)
            out = ops.bsr_conv2d(x, bsr.crow_indices(), bsr.col_indices(), bsr.values().reshape(-1, pat.block),
                                 w.shape, b, *conv_args)
        return (out, *answer())
    return run_gemm(op, backend, conv_shape(geom, pat), dtype, bias, compute)
