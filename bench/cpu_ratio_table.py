"""Ratio table: nmkern CPU sparse linear time / dense F.linear time, side by side.

Each (case, shape, batch) point alternates dense and sparse calls (the order
flips every repeat) in one process, with the same thread count on both sides
(torch.get_num_threads() for MKL/oneDNN, the same number of threads for
nmkern's kernels), and reports the ratio of medians plus the ratio of minima (the minima
are less disturbed by other processes on a shared machine).

    python bench/cpu_ratio_table.py                       # issue table, 4096x4096, batch 1/16/256
    python bench/cpu_ratio_table.py --minilm              # + MiniLM 384x1536 / 1536x384, tokens 1..512
    python bench/cpu_ratio_table.py --json r.json --png r.png
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nmkern  # noqa: E402
from nmkern import _cpu  # noqa: E402

# Targets from issue 5 (fp32, 4096x4096): max sparse/dense time ratio per batch.
TARGETS = {
    "2:4": {1: 0.55, 16: 0.80, 256: 1.00},
    "1x4@75%": {1: 0.30, 16: 0.50, 256: 0.80},
    "1:4": {1: 0.35, 16: 0.60, 256: 1.00},
}
CASES = {  # name -> (kind, n, m, block, block sparsity)
    "2:4": ("nm", 2, 4, 0, 0.0),
    "1x4@75%": ("1xn", 0, 0, 4, 0.75),
    "1:4": ("nm", 1, 4, 0, 0.0),
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def masked_weight(case: str, out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    kind, n, m, block, sparsity = CASES[case]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if kind == "nm":
        return nmkern.apply_nm(w, n, m)
    return w * nmkern.block_mask_1xn(w, block, sparsity)


def time_pair(dense_fn, sparse_fn, repeats: int) -> tuple[list[float], list[float]]:
    for _ in range(2):  # warm-up: page in the weights, start the thread pools
        dense_fn()
        sparse_fn()
    td, ts = [], []
    for r in range(repeats):
        order = ((dense_fn, td), (sparse_fn, ts)) if r % 2 == 0 else ((sparse_fn, ts), (dense_fn, td))
        for fn, acc in order:
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return td, ts


def measure(case: str, out_f: int, in_f: int, batch: int, repeats: int, threads: int) -> dict:
    w = masked_weight(case, out_f, in_f)
    kind, n, m, block, _ = CASES[case]
    layer = _cpu.prepare_cpu_linear(w, kind, n, m, block)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(threads)
    with torch.no_grad():
        td, ts = time_pair(lambda: F.linear(x, w), lambda: layer(x, num_threads=threads), repeats)
    md, ms = statistics.median(td), statistics.median(ts)
    return {
        "case": case, "out_features": out_f, "in_features": in_f, "batch": batch, "threads": threads,
        "dense_median_ms": md * 1e3, "sparse_median_ms": ms * 1e3, "ratio_median": ms / md,
        "dense_min_ms": min(td) * 1e3, "sparse_min_ms": min(ts) * 1e3, "ratio_min": min(ts) / min(td),
        "repeats": repeats, "packed_bytes": layer.nbytes, "dense_bytes": w.numel() * 4,
    }


def repeats_for(out_f: int, in_f: int, batch: int, budget_s: float) -> int:
    est = max(2e-5, 2.0 * out_f * in_f * batch / 20e9 + out_f * in_f * 4 / 15e9)  # rough dense time
    return int(min(200, max(7, budget_s / (2 * est))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--size", type=int, default=4096, help="square weight size of the issue table")
    ap.add_argument("--minilm", action="store_true", help="also MiniLM 384x1536 / 1536x384, tokens 1..512")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per point (sets the repeats)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    if not _cpu.available():
        print("nmkern CPU library unavailable: build it with `pip install -e .`", file=sys.stderr)
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    cases = args.cases.split(",")
    shapes = [(args.size, args.size, batches)]
    if args.minilm:
        tokens = [1, 8, 32, 128, 512]
        shapes += [(1536, 384, tokens), (384, 1536, tokens)]
    print(f"CPU: {cpu_model()}; nmkern ISA: {_cpu.isa()}; threads: {args.threads} (torch.set_num_threads "
          f"and nmkern's threads); torch {torch.__version__}")
    rows = []
    for out_f, in_f, bs in shapes:
        for case in cases:
            for b in bs:
                r = measure(case, out_f, in_f, b, repeats_for(out_f, in_f, b, args.budget), args.threads)
                target = TARGETS.get(case, {}).get(b) if (out_f, in_f) == (args.size, args.size) == (4096, 4096) else None
                r["target"] = target
                r["met"] = None if target is None else r["ratio_median"] <= target
                rows.append(r)
                mark = "" if target is None else (f" target <= {target:.2f}: " + ("met" if r["met"] else "NOT met"))
                print(f"{case:8s} {out_f:5d}x{in_f:<5d} batch {b:4d}: dense {r['dense_median_ms']:9.3f} ms "
                      f"sparse {r['sparse_median_ms']:9.3f} ms  ratio {r['ratio_median']:.3f} "
                      f"(min-ratio {r['ratio_min']:.3f}, {r['repeats']} reps){mark}", flush=True)
    meta = {"cpu": cpu_model(), "isa": str(_cpu.isa()), "threads": args.threads, "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.png:
        plot(rows, meta, args.png)
    return 0


def plot(rows: list[dict], meta: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list] = {}
    for r in rows:
        series.setdefault((r["case"], r["out_features"], r["in_features"]), []).append((r["batch"], r["ratio_median"]))
    for (case, o, i), pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{case} {o}x{i}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (tokens)")
    ax.set_ylabel("time ratio sparse / dense F.linear")
    ax.set_title(f"nmkern CPU ({meta['isa']}, {meta['threads']} threads)\n{meta['cpu']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
