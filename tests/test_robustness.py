"""Robustness fuzzing of every public op and module entry (issue #12).

Hypothesis draws shapes (ragged, K not divisible by M, empty), dtypes (fp32/fp16/bf16/fp64,
int, bool), devices (cpu, meta), non-contiguous views, NaN/Inf, bad n/m (N >= M, n=0, M > 16,
non-ints), wrong bias shapes and corrupted packed tensors. Every case obeys one rule:

* the call returns a result equal to the independent oracle of ``_fuzz_strategies`` (exact for
  masks and packing; for GEMMs the dense fp64 op on the masked weight, NaN/+inf/-inf at the same
  positions, elsewhere within TOL x torch's own same-precision error) - on every backend runnable
  here: ``reference`` (ops), ``reference``/``dense``/``cpu``/``auto`` (packed modules) and, in
  ``test_fuzz_triton``, ``triton`` (TRITON_INTERPRET=1, tiny sizes); on meta tensors only the
  result's shape/dtype/device are checked;
* or it raises ValueError/TypeError whose message names the op. Cases the oracle finds ill-defined
  (bad n/m, ragged groups, overfull groups, out-of-range or repeated packed indices, misaligned 2:4
  shapes, NaN/Inf given to a magnitude-ranking op, ...) must raise.

Any other exception (RuntimeError, IndexError, AttributeError, a crash) fails. Cases per run:
BUDGET (2,420; each test asserts it ran its share). Deterministic (derandomize, no database).
Triage: ``NMKERN_FUZZ_LOG=<file>`` appends every failing case to the file and keeps going.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

import nmkern
from nmkern import ops

from _fuzz_strategies import (BSR_FAULTS, CASES, DTYPES, GEMM_FAULTS, assert_close, block_keep_oracle, case_body,
                              checked, corrupt_bsr, corrupt_words, decode_oracle, bsr_buffers, faults, finite_recipes,
                              float_dtypes, from_rows, fuzz, gemm_extras, inject, layouts, make, make_bias, make_x,
                              meta_ok, nm_mask_oracle, nm_pairs, pack_oracle, pair_ok, recipes, relayout, rows_of, run, run_load,
                              run_gemm, same, valid_nm)

BUDGET = {"masks": 400, "pack": 400, "semi24": 120, "block": 300, "nm_linear": 350, "bsr_linear": 220,
          "conv": 200, "modules": 200, "sparsify": 80, "triton": 150}  # 2,420 cases
REF = "reference"


def fuzz_test(name: str, strategy, check, examples=()):
    """A pytest test running ``check(case)`` on BUDGET[name] generated cases (plus ``examples``, cases
    hypothesis once shrank to) and asserting that many ran."""
    @fuzz(BUDGET[name])
    @given(strategy)
    def cases(c):
        case_body(name, check)(c)
    for ex in examples:
        cases = example(ex)(cases)

    def test(*fixtures):
        cases()
        assert CASES[name] >= BUDGET[name], f"{name}: only {CASES[name]} cases generated, budget {BUDGET[name]}"
    return test


# ---------------------------------------------------------------------------------------- masks

@st.composite
def mask_cases(draw, side=6, max_m=16):
    f = draw(faults("nm", "dim", "ragged", "dtype"))
    n, m = draw(nm_pairs(max_m, bad=f == "nm"))
    mm = m if valid_nm(n, m) else 4
    nd = draw(st.integers(1, 4) if f != "dim" else st.integers(0, 4))
    shape = [draw(st.integers(0, side)) for _ in range(nd)]
    dim = draw(st.integers(-nd, nd - 1) if f != "dim" else st.sampled_from((nd, -nd - 1, 7)))
    if -nd <= dim < nd:
        shape[dim] = mm * draw(st.integers(1, 3)) + (draw(st.integers(1, mm - 1)) if f == "ragged" else 0)
    return dict(n=n, m=m, shape=shape, dim=dim, dtype=draw(st.sampled_from(DTYPES) if f == "dtype" else float_dtypes),
                recipe=draw(recipes), layout=draw(layouts), meta=draw(st.integers(0, 9)) == 0, fault=f)


def structural_nm(w, n, m, dim) -> bool:
    nd = w.dim()
    return not valid_nm(n, m) or not (isinstance(dim, int) and nd > 0 and -nd <= dim < nd) or w.shape[dim] % m != 0


def check_masks(c, backends) -> None:
    w = relayout(make(c["shape"], c["dtype"], c["recipe"]), c["layout"])
    n, m, dim = c["n"], c["m"], c["dim"]
    structural = structural_nm(w, n, m, dim)
    must_raise = structural or (w.dtype.is_floating_point and not bool(torch.isfinite(w).all()))
    expected = None if must_raise or w.dtype == torch.bool else nm_mask_oracle(w, n, m, dim)
    for b in backends:
        for op, fn in (("nm_mask", nmkern.nm_mask), ("apply_nm", nmkern.apply_nm)):
            if c["meta"]:
                res, _ = run(op, lambda: fn(w.to("meta"), n, m, dim, backend=b))
                if checked(structural, res, op + " (meta)"):
                    meta_ok(res, w.shape, torch.bool if op == "nm_mask" else w.dtype)
                continue
            res, _ = run(op, lambda: fn(w, n, m, dim, backend=b))
            if checked(must_raise, res, op) and expected is not None:
                want = expected if op == "nm_mask" else torch.where(expected, w, torch.zeros_like(w))
                assert same(res, want), f"{op}[{b}]: differs from the N:M oracle (ties to the lower index)"


test_fuzz_masks = fuzz_test("masks", mask_cases(), lambda c: check_masks(c, (REF,)))


# ---------------------------------------------------------------------------------------- pack / unpack

CORRUPT = ("oob", "dup", "swap", "values_cols", "words_cols", "indices_int64", "n_field", "shape_field",
           "meta_indices", "not_packed", "noncontig")


@st.composite
def pack_cases(draw, side=6, max_m=16):
    c = draw(mask_cases(side, max_m))
    c.update(dtype=draw(st.sampled_from(DTYPES)) if c["fault"] == "dtype" else c["dtype"],
             density=draw(st.sampled_from(("nm", "nm", "nm", "raw"))), corrupt=draw(faults(*CORRUPT)),
             where=draw(st.floats(0, 1)))
    return c


def packed_from(values, words, n, m, shape, dim):
    return nmkern.NMPacked(values=values, indices=words, n=n, m=m, shape=torch.Size(shape), dim=dim)


def corrupt_packed(kind, where, values, words, n, m, shape, dim, k):
    """(object handed to the op, oracle dense rows (rows, k) or None when the op must refuse it)."""
    if kind in ("oob", "dup", "swap"):
        words = corrupt_words(words, values.shape[1], m, kind, where)
    elif kind == "values_cols":
        values = values[:, : max(values.shape[1] - 1, 0)]
    elif kind == "words_cols":
        words = torch.cat([words, words[:, :1] * 0], 1) if words.shape[0] else words
    elif kind in ("indices_int64", "shape_field", "meta_indices"):
        words = words.long() if kind == "indices_int64" else words.to("meta") if kind == "meta_indices" else words
        shape = (shape[0] + 1, *shape[1:]) if kind == "shape_field" else shape
        return packed_from(values, words, n, m, shape, dim), None
    elif kind == "n_field" and n + 1 < m:
        n = n + 1
    elif kind == "not_packed":
        return (values, words), None
    elif kind == "noncontig":
        values = relayout(values, "transposed")
    return packed_from(values, words, n, m, shape, dim), decode_oracle(values, words, n, m, k)


def check_pack(c, backends) -> None:
    n, m, dim = c["n"], c["m"], c["dim"]
    w = make(c["shape"], c["dtype"], c["recipe"])
    structural = structural_nm(w, n, m, dim)
    if not structural and c["density"] == "nm" and w.dtype != torch.bool:
        w = torch.where(nm_mask_oracle(torch.nan_to_num(w.double(), 0.0, 9e9, -9e9), n, m, dim), w, torch.zeros_like(w))
    w = relayout(w, c["layout"])
    d = None if structural else dim % w.dim()
    w2 = None if structural else rows_of(w, d)
    overfull = w2 is not None and bool(((w2 != 0).reshape(w2.shape[0], w2.shape[1] // m, m).sum(-1) > n).any())
    for b in backends:
        if c["meta"]:
            res, _ = run("pack_nm", lambda: nmkern.pack_nm(w.to("meta"), n, m, dim, backend=b))
            if checked(structural, res, "pack_nm (meta)"):
                assert tuple(res.shape) == tuple(w.shape) and res.values.device.type == "meta"
            continue
        res, _ = run("pack_nm", lambda: nmkern.pack_nm(w, n, m, dim, backend=b))
        if checked(structural or overfull, res, "pack_nm"):
            values, words = pack_oracle(w2, n, m)
            assert isinstance(res, nmkern.NMPacked) and (res.n, res.m, res.dim) == (n, m, d)
            assert tuple(res.shape) == tuple(w.shape), f"pack_nm: shape {res.shape} != {w.shape}"
            assert same(res.values, values) and same(res.indices, words), f"pack_nm[{b}]: differs from the layout"
            back, _ = run("unpack_nm", lambda: nmkern.unpack_nm(res, backend=b))
            assert back is not None and same(back, w), f"unpack_nm[{b}]: round trip is not exact"
        if structural or overfull or w2.dtype == torch.bool:
            continue
        values, words = pack_oracle(w2, n, m)
        packed, dense = corrupt_packed(c["corrupt"], c["where"], values, words, n, m, w.shape, d, w2.shape[1])
        res, _ = run("unpack_nm", lambda: nmkern.unpack_nm(packed, backend=b))
        if checked(dense is None, res, f"unpack_nm ({c['corrupt']})"):
            assert same(res, from_rows(dense.to(w.dtype), w.shape, d)), f"unpack_nm[{b}] ({c['corrupt']}): wrong"


test_fuzz_pack_unpack = fuzz_test("pack", pack_cases(), lambda c: check_pack(c, (REF,)))


# ---------------------------------------------------------------------------------------- 2:4 CUTLASS

@st.composite
def semi24_cases(draw):
    f = draw(faults("rows", "k", "dtype", "raw", "zero_word", "meta_cols", "meta_int32", *GEMM_FAULTS))
    return dict(rows=draw(st.sampled_from((0, 16, 48) if f == "rows" else (32, 32, 64))),
                k=draw(st.sampled_from((16, 48, 8) if f == "k" else (32, 32, 64))),
                dtype=draw(st.sampled_from(DTYPES if f == "dtype" else (torch.float16, torch.bfloat16))),
                recipe=draw(recipes), density="raw" if f == "raw" else draw(st.sampled_from(("24", "14"))),
                batch=draw(st.lists(st.integers(0, 3), max_size=2)), **gemm_extras(draw, f))


def check_semi24(c, backends) -> None:
    rows, k, dtype, f = c["rows"], c["k"], c["dtype"], c["fault"]
    w = make((rows, k), dtype, c["recipe"])
    if dtype.is_floating_point and c["density"] != "raw":
        w = torch.where(nm_mask_oracle(torch.nan_to_num(w.double(), 0.0, 9e9, -9e9), int(c["density"][0]), 4, 1),
                        w, torch.zeros_like(w))
    aligned = dtype in (torch.float16, torch.bfloat16) and rows % 32 == 0 and k % 32 == 0 and rows > 0
    over = bool(((w != 0).reshape(rows, k // 4, 4).sum(-1) > 2).any()) if k % 4 == 0 else True
    for bk in backends:
        res, _ = run("compress_24", lambda: nmkern.compress_24(w, backend=bk))
        if not checked(not aligned or over, res, "compress_24"):
            continue
        tv, tm = sparse_semi_structured_from_dense_cutlass(w)
        assert same(res[0], tv) and same(res[1], tm), f"compress_24[{bk}]: not torch's CUTLASS layout"
        values, meta = res
        if f == "zero_word":
            meta = meta.clone()
            meta.view(-1)[0] = 0  # four groups naming slot 0 twice
        meta = meta[:, 1:] if f == "meta_cols" else meta.int() if f == "meta_int32" else meta
        bad = f in ("zero_word", "meta_cols", "meta_int32")
        back, _ = run("decompress_24", lambda: nmkern.decompress_24(values, meta, backend=bk))
        if checked(bad, back, "decompress_24"):
            assert same(back, w), f"decompress_24[{bk}]: round trip is not exact"
        x = make_x(c, (*c["batch"], k + c["kdelta"]), dtype)
        bias, bad_bias = make_bias(c, rows, dtype)
        must = bad or bad_bias or x.shape[-1] != k or x.dtype != dtype
        run_gemm(c, "semi24_linear", lambda xx, bb, on_meta: ops.semi24_linear(
            xx, values.to(xx.device), meta.to(xx.device), bb, backend=bk), x, w, bias, F.linear, must,
            (*c["batch"], rows), value_fault=f == "zero_word")


test_fuzz_compress_24_and_semi24_linear = fuzz_test("semi24", semi24_cases(), lambda c: check_semi24(c, (REF,)))


# ---------------------------------------------------------------------------------------- 1xN blocks

@st.composite
def block_cases(draw, side=5):
    f = draw(faults("block", "ndim", "ragged", "sparsity", "criterion", "dtype"))
    block = draw(st.sampled_from((0, -2, 2.0, True, "4")) if f == "block" else st.integers(1, 4))
    nd = draw(st.sampled_from((1, 6)) if f == "ndim" else st.sampled_from((2, 2, 4, 4, 3, 5)))
    shape = [draw(st.integers(1, side)) for _ in range(nd)]
    shape[0] = (block if isinstance(block, int) and block > 0 else 2) * draw(st.integers(1, 4)) + (f == "ragged")
    return dict(block=block, shape=shape, dtype=draw(st.sampled_from(DTYPES) if f == "dtype" else float_dtypes),
                recipe=draw(recipes), layout=draw(layouts), rearrange=draw(st.booleans()),
                criterion="bogus" if f == "criterion" else draw(st.sampled_from(("l1", "l1", "random"))),
                sparsity=draw(st.sampled_from((1.0, -0.1, 1.5, math.nan, "0.5", None)) if f == "sparsity" else
                              st.floats(0, 1, exclude_max=True)), meta=draw(st.integers(0, 9)) == 0)


def check_block(c, backends) -> None:
    w = relayout(make(c["shape"], c["dtype"], c["recipe"]), c["layout"])
    block, s = c["block"], c["sparsity"]
    block_ok = isinstance(block, int) and not isinstance(block, bool) and block > 0
    shape_bad = w.dim() < 2 or not block_ok or w.shape[0] % block != 0
    s_ok = isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1
    finite = not w.dtype.is_floating_point or bool(torch.isfinite(w).all())
    structural = shape_bad or not s_ok or c["criterion"] == "bogus"
    wm = w.to("meta") if c["meta"] else w
    for b in backends:
        res, _ = run("block_mask_1xn", lambda: nmkern.block_mask_1xn(
            wm, block, s, rearrange=c["rearrange"], criterion=c["criterion"], generator=torch.Generator().manual_seed(3),
            backend=b))
        if c["meta"]:
            if checked(structural, res, "block_mask_1xn (meta)"):
                meta_ok(res, w.shape, torch.bool)
        elif checked(structural or not finite, res, "block_mask_1xn") and w.dtype != torch.bool:
            if c["rearrange"] or c["criterion"] == "random":  # which blocks is the method's choice; how many is not
                per_block = block * math.prod(w.shape[2:])
                assert res.dtype == torch.bool and res.shape == w.shape
                assert int((~res).sum()) == int(s * (w.shape[0] // block) * w.shape[1]) * per_block, "wrong count"
            else:
                block_keep_oracle(w, block, s, c["recipe"][1] == "ties" or not w.dtype.is_floating_point, res)
        res, _ = run("block_scores_1xn", lambda: nmkern.block_scores_1xn(wm, block, backend=b))
        if c["meta"]:
            checked(shape_bad, res, "block_scores_1xn (meta)")
        elif checked(shape_bad, res, "block_scores_1xn") and w.dtype != torch.bool:
            s64 = w.double().abs().reshape(w.shape[0] // block, block, w.shape[1], -1).sum((1, 3))
            assert res.shape == s64.shape and res.dtype == (torch.float64 if w.dtype == torch.float64 else torch.float32)
            per = block * math.prod(w.shape[2:])
            fin = torch.isfinite(s64)
            assert torch.equal(fin, torch.isfinite(res.double())), "block_scores_1xn: non-finite positions differ"
            assert bool(((res.double() - s64)[fin].abs() <= 4 * per * torch.finfo(res.dtype).eps * s64[fin]).all())
    if c["meta"]:
        return
    res, _ = run("to_bsr_1xn", lambda: nmkern.to_bsr_1xn(w, block))
    if checked(shape_bad, res, "to_bsr_1xn") and w.dtype.is_floating_point:
        w2 = w.reshape(w.shape[0], -1)
        assert res.layout == torch.sparse_bsr and same(res.to_dense(), w2), "to_bsr_1xn: dense form differs"
        stored = int((w2.reshape(-1, block, w2.shape[1]) != 0).any(1).sum())
        assert res.values().shape[0] == stored, "to_bsr_1xn: stores zero blocks or drops non-zero ones"


test_fuzz_block_1xn = fuzz_test("block", block_cases(), lambda c: check_block(c, (REF,)))


# ---------------------------------------------------------------------------------------- nm_linear / bsr_linear

@st.composite
def linear_cases(draw, side=12, max_m=16):
    f = draw(faults("nm", *CORRUPT, *BSR_FAULTS, *GEMM_FAULTS))
    n, m = draw(nm_pairs(max_m, bad=f == "nm"))
    return dict(n=n, m=m, groups=draw(st.integers(0, 4)), out=draw(st.integers(0, side)), dtype=draw(float_dtypes),
                recipe=draw(recipes), where=draw(st.floats(0, 1)), batch=draw(st.lists(st.integers(0, 4), max_size=3)),
                block=draw(st.integers(1, 4)), keep=draw(st.floats(0, 1)),
                index_dtype=draw(st.sampled_from((torch.int32, torch.int64))), **gemm_extras(draw, f))


def nm_weight(c, shape, dim):
    """(NMPacked or junk handed to the op, the dense weight it holds or None when it must be refused)."""
    n, m = (c["n"], c["m"]) if valid_nm(c["n"], c["m"]) else (2, 4)
    base = make(shape, torch.float64, (c["recipe"][0], c["recipe"][1], ()))
    w = torch.where(nm_mask_oracle(base, n, m, dim), base, torch.zeros_like(base)).to(c["dtype"])
    w2 = rows_of(w, dim)
    values, words = pack_oracle(w2, n, m)
    values = inject(values.clone(), c["recipe"][2])  # NaN/Inf among the kept weights
    kind = c["fault"] if c["fault"] in CORRUPT else "none"
    packed, rows = corrupt_packed(kind, c["where"], values, words, n, m, shape, dim, w2.shape[1])
    if not valid_nm(c["n"], c["m"]):
        packed, rows = packed_from(values, words, c["n"], c["m"], shape, dim), None
    return packed, (None if rows is None else from_rows(rows.to(c["dtype"]), shape, dim))


def on(packed, meta: bool):
    return packed.to("meta") if meta and isinstance(packed, nmkern.NMPacked) else packed


def check_nm_linear(c, backends) -> None:
    out, k, dtype = c["out"], c["groups"] * (c["m"] if valid_nm(c["n"], c["m"]) else 4), c["dtype"]
    packed, w = nm_weight(c, (out, k), 1)
    x = make_x(c, (*c["batch"], max(k + c["kdelta"], 0)), dtype)
    bias, bad_bias = make_bias(c, out, dtype)
    must = w is None or bad_bias or x.shape[-1] != k or x.dtype != dtype
    for b in backends:
        run_gemm(c, "nm_linear", lambda xx, bb, meta: ops.nm_linear(xx, on(packed, meta), bb, backend=b),
                 x, w, bias, F.linear, must, (*c["batch"], out), value_fault=c["fault"] in ("oob", "dup", "meta_indices"))


def block_weight(c, shape):
    block, dtype = c["block"], c["dtype"]
    w = make(shape, dtype, c["recipe"])
    keep = torch.rand(shape[0] // block, 1, math.prod(shape[1:]),
                      generator=torch.Generator().manual_seed(c["recipe"][0])) < c["keep"]
    w = torch.where(keep.expand(-1, block, -1).reshape(shape), w, torch.zeros_like(w))
    kind = c["fault"] if c["fault"] in BSR_FAULTS else "none"
    return w, corrupt_bsr(kind, *bsr_buffers(w.reshape(shape[0], math.prod(shape[1:])), block, c["index_dtype"]))


def check_bsr_linear(c, backends) -> None:
    block, dtype, k = c["block"], c["dtype"], 2 + c["groups"] * 3
    out = block * max(c["out"] // block, c["fault"] == "values_cols")  # (0, block+1) values would fit out=0
    w, (crow, col, values, bad) = block_weight(c, (out, k))
    kx = k + c["kdelta"]
    used = int(col.max()) + 1 if col.numel() else 0
    x = make_x(c, (*c["batch"], kx), dtype)
    bias, bad_bias = make_bias(c, out, dtype)
    must = bad or bad_bias or x.dtype != dtype or used > kx
    wx = F.pad(w, (0, max(kx - k, 0)))[:, :kx]
    for b in backends:
        run_gemm(c, "bsr_linear", lambda xx, bb, meta: ops.bsr_linear(
            xx, crow.to(xx.device), col.to(xx.device), values.to(xx.device), out, bb, backend=b),
            x, wx, bias, F.linear, must, (*c["batch"], out), value_fault=bad or used > kx)  # col values: not on meta


test_fuzz_nm_linear = fuzz_test("nm_linear", linear_cases(), lambda c: check_nm_linear(c, (REF,)))
test_fuzz_bsr_linear = fuzz_test("bsr_linear", linear_cases(), lambda c: check_bsr_linear(c, (REF,)))


# ---------------------------------------------------------------------------------------- nm_conv2d / bsr_conv2d

@st.composite
def conv_cases(draw, side=6, max_m=8):
    c = draw(linear_cases(side, max_m))
    f = draw(faults("stride", "padding", "dilation", "cdelta", "small"))
    if f != "none":  # one fault per case
        c.update(fault="none", bias="ok", kdelta=0)
    c.update(cin_groups=draw(st.integers(1, 2)), kh=draw(st.integers(1, 3)), kw=draw(st.integers(1, 3)),
             h=draw(st.integers(1, side)), wd=draw(st.integers(1, side)), nb=draw(st.integers(0, 2)),
             pad_hw=draw(st.booleans()),
             stride=draw(st.sampled_from((0, -1, (1,), True)) if f == "stride" else st.sampled_from((1, 2, (1, 2)))),
             padding=draw(st.sampled_from((-1, (0, -1))) if f == "padding" else st.sampled_from((0, 1, (0, 1)))),
             dilation=draw(st.sampled_from((0, (1, 0))) if f == "dilation" else st.sampled_from((1, 2, (2, 1)))),
             cdelta=int(f == "cdelta"), conv_fault=f)
    if f == "small":
        c.update(h=1, kh=3, padding=0, dilation=1)
    elif c["pad_hw"]:  # mostly inputs the (dilated) kernel fits
        c.update(h=c["h"] + 2 * c["kh"] - 2, wd=c["wd"] + 2 * c["kw"] - 2)
    return c


# A 1x1 conv whose packed weight unpacks with odd strides on its size-1 dims: F.conv2d crashed the process.
CONV_SEGFAULT = dict(n=1, m=2, groups=0, out=1, dtype=torch.float32, recipe=(0, "ties", ()), where=0.0, batch=[],
                     block=1, keep=0.0, index_dtype=torch.int32, fault="none", other=torch.float32,
                     xrecipe=(0, "randn", ()), xlayout="contiguous", kdelta=0, grad=False, bias="ok", meta=False,
                     cin_groups=1, kh=1, kw=1, h=1, wd=1, nb=2, pad_hw=False, stride=(1, 2), padding=1, dilation=2,
                     cdelta=0, conv_fault="none")


def conv_geometry(c):
    """((stride, padding, dilation), output (B, ·, OH, OW)), or (None, _) when the op must refuse them."""
    s, p, d = pair_ok(c["stride"], 1), pair_ok(c["padding"], 0), pair_ok(c["dilation"], 1)
    if None in (s, p, d):
        return None, None
    oh, ow = ((size + 2 * p[i] - d[i] * (k - 1) - 1) // s[i] + 1 for i, (size, k) in
              enumerate(((c["h"], c["kh"]), (c["wd"], c["kw"]))))
    return ((s, p, d), (c["nb"], oh, ow)) if min(oh, ow) >= 1 else (None, None)


def check_convs(c, backends, with_bsr=True) -> None:
    cin = (c["m"] if valid_nm(c["n"], c["m"]) else 4) * c["cin_groups"]
    dtype, out = c["dtype"], max(c["out"], 1)
    geo, (nb, oh, ow) = (lambda g: (g[0], g[1] or (0, 0, 0)))(conv_geometry(c))
    dense = (lambda x, w, b: F.conv2d(x, w, b, *geo)) if geo else None
    x = make_x(c, (c["nb"], cin + c["cdelta"], c["h"], c["wd"]), dtype)
    bias, bad_bias = make_bias(c, out, dtype)
    must_x = geo is None or bad_bias or c["cdelta"] != 0 or x.dtype != dtype
    packed, w = nm_weight(c, (out, cin, c["kh"], c["kw"]), 1)
    for b in backends:
        run_gemm(c, "nm_conv2d", lambda xx, bb, meta: ops.nm_conv2d(
            xx, on(packed, meta), bb, c["stride"], c["padding"], c["dilation"], backend=b),
            x, w, bias, dense, must_x or w is None, (nb, out, oh, ow), value_fault=c["fault"] in ("oob", "dup", "meta_indices"))
    if with_bsr:
        ob = c["block"] * max(out // c["block"], 1)
        wb, (crow, col, vals, bad) = block_weight(c, (ob, cin, c["kh"], c["kw"]))
        bias, bad_bias = make_bias(c, ob, dtype)
        run_gemm(c, "bsr_conv2d", lambda xx, bb, meta: ops.bsr_conv2d(
            xx, crow.to(xx.device), col.to(xx.device), vals.to(xx.device), wb.shape, bb, c["stride"], c["padding"],
            c["dilation"]), x, wb, bias, dense, must_x or bad or bad_bias, (nb, ob, oh, ow), value_fault=bad)


test_fuzz_nm_conv2d_and_bsr_conv2d = fuzz_test("conv", conv_cases(), lambda c: check_convs(c, (REF,)),
                                               examples=[CONV_SEGFAULT])


# ---------------------------------------------------------------------------------------- modules

MODULE_FAULTS = ("nm", "pattern", "block", "sparsity", "ragged_in", "xdtype", "kdelta", "state_oob", "state_dup",
                 "state_col", "backend")


@st.composite
def module_cases(draw, max_m=8):
    c = draw(conv_cases(5, max_m))
    f = draw(faults(*MODULE_FAULTS))
    n, m = draw(nm_pairs(max_m, bad=f == "nm"))
    c.update(n=n, m=m, fault=f, kind=draw(st.sampled_from(("linear", "linear", "conv"))), has_bias=draw(st.booleans()),
             pattern="bogus" if f == "pattern" else draw(st.sampled_from(("nm", "nm", "1xn"))),
             sparsity=draw(st.sampled_from((1.0, -0.5) if f == "sparsity" else (0.0, 0.25, 0.5, 0.75))),
             block=draw(st.sampled_from((0, 2.5)) if f == "block" else st.integers(1, 4)), recipe=draw(finite_recipes),
             padding=draw(st.sampled_from((0, 1, "same", "valid"))), stride=draw(st.sampled_from((1, 1, 2))),
             dilation=draw(st.sampled_from((1, 1, 2))), unbatched=draw(st.booleans()), cdelta=int(f == "ragged_in"),
             kdelta=int(f == "kdelta"), state=draw(st.sampled_from(("none", "roundtrip"))))
    return c


def check_module(c, backends) -> None:
    lin, f, dtype = c["kind"] == "linear", c["fault"], c["dtype"]
    op = "SparseLinear" if lin else "SparseConv2d"
    names, cls = (op, "nmkern.linear" if lin else "nmkern.conv2d"), getattr(nmkern, op)
    blk, s = c["block"], c["sparsity"]
    cin = (c["m"] if valid_nm(c["n"], c["m"]) else 4) * c["cin_groups"] + c["cdelta"]
    out = (blk if isinstance(blk, int) and blk > 0 else 2) * (c["out"] // 4 + 1)
    kw = dict(n=c["n"], m=c["m"], pattern=c["pattern"], block=blk, sparsity=s)
    ok = (c["pattern"] == "nm" and valid_nm(c["n"], c["m"]) and cin % c["m"] == 0 or c["pattern"] == "1xn") \
        and isinstance(blk, int) and blk > 0 and 0 <= s < 1
    if lin:
        dmod = nn.Linear(cin, out, c["has_bias"], dtype=dtype)
    else:
        dmod = nn.Conv2d(cin, out, (c["kh"], c["kw"]), c["stride"] if c["padding"] != "same" else 1, c["padding"],
                         c["dilation"], bias=c["has_bias"], dtype=dtype)
    with torch.no_grad():
        dmod.weight.copy_(make(dmod.weight.shape, dtype, c["recipe"]))
    if c["meta"]:
        res, _ = run(names, lambda: cls.from_dense(dmod.to("meta"), **kw).pack())
        if checked(not ok, res, op + " (meta)"):
            xm = torch.empty((2, cin) + (() if lin else (7, 7)), device="meta", dtype=dtype)
            y, _ = run(names, lambda: res(xm))
            assert y is None or (y.device.type == "meta" and tuple(y.shape[:2]) == (2, out)), "meta forward"
        return
    mod, _ = run(names, lambda: cls.from_dense(dmod, **kw))
    if not checked(not ok, mod, op):
        return
    w, b = dmod.weight.detach(), None if dmod.bias is None else dmod.bias.detach()
    mask = nm_mask_oracle(w, c["n"], c["m"], 1) if c["pattern"] == "nm" else mod.mask()
    if c["pattern"] == "1xn":
        block_keep_oracle(w, blk, s, c["recipe"][1] == "ties", mask)
    wm = torch.where(mask, w, torch.zeros_like(w))
    dense = (lambda x, ww, bb: F.linear(x, ww, bb)) if lin else \
        (lambda x, ww, bb: F.conv2d(x, ww, bb, dmod.stride, dmod.padding, dmod.dilation))
    xshape = (*c["batch"][:2], cin + c["kdelta"]) if lin else (c["nb"], cin + c["kdelta"], c["h"] + 2, c["wd"] + 2)
    xshape = xshape[1:] if not lin and c["unbatched"] else xshape
    x = make_x(c, xshape, dtype)
    must = x.dtype != dtype or c["kdelta"] != 0
    try:
        oshape = dense(torch.empty(xshape, device="meta", dtype=dtype), wm.to("meta"), None).shape
    except RuntimeError:  # torch refuses the input (too small for the kernel, ...): so must the module
        must, oshape = True, None
    cc = dict(c, meta=False)
    run_gemm(cc, names, lambda xx, bb, meta: mod(xx), x, wm, b, dense, must, oshape)
    if run(names, mod.pack)[0] is None:
        return
    for bk in backends + (("bogus",) if f == "backend" else ()):
        if run(names, lambda: setattr(mod, "backend", bk) or True)[0]:
            assert bk != "bogus", f"{op}: accepted backend 'bogus'"
            run_gemm(cc, names, lambda xx, bb, meta: mod(xx), x, wm, b, dense, must, oshape)
    if c["state"] == "none" and not f.startswith("state"):
        return
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in mod.state_dict().items()}
    bad = False
    if f in ("state_oob", "state_dup") and c["pattern"] == "nm":
        vals = sd["packed_values"]
        sd["packed_indices"] = corrupt_words(sd["packed_indices"], vals.shape[1], c["m"], f[6:], c["where"])
        rows = decode_oracle(vals, sd["packed_indices"], c["n"], c["m"], rows_of(w, 1).shape[1])
        bad, wm = rows is None, wm if rows is None else from_rows(rows.to(dtype), w.shape, 1)
    elif f == "state_col" and c["pattern"] == "1xn" and sd["bsr_col"].numel():
        sd["bsr_col"][-1], bad = 10**4, True
    fresh = cls.from_dense(dmod, **kw)
    if run_load(names, fresh, sd)[0] is not None:
        run_gemm(cc, names, lambda xx, bb, meta: fresh(xx), x, wm, b, dense, must or bad, oshape)


test_fuzz_sparse_modules = fuzz_test("modules", module_cases(), lambda c: check_module(c, ("auto", REF, "dense", "cpu")))


# ---------------------------------------------------------------------------------------- sparsify

SCHEMES = ("2:4", (1, 8), "1x4:0.5", "1x2:0.25", {"0": "2:4"}, {"*": (1, 4), "1": None}, "4:4", (5, 4), (0, 4),
           "bogus", 3.5, "2:4:1", None)
SCHEME_SPECS = {"2:4": ("nm", 2, 4), (1, 8): ("nm", 1, 8), (1, 4): ("nm", 1, 4), "1x4:0.5": ("1xn", 4, 0.5), "1x2:0.25": ("1xn", 2, 0.25)}


def scheme_spec(scheme, name):
    if isinstance(scheme, dict):
        return SCHEME_SPECS.get(scheme.get(name, scheme.get("*")) if name in scheme or "*" in scheme else None)
    return SCHEME_SPECS.get(scheme)


@st.composite
def sparsify_cases(draw):
    return dict(conv=draw(st.booleans()), dims=[draw(st.sampled_from((1, 2, 4, 6, 8, 16))) for _ in range(3)],
                scheme=draw(st.sampled_from(SCHEMES)), pack=draw(st.booleans()), dtype=draw(float_dtypes),
                backend=draw(st.sampled_from(("auto", REF, "dense", "cpu", "bogus"))), recipe=draw(finite_recipes),
                xrecipe=draw(recipes), batch=draw(st.integers(0, 3)))


def check_sparsify(c) -> None:
    d0, d1, d2 = c["dims"]
    dtype = c["dtype"]
    torch.manual_seed(c["recipe"][0])
    layers = [nn.Conv2d(d0, d1, 1, dtype=dtype), nn.Conv2d(d1, d2, 1, dtype=dtype)] if c["conv"] else \
        [nn.Linear(d0, d1, dtype=dtype), nn.Linear(d1, d2, dtype=dtype)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.weight.copy_(make(layer.weight.shape, dtype, (c["recipe"][0] + i, c["recipe"][1], ())))
    weights = [(layer.weight.detach().clone(), layer.bias.detach().clone()) for layer in layers]
    known = c["scheme"] is None or isinstance(c["scheme"], dict) or c["scheme"] in SCHEME_SPECS
    rep, _ = run("sparsify", lambda: nmkern.sparsify(model, c["scheme"], backend=c["backend"], pack=c["pack"]))
    if not checked(not known or c["backend"] == "bogus", rep, "sparsify"):
        return
    x = make((c["batch"], d0, 2, 2) if c["conv"] else (c["batch"], d0), dtype, c["xrecipe"])
    ws = []
    for i, (w, b) in enumerate(weights):
        spec, mod = scheme_spec(c["scheme"], str(i)), model[i]
        fits = spec is not None and (w.shape[1] % spec[2] == 0 if spec[0] == "nm" else w.shape[0] % spec[1] == 0)
        assert isinstance(mod, (nmkern.SparseLinear, nmkern.SparseConv2d)) == fits, f"sparsify: layer {i} ({spec})"
        if fits and spec[0] == "nm":
            w = torch.where(nm_mask_oracle(w, spec[1], spec[2], 1), w, torch.zeros_like(w))
        elif fits:
            mask = mod.mask()  # packed: all-zero blocks read as dropped, so only the unpacked mask is the rule's
            if not c["pack"]:
                block_keep_oracle(w, spec[1], spec[2], c["recipe"][1] == "ties", mask)
            w = torch.where(mask, w, torch.zeros_like(w))
        ws.append((w, b))

    def dense(xx, abs_=False):
        for w, b in ws:
            w, b = (w.double().abs(), b.double().abs()) if abs_ else (w.to(xx.dtype), b.to(xx.dtype))
            xx = F.conv2d(xx, w, b) if c["conv"] else F.linear(xx, w, b)
        return xx
    y, _ = run(("sparsify", "SparseLinear", "SparseConv2d", "nmkern.linear", "nmkern.conv2d"), lambda: model(x))
    if y is not None:
        assert_close(y, dense(x.double()), dense(x), dense(torch.nan_to_num(x.double(), 0.0, 0.0, 0.0).abs(), True),
                     "sparsified model")


test_fuzz_sparsify = fuzz_test("sparsify", sparsify_cases(), check_sparsify)


# ---------------------------------------------------------------------------------------- triton (interpreted)

TRITON_CASES = {"masks": mask_cases(4, 8), "pack": pack_cases(4, 8), "semi24": semi24_cases(), "block": block_cases(4),
                "nm_linear": linear_cases(8, 4), "bsr_linear": linear_cases(8, 4), "conv": conv_cases(4, 4),
                "modules": module_cases(4)}
TRITON_CHECKS = {"masks": check_masks, "pack": check_pack, "semi24": check_semi24, "block": check_block,
                 "nm_linear": check_nm_linear, "bsr_linear": check_bsr_linear,
                 "conv": lambda c, b: check_convs(c, b, with_bsr=False), "modules": check_module}


test_fuzz_triton = fuzz_test("triton", st.sampled_from(sorted(TRITON_CASES)).flatmap(
    lambda k: st.tuples(st.just(k), TRITON_CASES[k])), lambda kc: TRITON_CHECKS[kc[0]](kc[1], ("triton",)))
test_fuzz_triton = pytest.mark.usefixtures("interpret")(test_fuzz_triton)
