"""nmkern.sparsify: in-place swaps identical to masking by hand, skip reasons, schemes, torch.compile."""

from __future__ import annotations

import copy
import importlib
import logging

import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern.reference import apply_nm_ref, block_mask_1xn_ref
from nmkern.spec import DENSE, BlockSpec, NMSpec


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # 3 input channels: no N:M group fits
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise: left dense
        self.block = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.stem(x))))
        x = self.block(x)
        return self.head(x.mean((2, 3)))


class MLPBlock(nn.Module):
    def __init__(self, d=32, hidden=128):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class TinyTransformerMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 32)  # 6 inputs: not divisible by 4
        self.layers = nn.ModuleList([MLPBlock(), MLPBlock()])
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def _mask_by_hand(model: nn.Module, names_patterns: dict) -> None:
    with torch.no_grad():
        for name, pat in names_patterns.items():
            mod = model.get_submodule(name)
            if pat[0] == "nm":
                mod.weight.copy_(apply_nm_ref(mod.weight, pat[1], pat[2], dim=1))
            else:
                mod.weight.mul_(block_mask_1xn_ref(mod.weight, pat[1], pat[2]))


@pytest.mark.parametrize("pack", [False, True])
def test_cnn_24_identical_to_masking_by_hand(pack, caplog):
    torch.manual_seed(0)
    model = SmallCNN()
    by_hand = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="nmkern.sparsify"):
        report = nmkern.sparsify(model, "2:4", pack=pack)
    assert [n for n, _ in report.swapped] == ["block.0", "block.2", "head"]
    skipped = dict(report.skipped)
    assert set(skipped) == {"stem", "dw"}
    assert "in_channels=3 is not divisible by m=4" in skipped["stem"]
    assert "depthwise conv (groups=16) is left dense" in skipped["dw"]
    assert "skipped stem" in caplog.text and "skipped dw" in caplog.text
    assert isinstance(model.block[0], nmkern.SparseConv2d) and isinstance(model.head, nmkern.SparseLinear)
    assert type(model.stem) is nn.Conv2d and type(model.dw) is nn.Conv2d
    assert all(model.get_submodule(n).is_packed == pack for n, _ in report.swapped)
    _mask_by_hand(by_hand, {n: ("nm", 2, 4) for n, _ in report.swapped})
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        if pack:  # the packed convs run on a decompressed copy: CPU conv may pick another algorithm
            assert torch.allclose(model(x), by_hand(x), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(model(x), by_hand(x))
    text = str(report)
    assert "3 layer(s) swapped" in text and "2 skipped" in text and "block.0" in text and "depthwise" in text
    d = report.to_dict()
    assert d["swapped"][2] == {"name": "head", "pattern": "Linear 32->10 as 2:4"} and d["packed"] == pack


def test_transformer_mlp_mapping_scheme_with_globs():
    torch.manual_seed(1)
    model = TinyTransformerMLP()
    by_hand = copy.deepcopy(model)
    scheme = {
        "layers.0.fc1": (1, 4),  # exact name beats the glob below
        "layers.*.fc1": "2:8",
        "layers.*.fc2": "1x4:0.5",
        "out": None,  # explicitly dense
        "decoder.*": (2, 4),  # matches nothing: reported
    }
    report = nmkern.sparsify(model, scheme, srste=False)
    swapped = dict(report.swapped)
    assert swapped == {"layers.0.fc1": "Linear 32->128 as 1:4", "layers.0.fc2": "Linear 128->32 as 1x4:0.5",
                       "layers.1.fc1": "Linear 32->128 as 2:8", "layers.1.fc2": "Linear 128->32 as 1x4:0.5"}
    skipped = dict(report.skipped)
    assert "not in the scheme" in skipped["embed"] and "keeps it dense" in skipped["out"]
    assert report.unmatched_keys == ["decoder.*"]
    assert model.layers[0].fc1.srste is False
    _mask_by_hand(by_hand, {"layers.0.fc1": ("nm", 1, 4), "layers.1.fc1": ("nm", 2, 8),
                            "layers.0.fc2": ("1xn", 4, 0.5), "layers.1.fc2": ("1xn", 4, 0.5)})
    x = torch.randn(3, 7, 6)
    with torch.no_grad():
        assert torch.equal(model(x), by_hand(x))
    # train a step: masks keep their pattern; then pack and get the same outputs as to_dense()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        before = model(x)
        for _, mod in model.named_modules():
            if isinstance(mod, nmkern.SparseLinear):
                mod.pack()
        assert torch.allclose(model(x), before, atol=1e-6)


def test_uniform_schemes_and_scheme_objects():
    from nmkern.scheme import Scheme

    torch.manual_seed(2)
    model = TinyTransformerMLP()
    report = nmkern.sparsify(model, Scheme({"layers.0.fc1": (2, 4), "layers.1.fc2": (1, 8)}))
    assert [n for n, _ in report.swapped] == ["layers.0.fc1", "layers.1.fc2"]
    model2 = TinyTransformerMLP()
    report2 = nmkern.sparsify(model2, (1, 4))
    assert len(report2.swapped) == 5 and dict(report2.skipped)["embed"].endswith("in_features=6 is not divisible by m=4")
    report3 = nmkern.sparsify(TinyTransformerMLP(), "1x8:0.25")
    assert "out" in dict(report3.skipped) and "not divisible by the 1xN block size 8" in dict(report3.skipped)["out"]
    # already sparse layers are left alone on a second call
    assert nmkern.sparsify(model2, (1, 4)).swapped == []


def test_sparsify_errors():
    with pytest.raises(ValueError, match="sparsify: scheme = '3:x' is not a pattern; write it as 'n:m'"):
        nmkern.sparsify(SmallCNN(), "3:x")
    with pytest.raises(ValueError, match=r"sparsify \(scheme\['head'\]\): n=4, m=4 is not an N:M pattern"):
        nmkern.sparsify(SmallCNN(), {"head": (4, 4)})
    with pytest.raises(TypeError, match=r"sparsify: scheme must be one pattern \('n:m' .*\(n, m\).* or a Mapping"):
        nmkern.sparsify(SmallCNN(), 0.5)
    with pytest.raises(ValueError, match="sparsify: model is itself an nn.Linear"):
        nmkern.sparsify(nn.Linear(8, 8), "2:4")
    with pytest.raises(ValueError, match="sparsify: unknown backend 'fastest'"):
        nmkern.sparsify(SmallCNN(), "2:4", backend="fastest")
    with pytest.raises(ValueError, match=r"sparsify \(scheme\): sparsity=1.5 must lie in"):
        nmkern.sparsify(SmallCNN(), "1x4:1.5")
    with pytest.raises(ValueError, match=r"sparsify: scheme = 'unstructured:0.5' is a unstructured pattern; sparsify "
                                         r"takes 'n:m'"):
        nmkern.sparsify(SmallCNN(), "unstructured:0.5")
    with pytest.raises(ValueError, match="sparsify: scheme None keeps every layer dense"):
        nmkern.sparsify(SmallCNN(), None)
    with pytest.raises(ValueError, match="sparsify: 1x4:0.5 with rearrange=True has no sparse module form"):
        nmkern.sparsify(SmallCNN(), BlockSpec(4, 0.5, rearrange=True))


def test_spec_objects_and_the_deprecated_spellings():
    torch.manual_seed(4)
    a, b = TinyTransformerMLP(), TinyTransformerMLP()
    b.load_state_dict(a.state_dict())
    ra = nmkern.sparsify(a, {"layers.*.fc1": NMSpec(2, 4), "layers.*.fc2": BlockSpec(4, 0.5), "out": DENSE})
    with pytest.warns(DeprecationWarning, match="write 1xN blocks as '1x4:0.5'"):
        rb = nmkern.sparsify(b, {"layers.*.fc1": "2:4", "layers.*.fc2": "1xN:4:0.5", "out": None})
    assert ra.swapped == rb.swapped and ra.skipped == rb.skipped
    assert [n for n, _ in ra.swapped] == [f"layers.{i}.{fc}" for i in (0, 1) for fc in ("fc1", "fc2")]
    for name, _ in ra.swapped:
        assert torch.equal(a.get_submodule(name).dense_weight(), b.get_submodule(name).dense_weight())
    sp = importlib.import_module("nmkern.sparsify")  # the module (nmkern.sparsify is also the function)

    with pytest.warns(DeprecationWarning, match="parse_layer_pattern is deprecated"):
        pat = sp.parse_layer_pattern("1x4:0.5")
    assert (pat.block, pat.sparsity, str(pat)) == (4, 0.5, "1x4:0.5")
    with pytest.warns(DeprecationWarning):
        assert sp.parse_layer_pattern(None) is None
    with pytest.warns(DeprecationWarning, match="LayerPattern is deprecated"):
        assert isinstance(pat, sp.LayerPattern)
    with pytest.warns(DeprecationWarning, match="_Resolver is deprecated"):
        resolver = sp._Resolver({"layers.0.*": (2, 4), "out": None, "nothing": "1:8"})
    matched, p = resolver.lookup("layers.0.fc1")
    assert matched and (p.n, p.m, str(p)) == (2, 4, "2:4")
    assert resolver.lookup("out") == (True, None) and resolver.lookup("embed") == (False, None)
    assert resolver.unused_keys() == ["nothing"]


def test_torch_compile_runs_a_sparsified_model():
    torch.manual_seed(3)  # small: compiling takes ~20 s of CPU on this machine
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    nmkern.sparsify(model, {"0": (2, 4), "2": "1x4:0.5"}, pack=True)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)
        assert torch.allclose(compiled(x), expected, atol=1e-5)
        for _, mod in model.named_modules():  # the registered ops trace into one graph
            if isinstance(mod, nmkern.SparseLinear):
                mod.backend = "reference"
        torch._dynamo.reset()
        full = torch.compile(model, fullgraph=True)
        assert torch.allclose(full(x), expected, atol=1e-5)


@pytest.mark.gpu
def test_sparsify_gpu_packed_matches_by_hand():
    torch.manual_seed(4)
    model = TinyTransformerMLP().cuda().half()
    by_hand = copy.deepcopy(model)
    report = nmkern.sparsify(model, "2:4", pack=True)
    _mask_by_hand(by_hand, {n: ("nm", 2, 4) for n, _ in report.swapped})
    x = torch.randn(4, 6, 6, device="cuda", dtype=torch.half)
    with torch.no_grad():
        assert torch.allclose(model(x).float(), by_hand(x).float(), atol=2e-2)
