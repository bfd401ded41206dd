"""nmkern.timing (the one timing harness) and nmkern.benchmark (what `nmkern bench` measures).

Times come from a fake clock that the timed functions advance, so every assertion is
exact; nothing here asserts a real duration.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from nmkern import benchmark, timing
from nmkern.timing import Timing


class Clock:
    """A fake ``timer``: functions made by :meth:`fn` log their call and advance the clock."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def fn(self, name: str, cost: float):
        def call():
            self.calls.append(name)
            self.now += cost

        return call


# --------------------------------------------------------------------------- Timing / columns


def test_timing_median_quartiles_min():
    t = Timing((5.0, 1.0, 3.0, 2.0, 4.0))
    assert t.repeats == 5 and t.median == 3.0 and t.min == 1.0
    assert t.quartiles == (2.0, 4.0)
    assert Timing((4.0, 1.0, 3.0, 2.0)).median == 2.5
    assert Timing((7.0,)).quartiles == (7.0, 7.0)
    assert Timing((1.0, 3.0)).scaled(0.5).times == (0.5, 1.5)
    assert Timing((0.001, 0.002, 0.003)).to_dict("x_") == pytest.approx(
        {"x_median_ms": 2.0, "x_q1_ms": 1.5, "x_q3_ms": 2.5, "x_min_ms": 1.0})
    with pytest.raises(ValueError):
        Timing(())


def test_columns_ratios_against_baseline():
    cols = timing.columns({"dense": Timing((0.002,)), "sparse": Timing((0.001,))}, prefix="cold_")
    assert cols["cold_dense_median_ms"] == pytest.approx(2.0)
    assert cols["cold_sparse_ratio"] == pytest.approx(0.5)
    assert "cold_dense_ratio" not in cols
    assert set(cols) == {f"cold_{k}_{s}_ms" for k in ("dense", "sparse") for s in ("median", "q1", "q3", "min")} | {
        "cold_sparse_ratio"}


# --------------------------------------------------------------------------- time_interleaved


def test_rounds_rotate_the_order_and_warmup_is_untimed():
    clock = Clock()
    fns = {k: clock.fn(k, 1.0) for k in "abc"}
    out = timing.time_interleaved(fns, repeats=4, warmup=1, timer=clock)
    assert "".join(clock.calls) == "abc" + "abc" + "bca" + "cab" + "abc"  # warm-up, then rotating rounds
    assert list(out) == ["a", "b", "c"] and all(t.repeats == 4 for t in out.values())


def test_two_candidates_alternate_which_goes_first():
    clock = Clock()
    timing.time_interleaved({"dense": clock.fn("d", 1.0), "sparse": clock.fn("s", 1.0)}, repeats=4, warmup=0,
                            timer=clock)
    assert "".join(clock.calls) == "ds" "sd" "ds" "sd"


def test_medians_are_per_candidate():
    clock = Clock()
    costs = iter([1.0, 9.0, 2.0, 3.0, 3.0])  # a's successive call costs: median 3, min 1

    def a():
        clock.now += next(costs)

    out = timing.time_interleaved({"a": a, "b": clock.fn("b", 0.5)}, repeats=5, warmup=0, timer=clock)
    assert out["a"].times == (1.0, 9.0, 2.0, 3.0, 3.0)
    assert out["a"].median == 3.0 and out["a"].min == 1.0 and out["b"].median == 0.5


def test_seconds_budget_sets_the_rounds():
    clock = Clock()
    fns = {"a": clock.fn("a", 0.25), "b": clock.fn("b", 0.75)}  # 1 s per round
    out = timing.time_interleaved(fns, seconds=3.5, warmup=0, min_repeats=1, timer=clock)
    assert out["a"].repeats == 4  # rounds run until 3.5 s are spent
    out = timing.time_interleaved(fns, seconds=3.5, warmup=0, min_repeats=6, timer=clock)
    assert out["a"].repeats == 6
    out = timing.time_interleaved(fns, seconds=100.0, warmup=0, max_repeats=3, timer=clock)
    assert out["a"].repeats == 3


def test_number_and_sync():
    clock = Clock()
    events = []
    out = timing.time_interleaved({"a": clock.fn("a", 2.0)}, repeats=2, warmup=0, number=4, timer=clock,
                                  sync=lambda: events.append(len(clock.calls)))
    assert len(clock.calls) == 8 and out["a"].times == (2.0, 2.0)  # each sample: 4 calls, divided by 4
    assert events == [0, 4, 4, 8]  # synchronized before starting and before stopping each clock


def test_bad_arguments():
    with pytest.raises(ValueError, match="no functions"):
        timing.time_interleaved({}, repeats=1)
    with pytest.raises(ValueError, match="not both"):
        timing.time_interleaved({"a": lambda: None}, repeats=1, seconds=1.0)
    with pytest.raises(ValueError):
        timing.time_interleaved({"a": lambda: None}, repeats=0)


def test_real_clock_smoke():
    out = timing.time_interleaved({"a": lambda: sum(range(100)), "b": lambda: None}, seconds=0.01)
    assert all(t.repeats >= 5 and t.median >= 0 for t in out.values())


# --------------------------------------------------------------------------- cold cache


def test_cold_stack_size():
    mib = 1 << 20
    assert timing.cold_stack_size(200 * mib, llc_bytes=32 * mib) == 1  # one layer is already > 4x the cache
    assert timing.cold_stack_size(64 * mib, llc_bytes=32 * mib) == 3  # 4096x4096 fp32: 192 MiB > 128 MiB
    assert timing.cold_stack_size(1 * mib, llc_bytes=32 * mib) == 129  # 129 MiB > 128 MiB
    assert timing.cold_stack_size(1, llc_bytes=32 * mib, max_layers=10) == 10
    n = timing.cold_stack_size(4096 * 4096 * 4)
    assert n * 4096 * 4096 * 4 > timing.COLD_FACTOR * timing.last_level_cache_bytes()
    with pytest.raises(ValueError):
        timing.cold_stack_size(0)


def test_run_stack_calls_in_order():
    seen = []
    timing.run_stack([lambda i=i: seen.append(i) for i in range(3)])()
    assert seen == [0, 1, 2]


def test_warm_cold_uses_first_copy_warm_and_all_copies_cold():
    clock = Clock()
    stacks = {"dense": [clock.fn(f"d{i}", 2.0) for i in range(3)], "sparse": [clock.fn(f"s{i}", 1.0) for i in range(3)]}
    res = timing.time_warm_cold(stacks, repeats=2, warmup=0, timer=clock)
    assert res.cold_layers == 3
    assert clock.calls[:4] == ["d0", "s0", "s0", "d0"]  # warm: first copies, interleaved
    assert clock.calls[4:10] == ["d0", "d1", "d2", "s0", "s1", "s2"]  # cold: whole stacks
    assert res.warm["dense"].median == 2.0 and res.cold["dense"].median == 2.0  # per layer
    cols = res.columns()
    assert cols["sparse_ratio"] == 0.5 and cols["cold_sparse_ratio"] == 0.5 and cols["cold_layers"] == 3
    assert timing.time_warm_cold(stacks, cold=False, repeats=1, warmup=0, timer=clock).cold is None
    with pytest.raises(ValueError):
        timing.time_warm_cold({"a": [clock.fn("a", 1.0)], "b": []}, repeats=1)


def test_parse_cache_size():
    assert timing._parse_size("32768K\n") == 32 << 20
    assert timing._parse_size("32 MiB (1 instance)") == 32 << 20
    assert timing._parse_size("1024 KiB") == 1 << 20
    assert timing.last_level_cache_bytes() > 0


# --------------------------------------------------------------------------- machine


def test_machine_info_keys():
    info = timing.machine_info()
    assert {"cpu", "cpu_flags", "cpu_isa", "torch_cpu_capability", "cores", "threads", "llc_bytes", "torch", "nmkern",
            "python", "platform", "cuda", "gpu"} <= set(info)
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert set(info["cpu_flags"]) <= set(timing.RELEVANT_CPU_FLAGS)
    assert (info["gpu"] is None) == (not torch.cuda.is_available())
    json.dumps(info)  # plain data


# --------------------------------------------------------------------------- nmkern.benchmark


def test_parse_pattern():
    from nmkern.spec import BlockSpec, NMSpec

    p = benchmark.parse_pattern("2:4")
    assert p.text == "2:4" and p.spec == NMSpec(2, 4) and p.kernel_args() == ("nm", 2, 4, 0)
    p = benchmark.parse_pattern("1x4:0.75")
    assert p.spec == BlockSpec(4, 0.75) and p.kernel_args() == ("1xn", 0, 0, 4) and p.kind == "1xn"
    for bad in ("4:2", "2:32", "1x4:0", "1x0:0.5", "1x4:1.5", "dense", "unstructured:0.5", 3):
        with pytest.raises(ValueError):
            benchmark.parse_pattern(bad)
    with pytest.raises(ValueError, match="divisible"):
        benchmark.parse_pattern("2:4").check_shape(16, 30)
    with pytest.raises(ValueError, match="divisible"):
        benchmark.parse_pattern("1x8:0.5").check_shape(12, 16)


def test_bench_linear_rows(monkeypatch):
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda device=None: 64 * 64 * 4)  # a 4-layer stack
    res = benchmark.bench_linear(64, 64, [1, 4], ["2:4", "1x4:0.5"], seconds=0.01, device="cpu")
    assert [(r["pattern"], r["batch"]) for r in res["rows"]] == [("2:4", 1), ("2:4", 4), ("1x4:0.5", 1), ("1x4:0.5", 4)]
    for r in res["rows"]:
        assert r["dense_median_ms"] > 0 and r["nmkern_auto_ratio"] > 0 and r["cold_nmkern_auto_ratio"] > 0
        assert r["cold_layers"] == 5 and r["cold_dense_bytes"] == 5 * 64 * 64 * 4 and r["dtype"] == "float32"
        assert r["repeats"] >= 5 and isinstance(r["auto_path"], str)
    assert res["meta"]["device"] == "cpu" and "cpu_isa" in res["meta"]
    json.dumps(res)
    table = benchmark.format_bench_table(res)
    assert "cold nmkern_auto" in table and len(table.splitlines()) == 2 + 4
    warm_only = benchmark.bench_linear(64, 64, [2], ["2:4"], seconds=0.01, cold=False, device="cpu")
    assert "cold_dense_median_ms" not in warm_only["rows"][0]
    with pytest.raises(ValueError, match="divisible"):
        benchmark.bench_linear(64, 63, [1], ["2:4"], seconds=0.01)


def test_pack_model_and_time_models():
    import nmkern

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    dense = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    nmkern.sparsify(model, "2:4")
    packed = benchmark.pack_model(model)
    assert all(m.is_packed for m in packed.modules() if isinstance(m, nmkern.SparseLinear))
    assert not any(m.is_packed for m in model.modules() if isinstance(m, nmkern.SparseLinear))  # a copy
    models = benchmark.packed_variants(dense, packed)
    assert {"dense", "packed_auto"} <= set(models)
    row = benchmark.time_models(models, torch.randn(3, 32), seconds=0.01, reference=model)
    assert row["repeats"] >= 5 and row["packed_auto_ratio"] > 0
    assert row["packed_auto_max_abs_diff"] < 1e-5
    forced = benchmark.force_backend(packed, "cpu")
    assert all(m.backend == "cpu" for m in forced.modules() if isinstance(m, nmkern.SparseLinear))
