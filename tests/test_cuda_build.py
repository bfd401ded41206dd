"""CUDA build checks without a GPU (marker ``aot``).

* every csrc/cuda/*.cu compiles with nvcc for every arch of the default list (setup.py's unity
  build, run by ``pip wheel``), and ptxas (``-Xptxas -v``) reports no spills and no stack frame
  (local memory) for any kernel;
* ``pip wheel .`` ships nmkern/_lib/nmkern_cuda.fatbin with one cubin per default arch plus
  portable PTX, and the sources for the NVRTC fallback;
* the SASS of every GEMM kernel in that fatbin runs on sparse tensor cores (HMMA.SP.16832)
  with both sparsity selectors, and stages tiles with cp.async (LDGSTS) and ldmatrix (LDSM).

The expensive step (the wheel build, one nvcc run) happens once per session.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nmkern import _cuda

pytestmark = pytest.mark.aot

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"


def _setup_module():
    spec = importlib.util.spec_from_file_location("nmkern_setup_py", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() runs only under __main__
    return mod


SETUP = _setup_module()
ARCHS = [a for a in SETUP.DEFAULT_CUDA_ARCHS.split(";") if a]
GEMM_KERNELS = [f"nmkern_sp24_gemm_{c}_{t}" for c in _cuda.CONFIGS for t in ("f16", "bf16")]
ALL_KERNELS = GEMM_KERNELS + [
    "nmkern_sp24_splitk_reduce_f16", "nmkern_sp24_splitk_reduce_bf16",
    "nmkern_sp24_prune_compress_f16", "nmkern_sp24_prune_compress_bf16",
]


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        cand = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(cand) if cand.exists() else None
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA build checks need the CUDA toolkit")
    return nvcc


def _tool_path() -> str:
    """PATH with cuobjdump + nvdisasm: PATH itself, the nvidia-cuda-* wheels, or Triton's copies."""
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-cuda-cuobjdump / -nvdisasm wheels

        dirs += [str(Path(p) / sub / "bin") for p in nvidia.__path__ for sub in ("cu13", "cu12", "cuda_cuobjdump", "cuda_nvdisasm")]
    except ImportError:
        pass
    try:
        import triton

        dirs.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin"))
    except ImportError:
        pass
    return os.pathsep.join([os.environ.get("PATH", ""), *dirs])


def _cuobjdump(*args) -> str:
    path = _tool_path()
    exe = shutil.which("cuobjdump", path=path)
    if exe is None or shutil.which("nvdisasm", path=path) is None:
        pytest.skip("cuobjdump/nvdisasm not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, env=dict(os.environ, PATH=path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---- ptxas statistics from the wheel build's nvcc log ---------------------------------------------


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas(text: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    stats, current = {}, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = (m.group(1), m.group(2))
        elif (m := _FRAME.search(line)) and current is not None:
            stats[current] = tuple(int(g) for g in m.groups())
            current = None
    return stats


def test_every_kernel_compiles_for_every_arch(wheel_build):
    stats = _parse_ptxas(wheel_build.log)
    for kernel in ALL_KERNELS:
        archs = sorted(a for (k, a) in stats if k == kernel)
        assert archs == sorted(f"sm_{a}" for a in ARCHS), f"{kernel}: ptxas compiled it for {archs}"


def test_no_spills_or_local_memory(wheel_build):
    stats = _parse_ptxas(wheel_build.log)
    assert stats, "no ptxas statistics in the build log"
    bad = []
    for (kernel, arch), (frame, spill_st, spill_ld) in sorted(stats.items()):
        if frame or spill_st or spill_ld:
            bad.append(f"{kernel}@{arch}: {frame} B stack frame, {spill_st} B spill stores, {spill_ld} B spill loads")
    assert not bad, "kernels use local memory:\n" + "\n".join(bad)


# ---- the wheel ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WheelBuild:
    fatbin: Path  # nmkern/_lib/nmkern_cuda.fatbin extracted from the wheel
    names: set  # files in the wheel
    log: str  # pip -v output, including nvcc's -Xptxas -v report


def _build_backend_ready() -> bool:
    """pyproject's build requirements (setuptools>=68, wheel) are importable here.

    Then the wheel builds without an isolated environment (no download). A fresh Python 3.11
    venv has setuptools 65 and no wheel: pip then builds in isolation, fetching them.
    """
    try:
        import setuptools
        from packaging.version import Version
    except ImportError:
        return False
    v = Version(setuptools.__version__)
    if v < Version("68"):
        return False
    return v >= Version("70.1") or importlib.util.find_spec("wheel") is not None  # 70.1+ has bdist_wheel


@pytest.fixture(scope="session")
def wheel_build(tmp_path_factory) -> WheelBuild:
    """Build the wheel once, from a copy of the tree (no build/ clash with other runs).

    setup.py compiles one unity translation unit holding every csrc/cuda/*.cu for every default
    arch; NMKERN_NVCC_FLAGS="-Xptxas -v" makes ptxas report each kernel's stack / spill bytes.
    """
    _nvcc()
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "_lib", ".pytest_cache", ".benchmarks"))
    env = dict(os.environ, NMKERN_SKIP_CPU_BUILD="1", NMKERN_NVCC_FLAGS="-Xptxas -v")
    env.pop("NMKERN_SKIP_CUDA_BUILD", None)
    env.pop("NMKERN_CUDA_ARCHS", None)  # the default list is what ships
    out = work / "dist"
    isolation = ["--no-build-isolation"] if _build_backend_ready() else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *isolation, "-w", str(out), "-v"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "CUDA build failed" not in log, log[-5000:]
    wheel = next(out.glob("nmkern-*.whl"))
    zf = zipfile.ZipFile(wheel)
    names = set(zf.namelist())
    assert "nmkern/_lib/nmkern_cuda.fatbin" in names, f"no fatbin in {wheel.name}: {sorted(n for n in names if '_lib' in n)}"
    fatbin = work / "nmkern_cuda.fatbin"
    fatbin.write_bytes(zf.read("nmkern/_lib/nmkern_cuda.fatbin"))
    return WheelBuild(fatbin, names, log)


@pytest.fixture(scope="session")
def wheel_fatbin(wheel_build) -> tuple[Path, set]:
    return wheel_build.fatbin, wheel_build.names


def test_wheel_ships_sources_for_nvrtc(wheel_fatbin):
    _, names = wheel_fatbin
    for p in list(CUDA_DIR.glob("*.cu")) + list(CUDA_DIR.glob("*.cuh")):
        assert f"nmkern/_lib/cuda_src/{p.name}" in names
    assert "nmkern/_cuda.py" in names


def test_fatbin_has_cubin_per_arch_and_portable_ptx(wheel_fatbin):
    fatbin, _ = wheel_fatbin
    elfs = set(re.findall(r"\.(sm_\w+)\.cubin", _cuobjdump("--list-elf", str(fatbin))))
    assert elfs == {f"sm_{a}" for a in ARCHS}
    assert {"sm_80", "sm_90a"} <= elfs
    ptx = set(re.findall(r"\.(sm_\w+)\.ptx", _cuobjdump("--list-ptx", str(fatbin))))
    newest = max(ARCHS, key=lambda a: int("".join(c for c in a if c.isdigit())))
    assert ptx == {f"sm_{newest.rstrip('af')}"}  # compute_90, not the non-portable compute_90a


def _sass_by_arch_and_function(sass: str) -> dict[tuple[str, str], str]:
    out, arch, func, buf = {}, None, None, []
    for line in sass.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\w+)", line):
            if func is not None:
                out[(arch_of_func, func)] = "\n".join(buf)
            func, arch_of_func, buf = m.group(1), arch, []
        elif func is not None:
            buf.append(line)
    if func is not None:
        out[(arch_of_func, func)] = "\n".join(buf)
    return out


def test_fatbin_sass_uses_sparse_tensor_cores(wheel_fatbin):
    fatbin, _ = wheel_fatbin
    funcs = _sass_by_arch_and_function(_cuobjdump("-sass", str(fatbin)))
    for arch in ARCHS:
        for kernel in GEMM_KERNELS:
            body = funcs.get((f"sm_{arch}", kernel))
            assert body is not None, f"{kernel} missing from the sm_{arch} cubin"
            op = "HMMA.SP.16832.F32.BF16" if kernel.endswith("bf16") else "HMMA.SP.16832.F32 "
            mmas = [ln for ln in body.splitlines() if op in ln]
            assert mmas, f"{kernel}@sm_{arch}: no {op.strip()} in SASS"
            # both m16 halves of a 32-row metadata block: sparsity selectors 0 and 1
            assert any(ln.rstrip().rstrip(";").split(",")[-1].strip().startswith("0x0") for ln in mmas)
            assert any(ln.rstrip().rstrip(";").split(",")[-1].strip().startswith("0x1") for ln in mmas)
            assert "LDGSTS" in body, f"{kernel}@sm_{arch}: no cp.async (LDGSTS)"
            assert "LDSM" in body, f"{kernel}@sm_{arch}: no ldmatrix (LDSM)"


# ---- the NVRTC fallback -------------------------------------------------------------------------


def _load_nvrtc():
    """libnvrtc via NMKERN_TEST_NVRTC_LIB, or the nvidia-cuda-nvrtc wheel CuPy would load; else skip."""
    import ctypes

    explicit = os.environ.get("NMKERN_TEST_NVRTC_LIB")
    if explicit:
        return ctypes.CDLL(explicit)
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return ctypes.CDLL(load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception as e:
        pytest.skip(f"libnvrtc not found ({type(e).__name__}); pip install nvidia-cuda-nvrtc to check the NVRTC fallback")


def test_nvrtc_fallback_compiles_shipped_sources(tmp_path):
    """The run-time fallback (_cuda._nvrtc_module) compiles the same unity source with NVRTC."""
    import ctypes

    lib = _load_nvrtc()
    code = "".join(f'#include "{s}"\n' for s in _cuda.KERNEL_SOURCES).encode()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), code, b"nmkern_unity.cu", 0, None, None) == 0
    # The options _cuda._nvrtc_module passes for this NVRTC's version (mma.sp variant included);
    # sm_80 makes NVRTC emit a cubin, as CuPy asks for the device's own arch.
    major, minor = ctypes.c_int(), ctypes.c_int()
    assert lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) == 0
    opts = [o.encode() for o in _cuda.nvrtc_options(CUDA_DIR, (major.value, minor.value))]
    assert any(o.startswith(b"-DNMKERN_SP_ORDERED_METADATA=") for o in opts)
    opts.append(b"--gpu-architecture=sm_80")
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    path = tmp_path / "nvrtc_sm80.cubin"
    path.write_bytes(cubin.raw)
    funcs = _sass_by_arch_and_function(_cuobjdump("-sass", str(path)))
    assert {f for (_, f) in funcs} == set(ALL_KERNELS)
    for kernel in GEMM_KERNELS:
        body = next(b for (_, f), b in funcs.items() if f == kernel)
        assert "HMMA.SP.16832" in body, f"{kernel}: NVRTC build has no sparse tensor-core instruction"


# ---- mma.sp vs mma.sp::ordered_metadata: chosen from the toolkit version ---------------------------


@pytest.mark.parametrize("version,ordered", [((11, 8), False), ((12, 4), False), ((12, 5), True), ((12, 10), True),
                                             ((13, 0), True), ((12, 5, 82), True)])
def test_ordered_metadata_choice_by_version(version, ordered):
    # PTX ISA 8.5 (CUDA 12.5) introduced mma.sp::ordered_metadata; setup.py (nvcc) and _cuda (NVRTC) agree.
    assert _cuda.ordered_metadata_supported(version) is ordered
    assert SETUP.ordered_metadata_supported(version) is ordered
    flag = f"-DNMKERN_SP_ORDERED_METADATA={int(ordered)}"
    assert flag in _cuda.nvrtc_options(CUDA_DIR, version)


def test_nvrtc_options_without_a_version_leave_the_choice_to_the_header():
    opts = _cuda.nvrtc_options(CUDA_DIR, None)
    assert not any("NMKERN_SP_ORDERED_METADATA" in o for o in opts)
    assert f"-I{CUDA_DIR}" in opts


def test_parse_nvcc_version():
    text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\n"
    assert SETUP.parse_nvcc_version(text) == (12, 4)
    assert SETUP.parse_nvcc_version("Cuda compilation tools, release 13.0, V13.0.88") == (13, 0)
    assert SETUP.parse_nvcc_version("no version here") is None


def _fake_nvcc(tmp_path: Path, release: str) -> str:
    exe = tmp_path / f"nvcc_{release.replace('.', '_')}"
    exe.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    exe.chmod(0o755)
    return str(exe)


def test_sparse_mma_flags_follow_nvcc_version(tmp_path):
    assert SETUP.sparse_mma_flags(_fake_nvcc(tmp_path, "12.4")) == ["-DNMKERN_SP_ORDERED_METADATA=0"]
    assert SETUP.sparse_mma_flags(_fake_nvcc(tmp_path, "12.5")) == ["-DNMKERN_SP_ORDERED_METADATA=1"]
    assert SETUP.sparse_mma_flags(str(tmp_path / "missing-nvcc")) == []  # unknown: the header decides


def _installed_nvcc_version() -> tuple[int, int]:
    proc = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True, timeout=60)
    version = SETUP.parse_nvcc_version(proc.stdout)
    assert version is not None, proc.stdout
    return version


def test_wheel_build_passes_the_variant_for_this_nvcc(wheel_build):
    flag = int(SETUP.ordered_metadata_supported(_installed_nvcc_version()))
    assert f"-DNMKERN_SP_ORDERED_METADATA={flag}" in wheel_build.log


_PTX_MMA = re.compile(r"\b(mma\.sp(?:::ordered_metadata)?)\.sync\.aligned\.m16n8k32\.row\.col\.f32\.(b?f16)\.")


@pytest.mark.parametrize("arch", ["80", "90a"])
@pytest.mark.parametrize("variant", [0, 1, None])
def test_both_mma_sp_variants_compile(tmp_path, arch, variant):
    """NMKERN_SP_ORDERED_METADATA=0 / 1 (None: the header's own default from the nvcc version): the PTX
    holds that instruction for f16 and bf16, and ptxas turns it into sparse tensor-core SASS."""
    nvcc = _nvcc()
    define = [] if variant is None else [f"-DNMKERN_SP_ORDERED_METADATA={variant}"]
    if variant is None:
        variant = int(SETUP.ordered_metadata_supported(_installed_nvcc_version()))
    src = CUDA_DIR / "sparse24_gemm.cu"
    base = [nvcc, "-O3", "-std=c++17", f"-I{CUDA_DIR}", *define]
    ptx, cubin = tmp_path / "k.ptx", tmp_path / "k.cubin"
    for cmd in ([*base, "-ptx", f"-arch=compute_{arch}", "-o", str(ptx), str(src)],
                [*base, "-cubin", "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-o", str(cubin), str(src)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    found = {(m.group(1), m.group(2)) for m in _PTX_MMA.finditer(ptx.read_text())}
    want = "mma.sp::ordered_metadata" if variant else "mma.sp"
    assert found == {(want, "f16"), (want, "bf16")}
    sass = _cuobjdump("-sass", str(cubin))
    assert "HMMA.SP.16832.F32.BF16" in sass
    assert re.search(r"HMMA\.SP\.16832\.F32 ", sass), "no fp16 sparse tensor-core instruction in the SASS"
