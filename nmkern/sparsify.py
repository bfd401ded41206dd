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


_SPARSE = (SparseLinear, SparseConv2d)
_MHA_OUT_PROJ = ("MultiheadAttention reads out_proj.weight directly (F.multi_head_attention_forward and its fused "
                 "fast path never call out_proj), so a sparse module there would be bypassed; left dense")
_MHA_RAW = ("a raw Parameter of MultiheadAttention, not an nn.Linear: sparse modules replace Linear/Conv2d layers "
            "only; left dense")


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def _shared_spec(module: nn.Module, names: list[str], resolver: SpecResolver):
    """The one spec the scheme gives every name of ``module`` (None: no name matched); refuses a conflict."""
    given = {name: spec for name in names if (spec := resolver.lookup(name)) is not None}
    if len(set(given.values())) > 1:
        listing = ", ".join(f"{n!r}: {'dense' if s is DENSE else s}" for n, s in given.items())
        raise ValueError(f"{_OP}: {', '.join(map(repr, names))} are one shared module ({_describe(module)}, the same "
                         f"object at each name), but the scheme gives them different patterns ({listing}); a module "
                         "has one weight and one pattern: give every name of it the same pattern (or None for dense)")
    return next(iter(given.values()), None)


def _skip_reason(model: nn.Module, module: nn.Module, names: list[str], spec) -> str | None:
    if spec is None:
        return "not in the scheme (left dense)"
    if spec is DENSE:
        return "the scheme keeps it dense (None)"
    if any(isinstance(_parent(model, n), nn.MultiheadAttention) and n.rpartition(".")[2] == "out_proj" for n in names):
        return _MHA_OUT_PROJ
    if type(module) not in (nn.Linear, nn.Conv2d):
        return f"{type(module).__name__} subclasses nn.{type(module).__mro__[1].__name__}; only plain layers are swapped"
    return _why_skip(module, spec)


def _plan(model: nn.Module, resolver: SpecResolver, report: SparsifyReport) -> list[tuple[nn.Module, list, object]]:
    """(module, every name it has in the model, spec) for each layer to swap; skipped layers go in the report."""
    groups: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):  # a shared module has one name per use
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and not isinstance(mod, _SPARSE):
            groups.setdefault(id(mod), (mod, []))[1].append(name)
    plan = []
    for module, names in groups.values():
        spec = _shared_spec(module, names, resolver)
        reason = _skip_reason(model, module, names, spec)
        if reason is None:
            plan.append((module, names, spec))
            continue
        for name in names:
            report.skipped.append((name, f"{_describe(module)}: {reason}"))
            log.info("sparsify: skipped %s (%s): %s", name, _describe(module), reason)
    return plan


def _check_plan(plan: list, pack: bool) -> None:
    """Refuse, before anything is swapped, tied weights given two patterns and pack=True on meta tensors."""
    owners: dict[int, tuple[str, object]] = {}
    for module, names, spec in plan:
        if pack and module.weight.is_meta:
            raise ValueError(f"{_OP}: pack=True needs real weights, but {names[0]}.weight is on the meta device "
                             "(shapes only, no values); sparsify without pack=True (the training form works on "
                             "meta), materialise the model (to_empty + load_state_dict), then pack()")
        first = owners.setdefault(id(module.weight), (names[0], spec))
        if first[1] != spec:
            raise ValueError(f"{_OP}: {first[0]!r} and {names[0]!r} share one weight Parameter (tied weights), but "
                             f"the scheme gives them {first[1]} and {spec}; a tied weight needs one mask rule: give "
                             f"both the same pattern, or keep one dense in the scheme (e.g. {{{names[0]!r}: None}})")


def _keep_fused_paths_off(model: nn.Module) -> None:
    """PyTorch's fused transformer kernels read ``linear1.weight`` / ``linear2.weight`` directly.

    ``TransformerEncoderLayer`` takes torch's fused path (``torch._transformer_encoder_layer_fwd``)
    in eval mode without grad only while ``activation_relu_or_gelu`` is set; it is a hint for that
    path alone (the layer's own forward uses ``self.activation``), so clearing it keeps a layer
    holding sparse modules on the modular path, which calls them. ``TransformerEncoder`` converts
    padded batches to nested tensors for the fused path only; that is turned off likewise.
    """
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and any(
                isinstance(getattr(mod, a, None), _SPARSE) for a in ("linear1", "linear2")):
            mod.activation_relu_or_gelu = 0
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder) and any(
                isinstance(sub, _SPARSE) for layer in mod.layers for sub in layer.modules()):
            mod.use_nested_tensor = False


def _report_raw_projections(model: nn.Module, resolver: SpecResolver, report: SparsifyReport) -> None:
    """MultiheadAttention's input projections are raw Parameters: say so where the scheme reaches them."""
    for name, mha in model.named_modules():
        if not isinstance(mha, nn.MultiheadAttention):
            continue
        raw = ("in_proj_weight",) if mha._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        for attr in raw:
            full = f"{name}.{attr}" if name else attr
            spec = resolver.lookup(full)
            if spec is not None and spec is not DENSE:
                shape = "x".join(map(str, getattr(mha, attr).shape))
                report.skipped.append((full, f"Parameter {shape}: {_MHA_RAW}"))
                log.info("sparsify: skipped %s: %s", full, _MHA_RAW)


def _swap(model: nn.Module, module: nn.Module, names: list[str], spec, report: SparsifyReport, pack: bool,
          **kw) -> None:
    cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
    new = cls.from_dense(module, **kw, **spec_kwargs(spec, _OP))
    # The module's own Parameters, not copies: tied weights stay tied, optimisers keep their references.
    new.weight = module.weight
    if module.bias is not None:
        new.bias = module.bias
    new.train(module.training)
    if pack:
        new.pack()
    for i, name in enumerate(names):  # a shared module: the same new module at every name
        setattr(_parent(model, name), name.rpartition(".")[2], new)
        shared = f" (the same module as {names[0]!r})" if i else ""
        report.swapped.append((name, f"{_describe(module)} as {spec}{shared}"))
        log.info("sparsify: %s (%s) -> %s%s", name, _describe(module), spec, shared)


def sparsify(model: nn.Module, scheme, *, backend="auto", srste: bool = True, lambda_w: float = DEFAULT_LAMBDA_W,
             pack: bool = False) -> SparsifyReport:
    """Swap ``model``'s ``nn.Linear`` / ``nn.Conv2d`` layers for :class:`~nmkern.SparseLinear` /
    :class:`~nmkern.SparseConv2d` in place, following ``scheme`` (see the module docstring).

    The new modules start in the training form (dense weight, mask in forward;
    ``srste``/``lambda_w`` set their SR-STE gradient) and hold the old layers' own
    Parameters (tied weights stay tied); ``pack=True`` packs them for inference right
    away. A module used at several names is swapped for one sparse module at all of
    them. Transformer layers holding sparse modules are kept off PyTorch's fused
    inference path (which would read the dense weights). Returns a :class:`SparsifyReport`.
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
    plan = _plan(model, resolver, report)
    _check_plan(plan, pack)  # refusals come before the model changes
    for module, names, spec in plan:
        _swap(model, module, names, spec, report, pack, backend=backend, srste=srste, lambda_w=lambda_w)
    _report_raw_projections(model, resolver, report)
    _keep_fused_paths_off(model)
    if resolver.is_mapping:
        report.unmatched_keys = resolver.unused_keys()
        for key in report.unmatched_keys:
            log.warning("sparsify: scheme key %r matched no Linear/Conv2d layer", key)
    return report
