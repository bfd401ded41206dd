"""GaP: partitions, S-GaP targets per step, P-GaP distributed == sequential fallback, kill-and-resume."""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nmkern.checkpoint_io import CheckpointError
from nmkern.methods._gap_dist import _DistContext
from nmkern.methods.gap import GaPMethod, PGaP, SGaP, check_partitions, gap_train, make_partitions
from nmkern.methods.masking import erk_sparsities, meets_target, prunable_layers, resolve_targets, weight_sparsity


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 8),
    )


def tiny_data(seed: int = 1, count: int = 96):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, 4, 4, 4, generator=g), torch.randint(0, 8, (count,), generator=g)


LAYERS = ["0", "3", "6", "8"]
TARGETS = {
    "unstructured": dict(target="unstructured", sparsity=0.8),
    "nm": dict(target="nm", n=2, m=4),
    "1xn": dict(target="1xn", block=4, sparsity=0.5, rearrange=["3"]),
}
FAST = dict(rounds=1, epochs_per_step=1, finetune_epochs=1, batch_size=32, lr=0.05)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def masks_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("k", range(2, 7))
def test_partitions_cover_every_layer_once_and_are_contiguous(k):
    names = [f"layer{i}" for i in range(7)]
    parts = make_partitions(names, k)
    assert len(parts) == k
    flat = [n for p in parts for n in p]
    assert flat == names  # each layer exactly once, in model order => contiguous groups
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_partitions_of_a_real_model_cover_every_prunable_layer():
    model = tiny_model()
    names = list(prunable_layers("t", model))
    assert names == LAYERS
    for k in (2, 3, 4):
        flat = [n for p in make_partitions(names, k) for n in p]
        assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))


def test_user_partitions_are_checked():
    names = ["a", "b", "c"]
    assert check_partitions("t", [["c"], ["a", "b"]], names) == [["c"], ["a", "b"]]
    with pytest.raises(ValueError, match="more than one partition"):
        check_partitions("t", [["a", "b"], ["b", "c"]], names)
    with pytest.raises(ValueError, match=r"\['c'\] are in no partition"):
        check_partitions("t", [["a"], ["b"]], names)
    with pytest.raises(ValueError, match="not prunable layers"):
        check_partitions("t", [["a", "b"], ["c", "zzz"]], names)
    with pytest.raises(ValueError, match="at least 2"):
        check_partitions("t", [["a", "b", "c"]], names)
    with pytest.raises(TypeError, match="list of layer names"):
        check_partitions("t", ["abc", ["x"]], names)
    with pytest.raises(ValueError, match="2 to 6"):
        make_partitions(names, 7)
    with pytest.raises(ValueError, match="only 3 prunable layers"):
        make_partitions(names, 4)


# ----------------------------------------------------------------------------- S-GaP per-step targets


@pytest.mark.parametrize("name", list(TARGETS))
def test_sgap_every_non_grown_partition_meets_its_target_exactly(name):
    model, data = tiny_model(), tiny_data()
    events = []

    def check(event, info):
        if event not in ("grown", "pruned"):
            return
        parts, targets, masks = info["partitions"], info["targets"], info["masks"]
        for p, layer_names in enumerate(parts):
            grown = event == "grown" and p == info["partition"]
            for k in layer_names:
                mod = info["model"].get_submodule(k)
                if grown:
                    assert masks[k] is None  # dense while grown
                else:
                    assert meets_target(mod, targets[k], masks[k]), (event, info["phase"], k)
        events.append((event, info["partition"]))

    res = gap_train(model, data, method="sgap", partitions=2, callback=check, progress=False, **TARGETS[name], **FAST)
    assert events == [("grown", 0), ("pruned", 0), ("grown", 1), ("pruned", 1)]
    for k, mask in res.masks.items():
        assert meets_target(model.get_submodule(k), res.targets[k], mask)
    # the log: one entry per phase with the sparsity of each partition
    assert [h["phase"] for h in res.history] == ["init", "round 0 grow p0", "round 0 grow p1", "finetune"]
    assert all(len(h["partition_sparsity"]) == 2 for h in res.history)


def test_sgap_grows_from_zero_and_changes_the_masks():
    model, data = tiny_model(), tiny_data()
    seen = {}

    def grab(event, info):
        if event == "checkpoint" and info["phase"] == ("init",):
            seen["init"] = {k: v.clone() for k, v in torch.load(info["path"], weights_only=True)["masks"].items()}

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = gap_train(model, data, method="sgap", partitions=2, target="unstructured", sparsity=0.5,
                        checkpoint_dir=d, callback=grab, progress=False, rounds=1, epochs_per_step=4,
                        finetune_epochs=0, batch_size=16, lr=0.1)
    # training the dense partition moves weights, so the re-pruned masks are not the initial ones
    assert any(not torch.equal(seen["init"][k], res.masks[k]) for k in res.masks)
    assert abs(res.sparsity() - 0.5) < 0.01


def test_erk_distribution_meets_the_overall_target():
    model = tiny_model()
    layers = prunable_layers("t", model)
    per_layer = erk_sparsities(layers, 0.9)
    kept = sum((1 - per_layer[k]) * layers[k].weight.numel() for k in layers)
    total = sum(layers[k].weight.numel() for k in layers)
    assert abs(kept - 0.1 * total) < 1e-6 * total
    assert len(set(round(s, 6) for s in per_layer.values())) > 1  # non-uniform
    res = gap_train(model, tiny_data(), method="sgap", partitions=2, target="unstructured", sparsity=0.9,
                    distribution="erk", progress=False, **FAST)
    assert abs(weight_sparsity(model.get_submodule(k) for k in layers) - 0.9) < 0.002
    for k in layers:
        assert meets_target(model.get_submodule(k), res.targets[k], res.masks[k])


def test_nm_from_a_scheme_mapping():
    model = tiny_model()
    scheme = {"0": (1, 4), "3": (2, 4), "6": (4, 8), "8": (1, 2)}
    res = gap_train(model, tiny_data(), method="sgap", partitions=[["0", "3"], ["6", "8"]], target="nm",
                    scheme=scheme, progress=False, **FAST)
    for k, (n, m) in scheme.items():
        assert res.targets[k].n == n and res.targets[k].m == m
        assert meets_target(model.get_submodule(k), res.targets[k], res.masks[k])


def test_scheme_none_leaves_the_layer_dense():
    model = tiny_model()
    dense_before = model.get_submodule("8").weight.detach().clone()
    scheme = {"0": (1, 4), "3": (2, 4), "6": (4, 8), "8": None}
    res = gap_train(model, tiny_data(), method="sgap", partitions=2, target="nm", scheme=scheme,
                    progress=False, **FAST)
    assert "8" not in res.targets and "8" not in res.masks
    assert bool((model.get_submodule("8").weight != 0).all())  # trained, never masked
    assert not torch.equal(model.get_submodule("8").weight, dense_before)
    for k in ("0", "3", "6"):
        assert meets_target(model.get_submodule(k), res.targets[k], res.masks[k])


def test_bad_configuration_errors():
    model = tiny_model()
    layers = prunable_layers("t", model)
    with pytest.raises(ValueError, match="not divisible by m=8"):
        resolve_targets("sgap", {"0": layers["0"]}, "nm", n=2, m=8)  # 4 input channels
    with pytest.raises(ValueError, match="unknown target"):
        resolve_targets("sgap", layers, "blocky", sparsity=0.5)
    with pytest.raises(ValueError, match="needs n and m"):
        resolve_targets("sgap", layers, "nm")
    with pytest.raises(ValueError, match="has no \\(n, m\\) for layers"):
        resolve_targets("sgap", layers, "nm", scheme={"0": (2, 4)})
    with pytest.raises(ValueError, match="needs sparsity="):
        resolve_targets("sgap", layers, "unstructured")
    with pytest.raises(ValueError, match=r"sparsity=1.5 must lie in \[0, 1\)"):
        resolve_targets("sgap", layers, "unstructured", sparsity=1.5)
    with pytest.raises(ValueError, match="not divisible by block=3"):
        resolve_targets("sgap", layers, "1xn", sparsity=0.5, block=3)
    with pytest.raises(ValueError, match="unknown method"):
        gap_train(model, tiny_data(), method="xgap", sparsity=0.5)
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        SGaP(rounds=0, sparsity=0.5)
    with pytest.raises(ValueError, match="unknown or non-prunable layers"):
        SGaP(sparsity=0.5, layers=["nope"]).run(model, tiny_data())
    with pytest.raises(TypeError, match="tensor pair or a map-style Dataset"):
        SGaP(sparsity=0.5).run(model, 42)


# ----------------------------------------------------------------------------- P-GaP: torch.distributed vs fallback


def _pgap_config():
    return dict(partitions=2, target="unstructured", sparsity=0.75, rounds=2, epochs_per_step=1, finetune_epochs=1,
                batch_size=32, lr=0.05, seed=3)


WORKER_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests_dir!r})
from test_gap import _pgap_config, tiny_data, tiny_model
from nmkern.methods.gap import PGaP

torch.set_num_threads(1)  # same thread count as the fallback run: identical float sums
model = tiny_model()
# torchrun sets WORLD_SIZE/RANK/MASTER_ADDR: PGaP.run creates the gloo process group itself.
res = PGaP(**_pgap_config()).run(model, tiny_data(), checkpoint_dir=os.path.join({out_dir!r}, "ckpt"), progress=False)
# run() destroyed the group it created (after a barrier): nothing of gloo is left to tear down at exit
assert not dist.is_initialized(), "PGaP.run left its process group alive"
torch.save({{"state": model.state_dict(), "masks": res.masks}}, os.path.join({out_dir!r}, "rank%s.pt" % os.environ["RANK"]))
"""


def _torchrun(tmp_path, script_text: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``script_text`` on ``nproc`` CPU ranks under torchrun (no restarts); the finished process."""
    script = tmp_path / "worker.py"
    script.write_text(script_text)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--max-restarts", "0", str(script)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _failed_ranks(output: str) -> dict[int, str]:
    """rank -> "exitcode X (SIGNAME)" for every rank torchrun reports as failed."""
    found = re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)[^\n]*?(\(SIG\w+\))?\s*$", output, re.M)
    return {int(r): f"exitcode {code}" + (f" {sig}" if sig else "") for r, code, sig in found}


def _assert_clean_exit(proc: subprocess.CompletedProcess) -> None:
    """Every rank exited 0; otherwise which rank failed how (exit code, signal) and the end of the output."""
    if proc.returncode == 0:
        return
    failed = _failed_ranks(proc.stderr + proc.stdout)
    raise AssertionError(f"torchrun exited {proc.returncode}; failed ranks: {failed or 'none reported'}\n"
                         f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")


def _fallback_pgap():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model()
        res = PGaP(**_pgap_config()).run(model, tiny_data(), progress=False)
    finally:
        torch.set_num_threads(threads)
    return model.state_dict(), res


def test_pgap_two_gloo_ranks_equal_the_single_process_fallback(tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = _torchrun(tmp_path, WORKER_SCRIPT.format(tests_dir=tests_dir, out_dir=str(tmp_path)))
    _assert_clean_exit(proc)
    # rank 0 checkpointed the initial prune, both merges and the fine-tune (phases 0, 3, 6, 7)
    assert sorted(os.listdir(tmp_path / "ckpt")) == [f"phase_{i:04d}.pt" for i in (0, 3, 6, 7)]
    state, res = _fallback_pgap()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert state_equal(got["state"], state), f"rank {rank} differs from the fallback"
        assert masks_equal(got["masks"], res.masks)
    # the merge really took each partition from its own worker: both partitions at target
    for k, mask in res.masks.items():
        assert int(mask.sum()) == mask.numel() - int(0.75 * mask.numel())


PLANTED_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests_dir!r})
from test_gap import _pgap_config, tiny_data, tiny_model
from nmkern.checkpoint_io import CheckpointError
from nmkern.methods.gap import PGaP

try:
    PGaP(**_pgap_config()).run(tiny_model(), tiny_data(), checkpoint_dir={ckpt_dir!r}, progress=False)
except CheckpointError as e:  # rank 0 read the file; every rank raises its error
    assert not dist.is_initialized(), "PGaP.run left its process group alive after an error"
    with open(os.path.join({out_dir!r}, "rank%s.err" % os.environ["RANK"]), "w") as f:
        f.write(str(e))
"""


def test_pgap_ranks_refuse_a_planted_checkpoint_and_exit_cleanly(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(Planted(marker), ckpt / "phase_0003.pt")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = _torchrun(tmp_path, PLANTED_SCRIPT.format(tests_dir=tests_dir, ckpt_dir=str(ckpt), out_dir=str(tmp_path)))
    _assert_clean_exit(proc)
    assert not marker.exists(), "loading the planted checkpoint ran its code"
    for rank in range(2):
        err = (tmp_path / f"rank{rank}.err").read_text()
        assert str(ckpt / "phase_0003.pt") in err and "delete" in err, err


def test_a_failed_rank_is_reported_with_its_signal(tmp_path):
    script = "import os, time\nif os.environ['RANK'] == '1':\n    os.abort()\ntime.sleep(1)\n"
    proc = _torchrun(tmp_path, script)
    assert proc.returncode != 0
    with pytest.raises(AssertionError, match=r"failed ranks: \{.*1: 'exitcode -6 \(SIGABRT\)'"):
        _assert_clean_exit(proc)


class _FakeDist:
    """Records the torch.distributed calls of :meth:`_DistContext.close`."""

    def __init__(self, fail_barrier: bool = False):
        self.calls, self.fail_barrier, self.initialized = [], fail_barrier, True

    def get_backend(self):
        return "gloo"

    def barrier(self):
        self.calls.append("barrier")
        if self.fail_barrier:
            raise RuntimeError("peer gone")

    def is_initialized(self):
        return self.initialized

    def destroy_process_group(self):
        self.calls.append("destroy")
        self.initialized = False


def test_close_barriers_before_destroying_and_always_destroys():
    ok = _FakeDist()
    _DistContext(ok, owned=True).close(ok=True)
    assert ok.calls == ["barrier", "destroy"]  # no rank tears down while a peer is in the last collective
    failed = _FakeDist()
    _DistContext(failed, owned=True).close(ok=False)
    assert failed.calls == ["destroy"]  # peers are in other collectives: no barrier to match
    broken = _FakeDist(fail_barrier=True)
    with pytest.raises(RuntimeError, match="peer gone"):
        _DistContext(broken, owned=True).close(ok=True)
    assert broken.calls == ["barrier", "destroy"]
    users = _FakeDist()
    _DistContext(users, owned=False).close(ok=True)
    assert users.calls == ["barrier"]  # a group the caller created stays theirs


def test_pgap_merge_takes_each_partition_from_its_worker():
    seen = {}

    def grab(event, info):
        if event == "pruned" and info["phase"].startswith("round 0"):
            seen[info["partition"]] = {k: v.detach().clone() for k, v in info["model"].state_dict().items()}

    model = tiny_model()
    res = gap_train(model, tiny_data(), method="pgap", partitions=2, target="unstructured", sparsity=0.5,
                    rounds=1, epochs_per_step=1, finetune_epochs=0, batch_size=32, callback=grab, progress=False)
    state = model.state_dict()
    for p, names in enumerate(res.partitions):
        for name in names:
            assert torch.equal(state[f"{name}.weight"], seen[p][f"{name}.weight"])
            assert torch.equal(state[f"{name}.bias"], seen[p][f"{name}.bias"])
    # BatchNorm is in no partition: the mean of the two workers
    assert torch.equal(state["1.weight"], (seen[0]["1.weight"] + seen[1]["1.weight"]) / 2)


# ----------------------------------------------------------------------------- kill and resume


class Killed(RuntimeError):
    pass


# P-GaP phases: 0 init, 1-2 worker jobs of round 0, 3 merge, ...: kill mid-round and right after a merge.
@pytest.mark.parametrize("method,kill_at", [(GaPMethod.SEQUENTIAL, 2), (GaPMethod.PARALLEL, 1), (GaPMethod.PARALLEL, 3)])
def test_kill_and_resume_is_bit_identical(tmp_path, method, kill_at):
    cfg = dict(method=method, partitions=2, target="unstructured", sparsity=0.8, rounds=2, epochs_per_step=1,
               finetune_epochs=1, batch_size=32, seed=5, progress=False)
    ref_model = tiny_model()
    ref = gap_train(ref_model, tiny_data(), checkpoint_dir=str(tmp_path / "ref"), **cfg)

    def kill_after_checkpoint(event, info):
        if event == "checkpoint" and info["index"] == kill_at:
            raise Killed("injected")

    model = tiny_model()
    with pytest.raises(Killed):
        gap_train(model, tiny_data(), checkpoint_dir=str(tmp_path / "run"), callback=kill_after_checkpoint, **cfg)
    # resume in a fresh model (a new process would start from the user's initial weights too)
    model = tiny_model(seed=99)
    res = gap_train(model, tiny_data(), checkpoint_dir=str(tmp_path / "run"), **cfg)
    assert state_equal(model.state_dict(), ref_model.state_dict())
    assert masks_equal(res.masks, ref.masks)
    assert [h["phase"] for h in res.history] == [h["phase"] for h in ref.history]


class Planted:
    """What an attacker puts in run/gap/phase_*.pt: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


SGAP_CFG = dict(method="sgap", partitions=2, target="unstructured", sparsity=0.8, rounds=2, epochs_per_step=1,
                finetune_epochs=1, batch_size=32, seed=5, progress=False)


@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_planted_checkpoint_is_refused_never_run(tmp_path, fmt):
    marker, ckpt = tmp_path / "pwned", tmp_path / "run" / "gap"
    gap_train(tiny_model(), tiny_data(), checkpoint_dir=str(ckpt), **SGAP_CFG)
    planted = ckpt / "phase_9999.pt"  # sorts last: the one a resume reads
    if fmt == "torch.save":
        torch.save(Planted(marker), planted)
    else:
        planted.write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(CheckpointError, match=re.escape(str(planted)) + r".*cannot be read safely.*delete"):
        gap_train(tiny_model(), tiny_data(), checkpoint_dir=str(ckpt), **SGAP_CFG)
    assert not marker.exists(), "resuming ran the planted checkpoint's code"
    # the planted file is live: an unsafe load does run it (so the assertion above can fail)
    if fmt == "torch.save":
        torch.load(planted, weights_only=False)
    else:
        pickle.loads(planted.read_bytes())
    assert marker.exists()


def test_a_truncated_checkpoint_names_the_file_and_deleting_it_resumes_bit_identically(tmp_path):
    ref_model = tiny_model()
    ref = gap_train(ref_model, tiny_data(), **SGAP_CFG)

    def kill(event, info):
        if event == "checkpoint" and info["index"] == 2:
            raise Killed("injected")

    run = tmp_path / "run"
    with pytest.raises(Killed):
        gap_train(tiny_model(), tiny_data(), checkpoint_dir=str(run), callback=kill, **SGAP_CFG)
    latest = run / "phase_0002.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a disk-full / half-copied file
    with pytest.raises(CheckpointError, match=re.escape(str(latest)) + r".*delete .*phase_0002\.pt to recompute"):
        gap_train(tiny_model(), tiny_data(), checkpoint_dir=str(run), **SGAP_CFG)
    latest.unlink()  # what the error says to do: phase 2 is recomputed from phase 1's checkpoint
    model = tiny_model(seed=99)
    res = gap_train(model, tiny_data(), checkpoint_dir=str(run), **SGAP_CFG)
    assert state_equal(model.state_dict(), ref_model.state_dict())
    assert masks_equal(res.masks, ref.masks)
    assert [h["phase"] for h in res.history] == [h["phase"] for h in ref.history]


@pytest.mark.parametrize("payload,problem", [
    ({"model": torch.zeros(2)}, "keys"),
    ([torch.zeros(2)], "a list, not a dict"),
    ("next", "a str, not a dict"),
])
def test_a_checkpoint_that_is_not_a_phase_checkpoint_is_refused(tmp_path, payload, problem):
    torch.save(payload, tmp_path / "phase_0000.pt")
    with pytest.raises(CheckpointError, match=rf"phase_0000\.pt is not a GaP phase checkpoint \({problem}.*delete"):
        gap_train(tiny_model(), tiny_data(), checkpoint_dir=str(tmp_path), **SGAP_CFG)


def test_a_checkpoint_with_masks_of_the_wrong_shape_is_refused(tmp_path):
    def kill(event, info):
        if event == "checkpoint" and info["index"] == 0:
            raise Killed("injected")

    with pytest.raises(Killed):
        gap_train(tiny_model(), tiny_data(), checkpoint_dir=str(tmp_path), callback=kill, **SGAP_CFG)
    path = tmp_path / "phase_0000.pt"
    ck = torch.load(path, weights_only=True)
    ck["masks"]["3"] = ck["masks"]["3"][:1]
    torch.save(ck, path)
    shape_error = r"phase_0000\.pt has a torch\.bool mask of shape \(1, 8, 3, 3\) for layer '3'.*delete"
    with pytest.raises(CheckpointError, match=shape_error):
        gap_train(tiny_model(), tiny_data(), checkpoint_dir=str(tmp_path), **SGAP_CFG)


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    cfg = dict(partitions=2, target="unstructured", rounds=1, epochs_per_step=1, finetune_epochs=0, batch_size=32,
               progress=False)
    gap_train(tiny_model(), tiny_data(), sparsity=0.5, checkpoint_dir=str(tmp_path), **cfg)
    with pytest.raises(ValueError, match="different configuration"):
        gap_train(tiny_model(), tiny_data(), sparsity=0.9, checkpoint_dir=str(tmp_path), **cfg)


@pytest.mark.parametrize("name", ["nm", "1xn"])
def test_export_packs_the_trained_sparse_layers(name):
    nmnn = pytest.importorskip("nmkern.nn")
    model = tiny_model()
    kw = dict(TARGETS[name])
    if name == "nm":
        kw["layers"] = ["3", "6", "8"]  # conv 0 has 4 input channels: fine for 2:4, keep a dense layer too
    res = gap_train(model, tiny_data(), method="sgap", partitions=2, progress=False, **kw, **FAST)
    exp = res.export()
    for k, mask in res.masks.items():
        mod = exp.get_submodule(k)
        inner = getattr(mod, "inner", mod)
        assert isinstance(inner, (nmnn.SparseLinear, nmnn.SparseConv2d)) and inner.is_packed
        w = model.get_submodule(k).weight.detach() * mask
        order = getattr(mod, "inverse", None)
        got = inner.dense_weight()
        if order is not None:  # rearranged 1xN layer stored in block order
            got = got[mod.inverse]
        assert torch.equal(got, w)
    x = tiny_data()[0][:8]
    model.eval(), exp.eval()
    with torch.no_grad():
        torch.testing.assert_close(exp(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_unstructured():
    res = gap_train(tiny_model(), tiny_data(), method="sgap", partitions=2, progress=False, **TARGETS["unstructured"],
                    **FAST)
    with pytest.raises(ValueError, match="no packed nmkern format"):
        res.export()


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(TARGETS))
def test_gap_on_cuda_meets_targets_and_resumes(tmp_path, monkeypatch, name):
    """CUDA weights: masks come from the Triton kernels; checkpoints (saved, loaded to CPU) resume on the GPU."""
    import copy

    from nmkern.methods.masking import compute_mask

    # bit-identical resume needs deterministic GPU kernels (cuDNN's default conv backward uses atomics)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    data = tuple(t.cuda() for t in tiny_data())
    cfg = dict(method="pgap", partitions=2, progress=False, **TARGETS[name], **FAST)
    model = tiny_model().cuda()
    ref = gap_train(model, data, checkpoint_dir=str(tmp_path / "ref"), **cfg)
    for k, mask in ref.masks.items():
        mod = model.get_submodule(k)
        assert mask.is_cuda and meets_target(mod, ref.targets[k], mask)
        # the Triton mask kernels on CUDA pick the same weights as the CPU reference
        cpu_mask = compute_mask(copy.deepcopy(mod).cpu(), ref.targets[k])
        assert torch.equal(cpu_mask.cuda(), compute_mask(mod, ref.targets[k]))

    def kill(event, info):
        if event == "checkpoint" and info["index"] == 1:
            raise Killed("injected")

    with pytest.raises(Killed):
        gap_train(tiny_model().cuda(), data, checkpoint_dir=str(tmp_path / "run"), callback=kill, **cfg)
    resumed = gap_train(tiny_model().cuda(), data, checkpoint_dir=str(tmp_path / "run"), **cfg)
    assert all(torch.equal(resumed.masks[k], ref.masks[k]) for k in ref.masks)
