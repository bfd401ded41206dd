"""The demo's last section: where sparsity pays, a LLaMA-7B-shaped decoder layer at batch 1, dense vs 2:4 packed.

One :class:`nmkern.models.LlamaShapedLayer` (hidden 4096, intermediate 11008, 32 heads, random weights:
808 MB in fp32, so every forward reads its weights from memory, not from the cache) is timed at one
token per call, fp32 and bf16, dense against a packed 2:4 copy whose layers dispatch on their own
(``auto``: measured before timing, :func:`nmkern.benchmark.settle_dispatch`), interleaved, medians
(:func:`nmkern.benchmark.time_models`). The packed copy's output is checked against the dense model
holding the same masked weights.
"""

from __future__ import annotations

import copy

import torch

from .benchmark import time_models
from .methods.recipes import to_plain
from .models import LlamaShapedLayer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def llama_latency(seconds: float, threads: int, *, hidden: int = 4096, intermediate: int = 11008, heads: int = 32,
                  seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per dtype: dense and packed 2:4 median ms at batch 1 (one token), their ratio, the paths the
    packed layers took and the packed model's max relative error against its dense twin."""
    from tqdm.auto import tqdm

    from .sparsify import sparsify

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        base = LlamaShapedLayer(hidden, intermediate, heads).eval()
        packed32 = copy.deepcopy(base)
        sparsify(packed32, "2:4", pack=True)  # masks from the fp32 weights; packing 202M weights takes ~17 s here
        twin32 = to_plain(packed32)  # the dense model holding the same masked weights
        rows = []
        for name in tqdm(list(DTYPES), desc="llama-shaped layer", disable=not progress, leave=False):
            dtype = DTYPES[name]
            dense, packed, twin = (copy.deepcopy(m).to(dtype) for m in (base, packed32, twin32))
            x = torch.randn(1, 1, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
            row = time_models({"dense": dense, "packed_auto": packed}, x, seconds=seconds)
            with torch.no_grad():
                ref = twin(x).float()
                err = float((packed(x).float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            paths = sorted({str(m._choose(x, 1)) for m in packed.modules() if hasattr(m, "_choose")})
            rows.append({"dtype": name, "batch": 1, "threads": threads, "paths": paths, "max_rel_error": err} | row)
            del dense, packed, twin
        return rows
    finally:
        torch.set_num_threads(before)


def plot_llama(rows: list[dict], path, plt) -> None:
    """Bar chart: packed 2:4 / dense time per dtype."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = [r["dtype"] for r in rows]
    ratios = [r["packed_auto_ratio"] for r in rows]
    ax.bar(names, ratios, color=["tab:green" if v < 1 else "tab:red" for v in ratios])
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    for i, v in enumerate(ratios):
        ax.text(i, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("time packed 2:4 / dense (median)")
    ax.set_title("LLaMA-7B-shaped decoder layer, batch 1", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def report_lines(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Where sparsity pays: a LLaMA-7B-shaped layer at batch 1",
        "",
        "One decoder layer with LLaMA-7B's shapes (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008, "
        "attention and norms; random weights, 808 MB in fp32: read from memory every call, as in a real model), "
        "one token per call, dense vs packed 2:4 (each packed layer measured its paths first and runs the "
        "winner), interleaved medians on this machine.",
        "",
        "| dtype | threads | dense (ms) | packed 2:4 (ms) | ratio | paths taken | max rel. error |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['threads']} | {r['dense_median_ms']:.2f} | {r['packed_auto_median_ms']:.2f} "
                     f"| **{r['packed_auto_ratio']:.2f}** | {', '.join(r['paths'])} | {r['max_rel_error']:.1e} |")
    lines += ["", "![llama-shaped layer](llama_layer.png)"]
    return lines
