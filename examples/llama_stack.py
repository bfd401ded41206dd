"""End-to-end CPU latency of 4 LLaMA-7B-shaped decoder layers: dense vs 2:4 vs 1:4 packed, fp32 and bf16.

The stack is transformers' ``LlamaModel`` built from a config (no download): hidden 4096, 32 heads,
intermediate 11008, 4 layers, random weights, so each layer holds q/k/v/o 4096x4096, gate/up
11008x4096 and down 4096x11008 Linear layers (3.2 GB of fp32 weights for the 4 layers: far beyond any
CPU cache), plus attention, RMSNorm and SiLU. A call is one decode-sized step: ``batch`` sequences of
one token each, fed as ``inputs_embeds`` (no KV cache: attention over that one token), so the GEMMs
have ``batch`` rows.

For each dtype: the packed copies are tuned first (:func:`nmkern.tune`, the same measurement every
packed layer makes on its first call; cold-cache timings, since the model exceeds the cache), then
dense and packed models are called interleaved, order rotating, medians
(:func:`nmkern.timing.time_interleaved`), after checking that each packed model's output matches the
dense model holding the same masked weights.

    python examples/llama_stack.py --out examples/llama_stack_results.json        # ~15 min on 2 cores
    python examples/llama_stack.py --layers 1 --hidden 512 --intermediate 1376 --out tiny.json   # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nmkern  # noqa: E402
from nmkern import timing  # noqa: E402
from nmkern.methods.recipes import to_plain  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_stack(layers: int, hidden: int, intermediate: int, heads: int, seed: int) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32,
                                   max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaModel(cfg).eval()


def sparse_twin(dense: torch.nn.Module, pattern: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(packed model, dense model holding the same masked weights) for one pattern."""
    sparse = copy.deepcopy(dense)
    nmkern.sparsify(sparse, {"layers.*": pattern}, pack=True)
    return sparse.eval(), to_plain(sparse).eval()


def _call(model, x):
    return model(inputs_embeds=x, use_cache=False).last_hidden_state


def run_dtype(dense32, args, dtype_name: str) -> dict:
    dtype = DTYPES[dtype_name]
    dense = copy.deepcopy(dense32).to(dtype)
    gen = torch.Generator().manual_seed(1)
    xs = {b: torch.randn(b, 1, args.hidden, generator=gen).to(dtype) for b in args.batches}
    models, tuned, errors = {"dense": dense}, {}, {}
    for pattern in args.patterns:
        sparse, masked = sparse_twin(dense, pattern)
        t0 = time.perf_counter()
        report = nmkern.tune(sparse, [{"inputs_embeds": xs[b], "use_cache": False} for b in args.batches])
        tuned[pattern] = {"seconds": round(time.perf_counter() - t0, 1),
                          "paths": sorted({(r["rows"], r["shape"], r["path"]) for r in report.rows})}
        with torch.no_grad():
            for b, x in xs.items():
                ref, got = _call(masked, x).float(), _call(sparse, x).float()
                errors[f"{pattern}@{b}"] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        del masked
        models[pattern] = sparse
    rows = []
    for b, x in xs.items():
        with torch.no_grad():
            t = timing.time_interleaved({k: (lambda m=m: _call(m, x)) for k, m in models.items()},
                                        seconds=args.seconds, warmup=1, min_repeats=5)
        row = {"dtype": dtype_name, "batch": b, "repeats": t["dense"].repeats} | timing.columns(t)
        rows.append(row)
        ratios = ", ".join(f"{p} {row[f'{p}_ratio']:.2f}x" for p in args.patterns)
        print(f"{dtype_name} batch {b}: dense {row['dense_median_ms']:.1f} ms; {ratios}", flush=True)
    return {"rows": rows, "tuned": tuned, "max_rel_error": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--patterns", default="2:4,1:4")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--seconds", type=float, default=20.0, help="timing budget per batch size and dtype")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dense32 = build_stack(args.layers, args.hidden, args.intermediate, args.heads, args.seed)
    result = {"meta": timing.machine_info() | {"command": " ".join(sys.argv), "layers": args.layers,
                                               "hidden": args.hidden, "intermediate": args.intermediate,
                                               "weight_bytes_fp32": nmkern.tuning.model_weight_bytes(dense32)},
              "results": {}}
    for name in args.dtypes.split(","):
        result["results"][name] = run_dtype(dense32, args, name.strip())
    result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
