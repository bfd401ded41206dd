"""Which OpenMP runtime this process has mapped, and whether torch's ops run on it.

nmkern/_cpu.py runs its kernels on torch's own OpenMP team when both use the one runtime
(NMKERN_CPU_THREADING=auto); two runtimes would keep two teams spinning on the same cores.
"""

from __future__ import annotations

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


def shares_torch_openmp(maps: str | None = None) -> bool:
    """True when torch runs its ops on OpenMP and nmkern's loaded library uses that same runtime (one mapped)."""
    return "OpenMP" in torch.__config__.parallel_info() and len(openmp_runtimes(maps)) == 1
