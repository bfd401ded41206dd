"""nmkern.prune_oneshot: magnitude, Wanda and SparseGPT one-shot pruning from calibration inputs (issue #13).

Checked against independent transcriptions: the Wanda mask against numpy (ties included), SparseGPT
against a float64 column-by-column transcription of the paper's algorithm (no blocks, no lazy
updates), and the three methods' reconstruction errors against each other on anisotropic,
correlated inputs, where SparseGPT < Wanda < magnitude.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern.methods.sparsegpt import sparsegpt_prune


def _correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Anisotropic, correlated inputs: column scales spanning 100x, mixed through a random matrix."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, k, generator=gen)
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=gen) / k ** 0.5
    return (z @ mix) * torch.logspace(-1, 1, k)[torch.randperm(k, generator=gen)]


def _linear(k: int = 32, out: int = 12, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, out)).eval()


def _batches(x: torch.Tensor, size: int = 16) -> list:
    return list(x.split(size))


# --------------------------------------------------------------------------- Wanda vs numpy


def _wanda_numpy(w: np.ndarray, x: np.ndarray, n: int, m: int) -> np.ndarray:
    """Wanda's N:M keep-mask, written independently: per row, per group of m inputs, the n largest
    |w| * ||x_j||, ties to the lower index (a stable sort of the negated score)."""
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(0))
    score = np.abs(w.astype(np.float64)) * norms[None, :]
    keep = np.zeros(w.shape, dtype=bool)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], m):
            order = np.argsort(-score[r, g:g + m], kind="stable")[:n]
            keep[r, g + order] = True
    return keep


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 16)])
def test_wanda_mask_equals_an_independent_numpy_implementation_ties_included(n, m):
    model = _linear(k=4 * m, out=10)
    with torch.no_grad():  # quantised weights (many equal |w|) and inputs with equal column norms: ties
        model[0].weight.copy_(torch.round(model[0].weight * 8) / 8)
    x = torch.randn(64, 4 * m, generator=torch.Generator().manual_seed(1)).sign()  # every column norm is 8
    w0 = model[0].weight.detach().clone()
    nmkern.prune_oneshot(model, _batches(x), f"{n}:{m}", method="wanda", progress=False)
    want = _wanda_numpy(w0.numpy(), x.numpy(), n, m)
    got = model[0].weight.detach()
    assert np.array_equal(torch.where(torch.from_numpy(want), w0, 0).numpy(), got.numpy())
    ties = (w0.abs().reshape(10, -1, m).unsqueeze(-1) == w0.abs().reshape(10, -1, 1, m)).sum() - w0.numel()
    assert int(ties) > 0  # the case really has ties


# --------------------------------------------------------------------------- SparseGPT vs the paper, float64


def _sparsegpt_paper(w: np.ndarray, x: np.ndarray, n: int, m: int, damp: float) -> np.ndarray:
    """SparseGPT for N:M, transcribed from the paper column by column in float64 (no blocks, no lazy batches)."""
    w = w.astype(np.float64).copy()
    h = 2 * x.astype(np.float64).T @ x.astype(np.float64) / x.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(h.shape[0])
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    for j in range(w.shape[1]):
        if j % m == 0:  # prune the m-n smallest w^2 / [H^-1]_jj^2 of the next m columns, per row
            score = w[:, j:j + m] ** 2 / np.diag(u)[j:j + m][None, :] ** 2
            order = np.argsort(-score, axis=1, kind="stable")
            pruned = np.ones_like(score, dtype=bool)
            np.put_along_axis(pruned, order[:, :n], False, axis=1)
        q = np.where(pruned[:, j % m], 0.0, w[:, j])
        err = (w[:, j] - q) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
        w[:, j] = q
    return w


@pytest.mark.parametrize("blocksize", [8, 16, 128])
def test_sparsegpt_equals_the_papers_algorithm_in_float64(blocksize):
    k, n, m = 48, 2, 4
    x = _correlated_inputs(256, k)
    x[:, 5] = 0  # a dead input
    w = torch.randn(10, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = _sparsegpt_paper(w.numpy(), x.numpy(), n, m, damp=0.01)
    h = 2 * x.double().t() @ x.double() / x.shape[0]
    got = sparsegpt_prune("t", w, h, nmkern.NMSpec(n, m), tuple(w.shape), blocksize=blocksize, damp=0.01)
    assert got.dtype == torch.float64 and bool((got[:, 5] == 0).all())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_sparsegpt_through_prune_oneshot_in_fp32_matches_the_float64_transcription():
    k = 32
    x = _correlated_inputs(192, k, seed=3)
    model = _linear(k=k, out=8, seed=3)
    w0 = model[0].weight.detach().double().numpy()
    nmkern.prune_oneshot(model, _batches(x, 48), "2:4", method="sparsegpt", progress=False)
    want = _sparsegpt_paper(w0, x.numpy(), 2, 4, damp=0.01)
    got = model[0].weight.detach().double().numpy()
    assert np.array_equal(got != 0, want != 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("scheme", ["2:4", "4:8", "1x4:0.5"])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(scheme):
    x = _correlated_inputs(512, 64, seed=4)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = _linear(k=64, out=32, seed=4)
        with torch.no_grad():
            want = model(x)
        nmkern.prune_oneshot(model, _batches(x, 128), scheme, method=method, progress=False)
        with torch.no_grad():
            errors[method] = float((model(x) - want).norm())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# --------------------------------------------------------------------------- structure, and the packed twin


def _conv_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 32)).eval()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_nm_structure_is_exact_and_sparsify_pack_gives_the_same_function(method, m):
    n = max(1, m // 2 - 1)
    model = _conv_model(seed=m)
    x = torch.randn(24, 16, 4, 4, generator=torch.Generator().manual_seed(m))
    report = nmkern.prune_oneshot(model, _batches(x, 8), f"{n}:{m}", method=method, progress=False)
    assert [r["name"] for r in report.layers] == ["0", "3"]
    conv_rows = model[0].weight.detach().permute(0, 2, 3, 1).reshape(16, -1)  # NHWC: groups along channels
    for w2 in (conv_rows, model[3].weight.detach()):
        assert int((w2.reshape(w2.shape[0], -1, m) != 0).sum(-1).max()) <= n
    with torch.no_grad():
        want = model(x)
    pruned = {name: mod.weight.detach().clone() for name, mod in model.named_modules() if hasattr(mod, "weight")}
    nmkern.sparsify(model, f"{n}:{m}", pack=True)
    for name, w in pruned.items():
        assert torch.equal(model.get_submodule(name).dense_weight(), w), name
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_1xn_blocks_are_exact(method):
    model = _conv_model(seed=7)
    x = torch.randn(24, 16, 4, 4, generator=torch.Generator().manual_seed(7))
    nmkern.prune_oneshot(model, _batches(x, 8), "1x4:0.5", method=method, swap=True, progress=False)
    for mod in (model[0], model[3]):
        assert isinstance(mod, (nmkern.SparseConv2d, nmkern.SparseLinear)) and mod.is_packed
        w = mod.dense_weight().reshape(mod.weight_shape[0] // 4, 4, -1)
        blocks = (w != 0).any(1)  # a block: 4 output rows x 1 input column (x the kernel for the conv)
        assert bool(((w != 0).all(1) | ~blocks).all())  # a block is kept whole or dropped whole
        assert abs(float(blocks.float().mean()) - 0.5) < 0.05


def test_sequential_calibrates_later_layers_on_the_pruned_earlier_ones():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = _correlated_inputs(128, 16, seed=5)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    nmkern.prune_oneshot(model, _batches(x, 32), "2:4", method="wanda", sequential=True, progress=False)
    with torch.no_grad():
        hidden = torch.relu(model[0](x))  # the pruned first layer's outputs
    w2 = dense["2.weight"]
    keep = nmkern.nm_mask(w2.abs() * hidden.norm(dim=0).reshape(1, -1), 2, 4)
    assert torch.equal(model[2].weight.detach(), w2 * keep)
    model.load_state_dict(dense)
    nmkern.prune_oneshot(model, _batches(x, 32), "2:4", method="wanda", sequential=False, progress=False)
    with torch.no_grad():
        hidden = torch.relu(nn.functional.linear(x, dense["0.weight"], dense["0.bias"]))  # the dense model's
    keep = nmkern.nm_mask(w2.abs() * hidden.norm(dim=0).reshape(1, -1), 2, 4)
    assert torch.equal(model[2].weight.detach(), w2 * keep)


# --------------------------------------------------------------------------- failures leave the model untouched


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _refused(model, calib, scheme, match, **kw):
    before = _state(model)
    with pytest.raises((ValueError, TypeError), match=match):
        nmkern.prune_oneshot(model, calib, scheme, progress=False, **kw)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_bad_input_is_refused_and_the_model_is_left_bit_identical():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = torch.randn(32, 16)
    _refused(model, [], "2:4", "calib is empty")
    _refused(model, [torch.randn(4, 12)], "2:4", "rejects calibration batch 0")
    _refused(model, [x, "text"], "2:4", "calibration batch 1 is a str")
    _refused(nn.Sequential(nn.Linear(6, 8)), [torch.randn(4, 6)], "2:4", r"layer '0' cannot take 2:4.*not divisible")
    _refused(model, [x], "2:4", "unknown method", method="obs")
    # NaN reaching the second layer only: the first one was already pruned (sequential) and is restored
    class Overflow(nn.Module):
        def forward(self, h):
            return h * 1e38 * 1e38  # inf in fp32

    nan_model = nn.Sequential(nn.Linear(16, 16), Overflow(), nn.Linear(16, 8)).eval()
    _refused(nan_model, [x], "2:4", r"layer '2' receives NaN/Inf", method="wanda")
    # a Hessian that stays singular: fewer input rows than columns and no dampening
    _refused(nn.Sequential(nn.Linear(16, 8)), [torch.randn(3, 16)], "2:4", "stays singular", damp=0.0)


def test_the_model_is_restored_when_a_later_batch_is_rejected():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    _refused(model, [torch.randn(8, 16), torch.randn(8, 12)], "2:4", "rejects calibration batch 1", method="wanda")


def test_batches_as_tuples_and_dicts_and_a_mapping_scheme():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x, scale=1.0):
            return self.b(torch.relu(self.a(x)) * scale)

    model = TwoInputs().eval()
    calib = [(torch.randn(4, 8),), {"x": torch.randn(4, 8), "scale": 2.0}]
    report = nmkern.prune_oneshot(model, calib, {"a": "2:4", "b": None}, method="sparsegpt", progress=False)
    assert [r["name"] for r in report.layers] == ["a"] and report.skipped == [("b", "Linear 8->4: the scheme keeps it dense (None)")]
    assert int((model.a.weight.reshape(8, -1, 4) != 0).sum(-1).max()) <= 2
    assert bool((model.b.weight != 0).all())
    assert "1 layer(s) pruned" in str(report)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cli_prune_with_calibration_writes_the_pruned_model(tmp_path, capsys, model_file, method):
    import json

    from nmkern.cli import main
    from nmkern.models import MNIST1DNet

    calib = tmp_path / "calib.pt"
    torch.save([torch.randn(16, 1, 1, 40, generator=torch.Generator().manual_seed(i)) for i in range(3)], calib)
    scheme = tmp_path / "scheme.json"
    scheme.write_text(json.dumps({"conv1": None, "conv*": "2:4", "fc1": "1x4:0.5", "fc2": "2:4"}))
    out = tmp_path / "pruned.safetensors"
    argv = ["prune", str(model_file), "--factory", "nmkern.models:MNIST1DNet", "--method", method, "--calib",
            str(calib), "--scheme", str(scheme), "-o", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["sparsified"] == 5 and report["method"] == method
    model = MNIST1DNet().eval()
    nmkern.load(out, model)
    assert isinstance(model.fc1, nmkern.SparseLinear) and model.fc1.spec == nmkern.BlockSpec(4, 0.5)
    assert isinstance(model.conv2, nmkern.SparseConv2d) and model.conv2.spec == nmkern.NMSpec(2, 4)
    assert type(model.conv1) is nn.Conv2d
    capsys.readouterr()
    bad = argv[:6] + ["--scheme", "2:4", "-o", str(tmp_path / "x.pt")]  # no --calib
    assert main(bad) == 2 and "needs --scheme (e.g. 2:4) and --calib FILE" in capsys.readouterr().err


def test_layers_fed_one_tensor_share_one_pass_and_one_hessian(monkeypatch):
    from nmkern.methods import oneshot

    class Attention(nn.Module):  # q/k/v read the same tensor: one group, one H
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4, -1)
            return self.o(att @ self.v(x))

    calls = []
    accumulate = oneshot._Stats._accumulate
    monkeypatch.setattr(oneshot._Stats, "_accumulate", lambda self, module, key, inp: (
        calls.append(type(module).__name__), accumulate(self, module, key, inp))[1])
    model = Attention().eval()
    x = [torch.randn(2, 6, 16) for _ in range(3)]
    report = nmkern.prune_oneshot(model, x, "2:4", method="sparsegpt", progress=False)
    assert sorted(r["name"] for r in report.layers) == ["k", "o", "q", "v"]
    assert len(calls) == 3 * 2  # per batch: one accumulation for q/k/v, one for o


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_block_by_block_equals_the_whole_model_path_on_a_llama(monkeypatch, method, tiny_llama):
    from nmkern.methods import oneshot

    base = tiny_llama(layers=3, heads=4)
    gen = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 64, (2, 12), generator=gen)} for _ in range(3)]
    scheme = {"model.layers.*": "2:4"}
    blocked = copy.deepcopy(base)
    report = nmkern.prune_oneshot(blocked, calib, scheme, method=method, progress=False)
    assert report.blocks == "model.layers (3 blocks)" and len(report.layers) == 21
    whole = copy.deepcopy(base)
    monkeypatch.setattr(oneshot, "_find_blocks", lambda model, targets: None)
    report = nmkern.prune_oneshot(whole, calib, scheme, method=method, progress=False)
    assert report.blocks == "" and len(report.layers) == 21
    for (name, a), b in zip(blocked.named_parameters(), whole.parameters()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(blocked.model.layers[2].mlp.down_proj.weight, base.model.layers[2].mlp.down_proj.weight)
    # the groups: layers fed one tensor, never two tensors that happened to reuse one address (o_proj's input
    # is freed right before the MLP's input is allocated with the same shape)
    targets, _ = oneshot._plan(base, scheme, None)
    groups = oneshot._record(base, targets, calib[0])
    short = [[t.names[0].rpartition(".")[2] for t in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * 3


# --------------------------------------------------------------------------- unstructured fractions


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_an_unstructured_fraction_prunes_exactly_that_fraction(method):
    x = _correlated_inputs(256, 64)
    model = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    report = nmkern.prune_oneshot(model, _batches(x), {"0": "unstructured:0.6", "2": "2:4"}, method=method,
                                  blocksize=16, swap=True, progress=False)
    assert [r["pattern"] for r in report.layers] == ["unstructured:0.6", "2:4"]
    w = model[0].weight.detach()
    assert type(model[0]) is nn.Linear and type(model[2]).__name__ == "SparseLinear"  # only N:M packs
    if method == "magnitude":  # the floor(0.6 * numel) lowest |w| of the layer
        assert int((w == 0).sum()) == int(0.6 * w.numel())
    elif method == "wanda":  # of each row (Wanda's comparison group)
        assert ((w == 0).sum(1) == int(0.6 * 64)).all()
    else:  # of each 16-column block
        assert all(int((w[:, c:c + 16] == 0).sum()) == int(0.6 * 24 * 16) for c in range(0, 64, 16))


def test_unstructured_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    x = _correlated_inputs(512, 64)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = _linear(k=64, out=16)
        dense = copy.deepcopy(model)
        nmkern.prune_oneshot(model, _batches(x, 64), "unstructured:0.5", method=method, progress=False)
        with torch.no_grad():
            errors[method] = float((model(x) - dense(x)).norm())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_layers_sharing_one_hessian_are_pruned_as_one_stacked_matrix_with_the_same_result():
    from nmkern.methods import oneshot
    from nmkern.spec import NMSpec

    x = _correlated_inputs(128, 32)
    torch.manual_seed(0)
    shared = nn.ModuleDict({"q": nn.Linear(32, 16), "k": nn.Linear(32, 8), "v": nn.Linear(32, 8)})
    dense = {n: m.weight.detach().clone() for n, m in shared.items()}
    targets = [oneshot._Target(m, [n], NMSpec(2, 4)) for n, m in shared.items()]
    assert oneshot._shared_rows(targets, oneshot.OneShotMethod.SPARSEGPT) == [targets]
    stats = oneshot._Stats(targets, oneshot.OneShotMethod.SPARSEGPT)
    for batch in x.split(32):  # one accumulator for the three: they share one input
        stats._accumulate(shared["q"], oneshot._stat_key(shared["q"]), batch)
    news = oneshot._new_weights(targets, oneshot.OneShotMethod.SPARSEGPT, stats, 16, 0.01)
    h = 2 * x.t() @ x / x.shape[0]
    for (name, w), new in zip(dense.items(), news):
        alone = sparsegpt_prune("t", w, h, NMSpec(2, 4), tuple(w.shape), blocksize=16)
        assert torch.equal(alone == 0, new == 0), name
        torch.testing.assert_close(new, alone, rtol=1e-5, atol=1e-5, msg=name)
