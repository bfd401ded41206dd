"""nmkern.memory_report: the bytes each layer holds, per form, after every kind of forward (issue #14, item 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern import _cpu, dispatch


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("NMKERN_BACKEND", raising=False)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16, bias=False))


def test_a_dense_model_holds_its_weights_and_biases():
    report = nmkern.memory_report(_model())
    assert [(r["name"], r["forms"]) for r in report.rows] == [
        ("1", {"weight": 64 * 32 * 4, "bias": 64 * 4}), ("3", {"weight": 16 * 64 * 4})]
    assert report.other_bytes == 10 * 32 * 4 and report.total_bytes == (64 * 32 + 64 + 16 * 64 + 320) * 4


def test_a_packed_layer_holds_its_packed_buffers_and_a_dense_cache_only_after_a_dense_call():
    model = _model()
    nmkern.sparsify(model, "2:4", pack=True)
    packed = {"packed": 64 * 16 * 4 + 64 * 32 // 4 // 8 * 4}  # fp32 values (n/m of 2048) + 2-bit indices, 16 per word
    rows = nmkern.memory_report(model).rows
    assert rows[0]["forms"]["packed"] == model[1].packed_nbytes() and set(rows[0]["forms"]) == {"packed", "bias"}
    assert rows[1]["forms"] == {"packed": model[3].packed_nbytes()}
    assert model[1].packed_nbytes() == packed["packed"]
    model(torch.randint(0, 10, (3,)))  # small layers: the dense path, which decodes and keeps the weight
    rows = nmkern.memory_report(model).rows
    assert rows[0]["forms"] == {"packed": model[1].packed_nbytes(), "dense_cache": 64 * 32 * 4, "bias": 64 * 4}
    assert nmkern.memory_report(model).by_form()["dense_cache"] == (64 * 32 + 16 * 64) * 4


def test_the_cpu_layout_shows_where_the_cpu_kernel_may_run(monkeypatch):
    from nmkern import _cpu

    monkeypatch.setattr(_cpu, "cpu_beats_dense", lambda *a, **kw: a[5] <= 4)
    layer = nmkern.SparseLinear(64, 32).pack()  # pack() prepares the layouts of the paths the layer may take
    forms = nmkern.memory_report(nn.Sequential(layer)).rows[0]["forms"]
    layout = layer._cpu_cache
    assert layout is not None and forms["cpu_layout"] == layout.nbytes and "dense_cache" not in forms


def test_training_forms_and_shared_weights_are_counted_once():
    lin = nn.Linear(32, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # one module used twice
    assert len(nmkern.memory_report(model).rows) == 1
    sl = nmkern.SparseLinear(32, 8, pattern="1xn", block=4, sparsity=0.5)
    forms = nmkern.memory_report(nn.Sequential(sl)).rows[0]["forms"]
    assert forms == {"weight": 32 * 8 * 4, "weight_mask": 32 * 8, "bias": 8 * 4}
    text = str(nmkern.memory_report(nn.Sequential(sl)))
    assert "weight_mask" in text and text.splitlines()[-1].startswith("total")
    with pytest.raises(TypeError, match="memory_report: model must be an nn.Module, got list"):
        nmkern.memory_report([sl])


@pytest.mark.skipif(not _cpu.available(), reason="nmkern CPU library not built")
@pytest.mark.parametrize("pattern", [dict(n=2, m=4), dict(pattern="1xn", block=4, sparsity=0.75)], ids=["2:4", "1x4"])
def test_eager_cpu_calls_skip_the_registered_op_unless_autograd_needs_it(monkeypatch, pattern):
    """The registered op's first call imports torch._dynamo (+150 MB); eager calls without autograd call its
    implementation directly, with the same result; autograd and traces keep the op."""
    torch.manual_seed(0)
    layer = nmkern.SparseLinear.from_dense(nn.Linear(64, 32), **pattern).pack()
    layer.backend = "cpu"
    direct = []
    impls = dispatch._cpu_impls()
    monkeypatch.setattr(dispatch, "_CPU_IMPLS", tuple(
        (lambda *a, f=f: direct.append(1) or f(*a)) for f in impls))
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)
    assert direct == [1]
    assert torch.equal(y, torch.ops.nmkern.cpu_nm_linear(x, *_cpu_args(layer)) if "n" in pattern else
                       torch.ops.nmkern.cpu_bsr_linear(x, *_cpu_args(layer)))
    xg = x.clone().requires_grad_()
    yg = layer(xg)  # autograd through the input: the registered op, with its backward
    yg.sum().backward()
    assert direct == [1] and torch.equal(yg.detach(), y) and xg.grad is not None


def _cpu_args(layer) -> tuple:
    packed = layer._cpu_cached()
    t = packed.tensors
    if packed.kind is nmkern.Pattern.NM:
        return (t["values"], t["index"], packed.n, packed.m, packed.in_features, packed.out_features, layer.bias)
    return (t["values"], t["rowptr"], t["col"], packed.block, packed.in_features, packed.out_features, layer.bias)


def test_packing_hands_its_temporaries_back_to_the_os(monkeypatch):
    from nmkern import memory

    trims = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: (lambda pad: trims.append(pad)))
    layer = nmkern.SparseLinear(64, 32).pack()
    assert trims == [0]
    layer(torch.randn(2, 64))  # the dense path decodes (and keeps) the weight once: its temporaries go too
    layer(torch.randn(2, 64))
    assert trims == [0, 0]
