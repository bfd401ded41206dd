"""Collect ``bench_*.py`` files when pytest is pointed at bench/ (``pytest bench/ --benchmark-only``).

pyproject's ``python_files`` already lists ``bench_*.py``; this hook only steps in
when it does not (so a config change cannot silently empty the benchmark run),
and never collects a file twice. ``testpaths = ["tests"]`` keeps a plain
``pytest`` away from bench/. With pytest-benchmark, the saved JSON's ``machine_info``
also holds ``nmkern``: :func:`nmkern.timing.machine_info` (CPU flags, nmkern's CPU
ISA, threads, versions, GPU).
"""

from __future__ import annotations

import fnmatch
import importlib.util

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest collects it itself
    if any(fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None  # pytest's own python_files rule collects it
    return pytest.Module.from_parent(parent, path=file_path)


if importlib.util.find_spec("pytest_benchmark") is not None:  # the hook exists only with the plugin

    def pytest_benchmark_update_machine_info(config, machine_info):
        from nmkern.timing import machine_info as nmkern_machine_info

        machine_info["nmkern"] = nmkern_machine_info()
