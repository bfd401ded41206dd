"""One resident weight form per packed layer (nmkern.nn._forms; issue #14, item 6).

Measuring on (the ``tuned`` fixture's fake timer decides which path wins), each packed layer on the CPU
keeps the CPU layout, or the dense weight, and the packed values only where no kernel layout stands in for
them. The tests count what each layer holds after forwards on every path, and check that what was left
out comes back exactly: ``state_dict``, pickling, ``.to()``, ``load_state_dict``, ``layer.packed_values``.
The layout decoder (``nmkern._cpu_layout.decode_rows``) is checked against the dense weight.
"""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nmkern
from nmkern import _cpu, _cpu_layout, tuning
from nmkern.backend import Backend
from nmkern.dispatch import Call
from nmkern.functional import block_mask_1xn, nm_mask, pack_nm, to_bsr_1xn
from nmkern.nn._forms import keep_dense_cache
from nmkern.reference.nm_pack import pack_words, unpack_words

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="nmkern CPU library not built")

PATTERNS = {"2:4": {"pattern": "nm", "n": 2, "m": 4}, "1x4": {"pattern": "1xn", "block": 4, "sparsity": 0.5}}


def _linear(pattern: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    dense = nn.Linear(64, 40).to(dtype)
    return nmkern.SparseLinear.from_dense(dense, **PATTERNS[pattern]).pack(), dense


def _conv(pattern: str, seed: int = 1):
    torch.manual_seed(seed)
    dense = nn.Conv2d(8, 8, 3, padding=1)
    return nmkern.SparseConv2d.from_dense(dense, **PATTERNS[pattern]).pack(), dense


def _decide(layer, x, calls: int = 64) -> Backend:
    """Call ``layer(x)`` until its key is decided; the path it then takes."""
    key = tuning.key_of(Call(layer._layer_info(), "cpu", layer._gemm_rows(x)))
    cache = tuning.dispatch_cache("cpu")
    with torch.no_grad():
        for _ in range(calls):
            if cache.get(key) is not None:
                break
            layer(x)
        layer(x)  # the call after the decision: remembered, forms settled
    return layer._decide(x, layer._gemm_rows(x))[0]


def _forms(layer) -> dict:
    return nmkern.memory_report(nn.Sequential(layer)).rows[0]["forms"]


def _tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _assert_same_state(a: dict, b: dict) -> None:
    a, b = _tensors(a), _tensors(b)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _x(layer, rows: int) -> torch.Tensor:
    return torch.randn(rows, 64) if isinstance(layer, nmkern.SparseLinear) else torch.randn(rows, 8, 5, 5)


def _rows_x(layer, gemm_rows: int) -> torch.Tensor:
    """An input of ``gemm_rows`` GEMM rows (a conv's are batch * 25 output pixels here)."""
    return _x(layer, gemm_rows if isinstance(layer, nmkern.SparseLinear) else max(1, gemm_rows // 25))


def _settled(tuned, make, pattern: str, winner: Backend):
    """(layer, its state before, an input, the forms it holds) once ``winner`` won its measurement at 2 rows."""
    layer, _ = make(pattern)
    state = copy.deepcopy(layer.state_dict())
    tuned.set(**({"dense": 1.0, "cpu": 0.5} if winner is Backend.CPU else {"dense": 0.5, "cpu": 1.0}))
    x = _x(layer, 2)
    assert _decide(layer, x) is winner
    return layer, state, x, _forms(layer)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_cpu_winner_holds_only_the_cpu_layout(tuned, make, pattern):
    layer, state, x, forms = _settled(tuned, make, pattern, winner=Backend.CPU)
    assert "dense_cache" not in forms and "cpu_layout" in forms, forms
    if pattern == "2:4":  # the values and the 2-bit indices live in the layout
        assert layer._buffers["packed_values"] is None and layer._buffers["packed_indices"] is None
        assert "packed" not in forms and torch.equal(layer.packed_indices, state["packed_indices"])
    elif make is _conv:  # a conv's BSR columns run in NCHW order, the layout's in NHWC: the values are left out
        assert layer._buffers["bsr_values"] is None
    else:  # the layout shares the BSR values and row pointers; only narrowed column indices are its own
        assert layer._cpu_cache.tensors["values"].data_ptr() == layer.bsr_values.data_ptr()
        assert forms["cpu_layout"] == layer.bsr_col.numel() * 2
    _assert_same_state(layer.state_dict(), state)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _plain(layer)(x))


def _plain(layer):
    from nmkern.methods.recipes import to_plain

    return to_plain(nn.Sequential(layer))[0]


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_dense_winner_holds_only_the_dense_weight(tuned, make, pattern):
    layer, state, x, forms = _settled(tuned, make, pattern, winner=Backend.DENSE)
    values = "packed_values" if pattern == "2:4" else "bsr_values"
    assert layer._buffers[values] is None and "cpu_layout" not in forms and "dense_cache" in forms, forms
    assert forms["dense_cache"] == layer.dense_weight().numel() * 4
    _assert_same_state(layer.state_dict(), state)  # the values gathered back from the dense weight, exactly
    assert torch.equal(getattr(layer, values), state[values])


def test_a_measured_dense_layer_drops_the_layout_the_static_rules_built(tuned, monkeypatch):
    """The static rules sent small batches to the kernel (the layout was built at pack); measured, dense won: the
    layer keeps the dense weight only, decodes nothing, and traces at row counts not measured yet run dense."""
    monkeypatch.setattr(_cpu, "cpu_beats_dense", lambda *a, **kw: True)
    layer, _ = _linear("2:4")
    assert layer._cpu_cache is not None and layer._buffers["packed_values"] is None  # the layout, at pack
    tuned.set(dense=0.5, cpu=1.0)
    x = _x(layer, 2)
    assert _decide(layer, x) is Backend.DENSE
    forms = _forms(layer)
    assert "cpu_layout" not in forms and "dense_cache" in forms and not layer._decoded_dense, forms
    assert layer._traced_path(_x(layer, 64), 64) is Backend.DENSE
    with torch.no_grad():
        assert torch.equal(layer(x), _plain(layer)(x))


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_mixed_winners_keep_the_layout_and_decode_for_dense_calls(tuned, make, pattern, monkeypatch):
    layer, _ = make(pattern)
    plain = _plain(layer)
    small, large = _rows_x(layer, 1), _rows_x(layer, 256)
    tuned.set(dense=1.0, cpu=0.5)
    assert _decide(layer, small) is Backend.CPU
    tuned.set(dense=0.5, cpu=1.0)
    assert _decide(layer, large) is Backend.DENSE
    forms = _forms(layer)
    assert "dense_cache" not in forms and "cpu_layout" in forms and layer._decoded_dense, forms
    with torch.no_grad():
        assert torch.equal(layer(large), plain(large))  # the decoded weight is the dense weight, bit for bit
        torch.testing.assert_close(layer(small), plain(small))
    assert "dense_cache" not in _forms(layer)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
@pytest.mark.parametrize("small_cpu, large_cpu, decode, form", [
    (0.9, 3.0, 2.0, Backend.DENSE), (0.5, 1.1, 0.2, Backend.DENSE), (0.74, 1.2, 0.02, Backend.CPU)],
    ids=["narrow-win-big-loss", "big-win-loss-beyond-the-margin", "loss-within-the-margin"])
def test_a_kernel_win_is_weighed_against_its_losses(tuned, make, monkeypatch, small_cpu, large_cpu, decode, form):
    """The kernel wins at 1 row and loses at 256 (dense 1.0 ms at both). Kernel 0.9 and 3.0 ms, decode 2.0 ms: the
    256-row call costs 3.0 either way: the dense weight, and the 1-row calls run dense too. Kernel 0.5 and 1.1 ms,
    decode 0.2: the geometric mean (0.74) gains, but the 256-row call would cost 1.1x dense (SmolLM2's 2:4 layers
    that won at the 64-row prefill and held the layout ran every one-row decode step at a loss): the dense weight.
    Kernel 0.74 and 1.2 ms, decode 0.02 ms: the 256-row call decodes (1.02, within the margin): the layout."""
    from nmkern.nn._forms import _ResidentForms
    monkeypatch.setattr(_ResidentForms, "_decode_ms", lambda self: decode)
    layer, _ = make("2:4")
    plain = _plain(layer)
    small, large = _rows_x(layer, 1), _rows_x(layer, 256)
    tuned.set(dense=1.0e-3, cpu=small_cpu * 1e-3)
    assert _decide(layer, small) is Backend.CPU  # the only row count met so far: the kernel's layout
    tuned.set(dense=1.0e-3, cpu=large_cpu * 1e-3)
    _decide(layer, large)
    assert layer._resident is form
    forms = _forms(layer)
    if form is Backend.DENSE:
        assert layer._decide(small, layer._gemm_rows(small))[0] is Backend.DENSE  # its kernel win is not taken
        assert "cpu_layout" not in forms and "dense_cache" in forms and not layer._decoded_dense, forms
    else:
        assert "cpu_layout" in forms and "dense_cache" not in forms and layer._decoded_dense, forms
    with torch.no_grad():
        torch.testing.assert_close(layer(large), plain(large))
        torch.testing.assert_close(layer(small), plain(small))
    assert _forms(layer) == forms  # no form built again by the calls


def test_tune_reports_the_paths_taken_after_every_input(tuned, monkeypatch):
    """tune() collects the paths after all its inputs: dense wins at 1 row (tuned first), the kernel at 256 rows, so
    the layer ends up holding the layout, and its 1-row calls then run the kernel (1.02 ms, within the margin of
    dense's 1.0, against dense plus a 2.0 ms decode): the report says so, not what the 1-row calls ran before the
    256-row input was tuned."""
    from nmkern.nn._forms import _ResidentForms
    monkeypatch.setattr(_ResidentForms, "_decode_ms", lambda self: 2.0)
    layer, _ = _linear("2:4")
    small, large = torch.randn(1, 64), torch.randn(256, 64)
    tuned.set(dense=1.0e-3, cpu=1.02e-3)
    with torch.no_grad():
        nmkern.tune(nn.Sequential(layer), small)  # dense's 1-row win recorded first
        assert layer._resident is Backend.DENSE
        tuned.set(dense=1.0e-3, cpu=0.5e-3)
        report = nmkern.tune(nn.Sequential(layer), [small, large])
    assert {r["rows"]: r["path"] for r in report.rows} == {1: "cpu", 256: "cpu"}
    assert layer._resident is Backend.CPU and layer._decoded_dense


def test_a_kernel_win_recorded_by_another_layer_does_not_decide_this_ones_form(tuned):
    """Two layers of one shape: the first meets 1 row, where the kernel wins; the second meets only 64 rows, where
    dense wins. The second holds the dense weight only (MiniLM-L6's pooler and its attention layers: the recorded
    1-row win once kept every 384x384 layer on the kernel's layout, 1.63x dense at 1 sentence)."""
    torch.manual_seed(6)
    first, second = (nmkern.SparseLinear.from_dense(nn.Linear(64, 64), n=2, m=4).pack() for _ in range(2))
    tuned.set(dense=1.0e-3, cpu=0.5e-3)
    assert _decide(first, torch.randn(1, 64)) is Backend.CPU
    tuned.set(dense=0.5e-3, cpu=1.0e-3)
    assert _decide(second, torch.randn(64, 64)) is Backend.DENSE
    assert second._resident is Backend.DENSE and "cpu_layout" not in _forms(second)
    assert first._resident is Backend.CPU and "dense_cache" not in _forms(first)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("bias", [True, False])
def test_dense_calls_of_a_mixed_linear_decode_block_by_block(tuned, pattern, bias, monkeypatch):
    """A layout bigger than one block: each dense call decodes 8 (N:M tile) / 4 (1xN block) output rows at a
    time into a buffer of that size, never the whole weight."""
    from nmkern.nn import _forms
    torch.manual_seed(5)
    dense = nn.Linear(64, 40, bias=bias)
    layer = nmkern.SparseLinear.from_dense(dense, **PATTERNS[pattern]).pack()
    plain = _plain(layer)
    monkeypatch.setattr(_forms, "DECODE_BLOCK_BYTES", 64 * 4 * 6)  # 6 rows of 64 fp32: rounded down to 4
    monkeypatch.setattr(_forms, "_scratch", threading.local())
    tuned.set(dense=1.0, cpu=0.5)
    _decide(layer, torch.randn(1, 64))
    tuned.set(dense=0.5, cpu=1.0)
    x = torch.randn(3, 256, 64)
    assert _decide(layer, x) is Backend.DENSE and layer._decoded_dense
    assert layer._decode_block_rows() == (8 if pattern == "2:4" else 4)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, plain(x), rtol=1.3e-6, atol=1e-5)  # fp32 GEMMs of different shapes
    assert y.shape == (3, 256, 40) and y.is_contiguous()
    assert [b.numel() for b in _forms._scratch.by_dtype.values()] == [layer._decode_block_rows() * 64]
    x.requires_grad_()  # autograd keeps the whole weight: decoded in one piece, into a tensor of its own
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, plain.weight.sum(0).expand(3, 256, 64), rtol=1e-5, atol=1e-5)


def test_gradients_through_decoded_layers_use_their_own_weights(tuned):
    """Two mixed layers share the decode buffer; autograd keeps each one's weight for the input's gradient."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    nmkern.sparsify(model, "2:4", pack=True)
    plain = _plain(model)
    small, large = torch.randn(1, 64), torch.randn(256, 64)
    tuned.set(dense=1.0, cpu=0.5)
    for layer in model:
        _decide(layer, small)
    tuned.set(dense=0.5, cpu=1.0)
    _decide(model[0], large)
    _decide(model[1], large)
    assert model[0]._decoded_dense and model[1]._decoded_dense
    x, xp = large.clone().requires_grad_(), large.clone().requires_grad_()
    model(x).square().sum().backward()
    plain(xp).square().sum().backward()
    torch.testing.assert_close(x.grad, xp.grad)


def test_tuning_one_batch_size_after_another_keeps_every_weight(tuned):
    """tune() forgets each layer's remembered paths between passes: the residency reads the recorded winners too,
    so a layer that went dense at 64 rows and then to the kernel at 1 row (possibly without running the kernel
    itself: eight layers pool one measurement) never drops the form its values come back from."""
    torch.manual_seed(4)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    nmkern.sparsify(model, "2:4", pack=True)
    plain = _plain(model)
    state = copy.deepcopy(model.state_dict())
    large, small = torch.randn(64, 64), torch.randn(1, 64)
    tuned.set(dense=0.5, cpu=1.0)
    with torch.no_grad():
        nmkern.tune(model, large)
        assert all(layer._resident is Backend.DENSE for layer in model)
        tuned.set(dense=1.0, cpu=0.5)
        report = nmkern.tune(model, small)
    assert {r["path"] for r in report.rows} == {"cpu"}
    for layer in model:
        forms = _forms(layer)
        assert "cpu_layout" in forms and "dense_cache" not in forms and layer._decoded_dense, forms
    _assert_same_state(model.state_dict(), state)
    with torch.no_grad():
        assert torch.equal(model(large), plain(large))
        torch.testing.assert_close(model(small), plain(small))


def test_nmkern_dense_cache_keeps_a_dense_copy_beside_the_layout(tuned, monkeypatch):
    monkeypatch.setenv("NMKERN_DENSE_CACHE", "1")
    layer, _ = _linear("2:4")
    tuned.set(dense=1.0, cpu=0.5)
    _decide(layer, _x(layer, 1))
    tuned.set(dense=0.5, cpu=1.0)
    _decide(layer, _x(layer, 256))
    forms = _forms(layer)
    assert "dense_cache" in forms and "cpu_layout" in forms and not layer._decoded_dense
    monkeypatch.setenv("NMKERN_DENSE_CACHE", "sometimes")
    with pytest.raises(ValueError, match=r"NMKERN_DENSE_CACHE='sometimes': use 1 .* or 0"):
        keep_dense_cache()


def test_what_was_left_out_comes_back_through_every_door(tuned, tmp_path):
    layer, _ = _linear("2:4")
    state = copy.deepcopy(layer.state_dict())
    # row 0, group 0 keeps positions (1, 3) holding (v, 0): a kept zero after a value, which a layout re-chosen
    # from the dense rows would store as positions (0, 1) holding (0, v)
    slots = state["packed_values"].shape[1]
    positions = unpack_words(state["packed_indices"], 4, slots)
    positions[0, :2] = torch.tensor([1, 3])
    state["packed_indices"] = pack_words(positions, 4)
    state["packed_values"][0, 1] = 0.0
    layer.load_state_dict(state)
    w = layer.dense_weight()
    tuned.set(dense=1.0, cpu=0.5)
    x = _x(layer, 3)
    _decide(layer, x)
    assert layer._buffers["packed_values"] is None and layer._buffers["packed_indices"] is None
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(layer.packed_values, state["packed_values"])
    assert torch.equal(layer.packed_indices, state["packed_indices"])
    assert torch.equal(layer.dense_weight(), w)
    buf = io.BytesIO()
    torch.save(layer, buf)  # pickling
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    _assert_same_state(again.state_dict(), state)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        assert torch.equal(twin(x), y) and torch.equal(again(x), y)
    other = nmkern.SparseLinear(64, 40).pack()
    other.load_state_dict(layer.state_dict())  # a packed state into a packed layer
    with torch.no_grad():
        assert torch.equal(other(x), y)
    layer.load_state_dict(state)  # into the layer whose values are out
    _assert_same_state(layer.state_dict(), state)
    half = copy.deepcopy(layer).to(torch.bfloat16)  # .to(): the values are held again, then converted
    assert torch.equal(half.packed_values, state["packed_values"].to(torch.bfloat16))
    nmkern.save(nn.Sequential(layer), tmp_path / "layer.safetensors")
    loaded = nmkern.load(tmp_path / "layer.safetensors", nn.Sequential(nn.Linear(64, 40)))
    _assert_same_state(loaded[0].state_dict(), state)


def test_indices_with_bits_the_layout_does_not_carry_stay_held(tuned):
    torch.manual_seed(4)
    layer = nmkern.SparseLinear.from_dense(nn.Linear(40, 16), pattern="nm", n=2, m=4).pack()
    with torch.no_grad():  # written in place (load_state_dict refuses set padding bits)
        layer.packed_indices[:, -1] |= 1 << 30  # slot 31 of a 20-slot row (16 per word): an unused field
    state = copy.deepcopy(layer.state_dict())
    tuned.set(dense=1.0, cpu=0.5)
    x = torch.randn(2, 40)
    _decide(layer, x)
    assert layer._buffers["packed_values"] is None and layer._buffers["packed_indices"] is not None
    _assert_same_state(layer.state_dict(), state)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _plain(layer)(x))


def test_without_measuring_the_packed_buffers_stay(monkeypatch):
    monkeypatch.setenv("NMKERN_TUNE", "0")
    monkeypatch.setattr(_cpu, "cpu_beats_dense", lambda *a, **kw: True)
    layer, _ = _linear("2:4")
    forms = _forms(layer)
    assert layer._buffers["packed_values"] is not None and "cpu_layout" in forms


def test_fp64_layers_keep_their_packed_values(tuned):
    layer, _ = _linear("2:4", dtype=torch.float64)
    tuned.set(dense=0.5, cpu=1.0)
    _decide(layer, torch.randn(2, 64, dtype=torch.float64))
    assert layer._buffers["packed_values"] is not None


def test_a_trace_runs_the_cpu_kernel_where_a_mixed_layer_decodes(tuned):
    layer, _ = _linear("2:4")
    tuned.set(dense=1.0, cpu=0.5)
    _decide(layer, _x(layer, 1))
    tuned.set(dense=0.5, cpu=1.0)
    large = _x(layer, 256)
    _decide(layer, large)
    assert layer._decoded_dense and layer._traced_path(large, 256) is Backend.CPU
    with torch.no_grad():
        eager = layer(large)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(large), eager)


# ---------------------------------------------------------------- the layout decoder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,n,m", [((13, 16), 2, 4), ((64, 48), 1, 4), ((9, 32), 3, 8), ((8, 32), 4, 16)])
def test_nm_layout_from_packed_round_trips_and_decodes(dtype, shape, n, m):
    torch.manual_seed(0)
    w = torch.randn(shape).to(dtype)
    w = w * nm_mask(w.float(), n, m, dim=1)
    w[0, :m] = 0  # kept zeros
    packed = pack_nm(w, n, m, dim=1)
    layout = _cpu_layout.layout_from_nm_packed(packed.values, packed.indices, n, m, shape[1])
    assert torch.equal(_cpu_layout.nm_values_from_layout(layout), packed.values)
    assert torch.equal(_cpu_layout.nm_indices_from_layout(layout), packed.indices)
    assert torch.equal(_cpu_layout.decode_rows(layout, 0, shape[0]), w)
    if shape[0] > 8:
        assert torch.equal(_cpu_layout.decode_rows(layout, 8, shape[0]), w[8:])
    x = torch.randn(3, shape[1]).to(dtype)
    assert torch.equal(layout(x), _cpu.prepare_cpu_linear(w, "nm", n, m)(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bsr_layout_shares_the_buffers_and_decodes(dtype):
    torch.manual_seed(0)
    w = torch.randn(32, 40).to(dtype)
    w = w * block_mask_1xn(w.float(), 4, 0.5)
    bsr = to_bsr_1xn(w, 4)
    values = bsr.values().reshape(-1, 4).contiguous()
    layout = _cpu_layout.layout_from_bsr(bsr.crow_indices().int(), bsr.col_indices().int(), values, 32, 40, 4)
    assert layout.tensors["values"] is values and layout.tensors["col"].dtype == torch.uint16
    assert torch.equal(_cpu_layout.decode_rows(layout, 0, 32), w)
    assert torch.equal(_cpu_layout.decode_rows(layout, 8, 16), w[8:16])
    out = torch.full((200 * 40,), float("nan"), dtype=dtype)  # a bigger reused buffer: every element written
    assert torch.equal(_cpu_layout.decode_rows(layout, 0, 32, out=out), w)


def test_decode_rows_refuses_bad_ranges_and_buffers():
    w = torch.randn(16, 8)
    layout = _cpu.prepare_cpu_linear(w * nm_mask(w, 2, 4, dim=1), "nm", 2, 4)
    for r0, r1 in ((4, 16), (0, 17), (8, 8), (-8, 8)):
        with pytest.raises(ValueError, match=r"decode_rows: rows \[.*\) of a 16-row nm layout: need 0 <= row0 < row1 "
                                             r"<= 16, row0 a multiple of 8"):
            _cpu_layout.decode_rows(layout, r0, r1)
    with pytest.raises(ValueError, match=r"out must be a contiguous CPU torch.float32 tensor of at least 128"):
        _cpu_layout.decode_rows(layout, 0, 16, out=torch.empty(100))
    with pytest.raises(ValueError, match=r"out must be .* got torch.float16"):
        _cpu_layout.decode_rows(layout, 0, 16, out=torch.empty(128, dtype=torch.float16))
    blocks = _cpu.prepare_cpu_linear(w * block_mask_1xn(w, 4, 0.5), "1xn", block=4)
    with pytest.raises(ValueError, match=r"row0 a multiple of 4 and row1 too"):
        _cpu_layout.decode_rows(blocks, 0, 6)
