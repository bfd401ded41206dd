"""`nmkern inspect`: per weight, shape and detected pattern; exit 2 with a message on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import nmkern
from nmkern.cli import main


def make_checkpoint(path):
    torch.manual_seed(0)
    conv = torch.randn(16, 16, 3, 3)
    blocky = torch.randn(32, 24)
    sd = {
        "fc24.weight": nmkern.apply_nm(torch.randn(32, 64), 2, 4),
        "fc24.bias": torch.randn(32),
        "conv18.weight": nmkern.apply_nm(conv, 1, 8, dim=1),
        "block.weight": blocky * nmkern.block_mask_1xn(blocky, 8, 0.75),
        "dense.weight": torch.randn(8, 8),
        "steps": torch.tensor(3),
    }
    torch.save({"state_dict": sd, "epoch": 3}, path)
    return sd


def test_inspect_json(tmp_path, capsys):
    path = tmp_path / "model.pt"
    make_checkpoint(path)
    assert main(["inspect", str(path), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fc24.weight"]["pattern"] == "2:4"
    assert rows["conv18.weight"]["pattern"] == "1:8"
    assert rows["block.weight"]["pattern"] == "1x8" and rows["block.weight"]["block_sparsity"] == 0.75
    assert rows["dense.weight"]["pattern"] == "dense"
    assert rows["fc24.bias"]["pattern"] == "-"
    assert rows["fc24.weight"]["shape"] == [32, 64] and rows["fc24.weight"]["sparsity"] == 0.5


def test_inspect_table_via_module(tmp_path):
    path = tmp_path / "model.pt"
    make_checkpoint(path)
    out = subprocess.run([sys.executable, "-m", "nmkern", "inspect", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("conv18.weight"))
    assert "(16, 16, 3, 3)" in line and line.rstrip().endswith("1:8")


def test_inspect_missing_file(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_inspect_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert main(["inspect", str(bad)]) == 2
    assert "is not a checkpoint torch can load" in capsys.readouterr().err


def test_no_command_is_usage_error(capsys):
    assert main([]) == 2


def test_detection_is_a_library_call():
    from nmkern.inspect_tensors import describe_state_dict, describe_tensor, detect_1xn, detect_nm

    w = nmkern.apply_nm(torch.randn(8, 16), 1, 4)
    assert detect_nm(w) == (1, 4) and detect_nm(torch.randn(8, 16)) is None
    blocky = torch.randn(16, 8)
    blocky = blocky * nmkern.block_mask_1xn(blocky, 4, 0.5)
    assert detect_1xn(blocky) == (4, 0.5)
    assert describe_tensor("b", blocky)["pattern"] == "1x4"
    assert [r["pattern"] for r in describe_state_dict({"w": w, "bias": torch.ones(8)})] == ["1:4", "-"]


def test_load_state_dict_errors_are_value_errors(tmp_path):
    import pytest

    from nmkern.checkpoint_io import CheckpointError, load_state_dict

    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(str(tmp_path / "nope.pt"))
    assert issubclass(CheckpointError, ValueError)  # the CLI reports it as bad input (exit 2)
