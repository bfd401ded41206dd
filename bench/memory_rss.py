"""Process memory of a packed model vs its dense twin: eight 2048x2048 fp32 Linear layers, each stage measured.

    python bench/memory_rss.py --out memory_rss.json     # each case in a fresh process; ~1 min

Issue #14, item 6: a packed 2:4 fp32 model should hold <= 0.60x the dense model's process RSS after
forwards at batch 1, 16 and 256 (its weights need ~0.53x). Each case runs in its own fresh
process (RSS never shrinks back to what it was): the RSS of ``import torch, nmkern`` alone, then
the model built, then ``sparsify(pack=True)``, then forwards at batch 1, 16, 256, with
:func:`nmkern.memory_report`'s bytes per form beside each stage. Reported: the model's share
(RSS minus the import baseline).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

LAYERS, WIDTH = 8, 2048


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(pattern: str) -> dict:
    import torch
    import torch.nn as nn

    import nmkern

    torch.set_num_threads(2)
    base = _rss_mb()
    stages = []

    def stage(name: str, model) -> None:
        forms = {k: round(v / 2**20, 1) for k, v in nmkern.memory_report(model).by_form().items()}
        stages.append({"stage": name, "rss_mb": round(_rss_mb() - base, 1), "forms_mb": forms})

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)]).eval()
    stage("built", model)
    if pattern != "dense":
        nmkern.sparsify(model, pattern, pack=True)
        stage("packed", model)
    with torch.no_grad():
        for batch in (1, 16, 256):
            model(torch.randn(batch, WIDTH))
            stage(f"forward {batch}", model)
    return {"pattern": pattern, "import_rss_mb": round(base, 1), "stages": stages}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", default="dense,2:4,1:4")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    results = []
    for pattern in args.patterns.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", pattern], stdout=subprocess.PIPE, text=True,
                             check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    dense = {s["stage"]: s["rss_mb"] for s in results[0]["stages"]} if results[0]["pattern"] == "dense" else {}
    print(f"eight {WIDTH}x{WIDTH} fp32 Linear: process RSS above `import torch, nmkern`, MB")
    for r in results:
        for s in r["stages"]:
            ratio = s["rss_mb"] / dense["forward 256"] if dense and s["stage"].startswith("forward") else None
            print(f"{r['pattern']:>6} {s['stage']:<12} {s['rss_mb']:>8.1f}" + (f"  ({ratio:.2f}x dense)" if ratio else "")
                  + f"  forms {s['forms_mb']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
