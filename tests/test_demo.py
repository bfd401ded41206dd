"""`nmkern demo --quick` end to end: every report file is written and holds real numbers."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from nmkern.cli import main
from nmkern.scheme import Scheme

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "-o", str(out), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo's single thread does not leak into the caller
    printed = capsys.readouterr().out
    assert "DominoSearch SR-STE" in printed and "report.md" in printed

    res = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in res["accuracy"]}
    assert {"dense", "DominoSearch one-shot", "DominoSearch SR-STE", "1:8 SR-STE"} <= set(rows)
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["sparsity"] < 1.0
    # Trained, not guessing: 10 classes are 10% by chance.
    assert rows["dense"]["accuracy"] > 0.3
    assert rows["DominoSearch SR-STE"]["accuracy"] > 0.2
    assert rows["1:8 SR-STE"]["sparsity"] == 0.875

    scheme = Scheme.load(out / "scheme.json")
    assert scheme.param_sparsity >= 0.875 - 1e-3
    assert rows["DominoSearch SR-STE"]["sparsity"] == pytest.approx(scheme.param_sparsity, abs=1e-9)  # trained == searched

    pk = res["packing"]
    assert pk["packed_bytes"] < 0.5 * pk["dense_bytes"]
    assert pk["packed_accuracy"] == pk["train_form_accuracy"] and pk["max_abs_logit_diff"] < 1e-4

    assert [r["batch"] for r in res["latency"]] == [1, 64, 512]
    for r in res["latency"]:
        assert r["dense_median_ms"] > 0 and math.isfinite(r["packed_auto_ratio"]) and r["packed_auto_ratio"] > 0
        assert r["packed_auto_max_abs_diff"] < 1e-4
        assert r["dense_q1_ms"] <= r["dense_median_ms"] <= r["dense_q3_ms"] and r["repeats"] >= 5
    # The machine as nmkern.timing records it (the harness the latency rows come from).
    assert {"cpu", "cpu_flags", "cpu_isa", "cores", "threads", "torch", "nmkern", "platform"} <= set(res["machine"])
    assert res["machine"]["threads"] == 1  # the demo's thread count, recorded while it ran

    report = (out / "report.md").read_text()
    for heading in ("## Accuracy", "## DominoSearch scheme", "## Packing", "## CPU latency"):
        assert heading in report
    dense_line = next(ln for ln in report.splitlines() if ln.startswith("| dense |"))
    assert re.search(r"\| \d+\.\d \|$", dense_line), dense_line
    assert f"{100 * rows['dense']['accuracy']:.1f}" in dense_line
    llama = {r["dtype"]: r for r in res["llama"]}  # the LLaMA-7B-shaped layer, dense vs packed 2:4 at batch 1
    assert set(llama) == {"float32", "bfloat16"}
    for r in llama.values():
        assert r["dense_median_ms"] > 0 and r["packed_auto_median_ms"] > 0 and r["repeats"] >= 5
        assert r["threads"] == threads and set(r["paths"]) <= {"dense", "cpu"}
        assert r["max_rel_error"] < (1e-4 if r["dtype"] == "float32" else 3e-2)
    assert "## Where sparsity pays: a LLaMA-7B-shaped layer at batch 1" in report
    for png in ("per_layer_n.png", "accuracy_vs_sparsity.png", "latency_ratio.png", "llama_layer.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, png
    # The dense checkpoint loads into the bundled model; `inspect` reads the packed one.
    from nmkern.models import MNIST1DNet

    MNIST1DNet().load_state_dict(torch.load(out / "dense.pt", weights_only=True))
    assert main(["inspect", str(out / "sparse_packed.pt"), "--json"]) == 0
