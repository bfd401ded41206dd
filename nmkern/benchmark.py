"""What ``nmkern bench``, the demo and the examples measure, on top of :mod:`nmkern.timing`.

* :func:`bench_linear`: dense ``F.linear`` vs nmkern's packed ``SparseLinear`` (auto dispatch),
  nmkern's native CPU kernel and, on a GPU, cuSPARSELt, per pattern and batch, warm and cold
  cache; returns plain data (``{"meta": ..., "rows": [...]}``); :func:`format_bench_table`
  prints it.
* :func:`pack_model`, :func:`force_backend`, :func:`packed_variants`, :func:`time_models`:
  a packed copy of a model, timed against the dense one (the demo, ``examples/minilm.py``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import timing
from .spec import BlockSpec, NMSpec, Pattern, parse_spec

# --------------------------------------------------------------------------- patterns


@dataclasses.dataclass(frozen=True)
class LinearPattern:
    """A weight pattern to benchmark: ``spec`` (an :class:`~nmkern.spec.NMSpec` or a
    :class:`~nmkern.spec.BlockSpec` with some blocks pruned) and its label ``text``."""

    text: str
    spec: NMSpec | BlockSpec

    @property
    def kind(self) -> str:
        return "nm" if isinstance(self.spec, NMSpec) else "1xn"

    def kernel_args(self) -> tuple[str, int, int, int]:
        """(kind, n, m, block) as ``nmkern._cpu.prepare_cpu_linear`` takes them."""
        if isinstance(self.spec, NMSpec):
            return "nm", self.spec.n, self.spec.m, 0
        return "1xn", 0, 0, self.spec.block

    def check_shape(self, out_features: int, in_features: int) -> None:
        """ValueError when a (out, in) weight cannot take this pattern."""
        sp = self.spec
        if isinstance(sp, NMSpec) and in_features % sp.m:
            raise ValueError(f"pattern {self.text}: in_features {in_features} is not divisible by m={sp.m}")
        if isinstance(sp, BlockSpec) and out_features % sp.block:
            raise ValueError(f"pattern {self.text}: out_features {out_features} is not divisible by the block "
                             f"size {sp.block}")


def parse_pattern(value) -> LinearPattern:
    """'2:4' -> N:M; '1x4:0.75' -> 1x4 blocks, 75% of them pruned (any :func:`nmkern.spec.parse_spec`
    form of those two; the label is the text given). ValueError for anything else."""
    try:
        spec = parse_spec(value, op="nmkern bench", where="pattern", allowed=(Pattern.NM, Pattern.BLOCK))
    except TypeError as e:
        raise ValueError(str(e)) from None
    if isinstance(spec, BlockSpec) and spec.sparsity == 0.0 or not isinstance(spec, (NMSpec, BlockSpec)):
        raise ValueError(f"nmkern bench: pattern {value!r} prunes nothing; write n:m (e.g. 2:4) or "
                         "1x<block>:<sparsity> (e.g. 1x4:0.75)")
    return LinearPattern(value.strip() if isinstance(value, str) else str(spec), spec)


def masked_weight(pattern: LinearPattern, out_features: int, in_features: int, *,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A random fp32 CPU weight (out, in) with ``pattern`` applied by magnitude (reference backend)."""
    from .functional import apply_nm, block_mask_1xn

    w = torch.randn(out_features, in_features, generator=generator)
    sp = pattern.spec
    if isinstance(sp, NMSpec):
        return apply_nm(w, sp.n, sp.m, backend="reference")
    return w * block_mask_1xn(w, block=sp.block, sparsity=sp.sparsity, backend="reference")


# --------------------------------------------------------------------------- one linear layer


def _packed_linear(w: torch.Tensor, pattern: LinearPattern):
    from .nn import SparseLinear, spec_kwargs

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return SparseLinear.from_dense(lin, **spec_kwargs(pattern.spec)).pack().eval()


def linear_candidates(w: torch.Tensor, pattern: LinearPattern, copies: int = 1) -> tuple[dict, dict]:
    """``copies`` distinct copies (own weights each) of every way to compute ``F.linear(x, w)``.

    Returns (candidates, skipped): ``candidates[name]`` a list of callables ``x -> y``:
    ``dense`` (``F.linear``), ``nmkern_auto`` (packed ``SparseLinear`` modules, dispatch decides)
    and where they run ``nmkern_cpu_kernel`` (nmkern's native CPU kernel) and ``cusparselt``
    (2:4 on a GPU); ``skipped[name]``: why a candidate did not run.
    """
    from .dispatch import cpu_kernels

    def distinct(first) -> list:  # deep copies: same values, own memory (the cold-cache stack)
        return [first] + [copy.deepcopy(first) for _ in range(copies - 1)]

    cands: dict[str, list[Callable]] = {
        "dense": [lambda x, wc=wc: F.linear(x, wc) for wc in distinct(w.clone())],
        "nmkern_auto": distinct(_packed_linear(w, pattern)),
    }
    skipped: dict[str, str] = {}
    cpu = cpu_kernels() if w.device.type == "cpu" else None
    if cpu is not None:
        cands["nmkern_cpu_kernel"] = distinct(cpu.prepare_cpu_linear(w, *pattern.kernel_args()))
    if w.device.type == "cuda" and pattern.spec == NMSpec(2, 4):
        try:
            semi = [torch.sparse.to_sparse_semi_structured(w) for _ in range(copies)]
            cands["cusparselt"] = [lambda x, ws=ws: F.linear(x, ws) for ws in semi]
        except Exception as e:  # shape/dtype the library refuses: reported, not fatal
            skipped["cusparselt"] = f"{type(e).__name__}: {e}"
    return cands, skipped


def bench_linear(out_features: int, in_features: int, batches: Iterable[int], patterns: Iterable[str | LinearPattern],
                 *, seconds: float = 2.0, cold: bool = True, device: str | torch.device | None = None,
                 seed: int = 0, progress: bool = False) -> dict:
    """Time one linear layer (out x in weight, no bias) dense vs sparse, per pattern and batch size.

    ``device`` defaults to CUDA (fp16) when present, else the CPU (fp32). Each point times
    the :func:`linear_candidates` interleaved for ``seconds`` warm, then (``cold``) a stack
    of :func:`timing.cold_stack_size` copies for ``seconds`` more. ValueError for a pattern
    the shape cannot take. Returns ``{"meta": timing.machine_info() + device, dtype, shape;
    "rows": [...]}``, one row per (pattern, batch): ``pattern``, ``out_features``,
    ``in_features``, ``batch``, ``device``, ``dtype``, ``auto_path``, ``dense_bytes``,
    ``repeats``, ``{name}_median_ms`` / ``_q1_ms`` / ``_q3_ms`` / ``_min_ms`` per candidate,
    ``{name}_ratio`` (median / dense median) for the sparse ones; with ``cold`` the same
    columns prefixed ``cold_`` (per layer), ``cold_layers`` / ``cold_repeats`` and
    ``cold_dense_bytes`` (of the whole stack; ``meta["llc_bytes"]`` is the cache); ``skipped``
    ({name: reason}) when a candidate could not run.
    """
    from tqdm.auto import tqdm

    pats = [p if isinstance(p, LinearPattern) else parse_pattern(p) for p in patterns]
    batches = list(batches)
    for p in pats:
        p.check_shape(out_features, in_features)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    base = {"out_features": out_features, "in_features": in_features, "device": dev.type,
            "dtype": str(dtype).replace("torch.", ""), "dense_bytes": out_features * in_features * dtype.itemsize}
    copies = timing.cold_stack_size(base["dense_bytes"], llc_bytes=timing.last_level_cache_bytes(dev)) if cold else 1
    g = torch.Generator().manual_seed(seed)
    rows = []
    bar = tqdm(total=len(pats) * len(batches), desc="bench", disable=not progress)
    for pat in pats:
        w = masked_weight(pat, out_features, in_features, generator=g).to(dev, dtype)
        cands, skipped = linear_candidates(w, pat, copies)
        for b in batches:
            x = torch.randn(b, in_features, generator=g).to(dev, dtype)
            settle_dispatch(nn.Sequential(*cands["nmkern_auto"]), x)
            with torch.no_grad():
                stacks = {k: [lambda f=f: f(x) for f in fs] for k, fs in cands.items()}
                res = timing.time_warm_cold(stacks, cold=cold, seconds=seconds, sync=timing.device_sync(dev))
            row = {"pattern": pat.text, **base, "batch": b, "auto_path": str(cands["nmkern_auto"][0]._choose(x, b)),
                   "cold_dense_bytes": copies * base["dense_bytes"] if cold else None}
            rows.append(row | res.columns("dense") | ({"skipped": skipped} if skipped else {}))
            bar.update(1)
        del cands
    bar.close()
    meta = timing.machine_info(dev) | {"device": dev.type, "dtype": base["dtype"],
                                       "shape": [out_features, in_features], "seconds_per_point": seconds}
    return {"meta": meta, "rows": rows}


BENCH_COLUMNS = ("nmkern_cpu_kernel", "nmkern_auto", "cusparselt")


def format_bench_table(result: dict) -> str:
    """The text table of a :func:`bench_linear` result: time ratio sparse / dense per candidate,
    warm and (when measured) cold cache, and where auto dispatch went."""
    meta, rows = result["meta"], result["rows"]
    cols = [c for c in BENCH_COLUMNS if any(f"{c}_ratio" in r for r in rows)]
    heads = [(c, f"{c}_ratio") for c in cols]
    if any("cold_dense_median_ms" in r for r in rows):
        heads += [(f"cold {c}", f"cold_{c}_ratio") for c in cols]
    isa = f", nmkern CPU ISA {meta['cpu_isa']}" if meta.get("cpu_isa") else ""
    lines = [f"{meta['device']} ({meta.get('gpu') or meta['cpu']}{isa}), {meta['threads']} thread(s), {meta['dtype']}; "
             "time ratio sparse / dense (median of interleaved calls; < 1 is faster; cold: a stack of layers "
             "> 4x the last-level cache)",
             f"{'pattern':<10} {'batch':>6} {'dense ms':>10} " + " ".join(f"{h:>18}" for h, _ in heads) + "  auto path"]
    for r in rows:
        cells = " ".join(f"{r[k]:>18.3f}" if k in r else f"{'-':>18}" for _, k in heads)
        lines.append(f"{r['pattern']:<10} {r['batch']:>6} {r['dense_median_ms']:>10.3f} {cells}  {r['auto_path']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- whole models


def _sparse_types() -> tuple[type, ...]:
    from .nn import SparseConv2d, SparseLinear

    return SparseLinear, SparseConv2d


def pack_model(model: nn.Module) -> nn.Module:
    """A packed copy of ``model`` in eval mode: every sparse layer holds its compressed weights only."""
    packed = copy.deepcopy(model).eval()
    for mod in packed.modules():
        if isinstance(mod, _sparse_types()):
            mod.pack()
    return packed


def masked_linear_stack(layers: int, width: int, pattern: str = "2:4", seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(dense, packed): ``layers`` ``width x width`` ``nn.Linear`` layers in a ``Sequential`` (eval mode) whose
    weights carry the N:M mask of ``pattern``, and a packed copy of it (:func:`nmkern.sparsify`); both compute the
    same function, so they time the same work."""
    from .functional import apply_nm
    from .sparsify import sparsify

    spec = parse_spec(pattern)
    if not isinstance(spec, NMSpec):
        raise ValueError(f"masked_linear_stack: an N:M pattern like '2:4', got {pattern!r}")
    torch.manual_seed(seed)
    dense = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).eval()
    with torch.no_grad():
        for lin in dense:
            lin.weight.copy_(apply_nm(lin.weight, spec.n, spec.m, dim=1, backend="reference"))
    packed = copy.deepcopy(dense)
    sparsify(packed, pattern, pack=True)
    return dense, packed.eval()


def force_backend(model: nn.Module, backend: str) -> nn.Module:
    """A copy of a (packed) model whose sparse layers all run ``backend`` (e.g. "cpu")."""
    out = copy.deepcopy(model)
    for mod in out.modules():
        if isinstance(mod, _sparse_types()):
            mod.backend = backend  # checked, and a native path's weight layout built now
    return out


def packed_variants(dense: nn.Module, packed: nn.Module) -> dict[str, nn.Module]:
    """The models to time against each other: ``dense``, ``packed_auto`` (dispatch decides) and, when
    nmkern's CPU kernels load, ``packed_cpu_kernel`` (every sparse layer forced onto them); eval mode."""
    from .dispatch import cpu_kernels

    models = {"dense": dense.eval(), "packed_auto": packed.eval()}
    if cpu_kernels() is not None:
        models["packed_cpu_kernel"] = force_backend(packed, "cpu").eval()
    return models


def settle_dispatch(model: nn.Module, example) -> None:
    """Finish the path measurements of ``model``'s packed ``auto`` layers on ``example`` before it is timed
    (:func:`nmkern.tune`; nothing when measuring is off or no layer measures): timings are of the decided
    paths, not of the exploration calls that decide them."""
    from . import tuning
    from .backend import Backend

    auto = any(isinstance(m, _sparse_types()) and m.is_packed and str(m.backend) == Backend.AUTO.value
               for m in model.modules())
    if auto and tuning.enabled():
        tuning.tune(model, example)


def time_models(models: Mapping[str, nn.Module], x: torch.Tensor, *, seconds: float,
                reference: nn.Module | None = None, baseline: str = "dense",
                diff_key: str = "max_abs_diff") -> dict:
    """Forward passes of ``models`` on ``x``, timed interleaved (warm cache): ``repeats`` and
    :func:`timing.columns`; with ``reference``, ``{name}_{diff_key}`` = max |output - reference(x)|
    for every model but the baseline."""
    for m in models.values():
        settle_dispatch(m, x)
    with torch.no_grad():
        times = timing.time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, seconds=seconds)
        row = {"repeats": times[baseline].repeats} | timing.columns(times, baseline=baseline)
        if reference is not None:
            ref = reference.eval()(x)
            for k, m in models.items():
                if k != baseline:
                    row[f"{k}_{diff_key}"] = float((m(x) - ref).abs().max())
    return row


__all__ = [
    "LinearPattern", "bench_linear", "force_backend", "format_bench_table", "linear_candidates", "masked_weight",
    "pack_model", "packed_variants", "parse_pattern", "settle_dispatch", "time_models",
]
