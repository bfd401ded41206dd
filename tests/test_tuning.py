"""Dispatch decided by measurement (nmkern.tuning; issue #14, item 2).

The ``tuned`` fixture (conftest.py) replaces what a timed call records with set seconds per path (a fake
timer), so every test knows which path must win; the calls themselves run. One test measures for real and
checks only what does not depend on the machine's load.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nmkern
from nmkern import _cpu, tuning
from nmkern.backend import Backend
from nmkern.dispatch import Call
from nmkern.reference import apply_nm_ref

needs_cpu_kernels = pytest.mark.skipif(not _cpu.available(), reason="nmkern CPU library not built")


def _packed(in_f=64, out_f=32, seed=0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    return nmkern.SparseLinear.from_dense(lin, **kw).pack(), lin


def _key(layer, x) -> str:
    return tuning.key_of(Call(layer._layer_info(), x.device.type, layer._gemm_rows(x)))


def _decided(layer, x, calls: int = 64) -> Backend:
    """Call ``layer(x)`` until its key is decided (at most ``calls`` times); the path it then takes."""
    cache = tuning.dispatch_cache(x.device.type)
    for _ in range(calls):
        if cache.get(_key(layer, x)) is not None:
            break
        layer(x)
    return layer._decide(x, layer._gemm_rows(x))[0]


def _reference(lin, x):
    return F.linear(x, apply_nm_ref(lin.weight.detach(), 2, 4), lin.bias)


def test_row_buckets_are_powers_of_two():
    assert [tuning.row_bucket(r) for r in (0, 1, 2, 3, 4, 5, 16, 17, 256, 70000)] == [1, 1, 2, 4, 4, 8, 16, 32, 256,
                                                                                       65536]


def test_pick_needs_a_three_percent_win():
    assert tuning.pick({Backend.DENSE: 1.0, Backend.CPU: 0.98}) is Backend.DENSE
    assert tuning.pick({Backend.DENSE: 1.0, Backend.CPU: 0.97}) is Backend.CPU
    assert tuning.pick({Backend.DENSE: 1.0, Backend.CPU: 1.5}) is Backend.DENSE
    assert tuning.pick({Backend.DENSE: 1.0, Backend.CUDA: 0.8, Backend.CUSPARSELT: 0.6}) is Backend.CUSPARSELT
    assert tuning.pick({Backend.DENSE: 1.0}) is Backend.DENSE


def test_a_trial_alternates_blocks_skips_switches_and_first_calls_and_decides_on_medians(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(tuning, "_clock", lambda: clock[0])
    cost = {Backend.DENSE: 2.0, Backend.CPU: 1.0}
    last = [None]

    def fn_for(path):
        def fn(layer, x):
            clock[0] += cost[path] + (100.0 if path not in layer.seen else 0.0)  # a first call builds a form
            clock[0] += 50.0 if last[0] not in (None, path) else 0.0  # a switch pays for the other path's threads
            layer.seen.add(path)
            last[0] = path
            return x
        return fn

    class Layer:
        def __init__(self):
            self.seen = set()

    trial = tuning.Trial("k", [Backend.DENSE, Backend.CPU])
    layers = [Layer(), Layer()]
    order = []
    while not trial.done():
        path = trial.next_path()
        order.append(path)
        trial.run(path, fn_for(path), layers[len(order) % 2], torch.zeros(1))
        assert len(order) < 100
    blocks = [order[i:i + tuning.BLOCK] for i in range(0, len(order), tuning.BLOCK)]
    assert all(len(set(b)) == 1 for b in blocks)  # one path per block
    assert [b[0] for b in blocks[:2]] == [Backend.DENSE, Backend.CPU]
    assert {b[0] for b in blocks[2:-2]} == {Backend.DENSE, Backend.CPU}  # interleaved, not one path then the other
    assert min(len(v) for v in trial.samples.values()) >= tuning.SAMPLES
    assert trial.samples[Backend.DENSE] == [2.0] * len(trial.samples[Backend.DENSE])  # no switch, no first call
    assert trial.samples[Backend.CPU] == [1.0] * len(trial.samples[Backend.CPU])
    decision = trial.decision()
    assert decision.path is Backend.CPU and decision.medians_ms == {"dense": 2000.0, "cpu": 1000.0}


@needs_cpu_kernels
def test_dispatch_obeys_the_measured_winner(tuned, monkeypatch):
    sl, lin = _packed()
    x = torch.randn(1, 64)
    tuned.set(dense=1.0, cpu=0.5)
    cache = tuning.dispatch_cache("cpu")
    while cache.get(_key(sl, x)) is None:  # every call while measuring computes the layer
        torch.testing.assert_close(sl(x), _reference(lin, x))
        assert len(tuned.samples) <= 4 * tuning.SAMPLES
    assert min(tuned.samples.count("cpu"), tuned.samples.count("dense")) >= tuning.SAMPLES
    assert _decided(sl, x) is Backend.CPU
    torch.testing.assert_close(sl(x), _reference(lin, x))
    assert sl._fast_dense is None and sl._dense_cache is None  # the dense form, built to time it, is dropped

    tuned.set(dense=1.0, cpu=0.99)  # a 1% win is not taken
    x16 = torch.randn(16, 64)
    key16 = _key(sl, x16)
    _decided(sl, x16)
    assert tuning.dispatch_cache("cpu").get(key16).path is Backend.DENSE
    # ... but this layer holds only the CPU layout now (nmkern.nn._forms): a dense call would decode it, so the
    # kernel, within 1% of dense, runs
    assert sl._decide(x16, 16)[0] is Backend.CPU
    torch.testing.assert_close(sl(x16), _reference(lin, x16))
    monkeypatch.setenv("NMKERN_DENSE_CACHE", "1")  # a dense copy kept beside the layout: the dense winner runs
    fresh, _ = _packed()
    assert fresh._decide(x16, 16)[0] is Backend.DENSE


@needs_cpu_kernels
def test_dense_winner_drops_the_cpu_layout_and_binds_the_dense_op(tuned):
    sl, lin = _packed()
    tuned.set(dense=1.0, cpu=2.0)
    x = torch.randn(2, 64)
    assert _decided(sl, x) is Backend.DENSE
    sl(x)
    assert sl._cpu_cache is None  # built to be timed, read by no path the layer takes
    assert sl._fast_dense is not None  # dense at every row count the plan knows: bound
    torch.testing.assert_close(sl(x), _reference(lin, x))


@needs_cpu_kernels
def test_layers_of_one_shape_pool_samples_and_the_winner_outlives_the_process(tuned):
    layers = [_packed(seed=s)[0] for s in range(4)]
    tuned.set(dense=1.0, cpu=0.5)
    x = torch.randn(3, 64)
    cache, rounds = tuning.dispatch_cache("cpu"), 0
    while cache.get(_key(layers[0], x)) is None:
        for layer in layers:
            layer(x)
        rounds += 1
    assert rounds <= 10  # four layers: the samples of each round pool
    taken = len(tuned.samples)
    assert all(_decided(layer, torch.randn(4, 64), calls=0) is Backend.CPU for layer in layers)  # same bucket (4)
    files = list(tuning.cache_dir().glob("dispatch-cpu-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["format"] == tuning.CACHE_FORMAT and doc["fingerprint"]["torch"] == torch.__version__
    (key, entry), = doc["entries"].items()
    assert key.endswith("|warm|r4") and "linear|2:4|32x64|float32|cpu" in key
    assert entry == {"path": "cpu", "medians_ms": {"dense": 1000.0, "cpu": 500.0}}

    tuning.forget()  # a new process: reads the file, measures nothing
    fresh, _ = _packed(seed=9)
    assert _decided(fresh, x, calls=0) is Backend.CPU and len(tuned.samples) == taken


@needs_cpu_kernels
@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "fingerprint": {"machine": "other"},
                                                              "entries": {}}), json.dumps([1, 2])])
def test_a_corrupted_or_foreign_cache_is_ignored_with_a_warning_and_rewritten(tuned, content):
    directory = tuning.cache_dir()
    directory.mkdir(parents=True)
    name = tuning.DispatchCache(directory, "cpu").path.name  # the file name this machine uses
    (directory / name).write_text(content)
    tuning.forget()
    with pytest.warns(RuntimeWarning, match="ignoring the dispatch cache .* it will be rewritten"):
        sl, _ = _packed()  # pack() plans with the recorded winners: the file is read there
    assert json.loads((directory / name).read_text())["entries"] == {}  # replaced at once
    assert _decided(sl, torch.randn(1, 64)) is Backend.CPU
    doc = json.loads((directory / name).read_text())
    assert doc["fingerprint"] == tuning._fingerprint("cpu") and len(doc["entries"]) == 1


@needs_cpu_kernels
def test_a_rebuilt_kernel_library_is_measured_again(tuned, monkeypatch):
    from nmkern import _cpu

    library = _cpu.library_id()
    assert library.startswith(f"{_cpu.isa().value}-") and len(library.split("-")[-1]) == 16
    assert tuning._fingerprint("cpu")["machine"]["library"] == library
    directory = tuning.cache_dir()
    before = tuning.DispatchCache(directory, "cpu").path.name
    monkeypatch.setitem(_cpu._state, "library_id", f"{_cpu.isa().value}-0123456789abcdef")  # another build
    assert tuning.DispatchCache(directory, "cpu").path.name != before


@needs_cpu_kernels
def test_tune_off_follows_the_static_rules_and_measures_nothing(tuned, monkeypatch):
    monkeypatch.setenv("NMKERN_TUNE", "0")
    sl, _ = _packed()
    for _ in range(20):
        sl(torch.randn(1, 64))
    assert sl._decide(torch.randn(1, 64), 1)[0] is Backend.DENSE  # 32x64: below the static rules' size
    assert tuned.samples == [] and not tuning.cache_dir().exists()
    monkeypatch.setenv("NMKERN_TUNE", "maybe")
    with pytest.raises(ValueError, match=r"NMKERN_TUNE='maybe' is not understood; set it to 1 .* or 0"):
        tuning.enabled()


@needs_cpu_kernels
def test_forced_and_env_backends_are_not_measured(tuned, monkeypatch):
    sl, _ = _packed(backend="cpu")
    sl(torch.randn(1, 64))
    assert sl._decide(torch.randn(1, 64), 1)[0] is Backend.CPU
    monkeypatch.setenv("NMKERN_BACKEND", "dense")
    other, _ = _packed()
    other(torch.randn(1, 64))
    assert other._decide(torch.randn(1, 64), 1)[0] is Backend.DENSE
    assert tuned.samples == []


@needs_cpu_kernels
def test_an_empty_cache_dir_keeps_winners_in_memory_only(tuned, monkeypatch):
    monkeypatch.setenv("NMKERN_CACHE_DIR", "")
    tuning.forget()
    sl, _ = _packed()
    assert _decided(sl, torch.randn(1, 64)) is Backend.CPU
    assert tuning.dispatch_cache("cpu").path is None


@needs_cpu_kernels
def test_an_unwritable_cache_folder_warns_once_and_still_decides(tuned, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("NMKERN_CACHE_DIR", str(blocker / "sub"))
    tuning.forget()
    a, _ = _packed()
    with pytest.warns(RuntimeWarning, match="cannot write the dispatch cache"):
        assert _decided(a, torch.randn(1, 64)) is Backend.CPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _decided(a, torch.randn(9, 64)) is Backend.CPU  # a new bucket, decided: no second warning


@needs_cpu_kernels
def test_cold_and_warm_winners_are_kept_apart(tuned, monkeypatch):
    sl, _ = _packed()
    x = torch.randn(1, 64)
    _decided(sl, x)
    monkeypatch.setitem(tuning._llc, "cpu", 1024)  # now the packed layers exceed the "cache"
    assert tuning.cache_state("cpu") == "cold"
    tuned.set(dense=1.0, cpu=2.0)
    sl._forget_decisions()
    assert _decided(sl, x) is Backend.DENSE
    assert sorted(k.split("|")[-2] for k in tuning.dispatch_cache("cpu").entries) == ["cold", "warm"]


@needs_cpu_kernels
def test_a_conv_is_measured_with_its_geometry_in_the_key(tuned):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    sc = nmkern.SparseConv2d.from_dense(conv).pack()
    x = torch.randn(2, 16, 6, 6)
    ref = F.conv2d(x, apply_nm_ref(conv.weight.detach(), 2, 4, dim=1), conv.bias, padding=1)
    for _ in range(4 * tuning.SAMPLES):
        torch.testing.assert_close(sc(x), ref, rtol=1e-5, atol=1e-5)
    (key,) = tuning.dispatch_cache("cpu").entries
    assert key.startswith("conv2d|2:4|8x144/(3, 3)/(1, 1)/(1, 1)/(1, 1)|") and key.endswith("|r128")


@needs_cpu_kernels
def test_tune_a_model_reports_every_layer_and_row_count(tuned):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64), nn.Linear(64, 8))
    nmkern.sparsify(model, "2:4", pack=True)
    tuned.set(dense=1.0, cpu=0.5)
    report = nmkern.tune(model, [torch.randn(1, 64), torch.randn(16, 64)])
    got = [(r["layer"], r["rows"], r["path"], r["source"]) for r in report.rows]
    assert got == [("0", 1, "cpu", "measured"), ("2", 1, "cpu", "measured"), ("3", 1, "cpu", "measured"),
                   ("0", 16, "cpu", "measured"), ("2", 16, "cpu", "measured"), ("3", 16, "cpu", "measured")]
    assert report.rows[0]["sparse_ratio"] == 0.5 and report.cache_file.endswith(".json")
    assert "| 0 | 32x64 | 2:4 | float32 | 1 | cpu | measured |" in report.table()
    taken = len(tuned.samples)
    again = nmkern.tune(model, torch.randn(1, 64))
    assert [r["source"] for r in again.rows] == ["cache"] * 3 and len(tuned.samples) == taken
    forced = nmkern.tune(model, torch.randn(1, 64), force=True)
    assert [r["source"] for r in forced.rows] == ["measured"] * 3 and len(tuned.samples) > taken


def test_tune_refuses_bad_input(tuned, monkeypatch):
    with pytest.raises(ValueError, match="no packed SparseLinear"):
        nmkern.tune(nn.Linear(4, 4), torch.randn(1, 4))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        nmkern.tune("model", torch.randn(1, 4))
    model = nn.Sequential(nmkern.SparseLinear(8, 8).pack())
    with pytest.raises(ValueError, match="example_inputs is an empty list"):
        nmkern.tune(model, [])
    with pytest.raises(TypeError, match="must be a tensor, a tuple of args or a dict of kwargs, got str"):
        nmkern.tune(model, "x")
    monkeypatch.setenv("NMKERN_TUNE", "0")
    with pytest.raises(ValueError, match="NMKERN_TUNE=0 turns measuring off"):
        nmkern.tune(model, torch.randn(1, 8))


@needs_cpu_kernels
def test_a_real_measurement_picks_a_path_that_computes_the_layer(tmp_path, monkeypatch):
    """No fake: which path wins depends on the machine; that it runs, is recorded and is right does not."""
    monkeypatch.setenv("NMKERN_TUNE", "1")
    monkeypatch.setenv("NMKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("NMKERN_BACKEND", raising=False)
    monkeypatch.setattr(tuning, "_trials", {})
    tuning.forget()
    try:
        sl, lin = _packed(256, 128)
        x = torch.randn(4, 256)
        for _ in range(4 * tuning.SAMPLES):  # blocks of 3 calls, 2 counted: 2 x 4 blocks, then the deciding call
            torch.testing.assert_close(sl(x), _reference(lin, x))
        (decision,) = tuning.dispatch_cache("cpu").entries.values()
        assert decision.path in (Backend.DENSE, Backend.CPU) and set(decision.medians_ms) == {"dense", "cpu"}
        assert all(t > 0 for t in decision.medians_ms.values())
        torch.testing.assert_close(sl(x), _reference(lin, x))
    finally:
        tuning.forget()


def test_winners_timed_another_way_are_measured_again(tuned, monkeypatch):
    """The fingerprint carries tuning.MEASUREMENT: a file written when samples timed something else (the checked
    op, before bound calls) is another file, so its winners are not read."""
    directory = tuning.cache_dir()
    before = tuning.DispatchCache(directory, "cpu").path.name
    assert tuning._fingerprint("cpu")["measurement"] == tuning.MEASUREMENT
    monkeypatch.setattr(tuning, "MEASUREMENT", tuning.MEASUREMENT - 1)
    assert tuning.DispatchCache(directory, "cpu").path.name != before
