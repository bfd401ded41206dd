"""Which 2:4 path wins per batch size on a LLaMA-7B-shaped block: dense vs cuda vs cuSPARSELt vs Triton.

    python bench/llama_dispatch.py --out llama_dispatch.json            # GPU: the real shapes
    python bench/llama_dispatch.py --out tiny.json --tiny --device cpu  # plumbing check without a GPU

The block is one decoder layer's linear layers, each with its own 2:4 weight (fp16 on a GPU):
q/k/v/o 4096 -> 4096, gate/up 4096 -> 11008, down 11008 -> 4096; batch rows M in
{1, 16, 64, 256, 1024, 4096}. Paths: ``dense`` (F.linear on the 2:4 weight, cuBLAS) and packed
``SparseLinear`` layers forced to ``cuda`` (csrc/cuda mma.sp), ``cusparselt``, ``triton``, plus
``auto`` (what nmkern's dispatch picks). Every path is first checked against float64 F.linear at
M = 1 and 65 (both tile configs of the CUDA kernel); a path that errs or is wrong is not timed.
Timing: :func:`nmkern.timing.time_interleaved` (candidates interleaved, order rotating, medians);
``block`` runs the seven layers one after another (distinct weights, 392 MB dense: beyond L2),
the per-shape rows call one layer again and again (warm). Each row names the fastest path and
what ``auto`` chose. ``--budget`` caps the whole run; SIGINT (``timeout -s INT``) stops it early
and the JSON holds what was measured.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LLAMA_LAYERS = (("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
                ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008))  # (name, out, in)
TINY_LAYERS = (("q_proj", 128, 128), ("k_proj", 128, 128), ("v_proj", 128, 128), ("o_proj", 128, 128),
               ("gate_proj", 352, 128), ("up_proj", 352, 128), ("down_proj", 128, 352))
LLAMA_M = (1, 16, 64, 256, 1024, 4096)
TINY_M = (1, 16, 64)
CHECK_M = (1, 65)  # the CUDA kernel's small (M <= 64) and large tile configs
SPARSE_PATHS = ("cuda", "cusparselt", "triton", "auto")


def _layer(w24: torch.Tensor, backend: str):
    from nmkern.nn import SparseLinear

    lin = torch.nn.Linear(w24.shape[1], w24.shape[0], bias=False, device=w24.device, dtype=w24.dtype)
    with torch.no_grad():
        lin.weight.copy_(w24)
    return SparseLinear.from_dense(lin, n=2, m=4, backend=backend).pack().eval()


def build(layers, device: torch.device, dtype: torch.dtype, paths, seed: int = 0):
    """Weights and per-path callables: ``({path: [fn per layer]}, {path: skip reason}, [w24 per layer])``."""
    import nmkern
    from nmkern.backend import triton_interpret

    gen = torch.Generator().manual_seed(seed)
    weights = [nmkern.apply_nm(torch.randn(out, inp, generator=gen) / inp**0.5, 2, 4, backend="reference")
               .to(device, dtype) for _, out, inp in layers]
    fns = {"dense": [lambda x, w=w: F.linear(x, w) for w in weights]}
    skipped = {}
    for path in paths:
        if path == "triton" and triton_interpret():
            skipped[path] = "Triton's interpreter on the CPU (TRITON_INTERPRET=1): timing it says nothing about its kernels"
            continue
        try:
            mods = [_layer(w, path) for w in weights]
            with torch.no_grad():  # a forced path that cannot run here raises ValueError saying why
                mods[0](torch.zeros(1, weights[0].shape[1], device=device, dtype=dtype))
            fns[path] = mods
        except Exception as e:  # a path that cannot be built or run here: reported, not fatal
            skipped[path] = f"cannot run here: {type(e).__name__}: {e}"
    return fns, skipped, weights


def check(fns: dict, skipped: dict, weights, layers, device, dtype) -> dict:
    """Each path vs float64 F.linear on every distinct shape at CHECK_M rows; failing paths move to ``skipped``.

    Bound (as tests/test_cuda_gpu.py): max error <= 2 x dense's own error + one ulp of max |ref|."""
    report = {}
    shapes = {}
    for i, (_, out, inp) in enumerate(layers):
        shapes.setdefault((out, inp), i)
    gen = torch.Generator().manual_seed(1)
    for path in [p for p in fns if p != "dense"]:
        worst = {"ok": True, "max_err": 0.0, "dense_err": 0.0}
        try:
            for (out, inp), i in shapes.items():
                for m in CHECK_M:
                    x = torch.randn(m, inp, generator=gen).to(device, dtype)
                    ref = F.linear(x.double(), weights[i].double())
                    with torch.no_grad():
                        y = fns[path][i](x)
                    err = (y.double() - ref).abs().max().item()
                    dense_err = (F.linear(x, weights[i]).double() - ref).abs().max().item()
                    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
                    ok = err <= 2 * dense_err + ulp
                    worst = {"ok": worst["ok"] and ok, "max_err": max(worst["max_err"], err),
                             "dense_err": max(worst["dense_err"], dense_err)}
        except Exception as e:
            worst = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        report[path] = worst
        if not worst["ok"]:
            skipped[path] = "failed the correctness check: " + worst.get("error", f"max err {worst['max_err']:.3g}")
            del fns[path]
    return report


def _auto_paths(fns: dict, layers, m: int, device, dtype) -> dict:
    if "auto" not in fns:
        return {}
    out = {}
    for i, (_, n_out, inp) in enumerate(layers):
        x = torch.empty(m, inp, device=device, dtype=dtype)
        out.setdefault(f"{n_out}x{inp}", str(fns["auto"][i]._choose(x, m)))
    return out


def time_row(fns: dict, idx: list[int], inputs: list, seconds: float, sync) -> dict:
    """Interleaved medians (ms) of every path running layers ``idx`` on ``inputs`` one after another."""
    from nmkern import timing

    def runner(layer_fns):
        def run():
            for i, x in zip(idx, inputs):
                layer_fns[i](x)
        return run

    with torch.no_grad():
        res = timing.time_interleaved({p: runner(f) for p, f in fns.items()}, seconds=seconds, warmup=3, sync=sync)
    row = timing.columns(res, baseline="dense")
    row["winner"] = min(res, key=lambda p: res[p].median)
    row["repeats"] = min(t.repeats for t in res.values())
    return row


def measure(fns: dict, layers, m_values, device, dtype, budget: float, seconds: float, rows: list) -> None:
    """Append one ``block`` row and one row per distinct shape for each M until the budget is spent."""
    from nmkern import timing

    sync = timing.device_sync(device)
    deadline = time.monotonic() + budget
    shapes = {}
    for i, (_, out, inp) in enumerate(layers):
        shapes.setdefault(f"{out}x{inp}", i)
    per_m = 1 + len(shapes)
    for j, m in enumerate(m_values):
        left = deadline - time.monotonic()
        if left <= 0:
            rows.append({"m": m, "scope": "not run", "reason": "time budget spent"})
            continue
        point = min(seconds, left / ((len(m_values) - j) * per_m) * 0.8)
        gen = torch.Generator().manual_seed(m)
        xs = {inp: torch.randn(m, inp, generator=gen).to(device, dtype) for inp in {inp for _, _, inp in layers}}
        auto = _auto_paths(fns, layers, m, device, dtype)
        all_idx = list(range(len(layers)))
        rows.append({"m": m, "scope": "block", **time_row(fns, all_idx, [xs[layers[i][2]] for i in all_idx],
                                                           point, sync), "auto_paths": auto})
        for shape, i in shapes.items():
            row = time_row(fns, [i], [xs[layers[i][2]]], point, sync)
            rows.append({"m": m, "scope": shape, **row, "auto_path": auto.get(shape)})
        del xs


def table(rows: list, paths) -> str:
    """The dispatch table as text: median ms per path, the fastest path, what auto picked."""
    head = f"{'M':>5} {'scope':>11} " + " ".join(f"{p:>10}" for p in paths) + f" {'winner':>10} {'auto picks':>10}"
    lines = [head]
    for r in rows:
        if "winner" not in r:
            lines.append(f"{r['m']:>5} {r['scope']:>11}  ({r.get('reason', '')})")
            continue
        cells = " ".join(f"{r[f'{p}_median_ms']:>10.4f}" if f"{p}_median_ms" in r else f"{'-':>10}" for p in paths)
        auto = r.get("auto_path") or ",".join(sorted(set((r.get("auto_paths") or {}).values()))) or "-"
        lines.append(f"{r['m']:>5} {r['scope']:>11} {cells} {r['winner']:>10} {auto:>10}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="1/32-size layers and M in {1, 16, 64} (CPU plumbing check)")
    ap.add_argument("--m", default=None, help="comma-separated batch rows (default: 1,16,64,256,1024,4096)")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds for the whole run (default 90)")
    ap.add_argument("--seconds", type=float, default=0.5, help="seconds per timed point at most (default 0.5)")
    return ap.parse_args(argv)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    # `timeout -s INT` ends the run early: SIGINT (ignored in background jobs of a non-interactive
    # shell unless reset here) and SIGTERM both stop the measurement, and the JSON is still written.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    from nmkern import timing

    start = time.monotonic()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    layers = TINY_LAYERS if args.tiny else LLAMA_LAYERS
    m_values = [int(v) for v in args.m.split(",")] if args.m else list(TINY_M if args.tiny else LLAMA_M)
    paths = SPARSE_PATHS + (("cpu",) if device.type == "cpu" else ())
    result = {"meta": {**timing.machine_info(device), "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                       "layers": [list(layer) for layer in layers], "m_values": m_values, "budget_s": args.budget},
              "checks": {}, "skipped": {}, "rows": [], "complete": False}
    try:
        fns, result["skipped"], weights = build(layers, device, dtype, paths)
        result["checks"] = check(fns, result["skipped"], weights, layers, device, dtype)
        left = args.budget - (time.monotonic() - start)
        measure(fns, layers, m_values, device, dtype, max(left, 0.0), args.seconds, result["rows"])
        result["complete"] = all("winner" in r for r in result["rows"])
    except KeyboardInterrupt:
        result["interrupted"] = True
    result["elapsed_s"] = time.monotonic() - start
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    cols = ["dense", *[p for p in paths if p not in result["skipped"]]]
    print(table(result["rows"], cols))
    for path, why in result["skipped"].items():
        print(f"skipped {path}: {why}")
    print(f"wrote {args.out} ({result['elapsed_s']:.1f} s{', interrupted' if result.get('interrupted') else ''})")
    return 0 if not result.get("interrupted") else 130


if __name__ == "__main__":
    sys.exit(main())
