"""A packed layer that its plan keeps dense at every row count calls the dense op directly (issue #14, item 1).

The bound op is what the per-call lookup would run (F.linear / F.conv2d on the cached dense weight), minus
the lookup: no validation, no dispatch, no extra Python frame per call. These tests pin that it is bound
only where the plan is dense everywhere, gives the same results, follows every change of the layer
(bias, state, dtype, backend), and stays out of copies and traces; tests/test_modules.py's
test_linear_input_errors checks that a bound layer still raises the module's messages.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nmkern
from nmkern import dispatch
from nmkern.nn import _exec, _layer
from nmkern.reference import apply_nm_ref


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("NMKERN_BACKEND", raising=False)


def _packed_linear(seed: int = 0, in_f: int = 32, out_f: int = 16) -> tuple[nmkern.SparseLinear, torch.Tensor, nn.Linear]:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    return nmkern.SparseLinear.from_dense(lin).pack(), apply_nm_ref(lin.weight.detach(), 2, 4), lin


def _dense_everywhere(layer) -> bool:
    plan = layer._plan_cache
    return plan is not None and len(plan[1]) == 1 and plan[1][0][1] is nmkern.Backend.DENSE


def test_bound_after_the_first_call_and_no_lookup_after_it(monkeypatch):
    sl, w, lin = _packed_linear()
    assert _dense_everywhere(sl) and sl._fast_dense is None
    x = torch.randn(3, 32)
    assert torch.equal(sl(x), F.linear(x, w, lin.bias))
    assert sl._fast_dense is not None
    looked_up = []
    monkeypatch.setattr(_layer._SparseLayer, "_decide", lambda *a: looked_up.append(a) or pytest.fail("looked up"))
    for shape in ((1, 32), (7, 32), (2, 5, 32), (0, 32)):
        x = torch.randn(shape)
        assert torch.equal(sl(x), F.linear(x, w, lin.bias)), shape
    assert looked_up == []


def test_a_conv_binds_too_and_keeps_unbatched_inputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1, stride=2)
    sc = nmkern.SparseConv2d.from_dense(conv).pack()
    # in the layer's (canonical) strides: apply_nm_ref gives channels-last ones, for which oneDNN picks another
    # conv algorithm on some CPUs (AMD EPYC, AVX2: 1.5e-7 apart)
    w = apply_nm_ref(conv.weight.detach(), 2, 4, dim=1).clone(memory_format=torch.contiguous_format)
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(sc(x), F.conv2d(x, w, conv.bias, 2, 1))
    assert sc._fast_dense is not None
    torch.testing.assert_close(sc(x[0]), F.conv2d(x[0].unsqueeze(0), w, conv.bias, 2, 1)[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"SparseConv2d: input has shape \(2, 6, 9, 9\); expected \(batch, 8, H, W\)"):
        sc(torch.randn(2, 6, 9, 9))


def test_not_bound_where_a_sparse_path_may_run(monkeypatch):
    sl, w, lin = _packed_linear()
    sl.backend = "reference"  # forced: every call runs the reference kernel
    x = torch.randn(3, 32)
    torch.testing.assert_close(sl(x), F.linear(x, w, lin.bias))
    assert sl._fast_dense is None and not _dense_everywhere(sl)
    # auto, where the CPU kernel wins at <= 4 rows: two ranges in the plan, so every call looks up its path
    fake = type("Fake", (), {"cpu_beats_dense": staticmethod(lambda *a, **kw: a[5] <= 4),
                             "prepare_cpu_linear": staticmethod(lambda w, *a: w)})
    monkeypatch.setattr(dispatch, "cpu_kernels", lambda: fake)
    monkeypatch.setattr(dispatch, "_cpu_rows", lambda layer, x2d: F.linear(x2d, layer._cpu_cached()))
    auto, w, lin = _packed_linear(seed=1)
    x8 = torch.randn(8, 32)
    assert torch.equal(auto(x8), F.linear(x8, w, lin.bias))
    assert auto._fast_dense is None and len(auto._plan_cache[1]) == 2


def test_the_bound_op_follows_bias_state_dtype_and_backend_changes():
    sl, w, lin = _packed_linear()
    x = torch.randn(4, 32)
    sl(x)
    sl.bias = nn.Parameter(torch.ones(16))
    assert torch.equal(sl(x), F.linear(x, w, torch.ones(16)))
    other, w2, lin2 = _packed_linear(seed=3)
    sl(x)
    sl.load_state_dict(other.state_dict())
    assert torch.equal(sl(x), F.linear(x, w2, lin2.bias))
    sl.double()
    assert torch.equal(sl(x.double()), F.linear(x.double(), w2.double(), lin2.bias.double()))
    sl.backend = "reference"
    assert sl._fast_dense is None
    torch.testing.assert_close(sl(x.double()), F.linear(x.double(), w2.double(), lin2.bias.double()))


def test_copies_do_not_share_the_bound_op():
    sl, w, lin = _packed_linear()
    x = torch.randn(4, 32)
    sl(x)
    twin = copy.deepcopy(sl)
    loaded = pickle.loads(pickle.dumps(sl))
    assert twin._fast_dense is None and loaded._fast_dense is None
    other, w2, lin2 = _packed_linear(seed=5)
    twin.load_state_dict(other.state_dict())
    assert torch.equal(twin(x), F.linear(x, w2, lin2.bias))
    assert torch.equal(sl(x), F.linear(x, w, lin.bias)) and torch.equal(loaded(x), sl(x))


def test_traces_take_the_planned_path_not_the_bound_op(monkeypatch):
    sl, w, lin = _packed_linear()
    x = torch.randn(4, 32)
    sl(x)
    decided = []
    real = _layer._SparseLayer._decide
    monkeypatch.setattr(_layer._SparseLayer, "_decide", lambda self, *a: decided.append(a[1]) or real(self, *a))
    monkeypatch.setattr(_exec, "_is_compiling", lambda: True)  # what a trace (torch.compile, ONNX export) sees
    assert torch.equal(sl(x), F.linear(x, w, lin.bias))
    assert decided == [4]
