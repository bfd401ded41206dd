"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90 (no GPU needed).

``python -m nmkern.aot`` runs in a subprocess without ``TRITON_INTERPRET`` (an
interpreted kernel cannot be compiled) and must compile every ``AOT_SPECS`` entry of
every kernel file for both archs with no spills.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nmkern.aot import parse_resource_usage

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "nmkern" / "kernels"


def _env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def kernel_files_with_specs() -> list[str]:
    """Module names of nmkern/kernels/*.py that assign AOT_SPECS (read from the source, not imported)."""
    names = []
    for path in sorted(KERNEL_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, (ast.Assign, ast.AnnAssign)) and "AOT_SPECS" in ast.unparse(node).split("=")[0]
               for node in tree.body):
            names.append(path.stem)
    return names


def spec_names(module: str) -> list[str]:
    import importlib

    return [s["name"] for s in importlib.import_module(f"nmkern.kernels.{module}").AOT_SPECS]


@pytest.mark.aot
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "nmkern.aot", "--out", str(out), "--quiet"], cwd=REPO,
                          env=_env(interpret=False), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nmkern.aot failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["archs"] == [80, 90] and report["failures"] == 0
    assert out.with_suffix(".md").read_text().startswith("# Triton AOT compile report")
    compiled = {(r["module"], r["name"], r["arch"]) for r in report["results"] if r["ok"]}
    modules = kernel_files_with_specs()
    assert {"nm_mask", "compress_24", "decompress_24", "pack_nm", "unpack_nm", "block_1xn"} <= set(modules)
    for module in modules:
        names = spec_names(module)
        assert names, f"nmkern/kernels/{module}.py has an empty AOT_SPECS"
        for name in names:
            for arch in (80, 90):
                assert (module, name, arch) in compiled, f"{module}:{name} missing or failing for sm_{arch}"
    for r in report["results"]:
        assert r["reg"] > 0 and r["stack"] == 0 and r["local"] == 0, r


@pytest.mark.aot
def test_aot_refuses_to_run_under_the_interpreter(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nmkern.aot", "--out", str(tmp_path / "aot.json")], cwd=REPO,
                          env=_env(interpret=True), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET is set" in proc.stderr and "env -u TRITON_INTERPRET" in proc.stderr
    assert not (tmp_path / "aot.json").exists()


def test_parse_resource_usage():
    text = (
        "\nResource usage:\n Common:\n  GLOBAL:0\n Function pack_nm_kernel:\n"
        "  REG:96 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:424 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
        " Function other:\n  REG:32 STACK:0 SHARED:1024 LOCAL:16 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    assert parse_resource_usage(text) == {
        "pack_nm_kernel": {"reg": 96, "stack": 8, "shared": 0, "local": 0},
        "other": {"reg": 32, "stack": 0, "shared": 1024, "local": 16},
    }
