"""Time and peak memory of ``nmkern.sparsify(model, pattern, pack=True)``: the native CPU mask, pack and layout
kernels (csrc/cpu/nm_mask.cpp, nm_pack.cpp, nm_tiles.cpp; what layers on the CPU use) against the torch
references they replace.

    python bench/pack_speed.py --out bench/pack_speed_results.json      # ~1 min on 2 cores

Each case runs in a fresh process (peak RSS never shrinks): eight WIDTH x WIDTH Linear layers in the dtype,
packed once; reported are the seconds, the dense bytes packed per second, and the process's peak RSS above
the model built (``ru_maxrss``: the packing temporaries at their largest). Each path's dispatch cache is a
fresh folder, so both build the same layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS = 8


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _use_references() -> None:
    """Mask, pack and the CPU layout built through the torch references (the pack path before these kernels)."""
    from nmkern import _cpu, _cpu_layout
    from nmkern.nn import _layer
    from nmkern.reference.cpu_layouts import nm_layout_from_packed_ref, nm_words_from_layout_ref
    from nmkern.spec import Pattern

    def layout(values, indices, n, m, k):
        tile_values, index = nm_layout_from_packed_ref(values, indices, n, m)
        return _cpu.CpuLinear(Pattern.NM, n, m, 0, values.shape[0], k, {"values": tile_values, "index": index})

    _layer._nm_backend = lambda t: "reference"
    _cpu_layout.layout_from_nm_packed = layout
    _cpu_layout.nm_indices_from_layout = lambda lay: nm_words_from_layout_ref(
        lay.tensors["index"], lay.out_features, lay.in_features, lay.n, lay.m)


def child(path: str, width: int, dtype_name: str, pattern: str) -> dict:
    import torch
    import torch.nn as nn

    import nmkern

    torch.set_num_threads(2)
    if path == "reference":  # the torch references the kernels replace
        _use_references()
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, dtype=dtype) for _ in range(LAYERS)]).eval()
    built = _peak_mb()
    start = time.perf_counter()
    nmkern.sparsify(model, pattern, pack=True)
    seconds = time.perf_counter() - start
    dense_bytes = LAYERS * width * width * torch.finfo(dtype).bits // 8
    return {"path": path, "width": width, "dtype": dtype_name, "pattern": pattern, "seconds": round(seconds, 3),
            "dense_gb_per_s": round(dense_bytes / seconds / 1e9, 3),
            "peak_above_model_mb": round(_peak_mb() - built, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="2048,4096")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        path, width, dtype_name, pattern = args.child
        print(json.dumps(child(path, int(width), dtype_name, pattern)))
        return 0
    from nmkern.timing import cpu_name

    rows = []
    print(f"eight WxW Linear layers, sparsify(pattern={args.pattern!r}, pack=True), 2 threads, {cpu_name()}")
    for width in map(int, args.widths.split(",")):
        for dtype_name in args.dtypes.split(","):
            for path in ("reference", "native"):
                with tempfile.TemporaryDirectory() as cache:
                    env = {**os.environ, "NMKERN_CACHE_DIR": cache}
                    cmd = [sys.executable, __file__, "--child", path, str(width), dtype_name, args.pattern]
                    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env).stdout
                row = json.loads(out.strip().splitlines()[-1])
                rows.append(row)
                print(f"{width:>5} {dtype_name:<9} {path:<9} {row['seconds']:>7.2f} s  "
                      f"{row['dense_gb_per_s']:>6.2f} GB/s of dense weights  "
                      f"peak +{row['peak_above_model_mb']:.0f} MB above the model")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "threads": 2,
                                              "layers": LAYERS, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
