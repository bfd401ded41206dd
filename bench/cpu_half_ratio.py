"""Half-precision ratio table: nmkern CPU sparse linear (bf16 / fp16) time / dense F.linear time, same dtype.

For 4096x4096 (out x in), batch 1/16/256, patterns 2:4, 1:4 and 1x8 at 75% sparsity, dtypes
bf16 and fp16: dense ``F.linear`` and nmkern's kernel are timed interleaved round by round
(``nmkern.timing``: warm-up rounds first, medians over the rounds; minima reported too), both
on ``--threads`` threads (torch.set_num_threads and the kernel's thread count), with a warm
cache (one layer called repeatedly) and a cold one (a stack of distinct layers whose dense
bytes exceed 4x the last-level cache, run like a model; capped at ``--max-stack-gib`` of
weights, said in the output when the cap bites). Writes a table and a JSON file.

    python bench/cpu_half_ratio.py                    # the issue table -> bench/cpu_half_ratio_results.json
    python bench/cpu_half_ratio.py --quick            # smoke run: 512x512, batch 1/16, 0.2 s per point
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmkern import _cpu, benchmark, timing  # noqa: E402

# Targets from the issue (4096x4096, vs dense in the same dtype): max sparse/dense time ratio per batch.
TARGETS = {"2:4": {1: 0.60, 16: 0.80, 256: 1.00}, "1:4": {1: 0.35, 16: 0.50, 256: 0.80}}
CASES = {"2:4": "2:4", "1:4": "1:4", "1x8@75%": "1x8:0.75"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "cpu_half_ratio_results.json"


def _copies(layer: _cpu.CpuLinear, count: int) -> list[_cpu.CpuLinear]:
    """``count`` layers with the same packed values in their own memory (packing once, not per copy)."""
    return [layer] + [_cpu.CpuLinear(layer.kind, layer.n, layer.m, layer.block, layer.out_features,
                                     layer.in_features, {k: t.clone() for k, t in layer.tensors.items()})
                      for _ in range(count - 1)]


def _stack_size(dense_bytes: int, packed_bytes: int, max_gib: float) -> tuple[int, str]:
    """(layers, note): the cold stack of nmkern.timing, capped so dense + packed copies fit ``max_gib``."""
    want = timing.cold_stack_size(dense_bytes)
    cap = max(1, int(max_gib * (1 << 30) // (dense_bytes + packed_bytes)))
    count = min(want, cap)
    llc = timing.last_level_cache_bytes()
    reach = f"{count * dense_bytes / llc:.1f}x the {llc >> 20} MiB LLC"
    why = f"capped by --max-stack-gib {max_gib}" if cap < want else (
        f"timing.MAX_COLD_LAYERS" if count * dense_bytes <= timing.COLD_FACTOR * llc else "> 4x LLC")
    return count, f"{count} layers = {count * dense_bytes / 2 ** 20:.0f} MiB dense = {reach} ({why})"


def measure(case: str, dtype_name: str, size: int, batch: int, args) -> dict:
    dtype = DTYPES[dtype_name]
    w = benchmark.masked_weight(benchmark.parse_pattern(CASES[case]), size, size,
                                generator=torch.Generator().manual_seed(0)).to(dtype)
    layer = _cpu.prepare_cpu_linear(w, *benchmark.parse_pattern(CASES[case]).kernel_args())
    count, note = _stack_size(w.numel() * w.element_size(), layer.nbytes, args.max_stack_gib) if args.cold else (1, "")
    weights, layers = [w] + [w.clone() for _ in range(count - 1)], _copies(layer, count)
    x = torch.randn(batch, size, generator=torch.Generator().manual_seed(1)).to(dtype)
    stacks = {"dense": [lambda wc=wc: F.linear(x, wc) for wc in weights],
              "sparse": [lambda lc=lc: lc(x, num_threads=args.threads) for lc in layers]}
    with torch.no_grad():
        res = timing.time_warm_cold(stacks, cold=args.cold, seconds=args.budget)
    row = {"case": case, "dtype": dtype_name, "out_features": size, "in_features": size, "batch": batch,
           "packed_bytes": layer.nbytes, "dense_bytes": w.numel() * w.element_size(), "cold_note": note}
    for prefix, t in (("", res.warm), ("cold_", res.cold)):
        if t is not None:
            row |= timing.columns(t, prefix=prefix) | {
                f"{prefix}ratio_median": t["sparse"].median / t["dense"].median,
                f"{prefix}ratio_min": t["sparse"].min / t["dense"].min, f"{prefix}repeats": t["dense"].repeats}
    target = TARGETS.get(case, {}).get(batch) if size == 4096 else None
    row |= {"target": target, "met": None if target is None else row["ratio_median"] <= target}
    if args.cold and target is not None:
        row["cold_met"] = row["cold_ratio_median"] <= target
    return row


def _line(r: dict) -> str:
    def cell(prefix):
        if f"{prefix}ratio_median" not in r:
            return " " * 33
        return (f"{r[f'{prefix}dense_median_ms']:8.3f} {r[f'{prefix}sparse_median_ms']:8.3f} "
                f"{r[f'{prefix}ratio_median']:5.2f} ({r[f'{prefix}ratio_min']:4.2f})")
    mark = "" if r["target"] is None else f"  <= {r['target']:.2f}: " + ("met" if r["met"] else "MISSED")
    if r.get("cold_met") is not None:
        mark += " / cold " + ("met" if r["cold_met"] else "MISSED")
    return f"{r['dtype']:5s} {r['case']:8s} {r['batch']:5d} | {cell('')} | {cell('cold_')}{mark}"


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per point and cache state")
    ap.add_argument("--no-cold", dest="cold", action="store_false", help="warm cache only")
    ap.add_argument("--max-stack-gib", type=float, default=12.0,
                    help="cap on the cold stack's dense + packed weight bytes (this machine has 24 GiB of RAM)")
    ap.add_argument("--quick", action="store_true", help="smoke run: --size 512 --batches 1,16 --budget 0.2")
    ap.add_argument("--json", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.budget = 512, "1,16", 0.2
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    if not _cpu.available():
        print("nmkern CPU library unavailable: build it with `pip install -e .`", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    meta = timing.machine_info() | {"isa": str(_cpu.isa()), "load_average_start": os.getloadavg(),
                                    "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))}
    print(f"CPU: {meta['cpu']}; nmkern ISA {meta['isa']}; {args.threads} threads (torch and nmkern); torch "
          f"{meta['torch']} (CPU capability {meta['torch_cpu_capability']}); LLC {meta['llc_bytes'] >> 20} MiB; "
          f"load average {meta['load_average_start'][0]:.2f}")
    print(f"{size_note(args)}\n{'dtype':5s} {'pattern':8s} {'batch':>5s} | {'warm: dense ms, sparse ms, ratio (min)':33s}"
          f" | {'cold: dense ms, sparse ms, ratio (min)':33s}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        for case in args.cases.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rows.append(measure(case, dtype_name, args.size, batch, args))
                print(_line(rows[-1]), flush=True)
    notes = sorted({r["cold_note"] for r in rows if r["cold_note"]})
    for note in notes:
        print(f"cold stack: {note}")
    meta["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "targets": TARGETS, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


def size_note(args) -> str:
    return (f"{args.size}x{args.size} (out x in), ratio = sparse / dense median (ratio of minima in brackets); "
            f"{args.budget:g} s of interleaved rounds per point and cache state")


if __name__ == "__main__":
    sys.exit(main())
