"""The CPU kernels under AddressSanitizer: a separate -fsanitize=address build of
csrc/cpu/*.cpp plus a standalone driver (csrc/cpu/test_driver/asan_main.cpp) that
runs every kernel path on odd shapes with exactly sized buffers. Any ASan report
(out-of-bounds read/write, use-after-free, leak) fails the test.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_SRC = ROOT / "csrc" / "cpu"


def _setup_module():
    spec = importlib.util.spec_from_file_location("nmkern_setup_for_asan", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only under __main__
    return module


# The flags setup.py builds each library with (the AMX kernel, nm_linear_amx.cpp, is compiled only in avx512).
ISA_FLAGS = _setup_module().CPU_ISA_FLAGS

pytestmark = pytest.mark.aot


def _cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def _cpu_has(*names: str) -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {name}" in flags for name in names)


@pytest.mark.parametrize("isa", list(ISA_FLAGS))
def test_kernels_clean_under_asan(isa, tmp_path):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    if isa == "avx2" and not _cpu_has("avx2", "fma"):
        pytest.skip("this CPU has no AVX2")
    if isa == "avx512" and not _cpu_has("avx512f", "avx512bw", "avx512vl", "avx512dq"):
        pytest.skip("this CPU has no AVX-512")
    exe = tmp_path / f"asan_{isa}"
    sources = sorted(str(p) for p in CPU_SRC.glob("*.cpp")) + [str(CPU_SRC / "test_driver" / "asan_main.cpp")]
    cmd = [cxx, "-std=c++17", "-O0", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-fopenmp",
           f"-DNMKERN_ISA_{isa.upper()}", f"-I{CPU_SRC}", *ISA_FLAGS[isa], *sources, "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"ASan build failed:\n{build.stderr[-4000:]}"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1:exitcode=99",
               OMP_NUM_THREADS="2")
    env.pop("LD_PRELOAD", None)
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=120)
    report = run.stdout[-3000:] + run.stderr[-6000:]
    assert "AddressSanitizer" not in run.stderr and "LeakSanitizer" not in run.stderr, report
    assert run.returncode == 0, report
    assert f"isa {isa}" in run.stdout and "OK (0 failures)" in run.stdout, report
    if isa == "avx512" and _cpu_has("amx_tile", "amx_bf16"):
        assert "amx 1" in run.stdout, report  # the bf16 and fp16 AMX paths ran, not only their refusals
