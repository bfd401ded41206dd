"""``nmkern demo``: the whole pipeline on MNIST-1D, offline, on the CPU.

1. train the small 1-D CNN (:class:`nmkern.models.MNIST1DNet`) dense;
2. DominoSearch (:func:`nmkern.methods.domino.domino_search`) a layer-wise N:M scheme for
   87.5% parameter sparsity of the prunable layers (M = 16);
3. retrain that scheme with SR-STE (``nmkern.sparsify`` + the sparse modules'
   training form), next to uniform baselines (2:4, 1:8 at the same 87.5% budget, ...)
   and the one-shot (no retraining) masks;
4. pack the sparse model (compressed weights only) and check that it computes the
   same logits;
5. time the packed model against the dense one on this CPU, batch by batch,
   interleaved in one process (:mod:`nmkern.timing`, the harness ``nmkern bench`` and
   ``bench/`` use; the machine is recorded with :func:`nmkern.timing.machine_info`);
6. where sparsity pays: a LLaMA-7B-shaped decoder layer at batch 1, fp32 and bf16, dense
   vs packed 2:4 (:mod:`nmkern.demo_llama`).

Writes ``report.md``, ``results.json``, ``scheme.json``, the dense and packed
checkpoints, and four PNG plots (per-layer N, accuracy vs sparsity, latency ratio
vs batch, the LLaMA-shaped layer) into the output folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from . import timing
from .benchmark import pack_model, packed_variants, time_models
from .demo_llama import llama_latency, plot_llama, report_lines as llama_report_lines
from .data import Dataset, load_mnist1d
from .methods.domino import Budget, domino_search
from .checkpoint_io import atomic_write
from .methods.recipes import accuracy, prunable_sparsity, seed_everything, sparsify_copy, train
from .models import MNIST1DNet
from .nn import SparseConv2d, SparseLinear

SPARSE_TYPES = (SparseLinear, SparseConv2d)
# every file run_demo writes into its output folder (each atomically: a temp file, then renamed)
OUTPUTS = ("dense.pt", "scheme.json", "per_layer_n.png", "sparse_packed.pt", "results.json", "accuracy_vs_sparsity.png",
           "latency_ratio.png", "llama_layer.png", "report.md")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run. :data:`FULL` (< 10 min on 2 cores) and :data:`QUICK` (< 2 min)."""

    quick: bool
    dense_epochs: int
    sparse_epochs: int
    baselines: tuple[str, ...]  # uniform patterns retrained with SR-STE next to the searched scheme
    oneshot: tuple[str, ...]  # uniform patterns evaluated without retraining
    latency_batches: tuple[int, ...]
    latency_seconds: float  # timing budget per batch size (sets the repeats)
    llama_seconds: float  # timing budget per dtype of the LLaMA-shaped layer
    batch_size: int = 64
    lr: float = 3e-3
    sparse_lr: float = 1e-3
    budget: float = 0.875
    m: int = 16
    # DominoSearch on a 5-layer model: the official schedule (vote every 100 steps, decay 0.1
    # doubling from step 30k) is sized for ImageNet; 10x more frequent votes and a 5x
    # stronger decay doubling every 200 steps met the 87.5% budget after 761 steps
    # (~24 epochs of MNIST-1D, 16 s of one core); decay 2.0 overshot it (91%).
    search_check_every: int = 10
    search_decay: float = 0.5
    search_milestones: tuple[int, ...] = (200, 400, 600, 800, 1000, 1200)
    search_lr: float = 0.01
    search_max_iters: int = 4000
    seed: int = 0
    # One thread: the model is small, and under contention two OpenMP threads spin (measured here:
    # 0.5 s of CPU per MNIST-1D epoch on one thread, 13 s on two).
    threads: int = 1


FULL = DemoConfig(quick=False, dense_epochs=30, sparse_epochs=15, baselines=("2:4", "1:4", "1:8"),
                  oneshot=("2:4", "1:8"), latency_batches=(1, 8, 64, 256, 1024), latency_seconds=3.0,
                  llama_seconds=4.0)
QUICK = DemoConfig(quick=True, dense_epochs=10, sparse_epochs=4, baselines=("1:8",), oneshot=(),
                   latency_batches=(1, 64, 512), latency_seconds=0.6, llama_seconds=1.5, sparse_lr=2e-3)


# --------------------------------------------------------------------------- helpers


def _seed_all(seed: int) -> None:
    seed_everything(seed)


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def exec_paths(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """Which execution path each packed layer takes for input ``x`` (the dispatch decision)."""
    paths: dict[str, str] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, SPARSE_TYPES) and mod.is_packed:
            def hook(module, inputs, output, name=name):
                xi = inputs[0]
                if isinstance(module, SparseLinear):
                    rows = xi.numel() // module.in_features
                else:
                    rows = output.shape[0] * output.shape[-2] * output.shape[-1]
                paths[name] = str(module._choose(xi, rows))

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return paths


def measure_latency(dense: nn.Module, packed: nn.Module, batches, seconds: float, sample: torch.Tensor,
                    reference: nn.Module, progress: bool = True) -> list[dict]:
    """Per batch size: median / quartiles / min ms of the dense model, the packed model (auto dispatch),
    and the packed model with every sparse layer forced onto nmkern's CPU kernels (when they load), timed
    interleaved (:func:`nmkern.benchmark.time_models`). ``reference``: the sparse model in its training
    form; the packed variants' max |output difference| to it is recorded."""
    from tqdm.auto import tqdm

    models = packed_variants(dense, packed)
    rows = []
    for b in tqdm(list(batches), desc="latency", disable=not progress, leave=False):
        reps = -(-b // len(sample))
        x = sample.repeat(reps, *([1] * (sample.dim() - 1)))[:b].contiguous()
        row = time_models(models, x, seconds=seconds, reference=reference)
        rows.append({"batch": b, "paths_auto": exec_paths(models["packed_auto"], x)} | row)
    return rows


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(plt, fig, path: Path) -> None:
    fig.tight_layout()
    try:
        atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    finally:
        plt.close(fig)


def plot_accuracy(rows: list[dict], dense_acc: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {"dense": "k", "one-shot": "tab:gray", "SR-STE": "tab:blue", "DominoSearch": "tab:red"}
    for r in rows:
        kind = r["kind"]
        ax.scatter(r["sparsity"], r["accuracy"] * 100, color=colors.get(kind, "tab:green"), zorder=3,
                   marker="*" if kind == "DominoSearch" else "o", s=90 if kind == "DominoSearch" else 40)
        ax.annotate(r["name"], (r["sparsity"], r["accuracy"] * 100), textcoords="offset points", xytext=(5, 3),
                    fontsize=7)
    ax.axhline(dense_acc * 100, color="k", lw=0.8, ls="--")
    ax.set_xlabel("parameter sparsity of the N:M layers")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST-1D, 1-D CNN: accuracy vs sparsity", fontsize=10)
    ax.grid(alpha=0.3)
    _save_fig(plt, fig, path)


def plot_latency(rows: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["batch"] for r in rows]
    for key, label in (("packed_auto", "packed, auto dispatch"), ("packed_cpu_kernel", "packed, nmkern CPU kernels forced")):
        if f"{key}_ratio" in rows[0]:
            ax.plot(xs, [r[f"{key}_ratio"] for r in rows], marker="o", label=label)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("time ratio packed / dense (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_fig(plt, fig, path)


# --------------------------------------------------------------------------- report


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}"


def write_report(res: dict, out: Path) -> None:
    """``report.md``: the run, accuracy table, searched scheme, packing and CPU latency of ``res``."""
    lines = (_report_header(res) + _report_accuracy(res) + _report_scheme(res) + _report_packing(res)
             + _report_latency(res) + llama_report_lines(res["llama"]) + _report_footer())
    atomic_write(out / "report.md", lambda p: p.write_text("\n".join(lines)))


def _report_header(res: dict) -> list[str]:
    cfg, mach = res["config"], res["machine"]
    isa = f", nmkern CPU kernels: {mach['cpu_isa']}" if mach.get("cpu_isa") else ""
    return [
        "# nmkern demo: MNIST-1D, 1-D CNN, DominoSearch + SR-STE",
        "",
        f"Command: `{res['command']}`  ",
        f"Mode: {'quick' if cfg['quick'] else 'full'}; seed {cfg['seed']}; {mach['threads']} torch thread(s) on "
        f"{mach['cpu']} ({mach['cores']} cores visible{isa}); torch {mach['torch']}.  ",
        f"Total time: {res['seconds']['total']:.0f} s wall, {res['seconds']['cpu_total']:.0f} s CPU "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in res['seconds'].items() if k not in ('total', 'cpu_total'))}).",
        "",
    ]


def _report_accuracy(res: dict) -> list[str]:
    lines = [
        "## Accuracy",
        "",
        f"Test accuracy on {res['data']['test']} MNIST-1D signals (trained on {res['data']['train']}). "
        f"Sparsity: zero weights of the N:M layers (input width divisible by 16; the first conv, 1 input channel, "
        f"stays dense in every row) / of all Linear+Conv weights.",
        "",
        "| model | how | sparsity (N:M layers) | sparsity (all) | accuracy (%) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in res["accuracy"]:
        lines.append(f"| {r['name']} | {r['kind']} | {_fmt_pct(r['sparsity'])}% | {_fmt_pct(r['sparsity_all'])}% | "
                     f"{_fmt_pct(r['accuracy'])} |")
    return lines


def _report_scheme(res: dict) -> list[str]:
    cfg, sch = res["config"], res["scheme"]
    lines = [
        "",
        f"## DominoSearch scheme (budget: {_fmt_pct(cfg['budget'])}% parameter sparsity, M = {cfg['m']})",
        "",
        f"Found in {sch['iterations']} iterations; parameter sparsity {_fmt_pct(sch['param_sparsity'])}%, "
        f"{1 / (1 - sch['flops_sparsity']):.2f}x fewer weight MACs over the searched layers.",
        "",
        "| layer | weights | MACs / sample | N:M |",
        "|---|---:|---:|---|",
    ]
    for name, p in sch["layers"].items():
        pat = "dense" if p is None else f"{p[0]}:{p[1]}"
        lines.append(f"| {name} | {sch['layer_params'][name]} | {sch['layer_flops'][name]} | {pat} |")
    for name in sch.get("skipped", []):
        lines.append(f"| {name} | - | - | dense (input width not divisible by {cfg['m']}) |")
    return lines


def _report_packing(res: dict) -> list[str]:
    pk = res["packing"]
    return [
        "",
        "## Packing",
        "",
        f"state_dict bytes: dense {pk['dense_bytes']:,}, SR-STE training form {pk['train_form_bytes']:,}, "
        f"packed {pk['packed_bytes']:,} ({pk['packed_bytes'] / pk['dense_bytes']:.2f}x of dense). "
        f"Packed model accuracy {_fmt_pct(pk['packed_accuracy'])}% (training form {_fmt_pct(pk['train_form_accuracy'])}%); "
        f"max |logit difference| packed vs training form: {pk['max_abs_logit_diff']:.2e}.",
    ]


def _report_latency(res: dict) -> list[str]:
    lines = [
        "",
        "## CPU latency, packed vs dense",
        "",
        "Median wall time per forward pass (`nmkern.timing`: warm-up, then dense, packed and forced-kernel calls "
        "interleaved round by round in one process; the machine may be shared: the ratio is the number to read; "
        "warm cache: the whole model fits in the last-level cache). *auto*: each packed layer runs where "
        "`nmkern` dispatch sends it (the dense op on the decompressed weight where no sparse kernel wins); "
        "*cpu kernel*: every sparse layer forced onto nmkern's native CPU kernels.",
        "",
    ]
    lat = res["latency"]
    has_kernel = lat and "packed_cpu_kernel_median_ms" in lat[0]
    head = "| batch | dense (ms) | packed auto (ms) | ratio auto |" + (" cpu kernel (ms) | ratio kernel |" if has_kernel else "")
    lines += [head, "|---:|---:|---:|---:|" + ("---:|---:|" if has_kernel else "")]
    for r in lat:
        row = (f"| {r['batch']} | {r['dense_median_ms']:.3f} | {r['packed_auto_median_ms']:.3f} | "
               f"{r['packed_auto_ratio']:.2f} |")
        if has_kernel:
            row += f" {r['packed_cpu_kernel_median_ms']:.3f} | {r['packed_cpu_kernel_ratio']:.2f} |"
        lines.append(row)
    if lat:
        paths = sorted({f"{k}: {v}" for r in lat for k, v in r["paths_auto"].items()})
        lines += ["", "Auto dispatch per layer (any batch): " + ", ".join(paths) + "."]
    return lines


def _report_footer() -> list[str]:
    return [
        "",
        "## Plots",
        "",
        "![per-layer N](per_layer_n.png)",
        "![accuracy vs sparsity](accuracy_vs_sparsity.png)",
        "![latency ratio vs batch](latency_ratio.png)",
        "",
        "All numbers: `results.json`. Scheme: `scheme.json` (load with `nmkern.scheme.Scheme.load`). "
        "Checkpoints: `dense.pt` (state_dict of `nmkern.models.MNIST1DNet()`), `sparse_packed.pt` "
        "(packed state_dict; `nmkern inspect` it, or load it into a model sparsified with the scheme).",
        "",
    ]


# --------------------------------------------------------------------------- pipeline


def run_demo(out_dir: str | os.PathLike = "nmkern-demo", *, quick: bool = False, seed: int = 0,
             progress: bool = True, command: str | None = None, config: DemoConfig | None = None,
             threads: int | None = None) -> dict:
    """Run the demo and write its report; returns the results dict (also ``results.json``)."""
    cfg = config or (QUICK if quick else FULL)
    cfg = dataclasses.replace(cfg, seed=seed, threads=threads or cfg.threads)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, Path(out_dir), progress, command, llama_threads=before)
    finally:
        torch.set_num_threads(before)


class _Stages:
    """The demo's progress bar and the wall time of each stage (``seconds``)."""

    def __init__(self, total: int, progress: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="nmkern demo", disable=not progress)
        self.seconds: dict[str, float] = {}
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def stage(self, key: str, label: str | None = None):
        self.bar.set_postfix_str(label or key)
        t0 = time.perf_counter()
        yield
        self.seconds[key] = time.perf_counter() - t0
        self.bar.update(1)

    def close(self) -> dict[str, float]:
        self.bar.close()
        self.seconds["total"] = time.perf_counter() - self._start
        self.seconds["cpu_total"] = time.process_time() - self._cpu_start
        return self.seconds


def _run(cfg: DemoConfig, out: Path, progress: bool, command: str | None, llama_threads: int = 1) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    st = _Stages(7, progress)
    with st.stage("data"):
        data = load_mnist1d()
    with st.stage("dense training"):  # 1. dense
        dense, dense_acc = _train_dense(cfg, data, out, progress)
    with st.stage("search", "DominoSearch"):  # 2. search
        scheme = _search_scheme(cfg, dense, data, out, progress)
    with st.stage("retraining", "SR-STE retraining"):  # 3. retrain
        rows = [{"name": "dense", "kind": "dense", "accuracy": dense_acc, **_sp(dense)}]
        main_model, sparsify_report = _run_variants(cfg, dense, scheme, data, rows, progress)
    with st.stage("packing"):  # 4. pack
        packed, packing = _pack_and_check(dense, main_model, data, out)
        packing |= {"train_form_accuracy": rows[-1]["accuracy"], "sparsify_report": sparsify_report}
    with st.stage("latency"):  # 5. latency
        latency = measure_latency(dense, packed, cfg.latency_batches, cfg.latency_seconds, data.x_test, main_model,
                                  progress=progress)
    with st.stage("llama", "LLaMA-shaped layer"):  # 6. where sparsity pays (the caller's threads: a big GEMM)
        llama = llama_latency(cfg.llama_seconds, llama_threads, seed=cfg.seed, progress=progress)
    res = {
        "command": command or "nmkern.demo.run_demo(...)",
        "config": dataclasses.asdict(cfg),
        "machine": timing.machine_info(),
        "data": {"name": data.name, "train": len(data.y_train), "test": len(data.y_test)},
        "accuracy": rows,
        "scheme": scheme.to_dict() | {"iterations": scheme.meta.get("iterations"),
                                     "skipped": scheme.meta.get("skipped", [])},
        "packing": packing,
        "latency": latency,
        "llama": llama,
        "seconds": st.close(),
    }
    res["scheme"].pop("meta", None)
    _write_outputs(res, dense_acc, out)
    return res


def _train_dense(cfg: DemoConfig, data: Dataset, out: Path, progress: bool) -> tuple[nn.Module, float]:
    """Step 1: the dense model, trained and saved (``dense.pt``); returns it and its test accuracy."""
    _seed_all(cfg.seed)
    dense = MNIST1DNet()
    train(dense, data, cfg.dense_epochs, cfg.lr, cfg.batch_size, seed=cfg.seed, desc="dense", progress=progress)
    dense.eval()
    atomic_write(out / "dense.pt", lambda p: torch.save(dense.state_dict(), p))
    return dense, accuracy(dense, data)


def _search_scheme(cfg: DemoConfig, dense: nn.Module, data: Dataset, out: Path, progress: bool):
    """Step 2: DominoSearch's layer-wise N:M scheme for the budget (``scheme.json``, ``per_layer_n.png``)."""
    _seed_all(cfg.seed + 1)
    search_data = data.train_batches(cfg.batch_size, seed=cfg.seed + 7, epochs=1)
    scheme = domino_search(dense, search_data, budget=Budget(params=cfg.budget), m=cfg.m, lr=cfg.search_lr,
                           decay=cfg.search_decay, decay_milestones=cfg.search_milestones,
                           check_every=cfg.search_check_every, max_iters=cfg.search_max_iters, progress=progress,
                           plot=out / "per_layer_n.png")
    scheme.save(out / "scheme.json")
    return scheme


def _variants(cfg: DemoConfig, scheme) -> list[tuple[str, str, object, bool]]:
    """(name, kind, scheme, retrain) of every sparse model: one-shot masks first, the searched scheme
    retrained with SR-STE last."""
    variants = [(f"{pat} one-shot", "one-shot", pat, False) for pat in cfg.oneshot]
    variants.append(("DominoSearch one-shot", "one-shot", scheme, False))
    variants += [(f"{pat} SR-STE", "SR-STE", pat, True) for pat in cfg.baselines]
    variants.append(("DominoSearch SR-STE", "DominoSearch", scheme, True))
    return variants


def _run_variants(cfg: DemoConfig, dense: nn.Module, scheme, data: Dataset, rows: list[dict],
                  progress: bool) -> tuple[nn.Module, dict]:
    """Step 3: sparsify copies of ``dense`` (retrain some with SR-STE) and append their accuracy rows to
    ``rows``; returns the DominoSearch SR-STE model and its sparsify report."""
    from tqdm.auto import tqdm

    main_model, sparsify_report = None, None
    variants = _variants(cfg, scheme)
    for i, (name, kind, sch, retrain) in enumerate(tqdm(variants, desc="variants", disable=not progress, leave=False)):
        model, rep = sparsify_copy(dense, sch)
        if retrain:
            _seed_all(cfg.seed + 10 + i)
            train(model, data, cfg.sparse_epochs, cfg.sparse_lr, cfg.batch_size, seed=cfg.seed + 10 + i,
                  desc=name, progress=progress)
        model.eval()
        rows.append({"name": name, "kind": kind, "accuracy": accuracy(model, data), **_sp(model),
                     "retrained_epochs": cfg.sparse_epochs if retrain else 0})
        if name == "DominoSearch SR-STE":
            main_model, sparsify_report = model, rep
    return main_model, sparsify_report


def _pack_and_check(dense: nn.Module, model: nn.Module, data: Dataset, out: Path) -> tuple[nn.Module, dict]:
    """Step 4: the packed copy of ``model`` (``sparse_packed.pt``), its sizes, accuracy and logit difference."""
    packed = pack_model(model)
    atomic_write(out / "sparse_packed.pt", lambda p: torch.save(packed.state_dict(), p))
    with torch.no_grad():
        diff = float((packed(data.x_test) - model(data.x_test)).abs().max())
    return packed, {"dense_bytes": state_bytes(dense), "train_form_bytes": state_bytes(model),
                    "packed_bytes": state_bytes(packed), "packed_accuracy": accuracy(packed, data),
                    "max_abs_logit_diff": diff}


def _write_outputs(res: dict, dense_acc: float, out: Path) -> None:
    """``results.json``, the accuracy and latency plots and ``report.md``."""
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    plot_accuracy(res["accuracy"], dense_acc, out / "accuracy_vs_sparsity.png")
    plot_latency(res["latency"], out / "latency_ratio.png",
                 f"MNIST-1D CNN, packed DominoSearch model vs dense, {res['machine']['threads']} thread(s)\n"
                 f"{res['machine']['cpu']}")
    plt = _plt()
    atomic_write(out / "llama_layer.png", lambda p: plot_llama(res["llama"], p, plt))
    write_report(res, out)


def _sp(model: nn.Module) -> dict:
    cap, total = prunable_sparsity(model)
    return {"sparsity": cap, "sparsity_all": total}


__all__ = ["DemoConfig", "FULL", "QUICK", "run_demo"]
