"""``nmkern.sparsify``: swap a model's ``nn.Linear`` / ``nn.Conv2d`` for sparse modules in place.

Scheme forms:

* ``"2:4"`` or ``(2, 4)``: every Linear / Conv2d gets that N:M pattern;
* ``"1xN:<block>:<sparsity>"`` (e.g. ``"1xN:4:0.5"``): every layer gets 1xN blocks;
* a Mapping ``{qualified name or glob: (n, m) | "n:m" | "1xN:<block>:<sparsity>" | None}``
  (``nmkern.scheme.Scheme`` is one): an exact name wins over globs, then the first
  matching glob in the mapping's order; ``None`` keeps the layer dense; layers no key
  matches stay dense.

Layers whose shapes do not fit the pattern (in_features not divisible by m, out
channels not divisible by the block, grouped / depthwise convs, ...) are skipped
with a logged reason. The :class:`SparsifyReport` lists what was swapped and what
was skipped and why.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Mapping

import torch.nn as nn

from . import _validate as v
from .dispatch import LayerOp, parse_path
from .nn import Pattern, SparseConv2d, SparseLinear, fit_reason
from .reference.srste import DEFAULT_LAMBDA_W

log = logging.getLogger("nmkern.sparsify")

_OP = "sparsify"


@dataclasses.dataclass(frozen=True)
class LayerPattern:
    """A parsed per-layer pattern."""

    pattern: Pattern
    n: int = 2
    m: int = 4
    block: int = 4
    sparsity: float = 0.5

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.pattern is Pattern.NM else f"1x{self.block}:{self.sparsity:g}"

    def kwargs(self) -> dict:
        return {"pattern": self.pattern, "n": self.n, "m": self.m, "block": self.block, "sparsity": self.sparsity}


def parse_layer_pattern(value, where: str = "scheme") -> LayerPattern | None:
    """``(n, m)`` / ``"n:m"`` / ``"1xN:<block>:<sparsity>"`` / None -> LayerPattern (None = stay dense)."""
    if value is None:
        return None
    if isinstance(value, LayerPattern):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        n, m = v.check_nm(f"{_OP} ({where})", value[0], value[1])
        return LayerPattern(Pattern.NM, n, m)
    if isinstance(value, str):
        text = value.strip()
        parts = text.split(":")
        if parts[0].lower() == "1xn" and len(parts) == 3:
            try:
                block, sparsity = int(parts[1]), float(parts[2])
            except ValueError:
                block, sparsity = -1, -1.0
            if block >= 1:
                sparsity = v.check_fraction(f"{_OP} ({where})", "sparsity", sparsity)
                return LayerPattern(Pattern.ONE_BY_N, block=block, sparsity=sparsity)
        elif len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            n, m = v.check_nm(f"{_OP} ({where})", int(parts[0]), int(parts[1]))
            return LayerPattern(Pattern.NM, n, m)
    raise ValueError(f"{_OP}: {where} value {value!r} is not a pattern; use (n, m), 'n:m' (e.g. '2:4'), "
                     "'1xN:<block>:<sparsity>' (e.g. '1xN:4:0.5') or None to keep the layer dense")


@dataclasses.dataclass
class SparsifyReport:
    """What :func:`sparsify` did: ``swapped`` (name, pattern) and ``skipped`` (name, reason)."""

    swapped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unmatched_keys: list[str] = dataclasses.field(default_factory=list)
    packed: bool = False

    def __str__(self) -> str:
        lines = [f"nmkern.sparsify: {len(self.swapped)} layer(s) swapped"
                 f"{' and packed' if self.packed and self.swapped else ''}, {len(self.skipped)} skipped"]
        width = max([len(n) for n, _ in self.swapped + self.skipped] + [4])
        for name, pat in self.swapped:
            lines.append(f"  swapped  {name:<{width}}  {pat}")
        for name, reason in self.skipped:
            lines.append(f"  skipped  {name:<{width}}  {reason}")
        if self.unmatched_keys:
            lines.append(f"  scheme keys that matched no Linear/Conv2d: {', '.join(self.unmatched_keys)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "swapped": [{"name": n, "pattern": p} for n, p in self.swapped],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "unmatched_keys": list(self.unmatched_keys),
            "packed": self.packed,
        }


class _Resolver:
    """Maps a qualified layer name to its pattern (or None) under one scheme."""

    def __init__(self, scheme):
        self.uniform: LayerPattern | None = None
        self.table: dict[str, LayerPattern | None] = {}
        self.used: set[str] = set()
        if isinstance(scheme, Mapping):
            for key in scheme:
                if not isinstance(key, str):
                    raise TypeError(f"{_OP}: scheme keys must be layer names or globs (str), got {key!r}")
                self.table[key] = parse_layer_pattern(scheme[key], f"scheme[{key!r}]")
        elif isinstance(scheme, (str, tuple, list)):
            self.uniform = parse_layer_pattern(scheme)
            if self.uniform is None:
                raise ValueError(f"{_OP}: scheme is empty")
        else:
            raise TypeError(f"{_OP}: scheme must be 'n:m', (n, m), '1xN:<block>:<sparsity>' or a Mapping "
                            f"{{name or glob: pattern}}, got {type(scheme).__name__}")

    @property
    def is_mapping(self) -> bool:
        return self.uniform is None

    def lookup(self, name: str) -> tuple[bool, LayerPattern | None]:
        """(matched, pattern)."""
        if not self.is_mapping:
            return True, self.uniform
        if name in self.table:
            self.used.add(name)
            return True, self.table[name]
        for key, pat in self.table.items():
            if fnmatch.fnmatchcase(name, key):
                self.used.add(key)
                return True, pat
        return False, None


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    return f"Conv2d {module.in_channels}->{module.out_channels} k{tuple(module.kernel_size)}"


def _why_skip(module: nn.Module, pat: LayerPattern) -> str | None:
    if isinstance(module, nn.Linear):
        return fit_reason(LayerOp.LINEAR, module.in_features, module.out_features, pat.pattern, pat.n, pat.m, pat.block)
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
    return fit_reason(LayerOp.CONV2D, module.in_channels, module.out_channels, pat.pattern, pat.n, pat.m, pat.block,
                      module.groups)


def sparsify(model: nn.Module, scheme, *, backend="auto", srste: bool = True, lambda_w: float = DEFAULT_LAMBDA_W,
             pack: bool = False) -> SparsifyReport:
    """Swap ``model``'s ``nn.Linear`` / ``nn.Conv2d`` layers for :class:`~nmkern.SparseLinear` /
    :class:`~nmkern.SparseConv2d` in place, following ``scheme`` (see the module docstring).

    The new modules start in the training form (dense weight, mask in forward;
    ``srste``/``lambda_w`` set their SR-STE gradient); ``pack=True`` packs them
    for inference right away. Returns a :class:`SparsifyReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OP}: model must be an nn.Module, got {type(model).__name__}")
    if type(model) in (nn.Linear, nn.Conv2d):
        # A bare layer has no parent to swap it in.
        raise ValueError(f"{_OP}: model is itself an nn.{type(model).__name__}; wrap it (nn.Sequential(layer)) or "
                         "use SparseLinear.from_dense / SparseConv2d.from_dense")
    parse_path(_OP, backend)
    resolver = _Resolver(scheme)
    report = SparsifyReport(packed=bool(pack))
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) in (nn.Linear, nn.Conv2d) or (isinstance(mod, (nn.Linear, nn.Conv2d))
                                                          and not isinstance(mod, (SparseLinear, SparseConv2d)))]
    for name, module in targets:
        matched, pat = resolver.lookup(name)
        if not matched:
            reason = "not in the scheme (left dense)"
        elif pat is None:
            reason = "the scheme keeps it dense (None)"
        elif type(module) not in (nn.Linear, nn.Conv2d):
            reason = f"{type(module).__name__} subclasses nn.{type(module).__mro__[1].__name__}; only plain layers are swapped"
        else:
            reason = _why_skip(module, pat)
        if reason is not None:
            report.skipped.append((name, f"{_describe(module)}: {reason}"))
            log.info("sparsify: skipped %s (%s): %s", name, _describe(module), reason)
            continue
        cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
        new = cls.from_dense(module, backend=backend, srste=srste, lambda_w=lambda_w, **pat.kwargs())
        new.train(module.training)
        if pack:
            new.pack()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        report.swapped.append((name, f"{_describe(module)} as {pat}"))
        log.info("sparsify: %s (%s) -> %s", name, _describe(module), pat)
    if resolver.is_mapping:
        report.unmatched_keys = [k for k in resolver.table if k not in resolver.used]
        for key in report.unmatched_keys:
            log.warning("sparsify: scheme key %r matched no Linear/Conv2d layer", key)
    return report
