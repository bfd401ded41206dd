"""Ratio table: nmkern CPU sparse linear time / dense F.linear time, side by side.

Each (case, shape, batch) point times dense and sparse calls with ``nmkern.timing``
(interleaved round by round in one process, warm-up first, medians), with the same
thread count on both sides (torch.get_num_threads() for MKL/oneDNN, the same number
of threads for nmkern's kernels), and reports the ratio of medians plus the ratio of
minima (the minima are less disturbed by other processes on a shared machine), warm
cache (one layer) and cold cache (``cold_*``: a stack of distinct layers whose dense
bytes exceed 4x the last-level cache, run like a model; ``--no-cold`` skips it).

    python bench/cpu_ratio_table.py                       # issue table, 4096x4096, batch 1/16/256
    python bench/cpu_ratio_table.py --minilm              # + MiniLM 384x1536 / 1536x384, tokens 1..512
    python bench/cpu_ratio_table.py --minilm-only --threads 1   # the MiniLM shapes alone (the README table)
    python bench/cpu_ratio_table.py --json r.json --png r.png
    python bench/cpu_ratio_table.py --quick               # smoke run: 512x512, batch 1/16, 0.2 s per point
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmkern import _cpu, benchmark, timing  # noqa: E402

# Targets from issue 5 (fp32, 4096x4096): max sparse/dense time ratio per batch.
TARGETS = {
    "2:4": {1: 0.55, 16: 0.80, 256: 1.00},
    "1x4@75%": {1: 0.30, 16: 0.50, 256: 0.80},
    "1:4": {1: 0.35, 16: 0.60, 256: 1.00},
}
CASES = {  # name -> nmkern.benchmark pattern
    "2:4": benchmark.parse_pattern("2:4"),
    "1x4@75%": benchmark.parse_pattern("1x4:0.75"),
    "1:4": benchmark.parse_pattern("1:4"),
}


def masked_weight(case: str, out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    return benchmark.masked_weight(CASES[case], out_f, in_f, generator=torch.Generator().manual_seed(seed))


def prepare(case: str, w: torch.Tensor) -> _cpu.CpuLinear:
    return _cpu.prepare_cpu_linear(w, *CASES[case].kernel_args())


def _ratios(t: dict[str, timing.Timing], prefix: str = "") -> dict:
    """``{prefix}dense_median_ms`` ... (:func:`nmkern.timing.columns`) plus the ratio of medians and of minima."""
    d, s = t["dense"], t["sparse"]
    return timing.columns(t, prefix=prefix) | {f"{prefix}ratio_median": s.median / d.median,
                                               f"{prefix}ratio_min": s.min / d.min}


def measure(case: str, out_f: int, in_f: int, batch: int, seconds: float, threads: int, cold: bool = True) -> dict:
    """One point: dense F.linear vs nmkern's CPU kernel, warm (and cold) cache, ``seconds`` each."""
    w = masked_weight(case, out_f, in_f)
    copies = timing.cold_stack_size(w.numel() * 4) if cold else 1
    weights = [w] + [w.clone() for _ in range(copies - 1)]
    layers = [prepare(case, wc) for wc in weights]
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(threads)
    stacks = {"dense": [lambda wc=wc: F.linear(x, wc) for wc in weights],
              "sparse": [lambda layer=layer: layer(x, num_threads=threads) for layer in layers]}
    with torch.no_grad():
        res = timing.time_warm_cold(stacks, cold=cold, seconds=seconds)
    row = {"case": case, "out_features": out_f, "in_features": in_f, "batch": batch, "threads": threads,
           **_ratios(res.warm), "repeats": res.warm["dense"].repeats, "packed_bytes": layers[0].nbytes,
           "dense_bytes": w.numel() * 4}
    if res.cold is not None:
        row |= _ratios(res.cold, "cold_") | {"cold_layers": copies, "cold_repeats": res.cold["dense"].repeats}
    return row


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--size", type=int, default=4096, help="square weight size of the issue table")
    ap.add_argument("--minilm", action="store_true", help="also MiniLM 384x1536 / 1536x384, tokens 1..512")
    ap.add_argument("--minilm-only", action="store_true", help="the MiniLM shapes alone")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per point and cache state")
    ap.add_argument("--no-cold", action="store_true", help="warm cache only")
    ap.add_argument("--quick", action="store_true", help="smoke run: --size 512 --batches 1,16 --budget 0.2")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.budget = 512, "1,16", 0.2
    return args


def _line(r: dict) -> str:
    target = r["target"]
    mark = "" if target is None else (f" target <= {target:.2f}: " + ("met" if r["met"] else "NOT met"))
    cold = f"; cold ratio {r['cold_ratio_median']:.3f} ({r['cold_layers']} layers)" if "cold_ratio_median" in r else ""
    return (f"{r['case']:8s} {r['out_features']:5d}x{r['in_features']:<5d} batch {r['batch']:4d}: "
            f"dense {r['dense_median_ms']:9.3f} ms sparse {r['sparse_median_ms']:9.3f} ms  ratio {r['ratio_median']:.3f} "
            f"(min-ratio {r['ratio_min']:.3f}, {r['repeats']} reps){cold}{mark}")


def main(argv=None) -> int:
    args = _parse_args(argv)
    if not _cpu.available():
        print("nmkern CPU library unavailable: build it with `pip install -e .`", file=sys.stderr)
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    shapes = [] if args.minilm_only else [(args.size, args.size, batches)]
    if args.minilm or args.minilm_only:
        tokens = [1, 8, 32, 128, 512]
        shapes += [(1536, 384, tokens), (384, 1536, tokens)]
    torch.set_num_threads(args.threads)
    meta = timing.machine_info() | {
        "isa": str(_cpu.isa()), "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    print(f"CPU: {meta['cpu']}; nmkern ISA: {meta['isa']}; threads: {args.threads} (torch.set_num_threads "
          f"and nmkern's threads); torch {meta['torch']}; last-level cache {meta['llc_bytes'] >> 20} MiB")
    rows = []
    for out_f, in_f, bs in shapes:
        for case in args.cases.split(","):
            for b in bs:
                r = measure(case, out_f, in_f, b, args.budget, args.threads, cold=not args.no_cold)
                target = TARGETS.get(case, {}).get(b) if (out_f, in_f) == (args.size, args.size) == (4096, 4096) else None
                r["target"] = target
                r["met"] = None if target is None else r["ratio_median"] <= target
                rows.append(r)
                print(_line(r), flush=True)
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
