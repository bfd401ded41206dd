"""What one resident weight form costs in speed: eight 2048x2048 fp32 layers, dense vs packed 2:4 holding only the
CPU layout (the default) vs packed 2:4 keeping a dense copy too (``NMKERN_DENSE_CACHE=1``).

    python bench/resident_form_speed.py --out bench/resident_form_speed_results.json     # ~2 min

Issue #14, item 6: a packed layer keeps one resident form (:mod:`nmkern.nn._forms`). Where its measured paths
are the CPU kernel at some batch sizes and dense at others, a dense call decodes the CPU layout into a reused
buffer instead of reading a kept dense copy, or runs the kernel where that is faster than dense plus the
decode. ``NMKERN_DENSE_CACHE`` is read for the whole process, so each setting runs in a fresh process of its
own (with a fresh dispatch cache): the packed copy is tuned on batches 1, 16 and 256 (:func:`nmkern.tune`),
then it and the dense model holding the same masked weights are called in turn at each batch
(interleaved medians, :func:`nmkern.timing.time_interleaved`). Each ratio is side by side in one process.
128 MB of dense weights: cold cache on CPUs whose last-level cache is under 32 MB (reported beside the numbers).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LAYERS, WIDTH, BATCHES = 8, 2048, (1, 16, 256)
SETTINGS = {"one_form": "0", "dense_copy": "1"}  # NMKERN_DENSE_CACHE


def child(seconds: float, threads: int) -> dict:
    import torch

    import nmkern
    from nmkern import benchmark, timing

    torch.set_num_threads(threads)
    dense, packed = benchmark.masked_linear_stack(LAYERS, WIDTH, "2:4")
    inputs = [torch.randn(b, WIDTH) for b in BATCHES]
    rows = []
    with torch.no_grad():
        nmkern.tune(packed, inputs)
        for x in inputs:
            torch.testing.assert_close(packed(x), dense(x))
            batch = x.shape[0]
            paths = collections.Counter(layer._choose(x, batch).value for layer in packed)
            decoded = sum(bool(layer._decoded_dense) and layer._choose(x, batch).value == "dense" for layer in packed)
            t = timing.time_interleaved({"dense": lambda: dense(x), "packed": lambda: packed(x)}, seconds=seconds)
            rows.append({"batch": batch, "paths": dict(paths), "dense_calls_decoding": decoded,
                         "dense_ms": round(t["dense"].median * 1e3, 3),
                         "ratio": round(t["packed"].median / t["dense"].median, 3)})
    forms = {k: round(v / 2**20, 1) for k, v in nmkern.memory_report(packed).by_form().items()}
    return {"rows": rows, "forms_mb": forms, "machine": timing.machine_info("cpu")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="timing budget per batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.seconds, args.threads)))
        return 0
    results = {}
    for name, keep in SETTINGS.items():
        with tempfile.TemporaryDirectory() as cache:  # measured afresh, not read from this machine's cache
            env = {**os.environ, "NMKERN_CACHE_DIR": cache, "NMKERN_DENSE_CACHE": keep}
            out = subprocess.run([sys.executable, __file__, "--child", "--seconds", str(args.seconds),
                                  "--threads", str(args.threads)], stdout=subprocess.PIPE, text=True, check=True,
                                 env=env).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    machine = results["one_form"]["machine"]
    print(f"eight {WIDTH}x{WIDTH} fp32 layers, 2:4, {args.threads} threads, {machine['cpu']}, "
          f"LLC {machine['llc_bytes'] / 2**20:.0f} MB; packed / dense (medians, interleaved)")
    print("| batch | one form: paths | one form / dense | dense copy kept: paths | dense copy / dense |")
    print("|---:|---|---:|---|---:|")
    for one, copy_row in zip(results["one_form"]["rows"], results["dense_copy"]["rows"]):
        print(f"| {one['batch']} | {one['paths']} ({one['dense_calls_decoding']} decoding) | {one['ratio']:.2f} "
              f"| {copy_row['paths']} | {copy_row['ratio']:.2f} |")
    for name, r in results.items():
        print(f"{name}: forms held (MB) {r['forms_mb']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
