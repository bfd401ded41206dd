"""bench/gpu_check.sh's plumbing without a GPU (``--dry-run``): every step runs in its CPU-safe form or
prints what it would run, OUTDIR gets at most 8 files, the summary comes last, and a short budget
skips steps instead of overrunning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
MAX_FILES = 8

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_check.sh needs bash and coreutils' timeout")


def _run(out: Path, seconds: int, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NMKERN_GPU_CHECK_SECONDS=str(seconds), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), str(out), *extra], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=seconds + 60)


def _steps(summary: str) -> dict[str, str]:
    """{step: status} from the summary's step table."""
    steps = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("step", "---"):
            steps[cells[0]] = cells[1]
    return steps


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    proc = _run(out, 100, "--dry-run")
    return out, proc


def test_dry_run_fills_outdir_and_prints_the_summary_last(dry_run):
    out, proc = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES, files
    assert {"env.txt", "build.log", "run.log", "summary.md", "gpu_tests.xml", "llama_dispatch.json"} <= set(files)
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip()), proc.stdout[-2000:]
    for heading in ("Does the mma.sp metadata placement work", "cuSPARSELt vs nmkern cuda vs Triton by M",
                    "Dispatch table"):
        assert heading in summary
    assert "DRY RUN" in summary
    assert "verdict: yes" not in summary  # nothing ran on a GPU: the summary must not claim the kernel works
    steps = _steps(summary)
    assert list(steps) == ["env", "install", "selftest", "gpu_tests", "llama", "tune", "bench_cuda"], steps
    assert steps["install"] == "dry" and steps["env"] == "ok"
    assert steps["gpu_tests"] == "ok" and steps["llama"] == "ok", steps
    assert "would run:" in (out / "build.log").read_text() and "--no-build-isolation" in (out / "build.log").read_text()


def test_dry_run_llama_dispatch_measures_every_m(dry_run):
    out, _ = dry_run
    result = json.loads((out / "llama_dispatch.json").read_text())
    assert result["complete"] and result["meta"]["device"] == "cpu"
    blocks = [r for r in result["rows"] if r["scope"] == "block"]
    assert [r["m"] for r in blocks] == [1, 16, 64]
    timed = {"dense"} | {p for p in result["checks"] if result["checks"][p].get("ok")}
    for r in blocks:
        assert r["winner"] in timed and r["dense_median_ms"] > 0
    assert result["checks"]["auto"]["ok"]  # nmkern's auto path agreed with the float64 reference
    assert {"cuda", "cusparselt", "triton"} <= set(result["skipped"])  # no GPU: said why, not timed


def test_dry_run_gpu_tests_xml(dry_run):
    out, _ = dry_run
    root = ET.parse(out / "gpu_tests.xml").getroot()
    cases = list(root.iter("testcase"))
    assert cases and all(c.find("skipped") is not None for c in cases)  # collected, skipped without a GPU


def test_dry_run_selftest_ran_and_exit_status(dry_run):
    out, proc = dry_run
    steps = _steps((out / "summary.md").read_text())
    assert steps["selftest"] == "ok", f"selftest step: {steps['selftest']}\n{proc.stdout[-3000:]}"
    json.loads((out / "selftest.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_short_budget_skips_steps_and_still_summarises(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, 12, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    steps = _steps(summary)
    assert steps["gpu_tests"] == "SKIPPED" and steps["bench_cuda"] == "SKIPPED", steps
    assert len(list(out.iterdir())) <= MAX_FILES
    assert proc.stdout.rstrip().endswith(summary.rstrip())


def test_usage_errors(tmp_path):
    assert subprocess.run(["bash", str(SCRIPT)], capture_output=True, cwd=ROOT, timeout=30).returncode == 2
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--bogus"], capture_output=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 2
    env = dict(os.environ, NMKERN_GPU_CHECK_SECONDS="soon")
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, cwd=ROOT, timeout=30, env=env)
    assert proc.returncode == 2 and not list(tmp_path.iterdir())
