"""Issue #12 (reliability) at the op level: exact input gradients through packed ops and layers on every
path, NaN/Inf that do not depend on the path dispatch picks, corrupted packed tensors, meta tensors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nmkern
import nmkern._cuda
from nmkern import dispatch, ops
from nmkern.backend import Backend, triton_interpret
from nmkern.reference import apply_nm_ref, block_mask_1xn_ref, compress_24_ref, to_bsr_1xn_ref
from nmkern.reference.linear import semi24_linear_ref

LINEAR_PATHS = ["reference", "dense", "cpu", "triton"]


def _need(path: str) -> None:
    if path == "cpu" and dispatch.cpu_kernels() is None:
        pytest.skip("nmkern's native CPU kernels are not built here")
    if path == "triton" and not torch.cuda.is_available() and not triton_interpret():
        pytest.skip("the triton path needs a GPU or TRITON_INTERPRET=1")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close_to_fp64(got: torch.Tensor, torch_same_precision: torch.Tensor, ref64: torch.Tensor) -> None:
    """``got`` is within 2x torch's own same-precision error vs the fp64 reference (plus a few ulps)."""
    floor = 8 * torch.finfo(got.dtype).eps * ref64.abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    torch_err = (torch_same_precision.double() - ref64).abs().max().item()
    assert err <= 2 * torch_err + floor, (err, torch_err, floor)


# ------------------------------------------------------------------ gradients: packed layers (issue scenario)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_issue_scenario_first_layer_grad_is_exact(backend):
    """first -> packed 1:4 1024x1024 (+ skip): first.weight.grad equals the dense twin's."""
    torch.manual_seed(0)
    first = nn.Linear(1024, 1024)
    sp = nmkern.SparseLinear.from_dense(nn.Linear(1024, 1024), n=1, m=4, backend=backend).pack()
    dense = sp.to_dense()
    x = torch.randn(2, 1024)
    y = sp(first(x))
    assert y.requires_grad
    (first(x) + y).sum().backward()
    got = first.weight.grad.clone()
    first.zero_grad()
    (first(x) + dense(first(x))).sum().backward()
    torch.testing.assert_close(got, first.weight.grad, rtol=1e-5, atol=1e-4)


def _packed_layer(kind: str, pattern: str, path: str, dtype=torch.float32):
    torch.manual_seed(7)
    kw = nmkern.nn.spec_kwargs(nmkern.parse_spec(pattern))
    if kind == "linear":
        layer = nmkern.SparseLinear.from_dense(nn.Linear(64, 32).to(dtype), backend=path, **kw).pack()
        return layer, torch.randn(3, 64, dtype=dtype)
    layer = nmkern.SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1, stride=(2, 1)).to(dtype), backend=path,
                                           **kw).pack()
    return layer, torch.randn(2, 8, 6, 5, dtype=dtype)


def _layer_cases():
    for kind in ("linear", "conv"):
        for pattern in ("2:4", "1x4:0.5"):
            for path in LINEAR_PATHS:
                if not (path == "triton" and kind == "conv" and pattern != "2:4"):
                    yield kind, pattern, path


@pytest.mark.parametrize("kind, pattern, path", list(_layer_cases()))
def test_packed_layer_input_and_bias_grads_match_dense_fp64(kind, pattern, path):
    _need(path)
    layer, x = _packed_layer(kind, pattern, path)
    x.requires_grad_()
    g = torch.randn(layer(x).shape, generator=_gen(1))
    (layer(x) * g).sum().backward()
    dense, dense64 = layer.to_dense(), copy.deepcopy(layer.to_dense()).double()
    x32 = x.detach().clone().requires_grad_()
    (dense(x32) * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (dense64(x64) * g.double()).sum().backward()
    _close_to_fp64(x.grad, x32.grad, x64.grad)
    _close_to_fp64(layer.bias.grad, dense.bias.grad, dense64.bias.grad)


@pytest.mark.parametrize("kind, pattern", [("linear", "2:4"), ("linear", "1x4:0.5"), ("conv", "2:4")])
@pytest.mark.parametrize("path", ["cpu", "dense", "reference"])
def test_packed_layer_grads_under_torch_compile(kind, pattern, path):
    """The autograd formulas trace into the backward graph (aot_eager, fullgraph)."""
    _need(path)
    layer, x = _packed_layer(kind, pattern, path)
    x.requires_grad_()
    layer(x).square().sum().backward()
    eager = x.grad.clone()
    x.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    torch.testing.assert_close(x.grad, eager)


# ------------------------------------------------------------------ gradients: the registered ops


def _op_cases():
    """(name, op, args (x first), dense fp64 weight, conv geometry or None)."""
    wn = apply_nm_ref(torch.randn(16, 32, generator=_gen(2)), 2, 4)
    p = nmkern.pack_nm(wn, 2, 4, backend="reference")
    x = torch.randn(3, 32, generator=_gen(3))
    b = torch.randn(16, generator=_gen(4))
    wb = torch.randn(16, 32, generator=_gen(5))
    wb = wb * block_mask_1xn_ref(wb, 4, 0.5)
    bsr = to_bsr_1xn_ref(wb, 4)
    crow, col, bv = bsr.crow_indices().int().clone(), bsr.col_indices().int().clone(), bsr.values().reshape(-1, 4)
    w24 = apply_nm_ref(torch.randn(32, 32, generator=_gen(6)), 2, 4)
    v24, meta = compress_24_ref(w24.half())
    wc = apply_nm_ref(torch.randn(8, 8, 3, 3, generator=_gen(7)), 2, 4, dim=1)
    pc = nmkern.pack_nm(wc, 2, 4, dim=1, backend="reference")
    xc = torch.randn(2, 8, 6, 5, generator=_gen(8))
    geo = ([2, 1], [1, 0], [1, 1])
    wbc = torch.randn(8, 8, 3, 3, generator=_gen(9))
    wbc = wbc * block_mask_1xn_ref(wbc, 4, 0.5)
    bc = to_bsr_1xn_ref(wbc.reshape(8, -1), 4)
    for impl in ("reference", "triton"):
        yield f"nm_linear_{impl}", (x, p.values, p.indices, 2, 4, b), wn, None
        yield f"bsr_linear_{impl}", (x, crow, col, bv, 16, b), wb, None
        yield f"semi24_linear_{impl}", (x.half()[:, :32], v24, meta, None), w24.half(), None
        yield f"nm_conv2d_{impl}", (xc, pc.values, pc.indices, 2, 4, list(wc.shape), b[:8], *geo), wc, geo
    yield ("bsr_conv2d_reference", (xc, bc.crow_indices().clone(), bc.col_indices().clone(),
                                    bc.values().reshape(-1, 4).clone(), list(wbc.shape), None, *geo), wbc, geo)
    for pattern, w in (("nm", wn), ("1xn", wb)):
        cpu = dispatch.cpu_kernels()
        if cpu is None:
            continue
        t = cpu.prepare_cpu_linear(w, pattern, 2, 4, 4)
        rest = ((t.tensors["values"], t.tensors["index"], 2, 4) if pattern == "nm"
                else (t.tensors["values"], t.tensors["rowptr"], t.tensors["col"], 4))
        yield f"cpu_{pattern}_linear".replace("1xn", "bsr"), (x, *rest, 32, 16, b), w, None
    yield "cuda_sparse24_linear", (x.half(), v24, meta, torch.randn(32, generator=_gen(13)).half()), w24.half(), None


def _run_op(name, args, x, bias):
    args = (x, *args[1:])
    if bias is not None:
        at = {"nm_conv2d": 6, "bsr_conv2d": 5}.get(name.rsplit("_", 1)[0], len(args) - 1)
        args = args[:at] + (bias,) + args[at + 1:]
    return getattr(torch.ops.nmkern, name)(*args)


def _dense(x, w, bias, geo):
    if geo is None:
        return F.linear(x, w, bias)
    return F.conv2d(x, w, bias, *(tuple(g) for g in geo))


@pytest.mark.parametrize("case", list(_op_cases()), ids=lambda c: c[0])
def test_every_op_input_grad_matches_dense_fp64(case, monkeypatch):
    name, args, w, geo = case
    if "triton" in name:
        _need("triton")
    if name == "cuda_sparse24_linear":  # the kernel needs a GPU; its autograd formula does not
        monkeypatch.setattr(nmkern._cuda, "sparse24_linear", lambda x, v, meta, b: semi24_linear_ref(
            x.float(), v.float(), meta, None if b is None else b.float()).to(x.dtype))
    x = args[0].detach().clone().requires_grad_()
    bias_arg = next((a for a in args[1:] if isinstance(a, torch.Tensor) and a.dim() == 1 and a.is_floating_point()
                     and a.shape[0] == w.shape[0]), None)
    bias = None if bias_arg is None else bias_arg.detach().clone().requires_grad_()
    y = _run_op(name, args, x, bias)
    assert y.requires_grad
    g = torch.randn(y.shape, generator=_gen(10)).to(y.dtype)
    (y * g).sum().backward()
    x_same, x64 = (x.detach().clone().requires_grad_() for _ in range(2))
    x64 = x64.double().detach().requires_grad_()
    b_same = None if bias is None else bias.detach().clone().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    (_dense(x_same, w.to(x.dtype), b_same, geo) * g).sum().backward()
    (_dense(x64, w.double(), b64, geo) * g.double()).sum().backward()
    _close_to_fp64(x.grad, x_same.grad, x64.grad)
    if bias is not None:
        _close_to_fp64(bias.grad, b_same.grad, b64.grad)


def test_packed_values_that_require_grad_are_refused():
    w, x = apply_nm_ref(torch.randn(16, 32), 2, 4), torch.randn(3, 32, requires_grad=True)
    p = nmkern.pack_nm(w, 2, 4, backend="reference")
    with pytest.raises(ValueError, match=r"nmkern::nm_linear_reference: argument 1 \(a packed weight tensor\) "
                                         r"requires grad; .* gradients for x and bias only"):
        torch.ops.nmkern.nm_linear_reference(x, p.values.requires_grad_(), p.indices, 2, 4, None)


@pytest.mark.parametrize("dim", [-1, 0])
def test_apply_nm_triton_is_differentiable_like_the_reference(interpret, dim):
    w = torch.randn(8, 16, generator=_gen(11))
    g = torch.randn(8, 16, generator=_gen(12))
    grads = {}
    for backend in ("reference", "triton"):
        wb = w.clone().requires_grad_()
        out = nmkern.apply_nm(wb, 2, 4, dim=dim, backend=backend)
        assert out.requires_grad
        (out * g).sum().backward()
        grads[backend] = wb.grad
    assert torch.equal(grads["triton"], grads["reference"])
    assert torch.equal(grads["triton"], g * nmkern.nm_mask(w, 2, 4, dim=dim, backend="reference"))


# ------------------------------------------------------------------ NaN/Inf: the same on every path


def _same_nonfinite(y: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor) -> None:
    """NaN and +-Inf at exactly the dense fp64 op's positions; the finite rest within tolerance."""
    assert torch.equal(torch.isnan(y), torch.isnan(ref64))
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref64))
    assert torch.equal(torch.isneginf(y), torch.isneginf(ref64))
    fin = torch.isfinite(ref64)
    assert fin.any() and not fin.all()
    _close_to_fp64(y[fin], torch_same[fin], ref64[fin])


def _poisoned(x: torch.Tensor, pruned_feature: int) -> torch.Tensor:
    x = x.clone()
    x[0, pruned_feature] = float("inf")  # row 0: inf in a feature row 0 of the weight prunes
    x[1, 3] = float("nan")
    return x


def test_issue_scenario_nonfinite_does_not_depend_on_batch_size():
    """Packed 2:4 4096->1024: out[0, 0] at batch 1 (a sparse kernel may run) == at batch 256 (dense)."""
    torch.manual_seed(0)
    layer = nmkern.SparseLinear.from_dense(nn.Linear(4096, 1024), n=2, m=4).pack()
    pruned = int((layer.to_dense().weight[0] == 0).nonzero()[0])
    x = torch.randn(256, 4096)
    x[0, pruned] = float("inf")
    with torch.no_grad():
        one, full = layer(x[:1]), layer(x)
    assert torch.isnan(one[0, 0]) and torch.isnan(full[0, 0])
    assert torch.equal(torch.isnan(one[0]), torch.isnan(full[0]))
    assert torch.equal(torch.isinf(one[0]), torch.isinf(full[0]))


@pytest.mark.parametrize("pattern", ["2:4", "1x4:0.5"])
@pytest.mark.parametrize("path", LINEAR_PATHS)
def test_nonfinite_input_same_on_every_linear_path(pattern, path):
    _need(path)
    layer, x = _packed_layer("linear", pattern, path)
    w = layer.to_dense().weight.detach()
    x = _poisoned(x, int((w[0] == 0).nonzero()[0]))
    with torch.no_grad():
        y = dispatch.run(Backend(path), layer, x)
        _same_nonfinite(y, F.linear(x, w, layer.bias), F.linear(x.double(), w.double(), layer.bias.double()))


@pytest.mark.parametrize("pattern", ["2:4", "1x4:0.5"])
@pytest.mark.parametrize("path", LINEAR_PATHS)
def test_nonfinite_input_same_on_every_conv_path(pattern, path):
    _need(path)
    if path == "triton" and pattern != "2:4":
        pytest.skip("there is no Triton 1xN conv kernel")
    layer, x = _packed_layer("conv", pattern, path)
    dense = layer.to_dense()
    x = x.clone()
    x[0, 2, 3, 1] = float("inf")
    x[1, 5, 0, 4] = -float("inf")
    x[1, 0, 4, 2] = float("nan")
    with torch.no_grad():
        y = dispatch.run(Backend(path), layer, x)
        _same_nonfinite(y, dense(x), copy.deepcopy(dense).double()(x.double()))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nonfinite_input_same_in_every_op_wrapper(backend):
    """nm_linear, bsr_linear, semi24_linear and nm_conv2d give the dense op's NaN/Inf on both backends."""
    _need(backend)
    w = apply_nm_ref(torch.randn(32, 64, generator=_gen(14)), 2, 4)
    x = _poisoned(torch.randn(3, 64, generator=_gen(15)), int((w[0] == 0).nonzero()[0]))
    y = ops.nm_linear(x, nmkern.pack_nm(w, 2, 4), backend=backend)
    _same_nonfinite(y, F.linear(x, w), F.linear(x.double(), w.double()))
    wb = w * block_mask_1xn_ref(w, 4, 0.5)
    bsr = to_bsr_1xn_ref(wb, 4)
    y = ops.bsr_linear(x, bsr.crow_indices(), bsr.col_indices(), bsr.values().reshape(-1, 4), 32, backend=backend)
    _same_nonfinite(y, F.linear(x, wb), F.linear(x.double(), wb.double()))
    y = ops.semi24_linear(x.half(), *compress_24_ref(w.half()), backend=backend)
    _same_nonfinite(y, F.linear(x.half(), w.half()), F.linear(x.double(), w.half().double()))
    wc = apply_nm_ref(torch.randn(8, 8, 3, 3, generator=_gen(16)), 2, 4, dim=1)
    xc = torch.randn(2, 8, 5, 5, generator=_gen(17))
    xc[0, 1, 2, 2] = float("inf")
    y = ops.nm_conv2d(xc, nmkern.pack_nm(wc, 2, 4, dim=1), padding=1, backend=backend)
    _same_nonfinite(y, F.conv2d(xc, wc, padding=1), F.conv2d(xc.double(), wc.double(), padding=1))


# ------------------------------------------------------------------ corrupted packed tensors


def _packed(n=2, m=4, rows=4, k=16):
    w = apply_nm_ref(torch.randn(rows, k, generator=_gen(20)), n, m)
    return w, nmkern.pack_nm(w, n, m, backend="reference")


def _with(p, **kw):
    import dataclasses

    return dataclasses.replace(p, **kw)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unpack_nm_rejects_truncated_and_foreign_buffers(backend):
    _need(backend)
    _, p = _packed(rows=4, k=64)  # 2:4: 32 kept per row, 16 per word: 2 words
    with pytest.raises(ValueError, match=r"unpack_nm: packed tensors do not match a 2:4 packing of shape \(4, 64\) "
                                         r"along dim 1: values \(4, 32\) and indices \(4, 1\), expected \(4, 32\) "
                                         r"and \(4, 2\) - .* re-pack the weight with nmkern.pack_nm"):
        nmkern.unpack_nm(_with(p, indices=p.indices[:, :1].contiguous()), backend=backend)
    with pytest.raises(ValueError, match=r"values \(3, 32\) and indices \(4, 2\), expected \(4, 32\)"):
        nmkern.unpack_nm(_with(p, values=p.values[:3]), backend=backend)
    with pytest.raises(TypeError, match=r"unpack_nm: packed.indices has dtype int64; supported dtypes are int32"):
        nmkern.unpack_nm(_with(p, indices=p.indices.long()), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unpack_nm_rejects_indices_out_of_range_or_order(backend):
    _need(backend)
    _, p = _packed()
    with pytest.raises(ValueError, match=r"unpack_nm: packed.indices are corrupted: row 0, group 0 holds in-group "
                                         r"indices \[3, 3\]; each group's n=2 indices must be distinct, increasing "
                                         r"and < m=4"):
        nmkern.unpack_nm(_with(p, indices=torch.full_like(p.indices, -1)), backend=backend)
    bad = p.indices.clone()
    bad[2, 0] = (bad[2, 0] & ~0b1111) | 0b0110  # group 0 of row 2: slots (2, 1), out of order
    with pytest.raises(ValueError, match=r"row 2, group 0 holds in-group indices \[2, 1\]"):
        nmkern.unpack_nm(_with(p, indices=bad), backend=backend)
    _, p5 = _packed(n=2, m=5, k=20)  # 3-bit fields: 5, 6, 7 are out of range
    bad = p5.indices.clone()
    bad[1, 0] = (bad[1, 0] & ~0b111111) | (7 << 3)  # row 1, group 0: slots (0, 7)
    with pytest.raises(ValueError, match=r"row 1, group 0 holds in-group indices \[0, 7\]; .* < m=5"):
        nmkern.unpack_nm(_with(p5, indices=bad), backend=backend)


def test_public_op_wrappers_reject_corrupted_packed_tensors():
    w, p = _packed(rows=8, k=32)
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"nm_linear: packed.indices are corrupted"):
        ops.nm_linear(x, _with(p, indices=torch.full_like(p.indices, -1)))
    with pytest.raises(ValueError, match=r"nm_linear: packed tensors do not match"):
        ops.nm_linear(x, _with(p, indices=p.indices[:4]))
    wc = apply_nm_ref(torch.randn(8, 8, 3, 3), 2, 4, dim=1)
    pc = nmkern.pack_nm(wc, 2, 4, dim=1)
    with pytest.raises(ValueError, match=r"nm_conv2d: packed.indices are corrupted"):
        ops.nm_conv2d(torch.randn(1, 8, 4, 4), _with(pc, indices=torch.full_like(pc.indices, -1)))
    v24, meta = compress_24_ref(apply_nm_ref(torch.randn(32, 32), 2, 4).half())
    with pytest.raises(ValueError, match=r"semi24_linear: meta is corrupted"):
        ops.semi24_linear(x.half(), v24, torch.zeros_like(meta))


def test_bsr_wrappers_reject_corrupted_pointers():
    wb = torch.randn(16, 24)
    wb = wb * block_mask_1xn_ref(wb, 4, 0.5)
    bsr = to_bsr_1xn_ref(wb, 4)
    crow, col, vals = bsr.crow_indices(), bsr.col_indices(), bsr.values().reshape(-1, 4)
    x = torch.randn(2, 24)
    msg = (r"bsr_linear: BSR buffers are corrupted: need crow\[0\] == 0, crow non-decreasing with crow\[-1\] == "
           rf"{vals.shape[0]} .* col in \[0, 24\) strictly increasing within each block row; got crow .* - rebuild")
    for bad_crow, bad_col in ((crow, col + 24), (crow, -col - 1), (crow.flip(0), col), (crow + 1, col),
                              (crow, col.flip(0))):
        with pytest.raises(ValueError, match=msg):
            ops.bsr_linear(x, bad_crow, bad_col, vals, 16)
    wc = torch.randn(8, 2, 3, 3)
    bc = to_bsr_1xn_ref((wc * block_mask_1xn_ref(wc, 4, 0.5)).reshape(8, -1), 4)
    with pytest.raises(ValueError, match=r"bsr_conv2d: BSR buffers are corrupted: .* col in \[0, 18\)"):
        ops.bsr_conv2d(torch.randn(1, 2, 5, 5), bc.crow_indices(), bc.col_indices() + 18,
                       bc.values().reshape(-1, 4), wc.shape)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decompress_24_rejects_invalid_metadata(backend):
    """Nibbles must be idx0 | idx1 << 2 with idx0 < idx1; before the fix each backend decoded garbage differently."""
    _need(backend)
    values, meta = compress_24_ref(apply_nm_ref(torch.randn(32, 64), 2, 4).half())
    for nibble in (0b0000, 0b0101, 0b0001, 0b1111):  # (0, 0), (1, 1), (1, 0), (3, 3)
        bad = meta.clone()
        bad[5, 1] = (int(bad[5, 1]) & ~0xF0) | (nibble << 4)
        with pytest.raises(ValueError, match=rf"decompress_24: meta is corrupted: int16 element \(5, 1\) \(CUTLASS "
                                             rf"order\) holds the nibble {nibble:#06b}; each nibble must encode two "
                                             r"distinct slots idx0 < idx1"):
            nmkern.decompress_24(values, bad, backend=backend)
    assert torch.equal(nmkern.decompress_24(values, meta, backend=backend), nmkern.decompress_24(values, meta))


# ------------------------------------------------------------------ meta tensors, -0.0


def test_shape_only_ops_run_on_meta_tensors():
    w = torch.empty(8, 16, device="meta")
    for out in (nmkern.nm_mask(w, 2, 4), nmkern.apply_nm(w, 2, 4), nmkern.block_mask_1xn(w, 4, 0.5),
                nmkern.block_mask_1xn(w, 4, 0.5, rearrange=True)):
        assert out.is_meta and out.shape == w.shape
    p, real = nmkern.pack_nm(w, 2, 4), nmkern.pack_nm(torch.zeros(8, 16), 2, 4)
    assert p.values.is_meta and p.values.shape == real.values.shape and p.indices.shape == real.indices.shape
    assert nmkern.unpack_nm(p).shape == w.shape
    values, meta = nmkern.compress_24(torch.empty(32, 64, dtype=torch.half, device="meta"))
    assert values.shape == (32, 32) and meta.shape == (32, 4) and values.is_meta
    assert nmkern.decompress_24(values, meta).shape == (32, 64)


def test_value_dependent_op_on_meta_says_why():
    with pytest.raises(ValueError, match=r"to_bsr_1xn: w is on the meta device \(shape \(8, 16\), no values\); the "
                                         r"number of stored blocks depends on its values - materialize it first"):
        nmkern.to_bsr_1xn(torch.empty(8, 16, device="meta"), 4)


def test_pack_nm_round_trip_keeps_kept_values_bitwise_and_drops_the_sign_of_dropped_zeros():
    """The docstring's promise: kept values bit for bit (-0.0 included); a dropped -0.0 comes back as +0.0."""
    w = torch.tensor([[-0.0, 1.0, 0.0, 2.0, -0.0, 0.0, 0.0, 3.0, float("nan"), 0.0, -float("inf"), 0.0]])
    for backend in ("reference",) + (("triton",) if triton_interpret() or torch.cuda.is_available() else ()):
        back = nmkern.unpack_nm(nmkern.pack_nm(w, 2, 4, backend=backend), backend=backend)
        assert torch.equal(torch.signbit(back), torch.tensor([[False] * 4 + [True] + [False] * 5 + [True, False]]))
        assert torch.equal(back.nan_to_num(7.0), w.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finite_check_finds_every_nan_and_inf(dtype):
    """ops._finite (a sum, see its docstring): one NaN, +Inf, -Inf or +Inf with -Inf anywhere is caught;
    large finite fp16 inputs whose fp16 sum would overflow are still finite."""
    for where in [(0, 0), (5, 63), (17, 1000)]:
        for bad in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]):
            x = torch.randn(18, 1024, generator=_gen(18)).to(dtype)
            x[where] = bad[0]
            if len(bad) > 1:
                x[0, 1] = bad[1]
            assert not ops._finite(x), (where, bad)
    assert ops._finite(torch.randn(18, 1024, generator=_gen(19)).to(dtype))
    assert ops._finite(torch.full((256, 4096), 60000.0, dtype=dtype))  # fp16 sum: 6.3e10 > 65504


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_half_conv_is_right_where_torch_cpu_conv_is_not(dtype):
    """The reference convs compute CPU bf16 / fp16 in fp32 (reference.linear.conv2d_dense): torch 2.13's oneDNN
    conv returned garbage for this shape on an AMX CPU, every call. Within one rounding of the fp64 result."""
    x = torch.randn(2, 4, 8, 5, generator=_gen(20)).to(dtype)
    w = apply_nm_ref(torch.randn(3, 4, 2, 3, generator=_gen(21)), 2, 4, dim=1).to(dtype)
    y = ops.nm_conv2d(x, nmkern.pack_nm(w, 2, 4, dim=1), stride=(1, 2), dilation=2, backend="reference")
    ref = F.conv2d(x.double(), w.double(), stride=(1, 2), dilation=2)
    assert y.dtype == dtype
    assert torch.equal(y, ref.to(dtype)) or (y.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max()
