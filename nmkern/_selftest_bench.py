"""The short benchmark of :func:`nmkern.selftest`: dense vs every sparse path, interleaved, as ratios.

Dense is ``F.linear`` on the masked weight (CPU BLAS or cuBLAS); each sparse path is a packed
:class:`~nmkern.SparseLinear` forced onto it (nmkern's CPU kernels; on a GPU the CUDA 2:4
kernel, Triton and cuSPARSELt). All candidates of a point run interleaved through
:func:`nmkern.timing.time_interleaved`; the table shows each path's median / dense's median,
and on a GPU also the CUDA kernel's median / cuSPARSELt's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import timing
from ._selftest_checks import Pat, dtype_name, masked

SPARSE_PATHS = ("cpu", "triton", "cuda", "cusparselt")


def bench_plan(device: str, quick: bool) -> dict:
    """Shape, batches, patterns and seconds per point of the benchmark on ``device``."""
    gpu = device == "cuda"
    return {
        "shape": (4096, 4096),
        "batches": [1, 16] if quick else [1, 16, 256],
        "patterns": [Pat(2, 4)] if gpu else [Pat(2, 4), Pat(block=4, sparsity=0.75)],
        "seconds": (0.3 if gpu else 0.5) if quick else 1.5,
        "dtype": torch.float16 if gpu else torch.float32,
    }


def _layer(w: torch.Tensor, pat: Pat, path: str):
    from .nn import SparseLinear

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = SparseLinear.from_dense(lin, **pat.layer_kwargs()).pack().eval()
    layer.backend = path  # refused (ValueError, with every reason) when the path cannot run this layer
    return layer


def _candidates(w: torch.Tensor, pat: Pat, paths: dict[str, str | None]) -> tuple[dict, dict]:
    """({name: fn(x)}, {name: why not}) for dense and each sparse path; ``paths[p]``: None when ``p``
    can be timed here, else why not."""
    fns = {"dense": lambda x: F.linear(x, w)}
    skipped = {}
    for path in SPARSE_PATHS:
        if path not in paths:
            continue
        if paths[path] is not None:
            skipped[path] = paths[path]
            continue
        try:
            layer = _layer(w, pat, path)
            probe = torch.zeros(1, w.shape[1], device=w.device, dtype=w.dtype)
            layer(probe)  # builds the path's layout, compiles or loads its kernel, outside the timing
            fns[path] = layer
        except Exception as e:  # noqa: BLE001 - reported in the table, not fatal for a timing
            skipped[path] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return fns, skipped


def bench(device: str, paths: dict[str, str | None], quick: bool, seed: int = 0) -> dict:
    """Time dense vs ``paths`` (sparse path -> None if it may be timed, else why not) on ``device``.

    Returns ``{"meta": ..., "rows": [...]}``; a row: pattern, batch, shape, dtype, repeats,
    ``{name}_median_ms`` / quartiles / min per candidate (:func:`nmkern.timing.columns`),
    ``{path}_ratio`` (median / dense median), ``cuda_vs_cusparselt`` when both ran, and
    ``skipped`` ({path: why}) for the paths that did not.
    """
    plan = bench_plan(device, quick)
    out_f, in_f = plan["shape"]
    dtype = plan["dtype"]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for pat in plan["patterns"]:
        w = masked(torch.randn(out_f, in_f, generator=g), pat).to(device, dtype)
        fns, skipped = _candidates(w, pat, paths)
        for batch in plan["batches"]:
            x = torch.randn(batch, in_f, generator=g).to(device, dtype)
            with torch.no_grad():
                times = timing.time_interleaved({k: (lambda f=f: f(x)) for k, f in fns.items()},
                                                seconds=plan["seconds"], sync=timing.device_sync(device))
            row = {"pattern": str(pat), "batch": batch, "out_features": out_f, "in_features": in_f,
                   "device": device, "dtype": dtype_name(dtype), "repeats": times["dense"].repeats}
            row |= timing.columns(times, baseline="dense")
            if "cuda" in times and "cusparselt" in times:
                row["cuda_vs_cusparselt"] = times["cuda"].median / times["cusparselt"].median
            if skipped:
                row["skipped"] = dict(skipped)
            rows.append(row)
    meta = {"device": device, "dtype": dtype_name(dtype), "shape": [out_f, in_f], "batches": plan["batches"],
            "seconds_per_point": plan["seconds"], "threads": torch.get_num_threads()}
    return {"meta": meta, "rows": rows}


def format_bench(result: dict) -> str:
    """The benchmark as a text table of time ratios (< 1: faster than dense)."""
    meta, rows = result["meta"], result["rows"]
    names = [p for p in SPARSE_PATHS if any(f"{p}_ratio" in r for r in rows)]
    extra = any("cuda_vs_cusparselt" in r for r in rows)
    dense = "cuBLAS" if meta["device"] == "cuda" else "CPU BLAS"
    lines = [f"benchmark: {meta['shape'][0]}x{meta['shape'][1]} {meta['dtype']} on {meta['device']}, "
             f"{meta['threads']} thread(s); time ratio path / dense F.linear ({dense}), median of interleaved calls, "
             "< 1 is faster"]
    heads = names + (["cuda/cusparselt"] if extra else [])
    lines.append(f"{'pattern':<10} {'batch':>6} " + " ".join(f"{h:>15}" for h in heads))
    for r in rows:
        cells = [f"{r[f'{p}_ratio']:>15.2f}" if f"{p}_ratio" in r else f"{'-':>15}" for p in names]
        if extra:
            cells.append(f"{r['cuda_vs_cusparselt']:>15.2f}" if "cuda_vs_cusparselt" in r else f"{'-':>15}")
        lines.append(f"{r['pattern']:<10} {r['batch']:>6} " + " ".join(cells))
    if not names:
        lines.append("(no sparse path could be timed here)")
    skipped = {k: v for r in rows for k, v in r.get("skipped", {}).items()}
    lines += [f"  not timed: {k}: {v}" for k, v in skipped.items()]
    return "\n".join(lines)


__all__ = ["SPARSE_PATHS", "bench", "bench_plan", "format_bench"]
