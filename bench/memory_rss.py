"""Process memory of a packed model vs its dense twin: eight 2048x2048 fp32 Linear layers, each stage measured.

    python bench/memory_rss.py --out bench/memory_rss_results.json     # each case in a fresh process; ~1 min

Issue #14, item 6: a packed 2:4 fp32 model should hold <= 0.60x the dense model's process RSS after
forwards at batch 1, 16 and 256 (its weights need ~0.53x). Each case runs in its own fresh
process (RSS never shrinks back to what it was): the RSS of ``import torch, nmkern`` alone, then
the model built, then ``sparsify(pack=True)``, then :func:`nmkern.tune` at batch 1, 16 and 256 (the
measurement every packed layer makes on its first calls, which settles its one resident form; its own
cache folder), then one forward at each batch, with
:func:`nmkern.memory_report`'s bytes per form beside each stage. Reported: the model's share
(RSS minus the import baseline), split into private memory (RssAnon: weights, buffers, the heap) and
resident pages of mapped files (RssFile: the code of torch's and nmkern's libraries that the calls touched
first, shared with other processes and reclaimable; packing a 2048x2048 model touches ~13 MB of it).

``--warmup``: before the baseline, each process first runs a tiny model (two 64x64 Linear layers) through
the same stages (packed and tuned when the case is), so the baseline also holds what the code touches on
first use (modules imported on demand, MKL's and the threads' buffers: 10-13 MB for nmkern's packing and
forwards, measured), and the figures are the model's own bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LAYERS, WIDTH = 8, 2048  # the model; --width 4096 for a 4x bigger one


_FIELDS = {"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}


def _rss_mb() -> dict[str, float]:
    """From /proc/self/status, in MB: rss_mb (VmRSS, all resident pages), anon_mb (RssAnon: private heap and
    buffers) and file_mb (RssFile: resident pages of mapped files, the libraries' code that calls have touched)."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        field, _, value = line.partition(":")
        if field in _FIELDS:
            found[_FIELDS[field]] = int(value.split()[0]) / 1024
    return {key: found.get(key, float("nan")) for key in _FIELDS.values()}


def _warm_up(pattern: str) -> None:
    """The tiny model of ``--warmup`` through the stages of ``child``, then dropped."""
    import torch
    import torch.nn as nn

    import nmkern

    tiny = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).eval()
    inputs = [torch.randn(batch, 64) for batch in (1, 16, 256)]
    if pattern != "dense":
        nmkern.sparsify(tiny, pattern, pack=True)
        with torch.no_grad():
            nmkern.tune(tiny, inputs)
    with torch.no_grad():
        for x in inputs:
            tiny(x)


def child(pattern: str, width: int, warmup: bool = False) -> dict:
    import torch
    import torch.nn as nn

    import nmkern

    torch.set_num_threads(2)
    if warmup:
        _warm_up(pattern)
    base = _rss_mb()
    stages = []

    def stage(name: str, model) -> None:
        forms = {k: round(v / 2**20, 1) for k, v in nmkern.memory_report(model).by_form().items()}
        now = _rss_mb()
        stages.append({"stage": name, **{key: round(now[key] - base[key], 1) for key in now}, "forms_mb": forms})

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(LAYERS)]).eval()
    stage("built", model)
    inputs = [torch.randn(batch, width) for batch in (1, 16, 256)]
    paths = {}
    if pattern != "dense":
        nmkern.sparsify(model, pattern, pack=True)
        stage("packed", model)
        with torch.no_grad():  # measured dispatch decides each layer's paths (what its first calls would do)
            report = nmkern.tune(model, inputs)
        paths = {str(r["rows"]): sorted({q["path"] for q in report.rows if q["rows"] == r["rows"]})
                 for r in report.rows}
        stage("tuned", model)
    with torch.no_grad():
        for x in inputs:
            model(x)
            stage(f"forward {x.shape[0]}", model)
    return {"pattern": pattern, "import_rss_mb": round(base["rss_mb"], 1), "paths_by_rows": paths, "stages": stages}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", default="dense,2:4,1:4,2:4/cache",
                    help="comma-separated; PATTERN/cache runs with NMKERN_DENSE_CACHE=1")
    ap.add_argument("--width", type=int, default=WIDTH, help="each layer is WIDTH x WIDTH (default %(default)s)")
    ap.add_argument("--warmup", action="store_true", help="baseline after a tiny model ran the same stages")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.width, args.warmup)))
        return 0
    results = []
    for case in args.patterns.split(","):
        pattern, _, option = case.partition("/")  # "2:4/cache": with NMKERN_DENSE_CACHE=1
        with tempfile.TemporaryDirectory() as cache:  # measured afresh, not read from this machine's cache
            env = {**os.environ, "NMKERN_CACHE_DIR": cache, "NMKERN_DENSE_CACHE": "1" if option == "cache" else "0"}
            cmd = [sys.executable, __file__, "--child", pattern, "--width", str(args.width)]
            if args.warmup:
                cmd.append("--warmup")
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env).stdout
        results.append(dict(json.loads(out.strip().splitlines()[-1]), pattern=case))
    first = results[0]["stages"] if results[0]["pattern"] == "dense" else []
    dense = {s["stage"]: s for s in first}
    above = "a tiny model's warm-up" if args.warmup else "`import torch, nmkern`"
    print(f"eight {args.width}x{args.width} fp32 Linear: process RSS above {above}, MB "
          "(anon: private memory; file: library code pages touched)")
    for r in results:
        if r["paths_by_rows"]:
            print(f"{r['pattern']:>6} paths taken by rows: {r['paths_by_rows']}")
        for s in r["stages"]:
            d = dense.get(s["stage"]) if r is not results[0] else None
            ratio = f"  ({s['rss_mb'] / d['rss_mb']:.2f}x dense, anon {s['anon_mb'] / d['anon_mb']:.2f}x)" if d else ""
            print(f"{r['pattern']:>6} {s['stage']:<12} {s['rss_mb']:>8.1f} = anon {s['anon_mb']:>6.1f} + file "
                  f"{s['file_mb']:>5.1f}{ratio}  forms {s['forms_mb']}")
    if args.out:
        doc = {"width": args.width, "warmup": args.warmup, "results": results}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
