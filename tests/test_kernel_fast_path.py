"""A packed linear running nmkern's CPU kernel calls it through a bound call after its first call at a row count.

``SparseLinear._rows_call`` (bound by ``_decide``; :func:`nmkern._cpu_layout.bound_kernel`) skips the table and
the checked op implementation: ~25 us less per call on small layers. These tests pin that it gives the checked
path's results bit for bit, that NaN / Inf inputs still give the dense op's result (the kernel's own scan), and
that it steps aside for anything it does not cover (other row counts, strided or wrong inputs, autograd, changes
of the layer), so the checked path still raises its messages.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nmkern
from nmkern import _cpu, dispatch

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="nmkern CPU library not built")

PATTERNS = {"2:4": dict(n=2, m=4), "1x4": dict(pattern="1xn", block=4, sparsity=0.5)}


@pytest.fixture()
def checked_calls(monkeypatch):
    """Counts the calls that reach the checked op implementations (ops._cpu_nm_linear / _cpu_bsr_linear)."""
    monkeypatch.delenv("NMKERN_BACKEND", raising=False)
    calls = []
    impls = dispatch._cpu_impls()
    monkeypatch.setattr(dispatch, "_CPU_IMPLS", tuple((lambda *a, f=f: calls.append(1) or f(*a)) for f in impls))
    return calls


def _layer(pattern: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(64, 24).to(dtype)
    layer = nmkern.SparseLinear.from_dense(lin, **PATTERNS[pattern]).pack()
    layer.backend = "cpu"
    return layer, layer.dense_weight()


def _checked(layer, x):
    """What the checked path gives (the registered op on the layer's CPU layout)."""
    layout = layer._cpu_cached()
    t, x2d = layout.tensors, x.reshape(-1, x.shape[-1])
    if layout.kind is nmkern.Pattern.NM:
        y = torch.ops.nmkern.cpu_nm_linear(x2d, t["values"], t["index"], layout.n, layout.m, layout.in_features,
                                           layout.out_features, layer.bias)
    else:
        y = torch.ops.nmkern.cpu_bsr_linear(x2d, t["values"], t["rowptr"], t["col"], layout.block,
                                            layout.in_features, layout.out_features, layer.bias)
    return y.reshape(*x.shape[:-1], layout.out_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_later_calls_skip_the_checked_op_with_the_same_result(checked_calls, pattern, dtype):
    layer, _ = _layer(pattern, dtype)
    with torch.no_grad():
        for shape in [(2, 3, 64), (6, 64)]:  # 6 GEMM rows both: bound by the first call
            x = torch.randn(shape).to(dtype)
            assert torch.equal(layer(x), _checked(layer, x))
        assert len(checked_calls) == 1
        x1 = torch.randn(64).to(dtype)  # 1 row: decided (checked) once, then bound
        assert torch.equal(layer(x1), _checked(layer, x1)) and torch.equal(layer(x1), _checked(layer, x1))
    assert len(checked_calls) == 2 and layer(x1).shape == (24,)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_nan_and_inf_inputs_give_the_dense_result(checked_calls, pattern):
    """A NaN / Inf at a pruned input column reaches every output through dense 0 * NaN; the bound call's kernel
    scan sends the call to the checked path, which runs the dense op."""
    layer, w = _layer(pattern)
    pruned = int((w == 0).any(0).nonzero()[0])  # a column some output rows dropped
    with torch.no_grad():
        layer(torch.randn(3, 64))  # bound
        for bad in (float("nan"), float("inf"), -float("inf")):
            x = torch.randn(3, 64)
            x[1, pruned] = bad
            torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), equal_nan=True)
            assert layer(x)[1].isnan().any()
        assert len(checked_calls) == 1 + 6  # each non-finite call went the checked way


def test_it_steps_aside_for_what_it_does_not_cover(checked_calls):
    layer, w = _layer("2:4")
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)
        strided = torch.randn(64, 4).t()  # 4 rows, not contiguous
        torch.testing.assert_close(layer(strided), F.linear(strided, w, layer.bias))
        assert len(checked_calls) == 2
        with pytest.raises(TypeError, match="SparseLinear"):
            layer(x.double())
        with pytest.raises(ValueError, match="in_features=64"):
            layer(torch.randn(4, 63))
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()  # autograd: the registered op and its backward
    torch.testing.assert_close(xg.grad, w.sum(0).expand(4, 64))


def test_it_follows_bias_state_and_dtype_changes(checked_calls):
    layer, w = _layer("2:4")
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)
        layer.bias = nn.Parameter(torch.full((24,), 3.0))  # a new bias: decided afresh, bound again
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias))
        layer.bias.data = torch.full((24,), -1.0)  # new storage under the same Parameter: read per call
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias))
        for bad in (torch.zeros(24, dtype=torch.float64), torch.zeros(3)):
            layer.bias.data = bad  # under the Parameter: no __setattr__, the bound call must not read it blindly
            with pytest.raises((TypeError, ValueError), match="bias"):
                layer(x)
        layer.bias.data = torch.arange(48.0)[::2]  # strided: the checked path copies it
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias))
        layer.bias = nn.Parameter(torch.full((24,), -1.0))
        layer.to(torch.bfloat16)
        xb = x.bfloat16()
        assert torch.equal(layer(xb), _checked(layer, xb)) and layer(xb).dtype == torch.bfloat16
        layer.backend = "dense"
        torch.testing.assert_close(layer(xb), F.linear(xb, w.bfloat16(), layer.bias))


def test_both_paths_of_a_mixed_layer_are_bound(tuned, monkeypatch):
    """A layer that runs the kernel at 1 row and dense at 64 (its dense copy kept: NMKERN_DENSE_CACHE=1) binds both
    row counts: later calls skip the input checks and the path lookup, with the checked results."""
    monkeypatch.setenv("NMKERN_DENSE_CACHE", "1")
    checks = []
    real_check = nmkern.SparseLinear._check_input
    monkeypatch.setattr(nmkern.SparseLinear, "_check_input", lambda self, x: checks.append(1) or real_check(self, x))
    layer, w = _layer("2:4")
    layer.backend = "auto"
    small, large = torch.randn(1, 64), torch.randn(64, 64)
    with torch.no_grad():
        tuned.set(dense=1.0e-3, cpu=0.5e-3)
        for _ in range(40):
            layer(small)
        tuned.set(dense=0.5e-3, cpu=1.0e-3)
        for _ in range(40):
            layer(large)
        assert layer._decide(small, 1)[0] is nmkern.Backend.CPU and layer._decide(large, 64)[0] is nmkern.Backend.DENSE
        assert sorted(layer._fast_rows) == [1, 64]
        checks.clear()
        assert torch.equal(layer(small), _checked(layer, small))
        assert torch.equal(layer(large), F.linear(large, layer._dense_cache, layer.bias))
    assert checks == []
    torch.testing.assert_close(layer(large), F.linear(large, w, layer.bias))


def test_a_dropped_form_is_freed_not_kept_by_a_bound_call(tuned, monkeypatch):
    """The measurement times the kernel through its bound call, then dense wins: the layer drops the layout, and
    nothing bound keeps its memory (bench/memory_rss.py once held 1.6x the dense model's bytes that way)."""
    import gc
    import weakref

    from nmkern import _cpu_layout
    built = []
    real = _cpu_layout.layout_from_nm_packed
    monkeypatch.setattr(_cpu_layout, "layout_from_nm_packed",
                        lambda *a: built.append(weakref.ref(out := real(*a))) or out)
    layer, _ = _layer("2:4")
    layer.backend = "auto"
    tuned.set(dense=0.5e-3, cpu=1.0e-3)
    x = torch.randn(4, 64)
    with torch.no_grad():
        for _ in range(40):
            layer(x)
    assert layer._resident is nmkern.Backend.DENSE and layer._cpu_cache is None and built
    gc.collect()
    assert all(ref() is None for ref in built)
