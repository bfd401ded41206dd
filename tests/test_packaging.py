"""The wheel ships the top-level kernels/ folder as nmkern.kernels, and the build never needs torch."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.aot
def test_wheel_contains_kernels_package(tmp_path):
    env = dict(os.environ, NMKERN_SKIP_CUDA_BUILD="1", NMKERN_SKIP_CPU_BUILD="1")
    # --no-build-isolation: the build needs only setuptools (pyproject's build requires), no download
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "-q"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("nmkern-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_files = sorted(p.name for p in (ROOT / "nmkern" / "kernels").glob("*.py"))
    assert kernel_files, "nmkern/kernels/ is empty"
    for name in kernel_files:
        assert f"nmkern/kernels/{name}" in names
    # every module of every subpackage (nmkern/nn/, methods/, cli/, reference/ ...): pyproject lists packages by hand
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "nmkern").rglob("*.py") if "_lib" not in p.parts)
    missing = [m for m in modules if m not in names]
    assert not missing, f"the wheel lacks {missing}; add their packages to [tool.setuptools] packages"
    assert not any(n.startswith("kernels/") for n in names)  # no stray top-level package


def test_build_requirements_exclude_torch():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(r.split()[0].lower().startswith("torch") for r in meta["build-system"]["requires"])
    torch_req = next(r for r in meta["project"]["dependencies"] if r.startswith("torch"))
    from packaging.requirements import Requirement

    assert Requirement(torch_req).specifier.contains("2.13.0")


def test_no_top_level_folder_of_the_checkout_shadows_another_package():
    """`python -m pytest` and `python -c` from the checkout put its root first on sys.path, so a top-level
    folder named like an installed package hides it: a top-level `kernels/` hid Hugging Face's `kernels`,
    which transformers 5.25 requires, and every transformers test failed on import. (A folder without
    `__init__.py` is only a namespace portion: a regular package later on sys.path still wins.)"""
    shadowing = sorted(p.name for p in ROOT.iterdir() if p.name != "nmkern" and (p / "__init__.py").exists())
    assert not shadowing, f"top-level folders {shadowing} shadow packages of the same name; move them into nmkern/"
