"""SparseLinear / SparseConv2d: both forms vs the dense op on the masked weight, packing,
state_dict round trips, SR-STE gradients, dispatch hooks and input errors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_nm_linear import assert_matches_torch

import nmkern
import nmkern._cpu
import nmkern._cpu_layout
from nmkern import dispatch
from nmkern.reference import apply_nm_ref, block_mask_1xn_ref, nm_mask_ref
from nmkern.reference.linear import nm_dense_rows_ref
from nmkern.nn._layer import _SparseLayer
from nmkern.reference.srste import srste_backward_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _linear(in_f=64, out_f=32, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def _expected_mask(w, pattern, n=2, m=4, block=4, sparsity=0.5):
    if pattern == "nm":
        return nm_mask_ref(w, n, m, dim=1)  # Linear: along in_features; conv: along input channels (NHWC)
    return block_mask_1xn_ref(w, block, sparsity)


def _masked_linear_weight(lin, **kw):
    w = lin.weight.detach()
    return w * _expected_mask(w, **kw)


PATTERNS = [dict(pattern="nm", n=2, m=4), dict(pattern="nm", n=1, m=8), dict(pattern="nm", n=3, m=16),
            dict(pattern="1xn", block=4, sparsity=0.5), dict(pattern="1xn", block=8, sparsity=0.75)]


# --------------------------------------------------------------------------- SparseLinear


@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.float32, False), (torch.float16, False),
                                        (torch.bfloat16, True)])
def test_linear_forms_match_masked_dense(kw, dtype, bias):
    lin = _linear(bias=bias, dtype=dtype)
    w = _masked_linear_weight(lin, **kw)
    sl = nmkern.SparseLinear.from_dense(lin, **kw)
    assert torch.equal(sl.mask(), _expected_mask(lin.weight.detach(), **kw))
    for shape in [(1, 64), (5, 64), (2, 3, 64), (64,)]:  # odd batch, 3-D, unbatched
        x = torch.randn(shape).to(dtype)
        expected = F.linear(x, w, lin.bias)
        assert torch.equal(sl(x), expected)  # training form: the same F.linear on the same masked weight
    mask_before = sl.mask()
    sl.pack()
    assert sl.is_packed and sl.weight is None and torch.equal(sl.mask(), mask_before)
    assert [name for name, _ in sl.named_parameters()] == (["bias"] if bias else [])
    for backend in ["auto", "dense", "reference"]:
        sl.backend = backend
        for shape in [(1, 64), (7, 64), (2, 3, 64), (64,)]:
            x = torch.randn(shape).to(dtype)
            assert torch.equal(sl(x), F.linear(x, w, lin.bias)), backend
    dense = sl.to_dense()
    assert type(dense) is nn.Linear and torch.equal(dense.weight, w) and dense.weight.dtype == dtype


@pytest.mark.parametrize("kw", [PATTERNS[0], PATTERNS[1], PATTERNS[3]], ids=["2:4", "1:8", "1x4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_packed_triton_path(interpret, device, kw, dtype):
    lin = _linear(in_f=32, out_f=16, dtype=dtype).to(device)
    w = _masked_linear_weight(lin, **kw)
    sl = nmkern.SparseLinear.from_dense(lin, backend="triton", **kw).pack()
    for batch in (1, 5):
        x = torch.randn(batch, 32, device=device).to(dtype)
        ref64 = F.linear(x.double(), w.double(), lin.bias.double())
        assert_matches_torch(sl(x), ref64, F.linear(x, w, lin.bias))


def test_linear_state_dict_round_trips():
    for kw in (PATTERNS[0], PATTERNS[2], PATTERNS[4]):
        lin = _linear(in_f=64, out_f=32)
        w = _masked_linear_weight(lin, **kw)
        x = torch.randn(3, 64)
        expected = F.linear(x, w, lin.bias)
        sl = nmkern.SparseLinear.from_dense(lin, **kw)
        train_sd = sl.state_dict()
        # training form -> fresh module with other defaults: the config rides in the extra state
        fresh = nmkern.SparseLinear(64, 32)
        fresh.load_state_dict(train_sd)
        assert not fresh.is_packed and torch.equal(fresh(x), expected)
        sl.pack()
        packed_sd = sl.state_dict()
        assert "weight" not in packed_sd
        tensor_bytes = sum(t.numel() * t.element_size() for k, t in packed_sd.items()
                           if torch.is_tensor(t) and k != "bias")
        assert tensor_bytes == sl.packed_nbytes() < w.numel() * w.element_size()
        for target in (nmkern.SparseLinear(64, 32), nmkern.SparseLinear(64, 32).pack(),
                       nmkern.SparseLinear(64, 32, pattern="1xn", block=2, sparsity=0.25).pack()):
            target.load_state_dict(packed_sd)
            assert target.is_packed and target.weight is None
            assert torch.equal(target(x), expected) and torch.equal(target.mask(), sl.mask())
        back = sl.state_dict()
        packed_target = nmkern.SparseLinear(64, 32).pack()
        packed_target.load_state_dict(train_sd)  # a packed module takes a training state too
        assert not packed_target.is_packed and torch.equal(packed_target(x), expected)
        assert back.keys() == packed_sd.keys()


def test_state_dict_across_patterns_adopts_the_saved_config():
    x = torch.randn(2, 32)
    src_1xn = nmkern.SparseLinear(32, 16, pattern="1xn", block=2, sparsity=0.25)
    dst = nmkern.SparseLinear(32, 16)  # 2:4, no mask buffer
    dst.load_state_dict(src_1xn.state_dict())
    assert (dst.pattern, dst.block, dst.sparsity) == (nmkern.Pattern.ONE_BY_N, 2, 0.25)
    assert torch.equal(dst.weight_mask, src_1xn.weight_mask) and torch.equal(dst(x), src_1xn(x))
    src_nm = nmkern.SparseLinear(32, 16, n=1, m=8)
    dst.load_state_dict(src_nm.state_dict())  # back to N:M: the 1xN mask buffer goes
    assert (dst.pattern, dst.n, dst.m) == (nmkern.Pattern.NM, 1, 8) and "weight_mask" not in dict(dst.named_buffers())
    assert torch.equal(dst(x), src_nm(x))


def test_packed_bytes_below_dense_for_real_patterns():
    # (pattern, dtype, packed bytes of a 128x256 weight from the format definitions)
    cases = [
        (dict(pattern="nm", n=2, m=4), torch.float16, 128 * (128 * 2 + 8 * 4)),  # 128 values + 8 words of 16 x 2 bits
        (dict(pattern="nm", n=1, m=8), torch.float32, 128 * (32 * 4 + 4 * 4)),  # 32 values + 4 words of 10 x 3 bits
        (dict(pattern="1xn", block=4, sparsity=0.5), torch.float16, 33 * 4 + 4096 * 4 + 4096 * 4 * 2),  # crow, col, values
    ]
    for kw, dtype, expected in cases:
        lin = _linear(in_f=256, out_f=128, dtype=dtype)
        sl = nmkern.SparseLinear.from_dense(lin, **kw).pack()
        dense_bytes = lin.weight.numel() * lin.weight.element_size()
        assert sl.packed_nbytes() == expected < dense_bytes, kw


@pytest.mark.parametrize("srste,lambda_w", [(True, 2e-4), (True, 0.5), (False, 0.5)])
def test_linear_training_gradients_are_srste(srste, lambda_w):
    lin = _linear(in_f=32, out_f=16)
    sl = nmkern.SparseLinear.from_dense(lin, srste=srste, lambda_w=lambda_w)
    x = torch.randn(4, 32)
    sl(x).square().sum().backward()
    mask = nm_mask_ref(lin.weight.detach(), 2, 4)
    out_grad = 2 * F.linear(x, lin.weight.detach() * mask, lin.bias)
    dense_grad = out_grad.t() @ x  # gradient w.r.t. the masked weight, passed on unmasked (STE)
    expected = srste_backward_ref(dense_grad, lin.weight.detach(), mask, lambda_w if srste else 0.0)
    assert torch.allclose(sl.weight.grad, expected, atol=1e-5)
    assert torch.allclose(sl.bias.grad, out_grad.sum(0), atol=1e-5)


def test_1xn_mask_is_fixed_and_settable():
    lin = _linear(in_f=16, out_f=8)
    sl = nmkern.SparseLinear.from_dense(lin, pattern="1xn", block=4, sparsity=0.5)
    expected = block_mask_1xn_ref(lin.weight.detach(), 4, 0.5)
    assert torch.equal(sl.mask(), expected) and torch.equal(sl.weight_mask, expected)
    with torch.no_grad():
        sl.weight.mul_(-3)  # the 1xN mask does not follow the weights
    assert torch.equal(sl.mask(), expected)
    new = torch.zeros(8, 16, dtype=torch.bool)
    new[4:, ::2] = True
    sl.set_mask(new)
    x = torch.randn(2, 16)
    assert torch.equal(sl(x), F.linear(x, sl.weight * new, sl.bias))
    bad = new.clone()
    bad[0, 0] = True
    with pytest.raises(ValueError, match="set_mask: mask is not a 1x4 block mask"):
        sl.set_mask(bad)
    with pytest.raises(ValueError, match=r"set_mask: mask has shape \(8, 8\), expected the weight's \(8, 16\)"):
        sl.set_mask(new[:, :8])
    with pytest.raises(ValueError, match="set_mask: N:M masks are recomputed"):
        nmkern.SparseLinear(16, 8).set_mask(new)


def test_linear_input_errors():
    sl = nmkern.SparseLinear(64, 32)
    bound = nmkern.SparseLinear(64, 32).pack()
    bound(torch.randn(2, 64))  # a small layer the plan keeps dense: its dense op is bound now
    assert bound._fast_dense is not None or os.environ.get("NMKERN_BACKEND")
    for layer in (sl, nmkern.SparseLinear(64, 32).pack(), bound):
        with pytest.raises(ValueError, match=r"SparseLinear: input has shape \(3, 60\) but in_features=64"):
            layer(torch.randn(3, 60))
        with pytest.raises(TypeError, match="SparseLinear: input has dtype torch.float16 but the layer's weight is "
                                            "torch.float32"):
            layer(torch.randn(3, 64).half())
        with pytest.raises(ValueError, match="SparseLinear: input is on meta but the layer is on cpu"):
            layer(torch.randn(3, 64, device="meta"))
        with pytest.raises(TypeError, match="SparseLinear: input must be a torch.Tensor, got list"):
            layer([1.0] * 64)


def test_constructor_errors():
    with pytest.raises(ValueError, match="SparseLinear: in_features=30 is not divisible by m=4"):
        nmkern.SparseLinear(30, 8)
    with pytest.raises(ValueError, match="SparseLinear: out_features=10 is not divisible by the 1xN block size 4"):
        nmkern.SparseLinear(32, 10, pattern="1xn")
    with pytest.raises(ValueError, match="SparseLinear: unknown pattern 'blocky'"):
        nmkern.SparseLinear(32, 8, pattern="blocky")
    with pytest.raises(ValueError, match="SparseLinear: n=4, m=4 is not an N:M pattern"):
        nmkern.SparseLinear(32, 8, n=4, m=4)
    with pytest.raises(ValueError, match="SparseLinear: unknown backend 'gpu'"):
        nmkern.SparseLinear(32, 8, backend="gpu")
    with pytest.raises(TypeError, match="from_dense: expected an nn.Linear, got Conv2d"):
        nmkern.SparseLinear.from_dense(nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match=r"SparseConv2d: depthwise conv \(groups=8\) is left dense"):
        nmkern.SparseConv2d(8, 8, 3, groups=8)
    with pytest.raises(ValueError, match=r"SparseConv2d: in_channels=6 is not divisible by m=4"):
        nmkern.SparseConv2d(6, 8, 3)
    with pytest.raises(ValueError, match="padding='same' with kernel \\(2, 2\\) .* needs asymmetric padding"):
        nmkern.SparseConv2d(8, 8, 2, padding="same")


def test_packed_module_follows_to_and_half():
    lin = _linear(in_f=32, out_f=16)
    sl = nmkern.SparseLinear.from_dense(lin).pack()
    x = torch.randn(2, 32)
    sl(x)  # fills the dense cache
    sl.half()
    w = apply_nm_ref(lin.weight.detach(), 2, 4).half()
    assert sl.packed_values.dtype == torch.float16 and sl.packed_indices.dtype == torch.int32
    assert torch.equal(sl(x.half()), F.linear(x.half(), w, lin.bias.half()))


def test_dispatch_hooks_reach_the_native_cpu_kernel(monkeypatch):
    """The CPU path runs the registered op nmkern::cpu_nm_linear on the layer's prepared CPU layout."""
    calls = []

    class FakePrepared:  # stands in for nmkern._cpu.CpuLinear: the dense weight as its "layout"
        def __init__(self, values, indices, n, m, k):
            w = nm_dense_rows_ref(values, indices, n, m)
            calls.append(("prepare", "nm", n, m, tuple(w.shape)))
            self.kind, self.n, self.m, self.block = nmkern.Pattern.NM, n, m, 0
            self.out_features, self.in_features = w.shape
            self.tensors = {"values": w, "index": torch.zeros(0, dtype=torch.int32)}

    def fake_nm_linear_f32(x, values, index, n, m, out_features, bias, check_finite=False):
        calls.append(("run", tuple(x.shape)))
        return F.linear(x, values, bias)

    monkeypatch.setattr(nmkern._cpu, "nm_linear_f32", fake_nm_linear_f32)
    monkeypatch.setattr(nmkern._cpu, "cpu_beats_dense", lambda *a, **kw: a[5] <= 4)
    monkeypatch.setattr(nmkern._cpu_layout, "layout_from_nm_packed", FakePrepared)
    monkeypatch.delenv("NMKERN_BACKEND", raising=False)
    lin = _linear(in_f=32, out_f=16)
    sl = nmkern.SparseLinear.from_dense(lin).pack()
    w = apply_nm_ref(lin.weight.detach(), 2, 4)
    x = torch.randn(2, 2, 32)
    assert torch.equal(sl(x), F.linear(x, w, lin.bias))
    assert calls == [("prepare", "nm", 2, 4, (16, 32)), ("run", (4, 32))]
    x8 = torch.randn(8, 32)  # cpu_beats_dense says no at 8 rows: the dense path, no new call
    assert torch.equal(sl(x8), F.linear(x8, w, lin.bias)) and len(calls) == 2


def test_dispatch_decision_is_remembered_per_input_size(monkeypatch):
    decisions = []
    real = dispatch.choose

    def counting(requested, call):
        decisions.append((str(requested), call.rows))
        return real(requested, call)

    monkeypatch.setattr(dispatch, "choose", counting)
    # pack() / .to() / setting backend also ask the table for the torch.compile plan (once, eagerly);
    # this test counts the per-call decisions of eager forwards
    monkeypatch.setattr(_SparseLayer, "_build_compile_plan", lambda self: None)
    sl = nmkern.SparseLinear.from_dense(_linear(in_f=32, out_f=16)).pack()
    for _ in range(3):
        sl(torch.randn(2, 32))
    sl(torch.randn(5, 32))
    sl.backend = "reference"
    sl(torch.randn(5, 32))
    sl.float()  # .to()/.float() forget the decisions (dtype or device may have changed)
    sl(torch.randn(5, 32))
    assert decisions == [("auto", 2), ("auto", 5), ("reference", 5), ("reference", 5)]


# --------------------------------------------------------------------------- SparseConv2d


CONV_CASES = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(0, 1), dilation=(1, 1)),
    dict(kernel_size=3, stride=1, padding="same", dilation=2),
]


@pytest.mark.parametrize("geom", CONV_CASES, ids=["3x3", "3x1s2", "same-d2"])
@pytest.mark.parametrize("kw,dtype", [(PATTERNS[0], torch.float32), (PATTERNS[0], torch.bfloat16),
                                      (PATTERNS[1], torch.float16), (PATTERNS[3], torch.float32),
                                      (PATTERNS[3], torch.float16)], ids=["2:4-fp32", "2:4-bf16", "1:8-fp16",
                                                                          "1x4-fp32", "1x4-fp16"])
def test_conv_forms_match_masked_dense(geom, kw, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, dtype=dtype, **geom)
    mask = _expected_mask(conv.weight.detach(), **kw)
    wm = conv.weight.detach() * mask
    sc = nmkern.SparseConv2d.from_dense(conv, **kw)
    x = torch.randn(3, 8, 7, 6).to(dtype)
    with torch.no_grad():  # same conv algorithm as the hand-masked call (no weight grad)
        assert torch.equal(sc(x), F.conv2d(x, wm, conv.bias, conv.stride, conv.padding, conv.dilation))
        sc.pack()
        for backend in ("auto", "reference", "dense"):
            sc.backend = backend
            for xi in (x, x[:1], x[0]):  # batch 3, 1 and unbatched
                # conv algorithms differ with padding='same' vs ints and weight layout: compare errors, not bits
                b64 = conv.bias.double()
                ref64 = F.conv2d(xi.double(), wm.double(), b64, conv.stride, conv.padding, conv.dilation)
                expected = F.conv2d(xi, wm, conv.bias, conv.stride, conv.padding, conv.dilation)
                assert_matches_torch(sc(xi), ref64, expected)
    fresh = nmkern.SparseConv2d(8, 16, **geom)
    fresh.load_state_dict(sc.state_dict())
    assert fresh.is_packed and torch.equal(fresh.mask(), mask) and torch.equal(sc.mask(), mask)
    with torch.no_grad():
        ref64 = F.conv2d(x.double(), wm.double(), conv.bias.double(), conv.stride, conv.padding, conv.dilation)
        assert_matches_torch(fresh.to(dtype)(x), ref64, F.conv2d(x, wm, conv.bias, conv.stride, conv.padding,
                                                                 conv.dilation))
    assert sc.packed_nbytes() < wm.numel() * wm.element_size()
    dense = sc.to_dense()
    assert type(dense) is nn.Conv2d and torch.equal(dense.weight, wm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_packed_triton_path(interpret, device, dtype):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dtype=dtype).to(device)
    wm = apply_nm_ref(conv.weight.detach(), 2, 4, dim=1)
    sc = nmkern.SparseConv2d.from_dense(conv, backend="triton").pack()
    x = torch.randn(2, 8, 5, 6, device=device).to(dtype)
    ref64 = F.conv2d(x.double(), wm.double(), conv.bias.double(), 2, 1)
    with torch.no_grad():
        assert_matches_torch(sc(x), ref64, F.conv2d(x, wm, conv.bias, 2, 1))


def test_conv_input_errors():
    sc = nmkern.SparseConv2d(8, 16, 3)
    for layer in (sc, nmkern.SparseConv2d(8, 16, 3).pack()):
        with pytest.raises(ValueError, match=r"SparseConv2d: input has shape \(2, 4, 8, 8\); expected \(batch, 8,"):
            layer(torch.randn(2, 4, 8, 8))
        with pytest.raises(TypeError, match="SparseConv2d: input has dtype torch.bfloat16"):
            layer(torch.randn(2, 8, 8, 8).bfloat16())
        with pytest.raises(ValueError, match=r"SparseConv2d: input height 2 \(padded 2\) is smaller than the dilated"):
            layer(torch.randn(1, 8, 2, 8))


# --------------------------------------------------------------------------- GPU duplicates


@pytest.mark.gpu
@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_gpu_match_masked_dense(kw, dtype):
    lin = _linear(in_f=512, out_f=256, dtype=dtype).cuda()
    w = _masked_linear_weight(lin, **kw)
    sl = nmkern.SparseLinear.from_dense(lin, **kw).pack()
    for batch in (1, 3, 16, 100):
        x = torch.randn(batch, 512, device="cuda").to(dtype)
        ref64 = F.linear(x.double(), w.double(), lin.bias.double())
        assert_matches_torch(sl(x), ref64, F.linear(x, w, lin.bias))
    if kw["pattern"] == "nm":
        conv = nn.Conv2d(32, 64, 3, padding=1, dtype=dtype).cuda()
        sc = nmkern.SparseConv2d.from_dense(conv, **kw).pack()
        wm = sc.dense_weight()
        x = torch.randn(2, 32, 9, 9, device="cuda").to(dtype)
        with torch.no_grad():
            ref64 = F.conv2d(x.double(), wm.double(), conv.bias.double(), padding=1)
            assert_matches_torch(sc(x), ref64, F.conv2d(x, wm, conv.bias, padding=1))
