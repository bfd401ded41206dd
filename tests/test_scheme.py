"""Scheme: a Mapping of per-layer N:M patterns with achieved sparsity, JSON, fixed-N mapping."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern.scheme import Scheme


def _scheme():
    return Scheme(
        {"a": (8, 16), "b": "2:16", "c": None, "d": (1, 16)},
        layer_params={"a": 1000, "b": 3000, "c": 500, "d": 500},
        layer_flops={"a": 4000, "b": 1000, "c": 2000, "d": 1000},
        meta={"budget": {"params": 0.75}},
    )


def test_mapping_and_sparsity_by_hand():
    s = _scheme()
    assert list(s) == ["a", "b", "c", "d"]
    assert s["a"] == (8, 16) and s["b"] == (2, 16) and s["c"] is None
    assert dict(s) == {"a": (8, 16), "b": (2, 16), "c": None, "d": (1, 16)}
    # kept params: 1000/2 + 3000/8 + 500 + 500/16 = 500 + 375 + 500 + 31.25 = 1406.25 of 5000
    assert s.param_sparsity == pytest.approx(1 - 1406.25 / 5000, abs=1e-12)
    # kept MACs: 4000/2 + 1000/8 + 2000 + 1000/16 = 2000 + 125 + 2000 + 62.5 = 4187.5 of 8000
    assert s.flops_sparsity == pytest.approx(1 - 4187.5 / 8000, abs=1e-12)
    assert s.flops_reduction == pytest.approx(8000 / 4187.5)
    assert "param_sparsity=0.7188" in repr(s)


def test_fixed_n_mapping():
    s = _scheme().fixed_n()
    assert dict(s) == {"a": (1, 2), "b": (1, 8), "c": None, "d": (1, 16)}
    assert s.param_sparsity == pytest.approx(_scheme().param_sparsity)  # same densities
    assert dict(Scheme({"x": (4, 16)}).fixed_n()) == {"x": (1, 4)}
    with pytest.raises(ValueError, match=r"Scheme.fixed_n: layer 'x' is 3:16; n must divide m"):
        Scheme({"x": (3, 16)}).fixed_n()


def test_json_round_trip(tmp_path):
    s = _scheme()
    path = tmp_path / "scheme.json"
    s.save(path)
    raw = json.loads(path.read_text())
    assert raw["layers"] == {"a": [8, 16], "b": [2, 16], "c": None, "d": [1, 16]}
    assert raw["param_sparsity"] == pytest.approx(s.param_sparsity)
    back = Scheme.load(path)
    assert back == s
    assert back.meta == s.meta
    assert back.flops_sparsity == s.flops_sparsity
    bare = Scheme({"x": (2, 4)})
    bare.save(path)
    assert Scheme.load(path) == bare and Scheme.load(path).param_sparsity is None


def test_errors(tmp_path):
    with pytest.raises(TypeError, match=r"Scheme: layers must be a Mapping"):
        Scheme([("a", (2, 4))])
    with pytest.raises(ValueError, match=r"Scheme \(layer 'a'\): n=4, m=4 is not an N:M pattern"):
        Scheme({"a": (4, 4)})
    with pytest.raises(ValueError, match=r"Scheme: layer 'a' = '2-4' is not a pattern; write it as 'n:m'"):
        Scheme({"a": "2-4"})
    with pytest.raises(TypeError, match=r"Scheme: layer 'a' must be 'n:m' .*, got int 7"):
        Scheme({"a": 7})
    with pytest.raises(ValueError, match=r"Scheme: layer 'a' = '1x4:0.5' is a 1xn pattern; Scheme takes 'n:m'"):
        Scheme({"a": "1x4:0.5"})
    with pytest.raises(ValueError, match=r"Scheme: layer_params has no entry for layers \['b'\]"):
        Scheme({"a": (2, 4), "b": (2, 4)}, layer_params={"a": 8})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"Scheme.load: .* is not valid JSON"):
        Scheme.load(bad)
    bad.write_text('{"layers": {}}')
    with pytest.raises(ValueError, match=r"Scheme.load: not an nmkern scheme"):
        Scheme.load(bad)


def test_load_refuses_wrong_json_types(tmp_path):
    path = tmp_path / "s.json"
    for doc, needle in (({"format": "nmkern.scheme/1", "layers": [["a", [2, 4]]]}, "'layers' must be an object"),
                        ({"format": "nmkern.scheme/1", "layers": {"a": [2, 4]}, "layer_params": [8]},
                         "'layer_params' must be an object"),
                        ({"format": 1, "layers": {"a": [2, 4]}}, "not an nmkern scheme")):
        path.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=needle):
            Scheme.load(path)
    path.write_text(json.dumps({"format": "nmkern.scheme/1", "layers": {"a": "2:4", "b": None}}))
    assert dict(Scheme.load(path)) == {"a": (2, 4), "b": None}  # "n:m" text, not split into characters


def test_save_and_plot_are_atomic(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    Scheme({"x": (2, 4)}).save(link)  # through the link, into its target; no temp file left beside it
    assert link.is_symlink() and dict(Scheme.load(target)) == {"x": (2, 4)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]
    (tmp_path / "d.json").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        Scheme({"x": (2, 4)}).save(tmp_path / "d.json")


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")  # an optional dependency (extras "demo" / "examples")
    path = tmp_path / "n.png"
    _scheme().plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plugs_into_sparsify_and_apply_srste():
    torch.manual_seed(0)

    def model():
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

    s = Scheme({"0": (4, 16), "2": (1, 16), "4": None})
    m1 = model()
    report = nmkern.sparsify(m1, s)
    swapped = dict(report.swapped)
    assert set(swapped) == {"0", "2"}
    assert isinstance(m1[0], nmkern.SparseLinear) and (m1[0].n, m1[0].m) == (4, 16)
    assert (m1[2].n, m1[2].m) == (1, 16)
    assert type(m1[4]) is nn.Linear

    from nmkern.methods.srste import apply_srste

    m2 = model()
    assert apply_srste(m2, s) == {"0": (4, 16), "2": (1, 16)}
    assert int((m2[2].weight != 0).sum()) == 16 * 32 // 16
