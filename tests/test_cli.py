"""The nmkern CLI beyond `inspect`: prune round trips, search/train with --resume, bench, and error paths
(exit 2, a message that says what and how to fix, nothing written)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

import nmkern.methods.srste
from nmkern.cli import main
from nmkern.models import MNIST1DNet

FACTORY = "nmkern.models:MNIST1DNet"
NM_LAYERS = ("conv2", "conv3", "conv4", "fc1", "fc2")  # conv1 has 1 input channel: never N:M


def inspect_rows(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)}


@pytest.fixture
def dense_ckpt(tmp_path):
    torch.manual_seed(0)
    model = MNIST1DNet()
    path = tmp_path / "dense.pt"
    torch.save(model.state_dict(), path)
    return path, model


# --------------------------------------------------------------------------- prune


def test_prune_state_dict_round_trip(dense_ckpt, tmp_path, capsys):
    src, model = dense_ckpt
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(src), "--factory", FACTORY, "--scheme", "2:4", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "conv1" in printed
    # The pruned file loads into the factory's model, strictly.
    pruned = MNIST1DNet()
    pruned.load_state_dict(torch.load(out, weights_only=True))
    rows = inspect_rows(out, capsys)
    for name in NM_LAYERS:
        assert rows[f"{name}.weight"]["pattern"] == "2:4", name
        assert rows[f"{name}.weight"]["sparsity"] == 0.5
    assert rows["conv1.weight"]["pattern"] == "dense"
    # Kept weights are the original ones (magnitude pruning does not touch survivors).
    kept = pruned.fc1.weight != 0
    assert torch.equal(pruned.fc1.weight[kept], model.fc1.weight.detach()[kept])
    report = json.loads((tmp_path / "pruned.json").read_text())
    actions = {r["layer"]: r for r in report["layers"]}
    assert actions["conv1"]["action"] == "skipped" and "in_channels=1 is not divisible by m=4" in actions["conv1"]["detail"]
    assert report["sparsified"] == 5 and report["skipped"] == 1


def test_prune_scheme_json_and_1xn(dense_ckpt, tmp_path, capsys):
    src, _ = dense_ckpt
    scheme = tmp_path / "scheme.json"
    scheme.write_text(json.dumps({"conv*": "1:8", "fc1": [1, 4], "fc2": None}))
    out = tmp_path / "mixed.pt"
    assert main(["prune", str(src), "--factory", FACTORY, "--scheme", str(scheme), "-o", str(out)]) == 0
    rows = inspect_rows(out, capsys)
    assert rows["conv2.weight"]["pattern"] == "1:8" and rows["conv4.weight"]["pattern"] == "1:8"
    assert rows["fc1.weight"]["pattern"] == "1:4"
    assert rows["fc2.weight"]["pattern"] == "dense"

    out2 = tmp_path / "blocks.pt"
    assert main(["prune", str(src), "--factory", FACTORY, "--method", "1xn:4:0.5", "-o", str(out2)]) == 0
    rows = inspect_rows(out2, capsys)
    for name in ("conv1", "conv2", "conv3", "conv4", "fc1"):
        assert rows[f"{name}.weight"]["pattern"] == "1x4", name
        assert rows[f"{name}.weight"]["block_sparsity"] == 0.5
    assert rows["fc2.weight"]["pattern"] == "dense"  # 10 outputs: no 1x4 blocks
    report = {r["layer"]: r for r in json.loads((tmp_path / "blocks.json").read_text())["layers"]}
    assert "out_features=10 is not divisible by the 1xN block size 4" in report["fc2"]["detail"]


def test_prune_torchscript_round_trip(tmp_path, capsys):
    torch.manual_seed(1)
    src = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(MNIST1DNet()), str(src))
    out = tmp_path / "pruned.ts"
    assert main(["prune", str(src), "--scheme", "1:4", "-o", str(out)]) == 0
    loaded = torch.jit.load(str(out))
    y = loaded(torch.randn(3, 1, 1, 40))
    assert y.shape == (3, 10)
    rows = inspect_rows(out, capsys)
    assert all(rows[f"{n}.weight"]["pattern"] == "1:4" for n in NM_LAYERS)


def _assert_error(capsys, argv, code, *needles):
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_prune_errors_write_nothing(dense_ckpt, tmp_path, capsys):
    src, _ = dense_ckpt
    out = tmp_path / "out.pt"
    cases = [
        (["prune", str(tmp_path / "missing.pt"), "--factory", FACTORY, "--scheme", "2:4", "-o", str(out)],
         "no such file"),
        (["prune", str(src), "--factory", FACTORY, "--scheme", "4:2", "-o", str(out)], "is not a pattern"),
        (["prune", str(src), "--factory", FACTORY, "--scheme", "banana", "-o", str(out)], "'n:m'"),
        (["prune", str(src), "--factory", FACTORY, "--scheme", str(tmp_path / "nope.json"), "-o", str(out)],
         "no such file"),
        (["prune", str(src), "--scheme", "2:4", "-o", str(out)], "pass --factory"),
        (["prune", str(src), "--factory", "nmkern.models:DigitsNet", "--scheme", "2:4", "-o", str(out)],
         "does not fit the model"),
        (["prune", str(src), "--factory", "nmkern.nothere:X", "--scheme", "2:4", "-o", str(out)], "cannot import"),
        (["prune", str(src), "--factory", FACTORY, "--method", "random", "-o", str(out)], "choose 'magnitude'"),
        (["prune", str(src), "--factory", FACTORY, "-o", str(out)], "--scheme is required"),
        (["prune", str(src), "--factory", FACTORY, "--scheme", "2:4", "-o", str(src)], "overwrite the input"),
    ]
    for argv, needle in cases:
        _assert_error(capsys, argv, 2, needle)
        assert not out.exists() and not out.with_suffix(".json").exists(), argv
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    _assert_error(capsys, ["prune", str(src), "--factory", FACTORY, "--scheme", str(bad_json), "-o", str(out)], 2,
                  "not valid JSON")
    assert set(tmp_path.iterdir()) == {src, bad_json}


def test_prune_incompatible_model_exit_2(tmp_path, capsys):
    # Every Linear has in_features=3: no N:M group fits, so there is nothing to prune.
    src = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3))), str(src))
    out = tmp_path / "o.ts"
    err = _assert_error(capsys, ["prune", str(src), "--scheme", "1:16", "-o", str(out)], 2, "nothing to prune",
                        "in_features=3 is not divisible by m=16")
    assert "in_features=8 is not divisible by m=16" in err
    assert not out.exists() and not (tmp_path / "o.json").exists()


# --------------------------------------------------------------------------- search / train


def test_search_then_resume(tmp_path, capsys):
    out = tmp_path / "search"
    argv = ["search", "--dataset", "mnist1d", "--dense-epochs", "1", "--budget", "params=0.5", "-o", str(out),
            "--no-progress"]
    assert main(argv) == 0
    scheme = json.loads((out / "scheme.json").read_text())
    assert scheme["param_sparsity"] >= 0.5 - 1e-3
    assert all(p is None or (p[1] == 16 and p[0] in (1, 2, 4, 8)) for p in scheme["layers"].values())
    result = json.loads((out / "search.json").read_text())
    assert 0.0 <= result["oneshot_accuracy"] <= 1.0 and (out / "per_layer_n.png").stat().st_size > 1000
    # Without --resume the finished run is protected; with it the finished search is kept.
    _assert_error(capsys, argv, 2, "pass --resume")
    assert main(argv + ["--resume"]) == 0
    assert "finished search" in capsys.readouterr().out


def test_train_srste_interrupted_then_resumed(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "mnist1d", "--method", "srste", "--scheme", "2:4", "--epochs", "2", "-o", str(out),
            "--no-progress"]
    real = nmkern.methods.srste.train_srste
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user stops the run during epoch 2
        return real(*a, **k)

    monkeypatch.setattr(nmkern.methods.srste, "train_srste", flaky)
    assert main(argv) == 130
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # tensors and plain containers only
    assert state["epoch"] == 1 and not (out / "model.pt").exists()
    first_epoch = state["history"][0]
    monkeypatch.setattr(nmkern.methods.srste, "train_srste", real)
    _assert_error(capsys, argv, 2, "pass --resume")
    assert main(argv + ["--resume"]) == 0
    assert "continuing after epoch 1 of 2" in capsys.readouterr().out
    result = json.loads((out / "train.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2] and result["history"][0] == first_epoch
    assert result["sparsity_nm_layers"] == pytest.approx(0.5, abs=1e-6)
    rows = inspect_rows(out / "model.pt", capsys)
    assert all(rows[f"{n}.weight"]["pattern"] == "2:4" for n in NM_LAYERS)
    assert (out / "model_packed.pt").is_file()


def test_train_and_search_usage_errors(tmp_path, capsys):
    out = tmp_path / "x"
    _assert_error(capsys, ["train", "--method", "srste", "--scheme", "5:4", "-o", str(out)], 2, "is not a pattern")
    _assert_error(capsys, ["train", "--method", "dense", "--scheme", "2:4", "-o", str(out)], 2, "--scheme is for")
    _assert_error(capsys, ["train", "--method", "nope", "-o", str(out)], 2)
    _assert_error(capsys, ["train", "--init", str(tmp_path / "none.pt"), "--epochs", "1", "-o", str(out)], 2,
                  "no such file")
    _assert_error(capsys, ["search", "--budget", "params=1.5", "-o", str(out)], 2, "params=1.5")
    _assert_error(capsys, ["search", "--budget", "size=3", "-o", str(out)], 2, "params=<sparsity>")
    assert not out.exists()


# --------------------------------------------------------------------------- bench


def test_bench_small_shape(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--shape", "64x128", "--batch", "1,8", "--pattern", "2:4,1x4:0.75", "--seconds", "0.05",
            "--json", str(path), "--no-progress", "--no-cold"]  # cold: a 1024-layer stack of this small shape
    assert main(argv) == 0
    data = json.loads(path.read_text())
    assert [(r["pattern"], r["batch"]) for r in data["rows"]] == [("2:4", 1), ("2:4", 8), ("1x4:0.75", 1),
                                                                  ("1x4:0.75", 8)]
    for r in data["rows"]:
        assert r["dense_median_ms"] > 0 and r["nmkern_auto_ratio"] > 0
    assert "2:4" in capsys.readouterr().out


def test_bench_bad_input_writes_nothing(tmp_path, capsys):
    path = tmp_path / "bench.json"
    _assert_error(capsys, ["bench", "--pattern", "3:3", "--json", str(path)], 2, "n:m with 1 <= n < m <= 16")
    _assert_error(capsys, ["bench", "--shape", "64", "--json", str(path)], 2, "OUTxIN")
    _assert_error(capsys, ["bench", "--shape", "64x66", "--pattern", "2:4", "--json", str(path)], 2,
                  "not divisible by m=4")
    _assert_error(capsys, ["bench", "--batch", "0,2", "--json", str(path)], 2, "positive integers")
    assert not path.exists()


# --------------------------------------------------------------------------- layout and the pattern vocabulary


def test_1xn_spellings_prune_alike(dense_ckpt, tmp_path):
    src, _ = dense_ckpt
    outs = []
    for i, scheme in enumerate(("1x4:0.5", "1xN:4:0.5")):  # the second: nmkern 0.1's spelling, deprecated
        out = tmp_path / f"p{i}.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            assert main(["prune", str(src), "--factory", FACTORY, "--scheme", scheme, "-o", str(out)]) == 0
        outs.append(torch.load(out, weights_only=True))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert (outs[0]["fc1.weight"] == 0).float().mean() == 0.5


def test_scheme_and_bench_patterns_use_parse_spec(tmp_path):
    from nmkern.cli._common import UsageError, parse_scheme_arg
    from nmkern.benchmark import parse_pattern
    from nmkern.spec import DENSE, BlockSpec, NMSpec

    assert parse_scheme_arg("2:4") == NMSpec(2, 4)
    assert parse_scheme_arg("1x4:0.5") == BlockSpec(4, 0.5)
    with pytest.warns(DeprecationWarning):
        assert parse_scheme_arg("1xN:4:0.5") == BlockSpec(4, 0.5)
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"fc*": "1x8:0.75", "conv2": [1, 4], "conv1": None}))
    assert parse_scheme_arg(str(path)) == {"fc*": BlockSpec(8, 0.75), "conv2": NMSpec(1, 4), "conv1": DENSE}
    for bad in ("dense", "unstructured:0.5", "4:2"):
        with pytest.raises(UsageError, match="is not a pattern"):
            parse_scheme_arg(bad)
    with pytest.warns(DeprecationWarning):
        assert parse_pattern("1x4:0.75").spec == parse_pattern("1xN:4:0.75").spec == BlockSpec(4, 0.75)
    assert parse_pattern("2:4").spec == NMSpec(2, 4)
    with pytest.raises(ValueError, match="1x<block>:<sparsity>"):
        parse_pattern("1x4:0")


def test_gap_target_from_specs():
    from nmkern.methods.recipes import gap_target
    from nmkern.spec import BlockSpec, NMSpec

    model = MNIST1DNet()
    logged = []
    kw = gap_target(NMSpec(2, 4), model, log=logged.append)
    assert kw["target"] == "nm" and (kw["n"], kw["m"]) == (2, 4) and "conv1" not in kw["layers"]
    assert logged == ["gap: left dense (shape does not fit 2:4): conv1"]
    assert gap_target(BlockSpec(4, 0.5), model, log=logged.append)["target"] == "1xn"
    kw = gap_target({"fc1": NMSpec(1, 4), "fc2": None}, model)
    assert kw == {"target": "nm", "scheme": {"fc1": (1, 4)}, "layers": ["fc1"]}
    with pytest.raises(ValueError, match="exact layer names"):
        gap_target({"conv*": NMSpec(2, 4)}, model)


def test_commands_are_thin_and_independent():
    import ast
    from pathlib import Path

    import nmkern.cli

    root = Path(nmkern.cli.__file__).parent
    commands = {p.stem for p in root.glob("*.py") if not p.stem.startswith("_")}
    assert commands == {"inspect", "prune", "convert", "demo", "search", "train", "bench", "tune", "selftest"}
    for name in commands:
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module == "_common" or node.module is None and not {a.name for a in node.names} & commands, \
                    (name, node.module)
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 80, (name, node.name)
