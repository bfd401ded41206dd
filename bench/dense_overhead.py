"""Per-call overhead of packed layers that run dense: a stack of eight 128x128 layers, packed 2:4 vs nn.Linear.

    python bench/dense_overhead.py --out dense_overhead.json          # table + JSON; ~30 s
    python bench/dense_overhead.py --batch 1,64 --threads 2 --seconds 5

The issue's target (#14, item 1): a packed layer whose dispatch runs dense costs what ``nn.Linear``
costs, beyond noise: <= 1.03x for this stack at batch 1 and 64. At 128x128 the dispatch keeps 2:4
dense at every batch (its kernels lose to a dense GEMM that small), so what is measured is the
wrapper: validation, the path lookup, the extra Python frames. Both models hold the same 2:4-masked
weights; each is called as a model (``model(x)`` through ``nn.Sequential``), interleaved, medians.
A third model, ``lookup``, is packed but never binds the dense op: the per-call path of nmkern
before it (validation, path lookup, table call), measured side by side.

Warm: the eight layers, called again and again (0.5 MB of weights stay in cache). Cold: as many
copies of the eight-layer stack as make the dense weights exceed 4x the last-level cache
(:func:`nmkern.timing.cold_stack_size`), called one after another like a deeper model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

# What is measured is the dense path's per-call cost: the static rules keep 128x128 layers dense at every batch
# (below nmkern._cpu.MIN_WEIGHTS), whereas measured dispatch may send batch 1 to the kernel on some CPUs.
os.environ["NMKERN_TUNE"] = "0"

import torch
import torch.nn as nn

from nmkern import benchmark, timing

LAYERS, WIDTH = 8, 128


def build(seed: int = 0) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
    """(dense, packed, lookup): eight 128x128 Linear layers with 2:4-masked weights, as nn.Linear, as packed
    SparseLinear, and as packed SparseLinear that never binds the dense op (the per-call lookup path)."""
    dense, packed = benchmark.masked_linear_stack(LAYERS, WIDTH, "2:4", seed=seed)
    lookup = copy.deepcopy(packed)
    for layer in lookup:  # nmkern before the bound dense op: validation and a path lookup on every call
        layer._bind_fast_dense = lambda x: None
    return dense, packed, lookup


def measure(batch: int, seconds: float) -> dict:
    dense, packed, lookup = build()
    x = torch.randn(batch, WIDTH)
    models = {"dense": dense, "packed": packed, "packed_lookup": lookup}
    with torch.no_grad():
        for name, model in models.items():  # same weights, same op: bit-equal
            torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0, msg=name)
        paths = sorted({m._choose(x, batch).value for m in packed})
        warm = timing.time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, seconds=seconds)
        copies = timing.cold_stack_size(LAYERS * WIDTH * WIDTH * 4)
        stacks = [build(seed=i) for i in range(copies)]
        cold = timing.time_interleaved({k: timing.run_stack([lambda m=s[i]: m(x) for s in stacks])
                                        for i, k in enumerate(models)}, seconds=seconds)
    row = {"batch": batch, "paths": paths, "cold_copies": copies}
    for k in models:
        row[f"warm_{k}_us"] = warm[k].median * 1e6
        row[f"cold_{k}_us"] = cold[k].median / copies * 1e6
    for k in ("packed", "packed_lookup"):
        row[f"warm_{k}_ratio"] = warm[k].median / warm["dense"].median
        row[f"cold_{k}_ratio"] = cold[k].median / cold["dense"].median
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="timing budget per table cell pair")
    ap.add_argument("--out", default=None, help="write the rows and the machine as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(int(b), args.seconds) for b in args.batch.split(",")]
    print(f"eight {WIDTH}x{WIDTH} layers, 2:4 packed vs nn.Linear; {timing.cpu_name()}, {args.threads} thread(s)")
    print("batch  path   nn.Linear us   packed/dense   lookup/dense  | cold: nn.Linear us   packed/dense   "
          "lookup/dense (copies)")
    for r in rows:
        print(f"{r['batch']:>5}  {','.join(r['paths']):<5}  {r['warm_dense_us']:>12.1f}  {r['warm_packed_ratio']:>13.3f}  "
              f"{r['warm_packed_lookup_ratio']:>13.3f}  | {r['cold_dense_us']:>18.1f}  {r['cold_packed_ratio']:>13.3f}  "
              f"{r['cold_packed_lookup_ratio']:>13.3f} ({r['cold_copies']})")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "threads": args.threads,
                                              "machine": timing.machine_info("cpu")}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
