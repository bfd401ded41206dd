"""GaP: partitions, S-GaP targets per step, P-GaP distributed == sequential fallback, kill-and-resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

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
            seen["init"] = {k: v.clone() for k, v in torch.load(info["path"], weights_only=False)["masks"].items()}

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
sys.path.insert(0, {tests_dir!r})
from test_gap import _pgap_config, tiny_data, tiny_model
from nmkern.methods.gap import PGaP

torch.set_num_threads(1)  # same thread count as the fallback run: identical float sums
model = tiny_model()
# torchrun sets WORLD_SIZE/RANK/MASTER_ADDR: PGaP.run creates the gloo process group itself.
res = PGaP(**_pgap_config()).run(model, tiny_data(), checkpoint_dir=os.path.join({out_dir!r}, "ckpt"), progress=False)
torch.save({{"state": model.state_dict(), "masks": res.masks}}, os.path.join({out_dir!r}, "rank%s.pt" % os.environ["RANK"]))
"""


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
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT.format(tests_dir=os.path.dirname(os.path.abspath(__file__)), out_dir=str(tmp_path)))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 checkpointed the initial prune, both merges and the fine-tune (phases 0, 3, 6, 7)
    assert sorted(os.listdir(tmp_path / "ckpt")) == [f"phase_{i:04d}.pt" for i in (0, 3, 6, 7)]
    state, res = _fallback_pgap()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert state_equal(got["state"], state), f"rank {rank} differs from the fallback"
        assert masks_equal(got["masks"], res.masks)
    # the merge really took each partition from its own worker: both partitions at target
    for k, mask in res.masks.items():
        assert int(mask.sum()) == mask.numel() - int(0.75 * mask.numel())


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
