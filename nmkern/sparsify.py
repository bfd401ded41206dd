"""``nmkern.sparsify``: swap a model's ``nn.Linear`` / ``nn.Conv2d`` for sparse modules in place.

Scheme forms (parsed by :func:`nmkern.spec.parse_spec` / :class:`nmkern.spec.SpecResolver`):

* ``"2:4"``, ``(2, 4)`` or ``NMSpec(2, 4)``: every Linear / Conv2d gets that N:M pattern;
* ``"1x<block>:<sparsity>"`` (e.g. ``"1x4:0.5"``) or ``BlockSpec(4, 0.5)``: every layer gets
  1xN blocks (the nmkern 0.1 spelling ``"1xN:4:0.5"`` still works, with a DeprecationWarning);
* a Mapping ``{qualified name or glob: any of the above | "dense" | None}``
  (``nmkern.scheme.Scheme`` is one): an exact name wins over globs, then the first
  matching glob in the mapping's order; ``None`` keeps the layer dense; layers no key
  matches stay dense.

Layers whose shapes do not fit the pattern (in_features not divisible by m, out
channels not divisible by the block, grouped / depthwise convs, ...) are skipped
with a logged reason. The :class:`SparsifyReport` lists what was swapped and what
was skipped and why.

``LayerPattern``, ``parse_layer_pattern`` and ``_Resolver`` (nmkern 0.1) still work, with a
DeprecationWarning; use :mod:`nmkern.spec` instead.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch.nn as nn

from ._moved import renamed_attribute
from .backend import parse_backend
from .dispatch import LayerOp
from .nn import SparseConv2d, SparseLinear, fit_reason, spec_kwargs
from .reference.srste import DEFAULT_LAMBDA_W
from .spec import DENSE, LayerSpec, Pattern, SpecResolver, parse_spec

log = logging.getLogger("nmkern.sparsify")

_OP = "sparsify"
_ALLOWED = (Pattern.NM, Pattern.BLOCK)  # what SparseLinear / SparseConv2d carry


@dataclasses.dataclass(frozen=True)
class _LayerPattern:
    """nmkern 0.1's parsed per-layer pattern (deprecated: :class:`nmkern.spec.NMSpec` / :class:`~nmkern.spec.BlockSpec`)."""

    pattern: Pattern
    n: int = 2
    m: int = 4
    block: int = 4
    sparsity: float = 0.5

    @classmethod
    def from_spec(cls, spec: LayerSpec) -> "_LayerPattern | None":
        return None if spec is DENSE else cls(**spec_kwargs(spec, _OP))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.pattern is Pattern.NM else f"1x{self.block}:{self.sparsity:g}"

    def kwargs(self) -> dict:
        return {"pattern": self.pattern, "n": self.n, "m": self.m, "block": self.block, "sparsity": self.sparsity}


_NEW_SPELLING = "nmkern.spec (parse_spec, SpecResolver, NMSpec, BlockSpec)"


def _deprecated(old: str) -> None:
    warnings.warn(f"nmkern.sparsify.{old} is deprecated; use {_NEW_SPELLING} (the old name goes away in nmkern 0.3)",
                  DeprecationWarning, stacklevel=3)


def parse_layer_pattern(value, where: str = "scheme") -> _LayerPattern | None:
    """Deprecated: :func:`nmkern.spec.parse_spec` (``allowed=[NM, BLOCK]``) as nmkern 0.1's LayerPattern (None = dense)."""
    _deprecated("parse_layer_pattern")
    if isinstance(value, _LayerPattern):
        return value
    return _LayerPattern.from_spec(parse_spec(value, op=_OP, where=where, allowed=_ALLOWED))


class _Resolver(SpecResolver):
    """Deprecated: :class:`nmkern.spec.SpecResolver` whose ``lookup`` gives nmkern 0.1's ``(matched, LayerPattern)``."""

    def __init__(self, scheme):
        _deprecated("_Resolver")
        super().__init__(scheme, op=_OP, allowed=_ALLOWED)

    def lookup(self, name: str) -> tuple[bool, _LayerPattern | None]:
        spec = super().lookup(name)
        return spec is not None, None if spec is None else _LayerPattern.from_spec(spec)


def __getattr__(name: str):
    return renamed_attribute(__name__, name, {"LayerPattern": (_LayerPattern, _NEW_SPELLING)})


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


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    return f"Conv2d {module.in_channels}->{module.out_channels} k{tuple(module.kernel_size)}"


def _why_skip(module: nn.Module, spec: LayerSpec) -> str | None:
    kw = spec_kwargs(spec, _OP)
    fit = (kw["pattern"], kw.get("n"), kw.get("m"), kw.get("block"))
    if isinstance(module, nn.Linear):
        return fit_reason(LayerOp.LINEAR, module.in_features, module.out_features, *fit)
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
    return fit_reason(LayerOp.CONV2D, module.in_channels, module.out_channels, *fit, module.groups)


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
    parse_backend(_OP, backend)
    resolver = SpecResolver(scheme, op=_OP, allowed=_ALLOWED)
    if resolver.uniform is DENSE:
        raise ValueError(f"{_OP}: scheme {scheme!r} keeps every layer dense; give a pattern such as '2:4' or '1x4:0.5'")
    report = SparsifyReport(packed=bool(pack))
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) in (nn.Linear, nn.Conv2d) or (isinstance(mod, (nn.Linear, nn.Conv2d))
                                                          and not isinstance(mod, (SparseLinear, SparseConv2d)))]
    for name, module in targets:
        pat = resolver.lookup(name)
        if pat is None:
            reason = "not in the scheme (left dense)"
        elif pat is DENSE:
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
        new = cls.from_dense(module, backend=backend, srste=srste, lambda_w=lambda_w, **spec_kwargs(pat, _OP))
        new.train(module.training)
        if pack:
            new.pack()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        report.swapped.append((name, f"{_describe(module)} as {pat}"))
        log.info("sparsify: %s (%s) -> %s", name, _describe(module), pat)
    if resolver.is_mapping:
        report.unmatched_keys = resolver.unused_keys()
        for key in report.unmatched_keys:
            log.warning("sparsify: scheme key %r matched no Linear/Conv2d layer", key)
    return report
