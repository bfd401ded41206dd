"""Collect ``bench_*.py`` files when pytest is pointed at bench/ (``pytest bench/ --benchmark-only``).

The project's ``testpaths = ["tests"]`` keeps a plain ``pytest`` away from here.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; only add the rest.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
