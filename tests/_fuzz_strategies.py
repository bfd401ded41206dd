"""Strategies, independent fp64 / pure-Python oracles and checkers for tests/test_robustness.py.

The oracles never call nmkern: they (N:M mask with ties to the lower index, the packed
N:M layout, its decoder, the 1xN block rule) are written from the documented formats, so a
library bug cannot hide in them. Tensors are drawn as recipes (seed, kind, specials) and
built with torch's generator: cheap to draw, and hypothesis still shrinks sizes and flags.
"""

from __future__ import annotations

import collections
import math
import os
import traceback

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPES = FLOATS + (torch.int8, torch.int32, torch.int64, torch.bool)
TOL = 4.0  # a GEMM may be off the fp64 answer by TOL x torch's own same-precision error
CASES: collections.Counter = collections.Counter()  # generated cases per test (each test asserts its own)


def fuzz(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def case_body(name: str, check):
    """The body of a fuzz test: count the case, run ``check(case)``. With ``NMKERN_FUZZ_LOG=<file>``
    (triage only) a failure is appended to the file and the run goes on, so one run lists every failing
    case instead of stopping at the first one."""
    def body(case):
        CASES[name] += 1
        log = os.environ.get("NMKERN_FUZZ_LOG")
        if not log:
            return check(case)
        try:
            check(case)
        except Exception as e:  # noqa: BLE001 - triage mode records everything
            where = [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)][-3:]
            with open(log, "a") as fh:
                fh.write(f"{name}\t{type(e).__name__}\t{str(e).splitlines()[0][:200] if str(e) else ''}\t"
                         f"{' <- '.join(reversed(where))}\t{case!r}\n")
    return body


def run(names, fn):
    """``(result, None)``, or ``(None, error)`` for a ValueError/TypeError whose message names the op.

    Any other exception propagates and fails the test (hypothesis then shrinks it).
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    try:
        return fn(), None
    except (ValueError, TypeError) as e:
        assert any(nm in str(e) for nm in names), f"{type(e).__name__} not naming {names[0]}: {e}"
        return None, e


def run_load(names, module, state):
    """``module.load_state_dict(state)`` like :func:`run`, but a refused state is torch's RuntimeError
    ("Error(s) in loading state_dict for ...") carrying nmkern's message naming the layer: torch's
    convention for load_state_dict, which callers already catch."""
    names = (names,) if isinstance(names, str) else tuple(names)
    try:
        return module.load_state_dict(state), None
    except RuntimeError as e:
        lines = str(e).splitlines()
        assert lines[0].startswith("Error(s) in loading state_dict"), f"raw RuntimeError: {e}"
        assert any(nm in line for nm in names for line in lines[1:]), f"load error not naming {names[0]}: {e}"
        return None, e
    except (ValueError, TypeError) as e:
        assert any(nm in str(e) for nm in names), f"{type(e).__name__} not naming {names[0]}: {e}"
        return None, e


# ------------------------------------------------------------------------------ strategies

_BAD_NM = [(4, 4), (5, 4), (9, 8), (0, 4), (1, 1), (2, 32), (-1, 4), (2.0, 4), (2, 4.0), (True, 4), ("2", 4),
           (None, 4), (17, 32)]


def nm_pairs(max_m: int = 16, bad: bool = False):
    """A valid (n, m) with m <= max_m, or (``bad``) one of: N >= M, n < 1, M > 16, non-int n or m."""
    if bad:
        return st.sampled_from(_BAD_NM)
    return st.integers(2, max_m).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m)))


def valid_nm(n, m) -> bool:
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m))
    return ints and 2 <= m <= 16 and 1 <= n < m


specials = st.one_of(st.just(()), st.just(()), st.just(()), st.lists(
    st.tuples(st.floats(0, 1), st.sampled_from((math.nan, math.inf, -math.inf))), min_size=1, max_size=2))
recipes = st.tuples(st.integers(0, 2**16), st.sampled_from(("randn", "ties", "sparse")), specials)
finite_recipes = st.tuples(st.integers(0, 2**16), st.sampled_from(("randn", "ties", "sparse")), st.just(()))
float_dtypes = st.sampled_from(FLOATS)
layouts = st.sampled_from(("contiguous", "contiguous", "transposed", "strided", "channels_last"))




def faults(*kinds: str):
    """One fault per case, or "none" (about half the cases): keeps many cases valid."""
    return st.one_of(st.just("none"), st.sampled_from(kinds))


def make(shape, dtype, recipe) -> torch.Tensor:
    seed, kind, specs = recipe
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        t = torch.randint(-3, 4, tuple(shape), generator=g).double()
    else:
        t = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    if kind == "sparse":
        t = t * (torch.rand(tuple(shape), generator=g, dtype=torch.float64) < 0.3)
    flat = t.view(-1)
    for frac, val in specs:
        if flat.numel():
            flat[min(int(frac * flat.numel()), flat.numel() - 1)] = val
    if dtype == torch.bool:
        return t != 0
    if not dtype.is_floating_point:
        return torch.nan_to_num(t, 0.0, 0.0, 0.0).round().clamp(-100, 100).to(dtype)
    return t.to(dtype)


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a non-contiguous layout (transposed, every other element, channels_last)."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" and t.dim() >= 1:
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


# ------------------------------------------------------------------------------ oracles

def nm_mask_oracle(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Keep the n largest |w| of each group of m along dim; ties to the lower index (pairwise ranks)."""
    a = w.movedim(dim, -1)
    g = a.double().abs().reshape(-1, m)
    gi, gj = g[:, :, None], g[:, None, :]
    lower = torch.arange(m)[None, :] < torch.arange(m)[:, None]  # [i, j]: j < i
    rank = (gj > gi).sum(-1) + ((gj == gi) & lower).sum(-1)
    return (rank < n).reshape(a.shape).movedim(-1, dim)


def index_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())


def pack_oracle(w2: torch.Tensor, n: int, m: int):
    """(values, int32 words) of 2-D N:M ``w2``: non-zeros then lowest-index zeros, ascending; LSB-first words."""
    rows, k = w2.shape
    g = w2.reshape(rows, k // m, m)
    key = (g == 0).long() * m + torch.arange(m)
    pos = key.sort(-1).indices[..., :n].sort(-1).values
    values = g.gather(2, pos).reshape(rows, k // m * n)
    bits, per = index_bits(m), 32 // index_bits(m)
    idx = pos.reshape(rows, k // m * n)
    words = torch.zeros(rows, -(-idx.shape[1] // per), dtype=torch.int64)
    for j in range(idx.shape[1]):
        words[:, j // per] |= idx[:, j] << (bits * (j % per))
    return values, torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def decode_oracle(values: torch.Tensor, words: torch.Tensor, n: int, m: int, k: int):
    """Dense (rows, k) fp64 from packed values/words, or None when an index is out of range or repeated."""
    rows, kept = values.shape
    bits, per = index_bits(m), 32 // index_bits(m)
    if kept != k // m * n or words.shape != (rows, -(-kept // per)):
        return None
    u = words.to(torch.int64) & 0xFFFFFFFF
    idx = torch.stack([(u[:, j // per] >> (bits * (j % per))) & ((1 << bits) - 1) for j in range(kept)], -1) \
        if kept else torch.zeros(rows, 0, dtype=torch.int64)
    grp = idx.reshape(rows, k // m, n)
    if bool((grp >= m).any()) or bool((grp.sort(-1).values.diff(dim=-1) == 0).any()):
        return None
    dense = torch.zeros(rows, k // m, m, dtype=torch.float64)
    dense.scatter_(2, grp, values.double().reshape(rows, k // m, n))
    return dense.reshape(rows, k)


def corrupt_words(words: torch.Tensor, kept: int, m: int, kind: str, where: float) -> torch.Tensor:
    """Set one packed index (of ``kept`` per row) to all ones (out of range unless m is a power of 2),
    to its neighbour's value (a repeat), or swap it with its neighbour."""
    bits, per = index_bits(m), 32 // index_bits(m)
    u = words.to(torch.int64) & 0xFFFFFFFF
    rows = u.shape[0]
    if rows == 0 or kept < 2:
        return words
    r, j = min(int(where * rows), rows - 1), min(int(where * kept), kept - 2) // 2 * 2
    get = lambda jj: (u[r, jj // per] >> (bits * (jj % per))) & ((1 << bits) - 1)  # noqa: E731

    def put(jj, val):
        sh = bits * (jj % per)
        u[r, jj // per] = (u[r, jj // per] & ~(((1 << bits) - 1) << sh)) | (int(val) << sh)
    a, b = int(get(j)), int(get(j + 1))
    if kind == "oob":
        put(j, (1 << bits) - 1)
    elif kind == "dup":
        put(j + 1, a)
    else:  # swap
        put(j, b), put(j + 1, a)
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


def block_keep_oracle(w: torch.Tensor, block: int, sparsity: float, exact: bool, mask: torch.Tensor) -> None:
    """``mask`` is a 1xN keep-mask dropping floor(sparsity*blocks) lowest-L1 blocks (ties: lower flat index)."""
    o, i = w.shape[:2]
    assert mask.dtype == torch.bool and mask.shape == w.shape, (mask.dtype, mask.shape)
    keep = mask.reshape(o // block, block, i, -1)
    kb = keep[:, 0, :, 0]
    assert bool((keep == kb[:, None, :, None]).all()), "mask is not constant over each 1xN block"
    scores = w.double().abs().reshape(o // block, block, i, -1).sum((1, 3)).reshape(-1)
    k = int(sparsity * scores.numel())
    assert int((~kb).sum()) == k, f"{int((~kb).sum())} blocks dropped, expected floor({sparsity}*{scores.numel()})={k}"
    if exact:
        expected = torch.ones(scores.numel(), dtype=torch.bool)
        expected[scores.sort(stable=True).indices[:k]] = False
        assert torch.equal(kb.reshape(-1), expected), "wrong blocks dropped (lowest L1, ties to the lower index)"
    elif 0 < k < scores.numel():
        flat = kb.reshape(-1)
        assert scores[~flat].max() <= scores[flat].min() * (1 + 1e-5), "a kept block scores below a dropped one"


# ------------------------------------------------------------------------------ GEMM comparison

def _finite0(t):
    return None if t is None else torch.nan_to_num(t.double(), 0.0, 0.0, 0.0).abs()


def _kind(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return torch.isnan(t) * 1 + (t == math.inf) * 2 + (t == -math.inf) * 3


def assert_close(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, scale: torch.Tensor, what: str):
    """NaN / +inf / -inf exactly where the fp64 answer has them; elsewhere within TOL x torch's own error
    (floored at one eps of the dtype times the magnitude scale sum|x||w| + |b|).

    Where torch's own same-precision op disagrees with fp64 about NaN/Inf (CPU convs skip implicit zero
    padding in fp32/bf16, so 0 * inf there is no NaN) either answer is accepted: that is "the dense op".
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    assert out.dtype == torch_out.dtype, f"{what}: dtype {out.dtype}, expected {torch_out.dtype}"
    o, t = out.detach().double(), torch_out.detach().double()
    ko, kr = _kind(o), _kind(ref64)
    assert bool(((ko == kr) | (ko == _kind(t))).all()), \
        f"{what}: NaN/Inf positions differ from the dense fp64 op on the masked weight"
    fin = torch.isfinite(ref64) & torch.isfinite(o)
    if fin.any():
        err = (o - ref64)[fin].abs().max().item()
        terr = (t - ref64)[fin & torch.isfinite(t)].abs().max().item() if (fin & torch.isfinite(t)).any() else 0.0
        floor = torch.finfo(out.dtype).eps * scale[fin].max().item()
        assert err <= TOL * max(terr, floor), f"{what}: error {err:.3g} vs torch's {terr:.3g} (floor {floor:.3g})"


def expect_dense(y, x, w, b, dense, what: str, gy=None, gx=None) -> None:
    """``y`` (and ``gx``, the input gradient for output gradient ``gy``) equal ``dense(x, w, b)`` in fp64."""
    b64 = None if b is None else b.double()
    # canonical strides: torch 2.13's CPU conv2d segfaults on a (1, 2, 1, 1) weight with strides (2, 1, 2, 2)
    w = w.clone(memory_format=torch.contiguous_format)
    ref64 = dense(x.detach().double(), w.double(), b64)
    torch_out = dense(x.detach(), w, b)
    scale = dense(_finite0(x.detach()), _finite0(w), _finite0(b))
    assert_close(y, ref64, torch_out, scale, what)
    if gy is None:
        return
    assert gx is not None, f"{what}: no gradient reached the input"

    def grad(xx, ww, bb, g):
        xx = xx.detach().requires_grad_()
        return torch.autograd.grad(dense(xx, ww, bb), xx, g)[0]
    assert_close(gx, grad(x.double(), w.double(), b64, gy.double()), grad(x, w, b, gy),
                 grad(_finite0(x.detach()), _finite0(w), None, _finite0(gy)), what + " input gradient")


# ------------------------------------------------------------------------------ shared case helpers

def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality (NaN == NaN, -0 == 0), shape and dtype included."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.where(a.isnan(), 0, a), torch.where(b.isnan(), 0, b))
    return torch.equal(a, b)


def rows_of(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The documented 2-D view (rows, K) with ``dim`` innermost (NMPacked's layout)."""
    a = w.movedim(dim, -1)
    return a.reshape(1, -1) if a.dim() < 2 else a.reshape(a.shape[0], math.prod(a.shape[1:]))


def from_rows(x2: torch.Tensor, shape, dim: int) -> torch.Tensor:
    moved = list(shape)
    moved.append(moved.pop(dim))
    return x2.reshape(moved).movedim(-1, dim)


def inject(t: torch.Tensor, specs) -> torch.Tensor:
    flat = t.view(-1)
    for frac, val in specs:
        if flat.numel():
            flat[min(int(frac * flat.numel()), flat.numel() - 1)] = val
    return t


def checked(must_raise: bool, res, what) -> bool:
    """True when a result came back (then it must not be one the op has to refuse)."""
    if res is None:
        return False
    assert not must_raise, f"{what}: returned a result for an input it must refuse"
    return True


def meta_ok(t: torch.Tensor, shape, dtype) -> None:
    assert t.device.type == "meta" and tuple(t.shape) == tuple(shape) and t.dtype == dtype, \
        f"meta result {t.device} {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}"


GEMM_FAULTS = ("xdtype", "kdelta", "bias_long", "bias_2d", "bias_dtype", "bias_meta")


def gemm_extras(draw, fault: str) -> dict:
    return dict(fault=fault, other=draw(st.sampled_from(DTYPES)), xrecipe=draw(recipes), xlayout=draw(layouts),
                kdelta=draw(st.sampled_from((1, -1))) if fault == "kdelta" else 0, grad=draw(st.booleans()),
                bias=fault[5:] if fault.startswith("bias_") else draw(st.sampled_from(("none", "ok"))),
                meta=draw(st.integers(0, 9)) == 0)


def make_x(c, shape, wdtype):
    return relayout(make(shape, c["other"] if c["fault"] == "xdtype" else wdtype, c["xrecipe"]), c["xlayout"])


def make_bias(c, out, dtype):
    """(bias or None, whether the op must refuse it)."""
    kind = c["bias"]
    if kind == "none":
        return None, False
    bdtype = dtype if kind != "dtype" else torch.float32 if dtype == torch.float64 else torch.float64
    b = make((out + (kind == "long"),), bdtype, c["xrecipe"])
    return (b[None] if kind == "2d" else b.to("meta") if kind == "meta" else b), kind != "ok"


def run_gemm(c, names, call, x, w, b, dense, must_raise, out_shape, value_fault=False):
    """Run ``call(x, bias, on_meta)``; check it (and its input gradient) against ``dense`` in fp64.

    ``value_fault``: the refusal depends on tensor contents (corrupted indices), which a meta
    tensor does not have - on meta such a call may also return a result of the right shape.
    """
    op = names if isinstance(names, str) else names[0]
    if c["meta"]:  # everything moves to meta, so a bias on meta is no fault there
        res, _ = run(names, lambda: call(x.to("meta"), None if b is None else b.to("meta"), True))
        if checked(must_raise and not value_fault and c["fault"] != "bias_meta", res, op + " (meta)") and not must_raise:
            meta_ok(res, out_shape, x.dtype)
        return
    grad = c["grad"] and x.dtype.is_floating_point and not must_raise
    xx = x.detach().requires_grad_() if grad else x
    res, _ = run(names, lambda: call(xx, b, False))
    if not checked(must_raise, res, op):
        return
    gy = gx = None
    if grad:
        gy = make(res.shape, res.dtype, (7, "randn", ()))
        gx = torch.autograd.grad(res, xx, gy, allow_unused=True)[0] if res.requires_grad else None
    expect_dense(res, x, w, b, dense, op, gy, gx)


def bsr_buffers(w2: torch.Tensor, block: int, index_dtype):
    """(crow, col, values (nnzb, block)) of the non-zero (block, 1) blocks of 2-D ``w2``, row-major."""
    o, k = w2.shape
    present = (w2.reshape(o // block, block, k) != 0).any(1)
    crow = torch.zeros(o // block + 1, dtype=torch.int64)
    crow[1:] = present.sum(1).cumsum(0)
    brow, col = present.nonzero(as_tuple=True)
    values = w2.reshape(o // block, block, k).permute(0, 2, 1)[brow, col]
    return crow.to(index_dtype), col.to(index_dtype), values


BSR_FAULTS = ("col_oob", "col_neg", "crow_len", "crow_order", "values_cols", "index_int16")


def corrupt_bsr(kind, crow, col, values):
    """BSR buffers with fault ``kind`` applied, and whether the op must refuse them."""
    crow, col = crow.clone(), col.clone()
    if kind == "col_oob" and col.numel():
        col[-1] = 10**4
    elif kind == "col_neg" and col.numel():
        col[0] = -1
    elif kind == "crow_len":
        crow = torch.cat([crow, crow[-1:]])
    elif kind == "crow_order" and crow.numel() > 2 and crow[1] > 0:
        crow[1] = crow[-1] + 1
    elif kind == "values_cols":
        values = torch.cat([values, values[:, :1]], 1)
    elif kind == "index_int16":
        crow, col = crow.short(), col.short()
    else:
        return crow, col, values, False
    return crow, col, values, True


def pair_ok(v, lo):
    vals = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v if isinstance(v, tuple) else None
    ok = vals is not None and len(vals) == 2 and all(isinstance(e, int) and not isinstance(e, bool) and e >= lo
                                                    for e in vals)
    return tuple(vals) if ok else None
