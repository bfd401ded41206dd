"""The layout the architecture promises: layering of imports and the size limits (read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nmkern"
# The layers below the methods: none of them may import nmkern.methods.
BELOW_METHODS = ["reference", "functional.py", "formats.py", "ops.py", "dispatch.py", "backend.py", "spec.py", "nn",
                 "sparsify.py", "autograd.py", "_cpu.py", "_cuda.py", "_validate.py", "scheme.py", "flops.py"]
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600


def _sources(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        out += [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))
    return out


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the nmkern modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(REPO).parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("nmkern")}


def test_nothing_below_methods_imports_them():
    for path in _sources(*(PACKAGE / p for p in BELOW_METHODS)):
        bad = sorted(n for n in _imported_modules(path) if n.startswith("nmkern.methods"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}; methods sit on top of the modules, not below"


def test_methods_do_not_import_the_demo():
    for path in _sources(PACKAGE / "methods"):
        bad = sorted(n for n in _imported_modules(path) if n.startswith("nmkern.demo"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}; the demo is an application built on the methods"


def test_nothing_in_the_library_imports_the_cli():
    for path in _sources(PACKAGE):
        if "cli" in path.relative_to(PACKAGE).parts or path.name == "__main__.py":
            continue
        bad = sorted(n for n in _imported_modules(path) if n.startswith("nmkern.cli"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}; the CLI is a thin layer over the library"


def test_size_limits():
    too_long = []
    for path in _sources(PACKAGE):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "over the size limits:\n" + "\n".join(too_long)


def test_import_resolution_sees_relative_imports():
    # the checks above are only as good as this resolution
    names = _imported_modules(PACKAGE / "nn" / "_layer.py")
    assert "nmkern.dispatch" in names and "nmkern.spec.Pattern" in names
    assert "nmkern.methods.loop" in _imported_modules(PACKAGE / "methods" / "masking.py")
