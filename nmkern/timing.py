"""The one timing harness of nmkern: ``nmkern bench``, the demo, ``bench/`` and the examples use it.

Rules it implements (the project's benchmark rules):

* **interleaved**: candidates run in turn, round by round, and the order rotates every
  round, so a load drift on a shared machine hits every candidate alike;
* **warm-up** rounds first (page in weights, start thread pools, JIT), then timed rounds;
* **medians** (with quartiles and the minimum) of per-call wall times, never a single run;
* **warm and cold cache**: warm = one layer called again and again; cold = a stack of
  distinct copies whose dense bytes exceed ``4x`` the last-level cache, run one after
  another like a model (:func:`cold_stack_size`, :func:`time_warm_cold`);
* **the machine recorded** with every result (:func:`machine_info`).

API::

    t = time_interleaved({"dense": f, "sparse": g}, seconds=2.0)   # -> {name: Timing}
    t["sparse"].median / t["dense"].median
    columns(t)                      # {"dense_median_ms": .., "sparse_ratio": .., ...}
    machine_info()                  # {"cpu": .., "cpu_flags": [..], "cpu_isa": .., "cores": .., ...}
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

# CPU features the kernels (nmkern's CPU library, MKL/oneDNN for the dense side) care about.
RELEVANT_CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",  # x86
    "asimd", "asimdhp", "asimddp", "sve", "sve2", "i8mm", "bf16",  # arm64
)
DEFAULT_LLC_BYTES = 32 << 20  # used when the cache size cannot be read
COLD_FACTOR = 4.0  # cold cache: the stack's dense bytes exceed this many last-level caches
MAX_COLD_LAYERS = 1024  # longest cold-cache stack (layers under ~128 KiB stay short of the 4x)


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call wall times (seconds) of one candidate, one entry per timed round."""

    times: tuple[float, ...]

    def __post_init__(self):
        if not self.times:
            raise ValueError("Timing needs at least one time")

    @property
    def repeats(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def quartiles(self) -> tuple[float, float]:
        """(first, third) quartile, inclusive method (the median's neighbours for 3 times)."""
        if len(self.times) == 1:
            return self.times[0], self.times[0]
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return q1, q3

    def scaled(self, factor: float) -> Timing:
        """Every time multiplied by ``factor`` (e.g. ``1 / layers`` for a per-layer time of a stack)."""
        return Timing(tuple(t * factor for t in self.times))

    def to_dict(self, prefix: str = "") -> dict:
        """``{prefix}median_ms``, ``_q1_ms``, ``_q3_ms``, ``_min_ms`` (milliseconds)."""
        q1, q3 = self.quartiles
        return {f"{prefix}median_ms": self.median * 1e3, f"{prefix}q1_ms": q1 * 1e3, f"{prefix}q3_ms": q3 * 1e3,
                f"{prefix}min_ms": self.min * 1e3}


def columns(timings: Mapping[str, Timing], *, baseline: str | None = "dense", prefix: str = "") -> dict:
    """Flat result columns: ``{prefix}{name}_median_ms`` / ``_q1_ms`` / ``_q3_ms`` / ``_min_ms`` for every
    candidate, and ``{prefix}{name}_ratio`` (its median / the baseline's median) for the others."""
    out: dict = {}
    for name, t in timings.items():
        out |= t.to_dict(f"{prefix}{name}_")
    if baseline is not None and baseline in timings:
        base = timings[baseline].median
        for name, t in timings.items():
            if name != baseline:
                out[f"{prefix}{name}_ratio"] = t.median / base
    return out


# --------------------------------------------------------------------------- timing


def _time_one(fn: Callable[[], object], number: int, sync, timer) -> float:
    if sync is not None:
        sync()
    t0 = timer()
    for _ in range(number):
        fn()
    if sync is not None:
        sync()
    return (timer() - t0) / number


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, seconds: float | None = None,
                     repeats: int | None = None, warmup: int = 2, number: int = 1, min_repeats: int = 5,
                     max_repeats: int = 500, sync: Callable[[], object] | None = None,
                     timer: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time zero-argument callables against each other; returns ``{name: Timing}`` in ``fns``' order.

    Round ``r`` calls every candidate once, starting at candidate ``r % len(fns)`` (A B C,
    B C A, C A B, ...). ``warmup`` untimed rounds come first. Give ``repeats`` (timed rounds)
    or ``seconds`` (a budget, default 1 s: rounds run until it is spent, at least
    ``min_repeats`` and at most ``max_repeats`` of them). ``number``: back-to-back calls per
    timed sample (the sample is divided by it). ``sync``: called before starting and before
    stopping each clock (e.g. ``torch.cuda.synchronize``; :func:`device_sync`). ``timer``:
    the clock (seconds).
    """
    names = list(fns)
    if not names:
        raise ValueError("time_interleaved: no functions to time")
    if seconds is not None and repeats is not None:
        raise ValueError("time_interleaved: give seconds or repeats, not both")
    if repeats is not None and repeats < 1 or seconds is not None and seconds <= 0 or number < 1 or warmup < 0:
        raise ValueError(f"time_interleaved: need repeats >= 1, seconds > 0, number >= 1, warmup >= 0 "
                         f"(got repeats={repeats}, seconds={seconds}, number={number}, warmup={warmup})")
    budget = 1.0 if seconds is None else seconds
    for _ in range(warmup):
        for k in names:
            _time_one(fns[k], number, sync, timer)
    samples: dict[str, list[float]] = {k: [] for k in names}
    start, r = timer(), 0
    while True:
        if repeats is not None and r >= repeats:
            break
        if repeats is None and (r >= max_repeats or r >= min_repeats and timer() - start >= budget):
            break
        for k in names[r % len(names):] + names[:r % len(names)]:
            samples[k].append(_time_one(fns[k], number, sync, timer))
        r += 1
    return {k: Timing(tuple(v)) for k, v in samples.items()}


def device_sync(device: str | torch.device | None) -> Callable[[], object] | None:
    """``torch.cuda.synchronize`` for a CUDA device, else None (CPU calls are synchronous)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return None


# --------------------------------------------------------------------------- cold cache


def last_level_cache_bytes(device: str | torch.device | None = None) -> int:
    """Size of one last-level cache: the CPU's (sysfs, then lscpu) or, for a CUDA device, the GPU's L2."""
    if device is not None and torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        return int(getattr(props, "L2_cache_size", 0) or DEFAULT_LLC_BYTES)
    best = (0, 0)
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (idx / "type").read_text().strip() == "Instruction":
                continue
            level, size = int((idx / "level").read_text()), _parse_size((idx / "size").read_text())
        except (OSError, ValueError):
            continue
        best = max(best, (level, size))
    return best[1] or _lscpu_llc() or DEFAULT_LLC_BYTES


def _parse_size(text: str) -> int:
    """'32768K' / '32 MiB' / '1024 KiB (2 instances)' -> bytes."""
    t = text.split("(")[0].strip().replace(" ", "").upper().replace("IB", "").rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(float(t.rstrip("KMG")) * mult)


def _lscpu_llc() -> int:
    for line in reversed(_lscpu().splitlines()):
        if line.startswith(("L3 cache:", "L2 cache:")):
            try:
                return _parse_size(line.split(":", 1)[1])
            except ValueError:
                return 0
    return 0


def cold_stack_size(layer_bytes: int, *, llc_bytes: int | None = None, factor: float = COLD_FACTOR,
                    max_layers: int = MAX_COLD_LAYERS) -> int:
    """How many distinct copies of a layer with ``layer_bytes`` dense weight bytes make a stack whose
    dense bytes exceed ``factor`` x the last-level cache (1 when one layer already does), at most
    ``max_layers`` (tiny layers: call overhead, not memory, is what a longer stack would measure)."""
    if layer_bytes < 1:
        raise ValueError(f"cold_stack_size: layer_bytes must be >= 1, got {layer_bytes}")
    llc = last_level_cache_bytes() if llc_bytes is None else llc_bytes
    return min(max_layers, int(factor * llc // layer_bytes) + 1)


def run_stack(fns: Sequence[Callable[[], object]]) -> Callable[[], None]:
    """One call that runs every function once, in order: a forward pass through a stack of layers."""
    fns = list(fns)

    def call() -> None:
        for f in fns:
            f()

    return call


@dataclasses.dataclass(frozen=True)
class WarmCold:
    """Per-layer timings with a warm cache (one copy called repeatedly) and a cold one (the stack)."""

    warm: dict[str, Timing]
    cold: dict[str, Timing] | None
    cold_layers: int

    def columns(self, baseline: str | None = "dense") -> dict:
        """:func:`columns` of the warm timings, plus ``cold_``-prefixed ones and ``cold_layers``."""
        out = {"repeats": next(iter(self.warm.values())).repeats} | columns(self.warm, baseline=baseline)
        if self.cold is not None:
            out |= {"cold_layers": self.cold_layers, "cold_repeats": next(iter(self.cold.values())).repeats}
            out |= columns(self.cold, baseline=baseline, prefix="cold_")
        return out


def time_warm_cold(stacks: Mapping[str, Sequence[Callable[[], object]]], *, cold: bool = True, **kw) -> WarmCold:
    """Warm- and cold-cache per-layer timings of each candidate.

    ``stacks[name]``: calls of distinct copies of that candidate's layer (own weights each),
    as many as :func:`cold_stack_size` asks for. Warm: the first copy, timed interleaved.
    Cold (when ``cold``): :func:`run_stack` of all copies, timed interleaved, divided by the
    number of copies. ``kw`` goes to :func:`time_interleaved` (``seconds``, ``sync``, ...).
    """
    sizes = {len(v) for v in stacks.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"time_warm_cold: every stack needs the same, non-zero number of copies (got {sizes})")
    layers = sizes.pop()
    warm = time_interleaved({k: v[0] for k, v in stacks.items()}, **kw)
    if not cold:
        return WarmCold(warm, None, layers)
    stacked = time_interleaved({k: run_stack(v) for k, v in stacks.items()}, **kw)
    return WarmCold(warm, {k: t.scaled(1 / layers) for k, t in stacked.items()}, layers)


# --------------------------------------------------------------------------- machine


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name() -> str:
    """The CPU model ("AMD EPYC 7B13", ...)."""
    for line in _lscpu().splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The :data:`RELEVANT_CPU_FLAGS` this CPU reports (Linux ``/proc/cpuinfo``; [] elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            have = set(value.split())
            return [f for f in RELEVANT_CPU_FLAGS if f in have]
    return []


def _nmkern_cpu_isa() -> str | None:
    try:
        from . import _cpu

        isa = _cpu.isa()
    except Exception:  # the library failed to load: recorded as None
        return None
    return None if isa is None else str(isa)


def _nmkern_cpu_library() -> str | None:
    """:func:`nmkern._cpu.library_id`, or None where the library or its file cannot be read."""
    try:
        from . import _cpu

        return _cpu.library_id()
    except Exception:  # the library failed to load, or its file went away: recorded as None
        return None


def machine_info(device: str | torch.device | None = None) -> dict:
    """What a timing ran on. Keys: ``cpu``, ``cpu_flags``, ``cpu_isa`` (the build nmkern's CPU library
    loaded: ``nmkern._cpu.isa()``, None without it), ``torch_cpu_capability``, ``cores``, ``threads``
    (torch's), ``llc_bytes`` (of ``device``), ``torch``, ``nmkern``, ``python``, ``platform``, ``cuda``
    (torch's CUDA version), ``gpu`` (name of ``device`` or of GPU 0 when CUDA is present, else None)."""
    from . import __version__

    gpu = None
    if torch.cuda.is_available():
        dev = torch.device(device) if device is not None and torch.device(device).type == "cuda" else None
        gpu = torch.cuda.get_device_name(dev)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        capability = None
    return {
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "cpu_isa": _nmkern_cpu_isa(), "torch_cpu_capability": capability,
        "cores": os.cpu_count(), "threads": torch.get_num_threads(), "llc_bytes": last_level_cache_bytes(device),
        "torch": torch.__version__, "nmkern": __version__, "python": platform.python_version(),
        "platform": platform.platform(), "cuda": torch.version.cuda, "gpu": gpu,
    }


__all__ = [
    "COLD_FACTOR", "Timing", "WarmCold", "cold_stack_size", "columns", "cpu_flags", "cpu_name", "device_sync",
    "last_level_cache_bytes", "machine_info", "run_stack", "time_interleaved", "time_warm_cold",
]
