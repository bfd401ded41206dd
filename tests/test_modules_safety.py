"""Reliability of sparse modules in real models (issue #12): shared and tied layers, PyTorch's fused
transformer paths, corrupted / plain / meta states, and torch.compile over changing batch sizes."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nmkern
from nmkern import dispatch
from nmkern.reference import apply_nm_ref, block_mask_1xn_ref

# --------------------------------------------------------------------------- shared modules and tied weights


@pytest.mark.parametrize("pack", [False, True])
def test_shared_module_is_swapped_at_every_name(pack):
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    w = apply_nm_ref(lin.weight.detach(), 2, 4, dim=1)
    b = lin.bias.detach().clone()
    model = nn.Sequential(lin, nn.ReLU(), lin)
    report = nmkern.sparsify(model, "2:4", pack=pack)
    assert [name for name, _ in report.swapped] == ["0", "2"] and not report.skipped
    assert "the same module as '0'" in report.swapped[1][1]
    assert isinstance(model[2], nmkern.SparseLinear) and model[0] is model[2]
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = F.linear(torch.relu(F.linear(x, w, b)), w, b)  # the sparse layer applied twice
        torch.testing.assert_close(model(x), expected)


def test_shared_module_given_two_patterns_is_refused():
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match=r"'0', '2' are one shared module.*'0': 2:4, '2': 1:4"):
        nmkern.sparsify(model, {"0": "2:4", "2": "1:4"})
    with pytest.raises(ValueError, match="one shared module"):
        nmkern.sparsify(model, {"0": "2:4", "2": None})
    assert model[0] is lin and model[2] is lin  # refused before anything was swapped
    # a name the scheme does not mention follows the one it does (they are one module)
    report = nmkern.sparsify(model, {"0": "2:4"})
    assert [name for name, _ in report.swapped] == ["0", "2"] and model[0] is model[2]


def _tied_model():
    torch.manual_seed(1)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight
    return nn.Sequential(a, nn.ReLU(), b)


def test_tied_weights_stay_tied_through_an_optimiser_step():
    model = _tied_model()
    original = model[0].weight
    nmkern.sparsify(model, "2:4")
    assert model[0].weight is model[2].weight is original  # the model's own Parameter, shared by both
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16)
    model(x).square().sum().backward()
    opt.step()
    assert model[0].weight is model[2].weight
    assert torch.equal(model[0].mask(), model[2].mask())  # one weight, one mask rule
    w = apply_nm_ref(model[0].weight.detach(), 2, 4, dim=1)
    with torch.no_grad():
        expected = F.linear(torch.relu(F.linear(x, w, model[0].bias)), w, model[2].bias)
        torch.testing.assert_close(model(x), expected)


def test_tied_weights_given_two_patterns_are_refused():
    model = _tied_model()
    with pytest.raises(ValueError, match=r"'0' and '2' share one weight Parameter.*2:4 and 1:4.*'2': None"):
        nmkern.sparsify(model, {"0": "2:4", "2": "1:4"})
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    nmkern.sparsify(model, {"0": "2:4", "2": None})  # the fix the message names: one of them dense
    assert model[0].weight is model[2].weight


# --------------------------------------------------------------------------- PyTorch's fused transformer paths

D, HEADS, FF = 16, 2, 32


def _transformer(kind: str, batch_first: bool) -> nn.Module:
    torch.manual_seed(2)
    if kind == "encoder":
        return nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=batch_first)
    if kind == "decoder":
        return nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, batch_first=batch_first)
    return nn.MultiheadAttention(D, HEADS, batch_first=batch_first)


def _call(kind: str, module: nn.Module, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    if kind == "encoder":
        return module(x)
    if kind == "decoder":
        return module(x, memory)
    return module(x, x, x, need_weights=False)[0]


def _reference(kind, dense, x, memory):
    """The dense module with linear1 / linear2 masked by hand, run on torch's modular path only."""
    ref = copy.deepcopy(dense).eval()
    with torch.no_grad():
        for name in ("linear1", "linear2"):
            if hasattr(ref, name):
                getattr(ref, name).weight.copy_(apply_nm_ref(getattr(ref, name).weight, 2, 4, dim=1))
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return _call(kind, ref, x, memory)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@pytest.mark.parametrize("kind", ["encoder", "decoder", "mha"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("pack", [False, True])
def test_transformer_modules_give_the_masked_result_in_every_mode(kind, batch_first, pack):
    dense = _transformer(kind, batch_first)
    model = copy.deepcopy(dense)
    report = nmkern.sparsify(model, "2:4", pack=pack)
    skipped = dict(report.skipped)
    attn = "" if kind == "mha" else "self_attn."
    assert "reads out_proj.weight directly" in skipped[attn + "out_proj"]
    assert "raw Parameter of MultiheadAttention" in skipped[attn + "in_proj_weight"]
    assert [n for n, _ in report.swapped] == ([] if kind == "mha" else ["linear1", "linear2"])
    shape = (3, 5, D) if batch_first else (5, 3, D)
    x, memory = torch.randn(shape), torch.randn(shape)
    expected = _reference(kind, dense, x, memory)
    if kind != "mha":  # the masks matter: the dense output is far from the masked one
        with torch.no_grad():
            assert not torch.allclose(_call(kind, dense.eval(), x, memory), expected, atol=1e-3)
    for training, grad in itertools.product([False, True], [False, True]):
        model.train(training)
        with torch.set_grad_enabled(grad):
            out = _call(kind, model, x, memory)
        torch.testing.assert_close(out, expected, msg=lambda m: f"train={training} grad={grad}: {m}")


@pytest.mark.parametrize("pack", [False, True])
def test_transformer_encoder_with_padding_mask_keeps_off_the_nested_path(pack):
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
    dense = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    model = copy.deepcopy(dense)
    nmkern.sparsify(model, "2:4", pack=pack)
    assert not model.use_nested_tensor
    x = torch.randn(3, 5, D)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    ref = copy.deepcopy(dense).eval()
    with torch.no_grad():
        for mod in ref.layers:
            for lin in (mod.linear1, mod.linear2):
                lin.weight.copy_(apply_nm_ref(lin.weight, 2, 4, dim=1))
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            expected = ref(x, src_key_padding_mask=pad)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, src_key_padding_mask=pad), expected)


# --------------------------------------------------------------------------- corrupted packed states


def _packed(pattern: str) -> nn.Sequential:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 16))
    nmkern.sparsify(model, pattern, pack=True)
    return model


def _corrupt(sd: dict, key: str, fn) -> dict:
    sd = dict(sd)
    sd[key] = fn(sd[key])
    return sd


def _with_extra(**changes):
    return lambda extra: {**extra, **changes}


NM_CORRUPTIONS = {
    "indices-zero-columns": ("0.packed_indices", lambda t: t[:, :0], r"packed_indices has shape \(16, 0\); expected"),
    "values-shape": ("0.packed_values", lambda t: t[:, :-1],
                     r"packed_values has shape \(16, 15\); expected \(16, 16\)"),
    "values-dtype": ("0.packed_values", lambda t: t.to(torch.int32), "packed_values has dtype int32"),
    "indices-dtype": ("0.packed_indices", lambda t: t.to(torch.int64), "packed_indices has dtype int64"),
    "indices-all-minus-one": ("0.packed_indices", lambda t: torch.full_like(t, -1), "not strictly increasing"),
    "indices-repeated": ("0.packed_indices", torch.zeros_like, "not strictly increasing"),
    "extra-n5-m4": ("0._extra_state", _with_extra(n=5, m=4), r"invalid N:M pattern.*n=5, m=4"),
    "extra-n0": ("0._extra_state", _with_extra(n=0), r"n=0; expected an int >= 1"),
    "extra-m-other-shape": ("0._extra_state", _with_extra(n=2, m=6), "not divisible by the state's m=6"),
    "extra-pattern": ("0._extra_state", _with_extra(pattern="2:4x"), "pattern='2:4x'"),
    "extra-not-a-dict": ("0._extra_state", lambda e: [1, 2], "_extra_state must be the dict"),
    "extra-packed-false": ("0._extra_state", _with_extra(packed=False), "says packed=False"),
}
BSR_CORRUPTIONS = {
    "crow-short": ("0.bsr_crow", lambda t: t[:-1], r"bsr_crow has shape \(4,\); expected \(5,\)"),
    "crow-end": ("0.bsr_crow", lambda t: torch.cat([t[:-1], t[-1:] - 1]), "bsr_crow must rise from 0"),
    "col-out-of-range": ("0.bsr_col", lambda t: t + 32, r"outside \[0, 32\)"),
    "col-repeated": ("0.bsr_col", torch.zeros_like, "not strictly increasing within a block row"),
    "values-block": ("0.bsr_values", lambda t: t[:, :2], r"bsr_values has shape .*; expected .* of 4 values"),
    "extra-block": ("0._extra_state", _with_extra(block=3), "not divisible by the state's block=3"),
}


def _check_refused(model, bad: dict, match: str) -> None:
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=match):
        model.load_state_dict(bad)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():  # the module is unchanged
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v


@pytest.mark.parametrize("case", NM_CORRUPTIONS, ids=list(NM_CORRUPTIONS))
def test_corrupted_nm_packed_state_is_refused_at_load(case):
    key, fn, match = NM_CORRUPTIONS[case]
    model = _packed("2:4")
    bad = _corrupt(model.state_dict(), key, fn)
    _check_refused(model, bad, match)
    fresh = nn.Sequential(nmkern.SparseLinear(32, 16))  # a training-form module refuses it too
    _check_refused(fresh, bad, match)
    x = torch.randn(2, 32)
    torch.testing.assert_close(model(x), _packed("2:4")(x))  # still the layer it was


@pytest.mark.parametrize("case", BSR_CORRUPTIONS, ids=list(BSR_CORRUPTIONS))
def test_corrupted_1xn_packed_state_is_refused_at_load(case):
    key, fn, match = BSR_CORRUPTIONS[case]
    model = _packed("1x4:0.5")
    _check_refused(model, _corrupt(model.state_dict(), key, fn), match)


def test_packed_state_without_extra_state_is_refused():
    model = _packed("2:4")
    sd = dict(model.state_dict())
    del sd["0._extra_state"]
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="needs its '0._extra_state'"):
            model.load_state_dict(sd, strict=strict)


def test_valid_packed_states_still_load_across_forms():
    src = _packed("2:4")
    dst = nn.Sequential(nmkern.SparseLinear(32, 16, pattern="1xn", block=4))
    dst.load_state_dict(src.state_dict())
    assert dst[0].is_packed and (dst[0].n, dst[0].m) == (2, 4)
    x = torch.randn(3, 32)
    torch.testing.assert_close(dst(x), src(x))


# --------------------------------------------------------------------------- plain states, meta tensors


@pytest.mark.parametrize("scheme,mask", [("2:4", lambda w: apply_nm_ref(w, 2, 4, dim=1) != 0),
                                         ("1x4:0.5", lambda w: block_mask_1xn_ref(w, 4, 0.5))])
def test_plain_state_dict_loads_strictly_into_the_training_form(scheme, mask):
    torch.manual_seed(5)
    plain = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Conv2d(4, 8, 3))
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Conv2d(4, 8, 3))
    nmkern.sparsify(model, scheme)
    result = model.load_state_dict(plain.state_dict())  # strict
    assert not result.missing_keys and not result.unexpected_keys
    for i in (0, 2):
        assert torch.equal(model[i].weight, plain[i].weight) and torch.equal(model[i].bias, plain[i].bias)
        assert torch.equal(model[i].mask(), mask(plain[i].weight.detach()))  # the mask follows the loaded weight


def test_plain_state_dict_into_a_packed_layer_says_it_needs_the_sparse_state():
    plain = nn.Sequential(nn.Linear(32, 16))
    model = _packed("2:4")
    with pytest.raises(RuntimeError, match="this layer is packed and the state is a plain dense one"):
        model.load_state_dict(plain.state_dict())
    assert model[0].is_packed


def test_meta_model_training_form_works_and_pack_is_refused_clearly():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"pack=True needs real weights, but 0.weight is on the meta device"):
        nmkern.sparsify(model, "2:4", pack=True)
    assert type(model[0]) is nn.Linear  # refused before anything was swapped
    report = nmkern.sparsify(model, "2:4")
    assert len(report.swapped) == 2 and model[0].weight.is_meta
    with pytest.raises(ValueError, match=r"SparseLinear.pack: the weight is on the meta device"):
        model[0].pack()
    model.to_empty(device="cpu")
    model[0].pack()  # once materialised, it packs
    assert model[0].is_packed


# --------------------------------------------------------------------------- torch.compile over batch sizes


def _cpu_native() -> bool:
    return dispatch.cpu_kernels() is not None


@pytest.mark.parametrize("backend", ["auto", "cpu", "dense"])
def test_compiled_packed_model_does_not_recompile_per_batch_size(backend):
    if backend == "cpu" and not _cpu_native():
        pytest.skip("nmkern's native CPU kernels are not built")
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 256))
    nmkern.sparsify(model, "2:4", pack=True, backend=backend)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: no graph break either
    with torch.no_grad():
        for batch in range(1, 9):
            x = torch.randn(batch, 1024)
            torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for batch sizes 1..8"
    torch._dynamo.reset()
