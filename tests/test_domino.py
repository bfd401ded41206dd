"""DominoSearch on a tiny model: budgets met within one step of N, powers of two, FLOPs by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nmkern.methods.domino import Budget, domino_search
from nmkern.flops import count_flops
from nmkern.scheme import Scheme

# Scaled-down schedule for a model this small (the official defaults assume ~30k ImageNet
# iterations): vote every 5 iterations, stronger decay doubling every 50.
FAST = dict(check_every=5, decay=2.0, decay_milestones=range(50, 5000, 50), max_iters=3000)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),  # 1 input channel: not searchable with m=16
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 32), nn.ReLU(),
        nn.Linear(32, 4),
    )


def _data(batches=6, batch=32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batches * batch, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


@pytest.fixture(scope="module")
def pretrained():
    torch.set_num_threads(1)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        for x, y in _data():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def _sparsity(scheme: Scheme, counts: dict[str, int], changed: dict[str, tuple[int, int] | None] = {}) -> float:
    pats = {**dict(scheme), **changed}
    total = sum(counts.values())
    kept = sum(c * (1.0 if pats[k] is None else pats[k][0] / pats[k][1]) for k, c in counts.items())
    return 1.0 - kept / total


def _check_search(scheme: Scheme, counts: dict[str, int], target: float):
    assert scheme.meta["budget_met"]
    assert scheme.meta["skipped"] == ["0"]
    assert list(scheme) == ["2", "5", "7", "9"]
    for name, p in scheme.items():
        if p is not None:
            n, m = p
            assert m == 16
            assert n in (1, 2, 4, 8), (name, p)  # powers of two, never sparser than 1:16
    achieved = _sparsity(scheme, counts)
    assert achieved >= target - 0.001
    # within one step of N: undoing the last decision (N back to 2N) misses the budget
    _, last_layer, last_n = scheme.meta["history"][-1]
    assert scheme[last_layer] == (last_n, 16)
    undone = None if 2 * last_n == 16 else (2 * last_n, 16)
    assert _sparsity(scheme, counts, {last_layer: undone}) < target - 0.001
    # every decision halves N of one layer, starting from dense
    ns = {}
    for _, layer, n in scheme.meta["history"]:
        assert n == ns.get(layer, 16) // 2
        ns[layer] = n


def test_params_budget(pretrained, tmp_path, capsys):
    before = {k: p.clone() for k, p in pretrained.state_dict().items()}
    scheme = domino_search(pretrained, _data(), budget=Budget(params=0.875), progress=True, **FAST)
    _check_search(scheme, scheme.layer_params, 0.875)
    assert scheme.param_sparsity == pytest.approx(_sparsity(scheme, scheme.layer_params))
    assert scheme.layer_params == {"2": 16 * 32 * 9, "5": 512 * 64, "7": 64 * 32, "9": 32 * 4}
    # the user's model is untouched (the search fine-tunes a copy)
    assert all(torch.equal(before[k], p) for k, p in pretrained.state_dict().items())
    assert "param sparsity" in capsys.readouterr().err  # the tqdm bar shows sparsity vs budget
    path = tmp_path / "s.json"
    scheme.save(path)
    back = Scheme.load(path)
    assert back == scheme and back.meta == scheme.meta


def test_flops_budget(pretrained):
    scheme = domino_search(pretrained, _data(), budget=Budget(flops=8.0), progress=False, **FAST)
    _check_search(scheme, scheme.layer_flops, 1 - 1 / 8)
    assert scheme.flops_reduction >= 8.0 * (1 - 0.01)
    assert scheme.meta["budget"] == {"flops": 8.0}


def test_fixed_n_policy(pretrained):
    scheme = domino_search(pretrained, _data(), budget=Budget(params=0.75), policy="fixed_n", progress=False, **FAST)
    assert all(p is None or (p[0] == 1 and p[1] in (2, 4, 8, 16)) for p in scheme.values())
    assert scheme.param_sparsity >= 0.75 - 0.001


def test_plot_png(pretrained, tmp_path):
    pytest.importorskip("matplotlib")  # an optional dependency (extras "demo" / "examples")
    png = tmp_path / "n.png"
    scheme = domino_search(pretrained, _data(), budget=Budget(params=0.5), plot=png, progress=False, **FAST)
    assert scheme.param_sparsity >= 0.5 - 0.001
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_counted_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    flops = count_flops(model, torch.randn(2, 3, 8, 8))
    # conv: output 8 x 4 x 4 per sample, each a 3 x 3 x 3 dot product; linear: 128 x 10
    assert flops == {"0": 8 * 4 * 4 * 3 * 3 * 3, "3": 128 * 10}
    # a Linear over a sequence counts every position; Conv1d and grouped convs from their output shape
    seq = nn.Sequential(nn.Linear(16, 32))
    assert count_flops(seq, torch.randn(2, 5, 16)) == {"0": 5 * 16 * 32}
    c1 = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2))
    assert count_flops(c1, torch.randn(3, 4, 10)) == {"0": 6 * 8 * (2 * 3)}


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(), ValueError, r"Budget: give exactly one of params="),
        (dict(params=0.5, flops=2.0), ValueError, r"Budget: give exactly one"),
        (dict(params=0.0), ValueError, r"Budget: params=0.0 must be a sparsity in \(0, 1\)"),
        (dict(params=1.0), ValueError, r"Budget: params=1.0 must be a sparsity in \(0, 1\)"),
        (dict(params=-0.2), ValueError, r"Budget: params=-0.2"),
        (dict(flops=1.0), ValueError, r"Budget: flops=1.0 must be a reduction factor > 1"),
        (dict(flops=-8.0), ValueError, r"Budget: flops=-8.0"),
        (dict(params="0.5"), TypeError, r"Budget: params must be a float"),
    ],
)
def test_budget_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Budget(**kwargs)


def test_search_errors(pretrained):
    data = _data(batches=1)
    with pytest.raises(ValueError, match=r"budget params 0.9500 is unreachable with m=16: .* every layer at 1:16"):
        domino_search(pretrained, data, budget=Budget(params=0.95), progress=False)
    with pytest.raises(ValueError, match=r"budget flops 20x is unreachable with m=16"):
        domino_search(pretrained, data, budget=Budget(flops=20.0), progress=False)
    with pytest.raises(ValueError, match=r"budget params 0.8000 is unreachable with m=4"):
        domino_search(pretrained, data, budget=Budget(params=0.8), m=4, progress=False)
    with pytest.raises(ValueError, match=r"m=12 must be a power of two"):
        domino_search(pretrained, data, m=12, progress=False)
    with pytest.raises(ValueError, match=r"unknown policy 'fixed'"):
        domino_search(pretrained, data, policy="fixed", progress=False)
    with pytest.raises(TypeError, match=r"budget must be nmkern.Budget"):
        domino_search(pretrained, data, budget=0.875, progress=False)
    with pytest.raises(ValueError, match=r"layer '0' .* has 1 input features/channels, not divisible by m=16"):
        domino_search(pretrained, data, layers=["0", "2"], progress=False)
    with pytest.raises(ValueError, match=r"no Linear/Conv layer has input features/channels divisible by m=16"):
        domino_search(nn.Sequential(nn.Linear(5, 3)), [(torch.randn(2, 5), torch.tensor([0, 1]))], progress=False)
    with pytest.raises(RuntimeError, match=r"budget params 0.8750 not met after max_iters=3 iterations"):
        domino_search(pretrained, data, max_iters=3, progress=False)
