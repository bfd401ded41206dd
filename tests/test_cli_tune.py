"""``nmkern tune``: measure each packed layer's path ahead of time and record it (nmkern.tuning)."""

from __future__ import annotations

import json

import pytest
import torch

import nmkern
from nmkern import _cpu, tuning
from nmkern.cli import main
from nmkern.models import MNIST1DNet

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="nmkern CPU library not built")


@pytest.fixture
def packed_file(tmp_path):
    torch.manual_seed(0)
    model = MNIST1DNet()
    nmkern.sparsify(model, "2:4", pack=True)
    path = tmp_path / "m.safetensors"
    nmkern.save(model, path)
    return path


def test_tune_records_every_layer_at_every_batch(tuned, packed_file, tmp_path, capsys):
    tuned.set(dense=1.0, cpu=0.5)
    out = tmp_path / "t.json"
    argv = [str(packed_file), "--factory", "nmkern.models:MNIST1DNet", "--input-shape", "1x1x40", "--batch", "1,8"]
    assert main(["tune", *argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| fc1 | 128x320 | 2:4 | float32 | 1 | cpu | measured |" in text
    assert "| fc1 | 128x320 | 2:4 | float32 | 8 | cpu | measured |" in text
    rows = json.loads(out.read_text())["rows"]
    per_layer = {}
    for r in rows:
        per_layer.setdefault(r["layer"], set()).add(r["rows"])
    assert {k: len(v) for k, v in per_layer.items()} == {n: 2 for n in ("conv2", "conv3", "conv4", "fc1", "fc2")}
    assert str(tuning.cache_dir()) in text
    n_measured = len(tuned.samples)
    assert main(["tune", *argv]) == 0  # a second run reads the winners: nothing measured
    assert len(tuned.samples) == n_measured and "| cache |" in capsys.readouterr().out
    assert main(["tune", *argv, "--remeasure"]) == 0
    assert len(tuned.samples) == 2 * n_measured


@pytest.mark.parametrize("extra, needle", [
    ([], "give --input-shape (float inputs, e.g. 1x1x40) or --seq-len"),
    (["--input-shape", "1x1x40", "--seq-len", "8"], "one of the two"),
    (["--input-shape", "1xzx40"], "--input-shape '1xzx40': write positive sizes joined by x"),
    (["--seq-len", "8"], "--seq-len 8: needs a transformers model"),
    (["--input-shape", "3x1x40"], "the model does not run on the example inputs"),
])
def test_tune_refusals_say_how_to_fix(tuned, packed_file, capsys, extra, needle):
    argv = ["tune", str(packed_file), "--factory", "nmkern.models:MNIST1DNet", "--batch", "1", *extra]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_tune_refuses_when_measuring_is_off_and_keeps_an_existing_json(tuned, packed_file, tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "t.json"
    out.write_text("keep")
    argv = ["tune", str(packed_file), "--factory", "nmkern.models:MNIST1DNet", "--input-shape", "1x1x40"]
    assert main([*argv, "--json", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "keep"
    monkeypatch.setenv("NMKERN_TUNE", "0")
    assert main(argv) == 2
    assert "NMKERN_TUNE=0 turns measuring off" in capsys.readouterr().err
