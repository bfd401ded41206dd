"""``nmkern selftest`` / ``nmkern.selftest``: availability, checks, a negative control, usage errors.

Two in-process runs of the command (about 10 s and 5 s under TRITON_INTERPRET=1 on 2 cores):
one clean (exit 0, the JSON complete), one with the dense path's linear made wrong (exit 1,
the mismatch reported). The rest are cheap unit checks of the comparison rules.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from nmkern import dispatch
from nmkern._selftest_checks import Check, compare_gemm, run_exact, run_gemm
from nmkern._selftest_masks import packed_oracle, topk_mask
from nmkern.backend import Backend
from nmkern.cli import main

ST = sys.modules["nmkern.selftest"]  # the module (nmkern.selftest the attribute is the function)
ALL = {"reference", "cpu", "triton", "cuda", "cusparselt", "dense"}
GEMM_OPS = {"reference": {"nm_linear", "semi24_linear", "bsr_linear", "nm_conv2d", "bsr_conv2d"},
            "triton": {"nm_linear", "semi24_linear", "bsr_linear", "nm_conv2d"},
            "cpu": {"SparseLinear", "SparseConv2d"}, "dense": {"SparseLinear", "SparseConv2d"},
            "cuda": {"SparseLinear", "SparseConv2d"}, "cusparselt": {"SparseLinear", "SparseConv2d"}}
EXACT_OPS = {"reference": {"nm_mask/apply_nm/pack_nm/unpack_nm", "compress_24/decompress_24",
                           "block_mask_1xn/to_bsr_1xn"},
             "triton": {"nm_mask", "apply_nm", "pack_nm", "unpack_nm", "compress_24", "decompress_24",
                        "block_mask_1xn"}}


def _run_cli(tmp_path, capsys, *extra):
    out = tmp_path / "selftest.json"
    rc = main(["selftest", "--quick", "--json", str(out), "--no-progress", *extra])
    text = capsys.readouterr().out
    return rc, out, text


def test_quick_passes_and_the_json_holds_every_result(tmp_path, capsys):
    rc, out, text = _run_cli(tmp_path, capsys)
    assert rc == 0, text
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["quick"] is True and data["checks_failed"] == 0
    backends = {b["backend"]: b for b in data["backends"]}
    assert set(backends) == ALL
    assert backends["reference"]["available"] and backends["dense"]["available"]
    checked = {c["backend"] for c in data["checks"]}
    for name, b in backends.items():
        if b["available"]:
            assert b["checks"] > 0 and b["failed"] == 0, name
            ops = {c["op"] for c in data["checks"] if c["backend"] == name}
            assert GEMM_OPS[name] | EXACT_OPS.get(name, set()) <= ops, (name, ops)
        else:
            assert b["reason"] and name not in checked, name
    assert len(data["checks"]) == data["checks_total"] == sum(b["checks"] for b in data["backends"])
    for c in data["checks"]:
        assert {"op", "backend", "shape", "dtype", "bias", "max_error", "tolerance", "ok"} <= set(c)
        assert c["ok"] and c["max_error"] <= c["tolerance"], c
    gemms = [c for c in data["checks"] if c["kind"] == "gemm" and c["backend"] == "reference"]
    assert {c["dtype"] for c in gemms} == {"float32", "float16", "bfloat16"}
    assert {c["bias"] for c in gemms} == {True, False}
    assert any(c["shape"].get("K", 0) % 64 == 32 for c in gemms)
    # triton: checked on the CPU exactly when the interpreter is on (no GPU here), else the reason says how
    if not torch.cuda.is_available():
        assert backends["triton"]["available"] == ST.triton_interpret()
        assert "TRITON_INTERPRET=1" in (backends["triton"]["reason"] or backends["triton"]["note"])
        assert "no CUDA GPU" in backends["cuda"]["reason"] and "no CUDA GPU" in backends["cusparselt"]["reason"]
    bench = data["benchmark"]
    assert bench["rows"] and all(r["dense_median_ms"] > 0 for r in bench["rows"])
    if backends["cpu"]["available"]:
        assert all(r["cpu_ratio"] > 0 for r in bench["rows"])
    assert data["machine"]["cpu"] and data["versions"]["torch"] == torch.__version__
    assert "OK:" in text and "benchmark:" in text and f"wrote {out}" in text


def test_a_wrong_path_is_reported_and_exits_1(tmp_path, capsys, monkeypatch):
    """Negative control: the dense path's linear off by 0.1% -> every fp32 dense linear check fails."""
    entry = dispatch.TABLE[Backend.DENSE]

    def wrong(layer, x):
        return entry.linear(layer, x) * 1.001

    monkeypatch.setitem(dispatch.TABLE, Backend.DENSE, dataclasses.replace(entry, linear=wrong))
    rc, out, text = _run_cli(tmp_path, capsys, "--no-bench")
    assert rc == 1, text
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["benchmark"] is None
    failed = [c for c in data["checks"] if not c["ok"]]
    assert failed and data["checks_failed"] == len(failed)
    assert {(c["backend"], c["op"]) for c in failed} == {("dense", "SparseLinear")}
    fp32 = [c for c in data["checks"] if c["backend"] == "dense" and c["op"] == "SparseLinear"
            and c["dtype"] == "float32"]
    assert fp32 and all(not c["ok"] and c["max_error"] > c["tolerance"] for c in fp32)
    assert "MISMATCH SparseLinear [dense]" in text and "FAILED:" in text


def test_library_call_reports_a_wrong_exact_op(monkeypatch):
    """Negative control through nmkern.selftest itself: the reference nm_mask keeping the wrong entries."""
    import nmkern
    from nmkern import functional

    real = functional.nm_mask

    def flipped(w, n, m, dim=-1, *, backend="auto"):
        mask = real(w, n, m, dim, backend=backend)
        return mask.flip(-1) if backend == "reference" else mask

    monkeypatch.setattr(functional, "nm_mask", flipped)
    monkeypatch.setattr(ST, "_plan", lambda status, quick: [lambda: ST.reference_mask_checks(quick)]
                        if status.backend == "reference" else [])
    report = nmkern.selftest(quick=True, bench=False)
    assert not report.ok
    assert {c.op for c in report.failures} == {"nm_mask/apply_nm/pack_nm/unpack_nm"}
    assert all("nm_mask keeps other entries" in c.detail for c in report.failures)
    assert "MISMATCH nm_mask/apply_nm/pack_nm/unpack_nm [reference]" in report.format()


@pytest.mark.parametrize("case", ["dir", "exists", "unwritable", "threads", "flag"])
def test_usage_errors_exit_2_before_any_work(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(ST, "selftest", lambda *a, **k: pytest.fail("selftest ran despite a usage error"))
    existing = tmp_path / "old.json"
    existing.write_text("keep")
    args = {"dir": ["--json", str(tmp_path)], "exists": ["--json", str(existing)],
            "unwritable": ["--json", "/proc/nmkern-selftest.json"], "threads": ["--threads", "0"],
            "flag": ["--quick", "--bogus"]}[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["selftest", *args]) == 2
    assert existing.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == before
    assert "error" in capsys.readouterr().err


def test_selftest_has_force():
    from nmkern.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "--force" in sub.choices["selftest"].format_help()


# ---------------------------------------------------------------- the comparison rules


def test_gemm_rule_is_the_fuzz_tests_rule():
    x, w = torch.randn(4, 64), torch.randn(8, 64)
    ref64 = x.double() @ w.double().T
    torch_out = x @ w.T
    scale = x.double().abs() @ w.double().abs().T
    err, tol, terr, problem = compare_gemm(torch_out, ref64, torch_out, scale)
    assert problem == "" and err == terr and tol == 4.0 * max(terr, torch.finfo(torch.float32).eps * scale.max().item())
    bad = torch_out.clone()
    bad[1, 2] += 5 * tol
    assert "error" in compare_gemm(bad, ref64, torch_out, scale)[3]
    assert "shape" in compare_gemm(torch_out[:, :4], ref64, torch_out, scale)[3]
    assert "dtype" in compare_gemm(torch_out.double(), ref64, torch_out, scale)[3]
    check = run_gemm("op", "b", {}, torch.float32, False, lambda: (torch_out[:, :4], ref64, torch_out, scale))
    assert not check.ok and json.dumps(check.to_dict(), allow_nan=False)
    raised = run_gemm("op", "b", {}, torch.float32, False, lambda: 1 / 0)
    assert not raised.ok and "ZeroDivisionError" in raised.detail


def test_exact_rule_counts_differences():
    a = torch.arange(6.0)
    b = a.clone()
    b[3] = -1
    assert run_exact("op", "b", {}, torch.float32, lambda: (a, a.clone())).ok
    bad = run_exact("op", "b", {}, torch.float32, lambda: (b, a))
    assert not bad.ok and bad.max_error == 1.0
    assert not run_exact("op", "b", {}, torch.float32, lambda: (a.half(), a)).ok
    assert not run_exact("op", "b", {}, torch.float32, lambda: "wrong").ok
    assert isinstance(bad, Check)


def test_packed_oracle_matches_pack_nm():
    import nmkern

    for n, m in ((2, 4), (1, 8), (3, 16), (5, 16)):
        w = torch.randn(7, 96)
        keep = topk_mask(w, n, m)
        wm = torch.where(keep, w, torch.zeros_like(w))
        packed = nmkern.pack_nm(wm, n, m, backend="reference")
        values, indices = packed_oracle(wm, keep, n, m)
        assert torch.equal(packed.values, values) and torch.equal(packed.indices, indices), (n, m)


def test_triton_status_without_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("with a GPU Triton runs compiled")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    status = {b.backend: b for b in ST.backend_status()}
    assert not status["triton"].available and "TRITON_INTERPRET=1" in status["triton"].reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ST.backend_status()[2].available and ST.backend_status()[2].devices == ["cpu"]
