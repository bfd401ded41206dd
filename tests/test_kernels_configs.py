"""Kernel configurations as data: each kernel file's ``*_configs()`` feeds its launcher,
its AOT_SPECS and the optional ``triton.autotune`` wrapper (nmkern/kernels/_configs.py).

Pure Python except the last test, which runs nm_linear through the autotune path (on the
CPU under TRITON_INTERPRET=1 with a stand-in benchmarker, or on a GPU).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import triton

from nmkern import kernels
from nmkern.kernels import _configs
from nmkern.kernels._configs import aot_spec, autotune_enabled, autotuned, launch, pick_by_rows, split
from nmkern.kernels.nm_linear import nm_linear_configs
from nmkern.kernels.sparse_conv2d import nm_conv2d_configs


def kernel_modules():
    names = sorted(i.name for i in pkgutil.iter_modules(kernels.__path__) if not i.name.startswith("_"))
    return [importlib.import_module(f"nmkern.kernels.{name}") for name in names]


def test_every_kernel_file_has_one_config_function():
    for module in kernel_modules():
        found = [name for name in vars(module) if name.endswith("_configs") and callable(getattr(module, name))
                 and getattr(module, name).__module__ == module.__name__]
        assert len(found) == 1, f"{module.__name__}: config functions {found}"
        assert len(getattr(module, found[0]).__doc__.strip()) > 80, f"{module.__name__}.{found[0]} needs a docstring"


@pytest.mark.parametrize("rows,want", [(1, 16), (16, 16), (17, 32), (32, 32), (33, 64), (64, 64), (10_000, 64)])
def test_linear_launcher_rule_keeps_the_old_block_sizes(rows, want):
    cfg = pick_by_rows(nm_linear_configs(), "BLOCK_B", rows)
    assert (cfg["BLOCK_B"], cfg["BLOCK_O"], cfg["BLOCK_K"]) == (want, 64, 32)
    assert (cfg["num_warps"], cfg["num_stages"]) == (4, 3)  # Triton's defaults


@pytest.mark.parametrize("pixels,want", [(1, 16), (16, 16), (17, 32), (5000, 32)])
def test_conv_launcher_rule_keeps_the_old_block_sizes(pixels, want):
    assert pick_by_rows(nm_conv2d_configs(), "BLOCK_P", pixels)["BLOCK_P"] == want


def _tuned_names_outside_config_function(module) -> list[str]:
    """``BLOCK_*`` / ``num_warps`` / ``num_stages`` given a number or a constant's name, as a dict
    entry or keyword argument, anywhere but the module's ``*_configs()`` function.

    Derived sizes (``BLOCK_N=_block_n(block)``) are calls and pass.
    """
    tree = ast.parse(Path(module.__file__).read_text())
    inside = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_configs"):
            inside |= {id(n) for n in ast.walk(node)}
    tuned = lambda name: isinstance(name, str) and (name.startswith("BLOCK_") or name in ("num_warps", "num_stages"))  # noqa: E731
    found = []
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        if isinstance(node, ast.Dict):
            found += [k.value for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and tuned(k.value) and isinstance(v, (ast.Constant, ast.Name))]
        elif isinstance(node, ast.keyword) and tuned(node.arg) and isinstance(node.value, (ast.Constant, ast.Name)):
            found.append(node.arg)
    return found


def test_launchers_and_aot_specs_take_tuned_numbers_only_from_the_config_function():
    for module in kernel_modules():
        assert not _tuned_names_outside_config_function(module), module.__name__
        for spec in module.AOT_SPECS:
            # the config's block sizes and launch options both reach the spec
            assert any(k.startswith("BLOCK_") for k in spec["constexprs"]) and "num_warps" in spec, spec["name"]


def test_split_and_aot_spec():
    cfg = {"BLOCK_G": 128, "num_warps": 4, "num_stages": 2}
    assert split(cfg) == ({"BLOCK_G": 128}, {"num_warps": 4, "num_stages": 2})
    spec = aot_spec("x", "fn", {"a": "i32"}, cfg, {"M": 4}, enable_fp_fusion=False)
    assert spec == {"name": "x", "fn": "fn", "signature": {"a": "i32"}, "constexprs": {"M": 4, "BLOCK_G": 128},
                    "num_warps": 4, "num_stages": 2, "enable_fp_fusion": False}


def test_autotune_wrapper_holds_the_whole_config_list(monkeypatch):
    from nmkern.kernels.nm_linear import nm_linear_kernel

    tuned = autotuned(nm_linear_kernel, nm_linear_configs(), ("B", "O", "K"))
    assert isinstance(tuned, triton.runtime.Autotuner)
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in tuned.configs] == [
        ({"BLOCK_B": b, "BLOCK_O": 64, "BLOCK_K": 32}, 4, 3) for b in (16, 32, 64)]
    assert autotuned(nm_linear_kernel, nm_linear_configs(), ("B", "O", "K")) is tuned  # tuning results are kept


def test_autotune_is_off_by_default_and_under_the_interpreter(monkeypatch):
    monkeypatch.delenv(_configs.AUTOTUNE_ENV, raising=False)
    assert not autotune_enabled()
    monkeypatch.setenv(_configs.AUTOTUNE_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not autotune_enabled()
    monkeypatch.setenv(_configs.AUTOTUNE_ENV, "0")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not autotune_enabled()


class _FakeKernel:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_launch_runs_the_picked_config(monkeypatch):
    monkeypatch.setattr(_configs, "autotune_enabled", lambda: False)
    kernel = _FakeKernel()
    configs = [{"BLOCK": 16, "num_warps": 4}, {"BLOCK": 32, "num_warps": 8}]
    launch(kernel, configs, configs[1], lambda cfg: (100 // cfg["BLOCK"],), "x", 7, FLAG=True, tune_key=("n",))
    assert kernel.calls == [((3,), ("x", 7), {"FLAG": True, "BLOCK": 32, "num_warps": 8})]


def test_launch_autotunes_over_the_list_when_enabled(monkeypatch):
    monkeypatch.setattr(_configs, "autotune_enabled", lambda: True)
    seen = {}

    def fake_autotuned(kernel, configs, key):
        seen.update(configs=configs, key=key)
        return kernel

    monkeypatch.setattr(_configs, "autotuned", fake_autotuned)
    kernel = _FakeKernel()
    configs = [{"BLOCK": 16, "num_warps": 4}, {"BLOCK": 32, "num_warps": 8}]
    grid = lambda cfg: (100 // cfg["BLOCK"],)  # noqa: E731
    launch(kernel, configs, configs[0], grid, "x", FLAG=True, tune_key=("n",))
    assert seen == {"configs": configs, "key": ("n",)}
    assert kernel.calls == [(grid, ("x",), {"FLAG": True})]  # the autotuner adds the config


def test_autotune_path_launches_through_triton_autotune(interpret, device, monkeypatch):
    """The NMKERN_AUTOTUNE path end to end, with a stand-in benchmarker (timing needs a GPU)."""
    import torch

    import nmkern
    from nmkern.kernels.nm_linear import nm_linear_kernel, nm_linear_triton
    from nmkern.reference.nm_pack import pack_nm_ref

    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0)).to(device)
    w = nmkern.apply_nm(torch.randn(48, 64, generator=torch.Generator().manual_seed(1)), 2, 4).to(device)
    values, indices = pack_nm_ref(w, 2, 4)
    default = nm_linear_triton(x, values, indices, 2, 4)
    _configs._autotuner.cache_clear()
    try:
        monkeypatch.setattr(_configs, "autotune_enabled", lambda: True)
        tuned = autotuned(nm_linear_kernel, nm_linear_configs(), ("B", "O", "K"))
        fake_ms = iter([3.0, 1.0, 2.0])  # one timing per config, in list order: BLOCK_B = 32 wins

        def fake_bench(kernel_call, quantiles):
            kernel_call()
            return [next(fake_ms)] * len(quantiles)

        tuned.__dict__["do_bench"] = fake_bench  # replaces the cached_property on this instance
        y = nm_linear_triton(x, values, indices, 2, 4)
        assert tuned.best_config.kwargs == {"BLOCK_B": 32, "BLOCK_O": 64, "BLOCK_K": 32}
        torch.testing.assert_close(y, default)
    finally:
        _configs._autotuner.cache_clear()


def test_unpack_launcher_refuses_rows_past_the_int32_group_index(monkeypatch):
    """unpack_nm_kernel keeps the in-row group index in int32; the launcher checks it fits with the tile."""
    import torch

    from nmkern.kernels import unpack_nm

    values = torch.zeros(1, 4, dtype=torch.float16)
    indices = torch.zeros(1, 1, dtype=torch.int32)
    monkeypatch.setattr(unpack_nm, "unpack_nm_configs", lambda n, m: [{"BLOCK_G": 2**31 - 4, "num_warps": 4}])
    with pytest.raises(ValueError, match="4 groups per row; the Triton kernel takes at most 3"):
        unpack_nm.unpack_nm_triton(values, indices, 1, 2)
