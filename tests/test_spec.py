"""nmkern.spec (one pattern vocabulary), the deprecated 0.1 names, and nmkern.methods.loop (one training loop)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern.methods import masking
from nmkern.methods.loop import EpochLosses, evaluate, train_epochs
from nmkern.scheme import Scheme
from nmkern.spec import (
    DENSE,
    BlockSpec,
    NMSpec,
    Pattern,
    SpecResolver,
    UnstructuredSpec,
    accepts_n_for_block,
    forms,
    parse_spec,
)


@pytest.mark.parametrize("value, spec", [
    ("2:4", NMSpec(2, 4)), (" 1 : 8 ", NMSpec(1, 8)), ((2, 4), NMSpec(2, 4)), ([1, 16], NMSpec(1, 16)),
    ("1x4:0.5", BlockSpec(4, 0.5)), ("1X8:0.25", BlockSpec(8, 0.25)), ("unstructured:0.9", UnstructuredSpec(0.9)),
    ("dense", DENSE), (None, DENSE), (BlockSpec(2, 0.5), BlockSpec(2, 0.5)),
])
def test_parse_spec_forms_round_trip(value, spec):
    got = parse_spec(value)
    assert got == spec
    assert parse_spec(str(got)) == got  # str is the text form


def test_density():
    assert (NMSpec(2, 4).density, BlockSpec(4, 0.25).density, UnstructuredSpec(0.9).density, DENSE.density) == (
        0.5, 0.75, pytest.approx(0.1), 1.0)


def test_legacy_1xn_spelling_warns_and_parses():
    with pytest.warns(DeprecationWarning, match=r"write 1xN blocks as '1x4:0.5'"):
        assert parse_spec("1xN:4:0.5") == BlockSpec(4, 0.5)


def test_parse_spec_errors_name_op_value_and_fix():
    with pytest.raises(ValueError, match=r"op: where = '3:x' is not a pattern; write it as 'n:m' \(e.g. '2:4'\)"):
        parse_spec("3:x", op="op", where="where")
    with pytest.raises(ValueError, match=r"op \(w\): n=4, m=4 is not an N:M pattern"):
        parse_spec((4, 4), op="op", where="w")
    with pytest.raises(ValueError, match=r"op \(w\): n=4, m=4 is not an N:M pattern"):
        parse_spec("4:4", op="op", where="w")
    with pytest.raises(ValueError, match=r"op \(w\): sparsity=1.5 must lie in \[0, 1\)"):
        parse_spec("1x4:1.5", op="op", where="w")
    with pytest.raises(ValueError, match=r"op \(w\): block must be a positive int"):
        parse_spec("1x0:0.5", op="op", where="w")
    with pytest.raises(TypeError, match=r"op: w must be 'n:m' .* got float 0.5"):
        parse_spec(0.5, op="op", where="w")
    with pytest.raises(ValueError, match=r"op: w = '1x4:0.5' is a 1xn pattern; op takes 'n:m' \(e.g. '2:4'\), \(n, m\), "
                                         r"'dense' or None"):
        parse_spec("1x4:0.5", op="op", where="w", allowed=[Pattern.NM])
    assert parse_spec(None, allowed=[Pattern.NM]) is DENSE  # dense is always allowed
    assert "1x<block>" not in forms([Pattern.NM]) and "unstructured" in forms()
    with pytest.raises(TypeError, match="BlockSpec: rearrange must be a bool"):
        BlockSpec(4, 0.5, rearrange="yes")


def test_spec_resolver_exact_name_then_first_glob():
    r = SpecResolver({"a.*": "2:4", "a.b": None, "*": (1, 8), "unused": "1x4:0.5"}, op="t")
    assert r.resolve(["a.b", "a.c", "z"]) == {"a.b": DENSE, "a.c": NMSpec(2, 4), "z": NMSpec(1, 8)}
    assert r.is_mapping and r.unused_keys() == ["unused"]
    assert SpecResolver("2:4").lookup("anything") == NMSpec(2, 4)
    assert SpecResolver({"x": "2:4"}).lookup("y") is None
    with pytest.raises(ValueError, match=r"t: scheme\['bad'\] = '1x4:0.5' is a 1xn pattern"):
        SpecResolver({"bad": "1x4:0.5"}, op="t", allowed=[Pattern.NM])
    with pytest.raises(TypeError, match="t: scheme keys must be layer names or globs"):
        SpecResolver({3: "2:4"}, op="t")
    with pytest.raises(TypeError, match=r"t: scheme must be one pattern \('n:m'.* or a Mapping"):
        SpecResolver(3.5, op="t")


def test_scheme_values_go_through_parse_spec():
    s = Scheme({"a": NMSpec(2, 4), "b": "dense", "c": [1, 8]})
    assert dict(s) == {"a": (2, 4), "b": None, "c": (1, 8)}


def test_accepts_n_for_block():
    @accepts_n_for_block
    def f(w, block, sparsity=0.5):
        return block, sparsity

    assert f(0, 4) == (4, 0.5) and f(0, block=2) == (2, 0.5)
    with pytest.warns(DeprecationWarning, match="f: the 1xN block size is now called block="):
        assert f(0, n=8) == (8, 0.5)
    with pytest.raises(TypeError, match="f: got both block= and n="):
        f(0, block=2, n=2)


def test_functional_1xn_ops_take_block_and_still_n():
    w = torch.randn(8, 6)
    keep = nmkern.block_mask_1xn(w, block=4, sparsity=0.5, backend="reference")
    assert torch.equal(keep, nmkern.block_mask_1xn(w, 4, 0.5, backend="reference"))
    with pytest.warns(DeprecationWarning, match="block_mask_1xn: the 1xN block size is now called block="):
        assert torch.equal(keep, nmkern.block_mask_1xn(w, n=4, sparsity=0.5, backend="reference"))
    with pytest.warns(DeprecationWarning, match="block_scores_1xn"):
        assert torch.equal(nmkern.block_scores_1xn(w, n=4, backend="reference"),
                           nmkern.block_scores_1xn(w, block=4, backend="reference"))
    with pytest.warns(DeprecationWarning, match="to_bsr_1xn"):
        assert torch.equal(nmkern.to_bsr_1xn(w * keep, n=4).to_dense(), nmkern.to_bsr_1xn(w * keep, block=4).to_dense())
    with pytest.raises(ValueError, match="block_mask_1xn: block must be a positive int"):
        nmkern.block_mask_1xn(w, block=0, sparsity=0.5)


def test_masking_targets_are_specs_and_target_is_a_deprecated_pattern():
    layers = {"0": nn.Linear(8, 8), "1": nn.Conv2d(8, 4, 3)}
    assert masking.resolve_targets("t", layers, Pattern.NM, n=2, m=4) == {"0": NMSpec(2, 4), "1": NMSpec(2, 4)}
    got = masking.resolve_targets("t", layers, "1xn", sparsity=0.5, block=4, rearrange=["1"])
    assert got == {"0": BlockSpec(4, 0.5), "1": BlockSpec(4, 0.5, rearrange=True)}
    assert masking.describe(got["1"]) == "1x4 0.500 rearranged"
    assert masking.resolve_targets("t", layers, "nm", scheme={"*": "2:4"}) == {"0": NMSpec(2, 4), "1": NMSpec(2, 4)}
    with pytest.raises(ValueError, match=r"t: the scheme keeps layers \['1'\] dense"):
        masking.resolve_targets("t", layers, "nm", scheme={"0": (2, 4), "1": None})
    with pytest.raises(ValueError, match="t: unknown target 'dense'"):
        masking.resolve_targets("t", layers, "dense")
    with pytest.warns(DeprecationWarning, match=r"masking.Target is deprecated; use nmkern.spec.Pattern"):
        target = masking.Target
    assert target is Pattern and target.BLOCK_1XN is Pattern.BLOCK
    with pytest.warns(DeprecationWarning, match="masking.LayerTarget is deprecated"):
        masking.LayerTarget  # noqa: B018
    with pytest.raises(AttributeError):
        masking.NoSuchName  # noqa: B018


def _toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    return model, [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]


def test_train_epochs_hooks_order_and_losses():
    model, batches = _toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    out = train_epochs(model, lambda ep: batches[: ep + 2], opt, epochs=2, scheduler=sched,
                       before_step=lambda: calls.append(("before", opt.param_groups[0]["lr"])),
                       after_step=lambda: calls.append(("after", opt.param_groups[0]["lr"])), progress=False)
    assert [len(e.losses) for e in out] == [2, 3] and out[1].sizes == [8, 8, 4]
    # before_step sees the lr of this step, after_step the one the scheduler set for the next
    assert calls[:4] == [("before", 0.1), ("after", 0.05), ("before", 0.05), ("after", 0.025)]
    e = EpochLosses([1.0, 4.0], [3, 1])
    assert e.mean == 2.5 and e.per_example == 7.0 / 4
    assert EpochLosses().mean != EpochLosses().mean  # nan


def test_train_srste_and_evaluate_are_the_loop():
    from nmkern.methods import srste

    a, batches = _toy()
    b, _ = _toy()
    la = srste.train_srste(a, batches, torch.optim.SGD(a.parameters(), lr=0.1), progress=False)
    lb = train_epochs(b, batches, torch.optim.SGD(b.parameters(), lr=0.1), progress=False)[0].losses
    assert la == lb and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert srste.evaluate is evaluate
    loss, acc = evaluate(a, batches)
    assert loss > 0 and 0 <= acc <= 1 and a.training
    with pytest.raises(ValueError, match="evaluate: batches yielded no example"):
        evaluate(a, [])


def test_no_deprecation_warning_on_the_new_paths():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model, _ = _toy()
        nmkern.sparsify(model, {"2": "1x1:0.5", "0": NMSpec(2, 4)})
        nmkern.block_mask_1xn(torch.randn(4, 4), 2, 0.5, backend="reference")


def test_moved_backend_names_still_work():
    import nmkern.backend as backend_module
    import nmkern.dispatch as dispatch_module

    with pytest.warns(DeprecationWarning, match="nmkern.backend.resolve_backend is deprecated"):
        resolve = backend_module.resolve_backend
    assert resolve is dispatch_module.resolve_backend
    assert resolve("op", "reference", torch.zeros(1)) is nmkern.Backend.REFERENCE
    with pytest.warns(DeprecationWarning, match="nmkern.ExecPath is deprecated; use nmkern.Backend"):
        assert nmkern.ExecPath is nmkern.Backend
    with pytest.warns(DeprecationWarning, match="nmkern.dispatch.parse_path is deprecated"):
        assert dispatch_module.parse_path("op", "auto") is None
    with pytest.raises(AttributeError):
        backend_module.no_such_name


@pytest.mark.parametrize("name", ["srste", "domino", "gap", "blockprune", "masking"])
def test_old_module_paths_alias_the_methods(name, monkeypatch):
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, f"nmkern.{name}", raising=False)
    with pytest.warns(DeprecationWarning, match=f"nmkern.{name} moved to nmkern.methods.{name}"):
        old = importlib.import_module(f"nmkern.{name}")
    assert old is importlib.import_module(f"nmkern.methods.{name}")
