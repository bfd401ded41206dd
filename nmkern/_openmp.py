"""Which OpenMP runtime this process has mapped, and whether torch's ops run on it.

nmkern/_cpu.py runs its kernels on torch's own OpenMP team when both use the one runtime
(NMKERN_CPU_THREADING=auto); two runtimes would keep two teams spinning on the same cores.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch


def openmp_runtimes(maps: str | None = None) -> set[str]:
    """The OpenMP runtime files mapped in this process (``/proc/self/maps``; empty where there is none)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return set()
    found = set()
    for line in maps.splitlines():
        fields = line.split(None, 5)  # address, perms, offset, dev, inode, path (absent for anonymous maps)
        if len(fields) == 6 and any(n in fields[5].rsplit("/", 1)[-1] for n in ("libgomp", "libiomp", "libomp")):
            found.add(fields[5])
    return found


def omp_entry(lib) -> int | None:
    """The address at which ``lib`` (a ``ctypes.CDLL``) resolves ``omp_get_max_threads``: dlsym on a library's handle
    searches it and its dependencies, so the address names the OpenMP runtime the library runs on (None: none)."""
    try:
        return ctypes.cast(lib.omp_get_max_threads, ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None


def torch_omp_entry() -> int | None:
    """:func:`omp_entry` of torch's CPU library (whose OpenMP team runs torch's ops); None where it is not found."""
    path = Path(torch.__file__).resolve().parent / "lib" / "libtorch_cpu.so"
    try:
        return omp_entry(ctypes.CDLL(str(path)))  # loaded already: the same handle, nothing loaded again
    except OSError:
        return None


def shares_torch_openmp(maps: str | None = None, lib=None) -> bool:
    """True when torch runs its ops on OpenMP and nmkern's loaded library ``lib`` uses that same runtime.

    With ``lib``: the runtimes both libraries resolve ``omp_get_max_threads`` in (:func:`omp_entry`). Another
    runtime mapped in the process does not matter then: scikit-learn's wheel maps a second libgomp under a
    hashed name, which nmkern's library (asking for libgomp.so.1) never binds to; counting the mapped runtimes
    alone took that for two teams and ran nmkern's kernels on its own pool, 1.13x dense for MiniLM-L6 bf16 2:4
    against 0.86x on torch's team (2-core Xeon). Without ``lib``, or where an address is not found: exactly one
    runtime mapped (``maps``: /proc/self/maps)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    if lib is not None:
        ours, torch_s = omp_entry(lib), torch_omp_entry()
        if ours is not None and torch_s is not None:
            return ours == torch_s
    return len(openmp_runtimes(maps)) == 1
