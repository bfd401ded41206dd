"""Build script: compiles the native kernels in csrc/ next to the Python package.

Outputs land in ``nmkern/_lib/`` (in the source tree for editable installs, in the
build directory for wheels):

* ``csrc/cuda/*.cu`` -> ``nmkern_cuda.fatbin`` with nvcc, one cubin per arch in
  ``NMKERN_CUDA_ARCHS`` (default ``80;86;89;90a``) plus PTX of the newest arch.
  The ``.cu`` sources are shipped too so that the run time can NVRTC-compile them
  for an arch the fatbin lacks. ``nvcc --version`` picks the sparse MMA instruction:
  ``mma.sp::ordered_metadata`` from CUDA 12.5 (PTX ISA 8.5), plain ``mma.sp`` before
  (``-DNMKERN_SP_ORDERED_METADATA=1/0``, see csrc/cuda/sp24_device.cuh).
* ``csrc/cpu/*.cpp`` -> ``libnmkern_cpu_<isa>.so`` with the host C++ compiler, one
  library per instruction set (``avx512``, ``avx2``, ``generic``); the run time
  picks the best one the CPU supports.

Neither build links against torch (plain C ABI), so one wheel serves every torch
version, and the build needs only setuptools and the compilers, never torch.
``NMKERN_SKIP_CUDA_BUILD=1`` / ``NMKERN_SKIP_CPU_BUILD=1`` skip a part; a missing
compiler or a failed build prints a warning and the package still works through
its Triton and reference backends.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;86;89;90a"
# mma.sp::ordered_metadata needs PTX ISA 8.5, first shipped with CUDA 12.5. Same number and rule
# as nmkern._cuda.ordered_metadata_supported (the build test checks that they agree).
ORDERED_METADATA_MIN_CUDA = (12, 5)

# Flags per CPU instruction-set variant; the run time chooses among them.
CPU_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mamx-tile", "-mamx-bf16"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}


def _warn(msg: str) -> None:
    print(f"nmkern setup: WARNING: {msg}", file=sys.stderr)


def _run(cmd: list[str]) -> bool:
    print("nmkern setup:", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.stdout:
        print(proc.stdout)
    if proc.returncode != 0:
        _warn(f"command failed ({proc.returncode}):\n{proc.stderr}")
        return False
    if proc.stderr:
        print(proc.stderr, file=sys.stderr)
    return True


def cuda_gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags: SASS for every arch, PTX for the newest one."""
    names = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in names:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX of the newest arch lets newer GPUs JIT the kernels. Arch-specific targets (90a, 100a)
    # are not forward compatible, so the PTX uses the plain arch (compute_90 for 90a).
    newest = max(names, key=lambda a: int("".join(ch for ch in a if ch.isdigit())))
    portable = newest.rstrip("af")
    flags += ["-gencode", f"arch=compute_{portable},code=compute_{portable}"]
    return flags


def ordered_metadata_supported(version: tuple[int, ...]) -> bool:
    """True when a CUDA toolkit of ``version`` (major, minor) assembles mma.sp::ordered_metadata."""
    return tuple(version[:2]) >= ORDERED_METADATA_MIN_CUDA


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` output ("... release 12.4, V12.4.131"), else None."""
    m = re.search(r"release (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def sparse_mma_flags(nvcc: str) -> list[str]:
    """``-DNMKERN_SP_ORDERED_METADATA=1`` for nvcc >= 12.5, ``=0`` before; no flag when the version
    cannot be read (then the header decides from __CUDACC_VER_MAJOR__ / __CUDACC_VER_MINOR__)."""
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
        version = parse_nvcc_version(proc.stdout)
    except (OSError, subprocess.SubprocessError):
        version = None
    if version is None:
        _warn("could not read the nvcc version; csrc/cuda/sp24_device.cuh picks the mma.sp variant itself")
        return []
    flag = int(ordered_metadata_supported(version))
    print(f"nmkern setup: nvcc {version[0]}.{version[1]}: NMKERN_SP_ORDERED_METADATA={flag}")
    return [f"-DNMKERN_SP_ORDERED_METADATA={flag}"]


def build_cuda(out_dir: Path) -> None:
    if os.environ.get("NMKERN_SKIP_CUDA_BUILD") == "1":
        print("nmkern setup: NMKERN_SKIP_CUDA_BUILD=1, skipping the CUDA build")
        return
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        return
    nvcc = shutil.which("nvcc") or (
        str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if not nvcc or not Path(nvcc).exists():
        _warn("nvcc not found: no CUDA fatbin is built (the triton and reference backends still work)")
        return
    archs = os.environ.get("NMKERN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    # One translation unit that includes every .cu file: one fatbin, one RawModule.
    unity = out_dir / "_nmkern_cuda_all.cu"
    unity.write_text("".join(f'#include "{s.as_posix()}"\n' for s in sources))
    fatbin = out_dir / "nmkern_cuda.fatbin"
    # --threads 0: compile the per-arch targets in parallel on all cores. NMKERN_NVCC_FLAGS adds
    # flags (the build test passes "-Xptxas -v" to read register / spill figures from the log).
    import shlex

    extra = shlex.split(os.environ.get("NMKERN_NVCC_FLAGS", ""))
    cmd = [nvcc, "-fatbin", "-O3", "-std=c++17", "--threads", "0", f"-I{ROOT / 'csrc' / 'cuda'}",
           *sparse_mma_flags(nvcc), *cuda_gencode_flags(archs), *extra, "-o", str(fatbin), str(unity)]
    ok = _run(cmd)
    unity.unlink(missing_ok=True)
    if not ok:
        _warn("CUDA build failed: the cuda backend will try NVRTC at run time")
    # Ship the sources for the NVRTC fallback.
    src_out = out_dir / "cuda_src"
    src_out.mkdir(exist_ok=True)
    for p in (ROOT / "csrc" / "cuda").iterdir():
        if p.suffix in (".cu", ".cuh", ".h"):
            shutil.copy2(p, src_out / p.name)


def build_cpu(out_dir: Path) -> None:
    if os.environ.get("NMKERN_SKIP_CPU_BUILD") == "1":
        print("nmkern setup: NMKERN_SKIP_CPU_BUILD=1, skipping the CPU build")
        return
    sources = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    if not sources:
        return
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        _warn("no C++ compiler found: the cpu backend is unavailable (reference path used)")
        return
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    variants = CPU_ISA_FLAGS if x86 else {"generic": []}
    extra = os.environ.get("NMKERN_CPU_CFLAGS", "").split()
    for isa, flags in variants.items():
        lib = out_dir / f"libnmkern_cpu_{isa}.so"
        cmd = [cxx, "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-DNMKERN_ISA_" + isa.upper(),
               f"-I{ROOT / 'csrc' / 'cpu'}", *flags, *extra, *map(str, sources), "-o", str(lib)]
        if not _run(cmd):
            _warn(f"CPU build for {isa} failed: that variant is unavailable")


def build_native(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    build_cpu(out_dir)
    build_cuda(out_dir)


class BuildPyWithNative(build_py):
    """build_py that also compiles csrc/ into nmkern/_lib."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            out = ROOT / "nmkern" / "_lib"
        else:
            out = Path(self.build_lib) / "nmkern" / "_lib"
        build_native(out)


class BinaryDistribution(Distribution):
    """The wheel carries native libraries: tag it per platform, not py3-none-any."""

    def has_ext_modules(self):
        return True


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPyWithNative}, distclass=BinaryDistribution)
