"""Ahead-of-time compile every Triton kernel for sm_80 and sm_90; report registers and spills.

Every module in :mod:`nmkern.kernels` that defines ``AOT_SPECS`` (a list of dicts
``{"name", "fn", "signature", "constexprs"}`` plus optional compile options such
as ``num_warps``; kernel files build them from their ``*_configs()`` list with
``nmkern.kernels._configs.aot_spec``, so the check compiles configs the
launchers run) is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` - no GPU needed. Each cubin goes through
``cuobjdump --dump-resource-usage``, whose ``REG/STACK/SHARED/LOCAL`` figures land
in a JSON report and a markdown table beside it.

The run fails (exit status 1) when a kernel does not compile, spills (STACK or
LOCAL above 0), or asks for more shared memory or registers than the arch has.

Usage::

    python -m nmkern.aot --out reports/aot.json

Must run without ``TRITON_INTERPRET``: an interpreted kernel cannot be compiled.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (80, 90)
WARP_SIZE = 32
# Keys of an AOT spec that are not compile options.
SPEC_KEYS = ("name", "fn", "signature", "constexprs", "attrs")
# Per-block limits: shared memory a block may opt into (A100: 163 KiB, H100: 227 KiB) and
# the 64 Ki 32-bit registers of one SM that a block's threads must share.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 65536

_RESOURCE_RE = re.compile(
    r"Function\s+(?P<fn>[^\s:]+)\s*:\s*REG:(?P<reg>\d+)\s+STACK:(?P<stack>\d+)\s+SHARED:(?P<shared>\d+)"
    r"\s+LOCAL:(?P<local>\d+)"
)


@dataclasses.dataclass
class KernelResult:
    module: str
    name: str
    kernel: str  # the @triton.jit function's name
    arch: int
    ok: bool
    reg: int | None = None
    stack: int | None = None
    shared: int | None = None  # static shared memory (cuobjdump)
    local: int | None = None
    shared_dynamic: int | None = None  # Triton's dynamic shared memory (metadata)
    num_warps: int | None = None
    compile_s: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def discover_specs() -> list[tuple[str, dict]]:
    """``(module name, spec)`` for every ``AOT_SPECS`` entry in every module of nmkern.kernels."""
    from nmkern import kernels

    found = []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for spec in getattr(module, "AOT_SPECS", ()):
            found.append((info.name, spec))
    return found


def find_cuobjdump() -> str:
    """cuobjdump from PATH, the nvidia-cuda-cuobjdump wheel, or Triton's bundled copy."""
    on_path = shutil.which("cuobjdump")
    if on_path:
        return on_path
    candidates = []
    try:
        import nvidia

        candidates += [Path(p) / "cu13" / "bin" / "cuobjdump" for p in nvidia.__path__]
        candidates += [Path(p) / "cuda_cuobjdump" / "bin" / "cuobjdump" for p in nvidia.__path__]
    except ImportError:
        pass
    import triton

    candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise FileNotFoundError(
        "nmkern.aot: cuobjdump not found; pip install nvidia-cuda-cuobjdump (it installs "
        "site-packages/nvidia/cu13/bin/cuobjdump) or put cuobjdump on PATH"
    )


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``{function: {"reg", "stack", "shared", "local"}}`` from ``cuobjdump --dump-resource-usage``."""
    return {
        m["fn"]: {k: int(m[k]) for k in ("reg", "stack", "shared", "local")}
        for m in _RESOURCE_RE.finditer(text)
    }


def _full_signature(fn, spec: dict) -> dict:
    """The spec's signature with every constexpr argument marked ``"constexpr"`` (Triton wants all args)."""
    sig = dict(spec["signature"])
    for name in spec.get("constexprs", {}):
        if isinstance(name, str):
            sig.setdefault(name, "constexpr")
    unknown = [a for a in fn.arg_names if a not in sig]
    if unknown:
        raise ValueError(f"spec {spec['name']!r}: no signature entry for argument(s) {unknown}")
    return {a: sig[a] for a in fn.arg_names}


def _ast_source(triton, fn, signature: dict, constexprs: dict, attrs):
    """``triton.compiler.ASTSource`` across Triton versions: 3.3 renamed ``constants=`` to ``constexprs=``."""
    import inspect

    if "constexprs" in inspect.signature(triton.compiler.ASTSource).parameters:
        return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compiler.ASTSource(fn=fn, signature=signature, constants=constexprs, attrs=attrs)


def compile_one(module: str, spec: dict, arch: int, cuobjdump: str, workdir: str) -> KernelResult:
    import triton
    from triton.backends.compiler import GPUTarget

    fn = spec["fn"]
    res = KernelResult(module=module, name=spec["name"], kernel=getattr(fn, "__name__", "?"), arch=arch, ok=False)
    options = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    t0 = time.perf_counter()
    try:
        src = _ast_source(triton, fn, _full_signature(fn, spec), spec.get("constexprs", {}), spec.get("attrs"))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, WARP_SIZE), options=options)
    except Exception as e:  # report every failure, keep going
        res.compile_s = time.perf_counter() - t0
        first = str(e).strip().splitlines()
        res.problems.append(f"compile failed: {type(e).__name__}: {first[-1] if first else ''}"[:500])
        return res
    res.compile_s = time.perf_counter() - t0
    res.num_warps = compiled.metadata.num_warps
    res.shared_dynamic = compiled.metadata.shared
    kernel_name = compiled.metadata.name
    cubin = Path(workdir) / f"{res.name}.sm{arch}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    dump = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
    usage = parse_resource_usage(dump.stdout)
    if dump.returncode or kernel_name not in usage:
        res.problems.append(f"cuobjdump gave no resource usage for {kernel_name}: {(dump.stderr or dump.stdout)[:300]}")
        return res
    u = usage[kernel_name]
    res.reg, res.stack, res.shared, res.local = u["reg"], u["stack"], u["shared"], u["local"]
    if res.stack or res.local:
        res.problems.append(f"spills: STACK={res.stack} LOCAL={res.local} bytes")
    total_shared = res.shared + (res.shared_dynamic or 0)
    if total_shared > MAX_SHARED_BYTES[arch]:
        res.problems.append(f"shared memory {total_shared} B exceeds the sm_{arch} limit {MAX_SHARED_BYTES[arch]} B")
    if res.reg * WARP_SIZE * res.num_warps > REGISTERS_PER_SM:
        res.problems.append(f"{res.reg} registers x {WARP_SIZE * res.num_warps} threads exceed {REGISTERS_PER_SM}")
    res.ok = not res.problems
    return res


# Worker state for the process pool: forked after discovery, so specs need no pickling.
_WORK: dict = {}


def _work(item: tuple[int, int]) -> KernelResult:
    index, arch = item
    module, spec = _WORK["specs"][index]
    return compile_one(module, spec, arch, _WORK["cuobjdump"], _WORK["workdir"])


def run(jobs: int = 1, progress: bool = True) -> list[KernelResult]:
    specs = discover_specs()
    names = [s["name"] for _, s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"nmkern.aot: duplicate AOT spec names {dupes}; every spec needs its own name")
    cuobjdump = find_cuobjdump()
    items = [(i, arch) for i in range(len(specs)) for arch in ARCHS]
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc="AOT compile", unit="kernel", disable=not progress, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="nmkern-aot-") as workdir:
        _WORK.update(specs=specs, cuobjdump=cuobjdump, workdir=workdir)
        results: list[KernelResult] = []
        if jobs > 1:
            ctx = multiprocessing.get_context("fork")
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                for r in pool.map(_work, items):
                    results.append(r)
                    bar.update()
        else:
            for item in items:
                results.append(_work(item))
                bar.update()
    bar.close()
    return results


def markdown_report(results: list[KernelResult], meta: dict) -> str:
    lines = [
        "# Triton AOT compile report",
        "",
        f"Triton {meta['triton']}, targets {', '.join(f'sm_{a}' for a in ARCHS)}; "
        f"{meta['kernels']} specs, {meta['failures']} failing, {meta['wall_s']:.1f} s. "
        "REG = registers per thread; STACK/LOCAL > 0 means spills; SHARED = static + Triton's dynamic bytes.",
        "",
        "| module | spec | arch | warps | REG | STACK | LOCAL | SHARED | compile s | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shared = "" if r.shared is None else r.shared + (r.shared_dynamic or 0)
        status = "ok" if r.ok else "FAIL: " + "; ".join(r.problems).replace("|", "/")
        lines.append(
            f"| {r.module} | {r.name} | sm_{r.arch} | {r.num_warps or ''} | {'' if r.reg is None else r.reg} | "
            f"{'' if r.stack is None else r.stack} | {'' if r.local is None else r.local} | {shared} | "
            f"{r.compile_s:.2f} | {status} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nmkern.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/aot.json"),
                        help="JSON report path; the markdown table goes next to it with .md (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel compile processes (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if interpreter_on():
        print(
            "nmkern.aot: TRITON_INTERPRET is set, so every @triton.jit kernel is an interpreted function that "
            "cannot be compiled; run without it: env -u TRITON_INTERPRET python -m nmkern.aot",
            file=sys.stderr,
        )
        return 2
    import triton

    t0 = time.perf_counter()
    results = run(jobs=max(1, args.jobs), progress=not args.quiet)
    wall = time.perf_counter() - t0
    failures = [r for r in results if not r.ok]
    meta = {"triton": triton.__version__, "archs": list(ARCHS), "kernels": len(results) // len(ARCHS),
            "failures": len(failures), "wall_s": round(wall, 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, "results": [dataclasses.asdict(r) for r in results]}, indent=1) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(markdown_report(results, meta))
    for r in failures:
        print(f"FAIL {r.module}:{r.name} sm_{r.arch}: {'; '.join(r.problems)}", file=sys.stderr)
    print(f"nmkern.aot: {len(results)} compiles ({meta['kernels']} specs x {len(ARCHS)} archs), "
          f"{len(failures)} failing, {wall:.1f} s; report {args.out} and {md}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
