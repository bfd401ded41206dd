"""Issue #12: the CLI never runs code from a checkpoint, never writes over what it must not, validates
every option before any work, and exits 2 with a message (and nothing written) on bad input."""

from __future__ import annotations

import io
import json
import os
import pathlib
import random
import stat
import subprocess
import sys

import pytest
import torch

import nmkern.methods.srste
from nmkern.cli import main
from nmkern.models import MNIST1DNet

FACTORY = "nmkern.models:MNIST1DNet"
FAST_TRAIN = ["train", "--method", "dense", "--batch-size", "256", "--epochs", "1", "--no-progress"]


def snapshot(root: pathlib.Path) -> dict:
    """Every path under ``root``, with each file's size and modification time: 'nothing written' compares two.
    (A folder's own mtime is left out: the writability probe creates and removes a file in it.)"""
    return {str(p.relative_to(root)): None if p.is_dir() else (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def usage_error(capsys, argv, root: pathlib.Path, *needles) -> str:
    """``main(argv)`` exits 2 with every needle in its message, no traceback, and nothing under ``root`` changed."""
    before = snapshot(root)
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.startswith(f"nmkern {argv[0]}: error: ") or err.startswith("usage:"), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert snapshot(root) == before, argv
    return err


# --------------------------------------------------------------------------- 1. train --resume loads safely


class _Touch:
    """Unpickling this creates ``path``: the stand-in for a planted os.system call."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def test_resume_does_not_run_a_planted_pickle(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    run.mkdir()
    torch.save({"fingerprint": {}, "epoch": 0, "model": _Touch(marker)}, run / "checkpoint.pt")
    err = usage_error(capsys, FAST_TRAIN + ["-o", str(run), "--resume"], tmp_path,
                      "checkpoint.pt is not a checkpoint nmkern can load safely", "could run code", "delete")
    assert "weights_only` set to `False" not in err and "weights_only=False" not in err  # torch's advice is not ours
    assert not marker.exists()


def _checkpoint_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"model": MNIST1DNet().state_dict(), "epoch": 1}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("content, needle", [
    (b"", "empty or truncated"),
    ("truncated", "not a checkpoint nmkern can load safely"),
    (bytes(random.Random(0).randrange(256) for _ in range(4096)), "not a checkpoint nmkern can load safely"),
    ([1, 2, 3], "holds a list, not an nmkern training checkpoint"),
    ({"epoch": 1, "model": {}}, "no valid 'fingerprint' entry"),
    ({"fingerprint": {}, "epoch": "1", "model": {}, "optimizer": {}, "scheduler": {}, "history": []},
     "no valid 'epoch' entry"),
])
def test_resume_refuses_a_bad_checkpoint(tmp_path, capsys, content, needle):
    run = tmp_path / "run"
    run.mkdir()
    if content == "truncated":
        data = _checkpoint_bytes()
        (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    elif isinstance(content, bytes):
        (run / "checkpoint.pt").write_bytes(content)
    else:
        torch.save(content, run / "checkpoint.pt")
    usage_error(capsys, FAST_TRAIN + ["-o", str(run), "--resume"], tmp_path, needle, "checkpoint.pt")


def test_resume_refuses_a_checkpoint_of_the_wrong_shape(tmp_path, capsys, monkeypatch):
    """A well-formed checkpoint whose epoch does not fit this run is refused before anything is written."""
    run = tmp_path / "run"
    assert main(FAST_TRAIN + ["-o", str(run)]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save(state | {"epoch": 5}, run / "checkpoint.pt")
    usage_error(capsys, FAST_TRAIN + ["-o", str(run), "--resume"], tmp_path, "records epoch 5")
    torch.save(state | {"model": {"fc9.weight": torch.zeros(1)}}, run / "checkpoint.pt")
    usage_error(capsys, FAST_TRAIN + ["-o", str(run), "--resume"], tmp_path, "does not fit this run")


def test_resume_is_bit_identical_and_checkpoint_is_plain(tmp_path, monkeypatch):
    argv = ["train", "--method", "dense", "--batch-size", "256", "--epochs", "2", "--no-progress"]
    assert main(argv + ["-o", str(tmp_path / "whole")]) == 0
    real, calls = nmkern.methods.srste.train_srste, {"n": 0}

    def stop_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(nmkern.methods.srste, "train_srste", stop_in_epoch_2)
    assert main(argv + ["-o", str(tmp_path / "split")]) == 130
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)  # tensors and plain containers only
    assert state["epoch"] == 1 and set(state["rng"]) >= {"torch", "python"}
    monkeypatch.setattr(nmkern.methods.srste, "train_srste", real)
    assert main(argv + ["-o", str(tmp_path / "split"), "--resume"]) == 0
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    hist = [json.loads((tmp_path / d / "train.json").read_text())["history"] for d in ("whole", "split")]
    assert hist[0] == hist[1]


def test_rng_state_round_trip():
    import numpy as np

    from nmkern.methods.recipes import rng_state, seed_everything, set_rng_state

    seed_everything(3)
    state = rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    first = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn())
    set_rng_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    again = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2]) and first[3] == again[3]


# --------------------------------------------------------------------------- 3. --seed seeds the model


def test_train_seed_makes_runs_identical(tmp_path):
    for name in ("a", "b"):
        assert main(FAST_TRAIN + ["--seed", "3", "-o", str(tmp_path / name)]) == 0
    a, b = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (json.loads((tmp_path / n / "train.json").read_text())["history"][-1]["loss"] for n in ("a", "b"))
    assert la == lb


def test_search_seed_seeds_the_dense_model(tmp_path):
    from nmkern.data import load_dataset
    from nmkern.methods.recipes import SearchConfig, dense_stage

    cfg = SearchConfig(seed=5, batch_size=256)
    data = load_dataset("mnist1d", seed=5)
    states, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as `nmkern search` runs it: more threads only spin on this small model
    try:
        for name in ("a", "b"):
            dense_stage(cfg, data, tmp_path / name, 1, progress=False)
            states.append(torch.load(tmp_path / name / "dense.pt", weights_only=True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# --------------------------------------------------------------------------- 2. prune never clobbers


def test_prune_report_never_overwrites_an_input(tmp_path, model_file, capsys):
    scheme = tmp_path / "my.json"
    scheme.write_text(json.dumps({"fc1": "2:4"}))
    for force in ([], ["--force"]):
        usage_error(capsys, ["prune", str(model_file), "--factory", FACTORY, "--scheme", str(scheme),
                             "-o", str(tmp_path / "my.pt")] + force, tmp_path, "would overwrite the input")
    weights = tmp_path / "w.json"  # a state_dict under a .json name: its report would be the input itself
    torch.save(MNIST1DNet().state_dict(), weights)
    usage_error(capsys, ["prune", str(weights), "--factory", FACTORY, "--scheme", "2:4", "-o", str(tmp_path / "w.pt")],
                tmp_path, "would overwrite the input")


def test_prune_checks_every_output_before_writing(tmp_path, model_file, capsys):
    (tmp_path / "out.json").mkdir()  # the report's path is a directory: the .pt must not be left behind
    usage_error(capsys, ["prune", str(model_file), "--factory", FACTORY, "--scheme", "2:4", "-o",
                         str(tmp_path / "out.pt"), "--force"], tmp_path, "out.json is a directory")
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    usage_error(capsys, ["prune", str(model_file), "--factory", FACTORY, "--scheme", "2:4", "-o", str(fifo),
                         "--force"], tmp_path, "is a pipe or socket")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_prune_to_a_device_is_refused(tmp_path, model_file, capsys):
    before = os.stat("/dev/null")
    usage_error(capsys, ["prune", str(model_file), "--factory", FACTORY, "--scheme", "2:4", "-o", "/dev/null",
                         "--force"], tmp_path, "-o /dev/null is a device")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino


def test_prune_existing_output_needs_force(tmp_path, model_file, capsys):
    out, report = tmp_path / "p.pt", tmp_path / "p.json"
    out.write_bytes(b"mine")
    usage_error(capsys, ["prune", str(model_file), "--factory", FACTORY, "--scheme", "2:4", "-o", str(out)],
                tmp_path, "-o", "p.pt exists; pass --force")
    out.unlink()
    report.write_text("my notes")
    usage_error(capsys, ["prune", str(model_file), "--factory", FACTORY, "--scheme", "2:4", "-o", str(out)],
                tmp_path, "p.json exists; pass --force")
    assert main(["prune", str(model_file), "--factory", FACTORY, "--scheme", "2:4", "-o", str(out), "--force"]) == 0
    assert json.loads(report.read_text())["sparsified"] == 5
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(report.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "p.json", "p.pt"]  # no temp files left


def test_scheme_file_with_wrong_types_is_a_usage_error(tmp_path, model_file, capsys):
    for name, obj, needle in (("list.json", {"format": "nmkern.scheme/1", "layers": [["fc1", [2, 4]]]},
                               "'layers' must be an object"),
                              ("int.json", {"format": 1, "layers": {"fc1": [2, 4]}}, '"format" is 1'),
                              ("pair.json", {"format": "nmkern.scheme/1", "layers": {"fc1": "2:4"}}, None)):
        path = tmp_path / name
        path.write_text(json.dumps(obj))
        argv = ["prune", str(model_file), "--factory", FACTORY, "--scheme", str(path), "-o", str(tmp_path / "o.pt")]
        if needle is None:  # a scheme file with "n:m" strings is fine
            assert main(argv) == 0
            continue
        usage_error(capsys, argv, tmp_path, needle, str(path))
        usage_error(capsys, FAST_TRAIN + ["--method", "srste", "--scheme", str(path), "-o", str(tmp_path / "r")],
                    tmp_path, needle)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_all_is_all_or_nothing(tmp_path):
    from nmkern.checkpoint_io import CheckpointError, atomic_write, atomic_write_all

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old")

    def fail(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_all([(a, lambda p: p.write_text("new")), (b, fail)])
    assert a.read_text() == "old" and not b.exists() and sorted(tmp_path.iterdir()) == [a]
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        atomic_write(tmp_path / "d", lambda p: p.write_text("x"))
    link = tmp_path / "link.txt"
    link.symlink_to(a)
    atomic_write(link, lambda p: p.write_text("via link"))
    assert link.is_symlink() and a.read_text() == "via link"


# --------------------------------------------------------------------------- 4. user errors: exit 2, nothing written


def test_unwritable_output_is_refused_before_any_work(tmp_path, model_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    bad = str(blocker / "sub")
    cases = [
        ["prune", str(model_file), "--factory", FACTORY, "--scheme", "2:4", "-o", bad + "/p.pt"],
        FAST_TRAIN + ["-o", bad],
        ["search", "--dense-epochs", "1", "-o", bad],
        ["bench", "--json", bad + "/b.json"],
        ["demo", "--quick", "-o", bad],
    ]
    for argv in cases:
        usage_error(capsys, argv, tmp_path, "is not a directory")
    if os.path.isdir("/proc/self"):  # not writable even by root
        usage_error(capsys, FAST_TRAIN + ["-o", "/proc/nmkern-test"], tmp_path, "cannot write in /proc")


@pytest.mark.parametrize("argv, needle", [
    (FAST_TRAIN + ["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (FAST_TRAIN + ["--batch-size", "-5"], "--batch-size -5"),
    (FAST_TRAIN + ["--seed", "-1"], "--seed -1"),
    (FAST_TRAIN + ["--lr", "nan"], "--lr nan"),
    (FAST_TRAIN + ["--method", "1xn", "--sparsity", "1.5"], "--sparsity 1.5"),
    (FAST_TRAIN + ["--method", "1xn", "--block", "0"], "--block 0"),
    (FAST_TRAIN + ["--method", "gap", "--partitions", "0"], "--partitions 0"),
    (["search", "--batch-size", "0"], "--batch-size 0"),
    (["search", "--m", "5"], "--m 5: must be a power of two"),
    (["search", "--max-iters", "0"], "--max-iters 0"),
    (["search", "--check-every", "0"], "--check-every 0"),
    (["search", "--dense-epochs", "0"], "--dense-epochs 0"),
    (["search", "--lr", "-1"], "--lr -1"),
    (["search", "--budget", "params=0.99", "--m", "4"], "unreachable with m=4"),
])
def test_train_and_search_options_checked_first(tmp_path, capsys, argv, needle):
    usage_error(capsys, argv + ["-o", str(tmp_path / "out")], tmp_path, needle)


def test_search_budget_not_met_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["search", "--dense-epochs", "1", "--batch-size", "256", "--max-iters", "2", "--check-every", "1",
            "--budget", "params=0.5", "--no-progress", "-o", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not met after max_iters=2" in err and "raise --max-iters" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["dense.pt"]  # the finished dense stage, kept for --resume


@pytest.mark.parametrize("extra, needle", [
    (["--pattern", ","], "give at least one pattern"),
    (["--seconds", "nan"], "--seconds nan"),
    (["--seconds", "inf"], "--seconds inf"),
    (["--seconds", "0"], "--seconds 0.0"),
    (["--threads", "0"], "--threads 0"),
])
def test_bench_bad_options_write_nothing(tmp_path, capsys, extra, needle):
    usage_error(capsys, ["bench", "--shape", "64x64", "--json", str(tmp_path / "b.json")] + extra, tmp_path, needle)


def test_bench_json_must_be_a_new_regular_file(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    usage_error(capsys, ["bench", "--json", str(tmp_path / "dir")], tmp_path, "is a directory")
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    usage_error(capsys, ["bench", "--json", str(mine)], tmp_path, "exists; pass --force")


def test_run_folders_are_not_clobbered(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")  # other files do not block a run, and are never touched
    assert main(FAST_TRAIN + ["-o", str(run)]) == 0
    first = (run / "model.pt").read_bytes()
    usage_error(capsys, FAST_TRAIN + ["-o", str(run)], tmp_path, "already holds", "pass --resume", "--force")
    usage_error(capsys, FAST_TRAIN + ["-o", str(run), "--force", "--init", str(run / "model.pt")], tmp_path,
                "would overwrite the input")
    assert main(FAST_TRAIN + ["-o", str(run), "--force", "--seed", "1"]) == 0
    assert (run / "model.pt").read_bytes() != first and (run / "notes.txt").read_text() == "mine"
    (run / "train.json").unlink()
    (run / "train.json").mkdir()  # an output name taken by a folder is refused, even with --force
    usage_error(capsys, FAST_TRAIN + ["-o", str(run), "--force"], tmp_path, "train.json is a directory")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "report.md").write_text("my report")
    usage_error(capsys, ["demo", "--quick", "-o", str(demo)], tmp_path, "already holds report.md", "--force")


# --------------------------------------------------------------------------- exit codes


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(MNIST1DNet().state_dict(), path)
    proc = subprocess.Popen([sys.executable, "-m", "nmkern", "inspect", str(path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before nmkern writes (`| head` that already quit)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_documented_exit_codes(tmp_path, model_file, capsys, monkeypatch):
    import nmkern.cli.inspect as inspect_cmd

    assert main(["inspect", str(model_file)]) == 0
    assert main(["inspect", str(tmp_path / "none.pt")]) == 2
    assert main(["prune", "--nope"]) == 2  # argparse usage error
    assert main([]) == 2

    def boom(_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(inspect_cmd, "describe_state_dict", boom)
    capsys.readouterr()
    assert main(["inspect", str(model_file)]) == 1
    assert "internal error: a bug" in capsys.readouterr().err

    def interrupted(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_cmd, "describe_state_dict", interrupted)
    assert main(["inspect", str(model_file)]) == 130


def test_every_writing_command_has_force():
    from nmkern.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ("prune", "train", "search", "bench", "demo", "selftest"):
        assert "--force" in sub.choices[name].format_help(), name
