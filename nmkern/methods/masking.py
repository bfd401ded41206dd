"""Mask bookkeeping shared by the training methods (GaP, 1xN block pruning).

A training method works on plain ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
modules and keeps one boolean keep-mask per prunable layer in a
:class:`MaskSet`. The training loop zeroes masked gradients before each
optimizer step and masked weights after it, so a pruned weight stays exactly
0.0 (and its momentum stays 0) until its layer is grown again.

Targets (a :class:`~nmkern.spec.Pattern` and, per layer, a spec of :mod:`nmkern.spec`):

- ``unstructured`` (:class:`~nmkern.spec.UnstructuredSpec`): the ``floor(sparsity * numel)``
  smallest |w| of the layer go (ties to the lower flat index);
- ``nm`` (:class:`~nmkern.spec.NMSpec`): :func:`nmkern.nm_mask` along the input features
  (Linear, ``dim=-1``) or the input channels (Conv, ``dim=1``), uniform ``(n, m)`` or per
  layer from a ``Scheme`` / any ``Mapping[name or glob, (n, m)]``;
- ``1xn`` (:class:`~nmkern.spec.BlockSpec`): :func:`nmkern.block_mask_1xn` blocks of
  ``block`` output channels, rearranged per layer when ``BlockSpec.rearrange``.

Per-layer sparsity (:class:`Distribution`): ``uniform`` (every layer the same),
``erk`` (Erdos-Renyi-Kernel, as in RigL: density proportional to
``sum(shape) / prod(shape)``, scaled so the prunable weights as a whole meet the
target), or a ``Mapping[str, float]`` given by the user.

``Target`` and ``LayerTarget`` (nmkern 0.1) are deprecated aliases of
:class:`~nmkern.spec.Pattern` and :class:`~nmkern.spec.LayerSpec`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from .. import _validate as v
from .._moved import renamed_attribute
from ..functional import BlockCriterion, block_mask_1xn, nm_mask
from ..reference.block_1xn import drop_lowest_fraction
from ..spec import BlockSpec, LayerSpec, NMSpec, Pattern, SpecResolver, UnstructuredSpec, check_block, pattern_in
from .loop import train_epochs

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
TARGETS = (Pattern.UNSTRUCTURED, Pattern.NM, Pattern.BLOCK)  # what a mask can enforce

_DEPRECATED = {"Target": (Pattern, "nmkern.spec.Pattern"), "LayerTarget": (LayerSpec, "nmkern.spec.LayerSpec "
                                                                         "(NMSpec, BlockSpec, UnstructuredSpec)")}


def __getattr__(name: str):
    return renamed_attribute(__name__, name, _DEPRECATED)


class Distribution(str, enum.Enum):
    UNIFORM = "uniform"
    ERK = "erk"


def describe(spec: LayerSpec) -> str:
    """A layer's target in words (part of the GaP checkpoint fingerprint: keep it stable)."""
    if spec.pattern is Pattern.NM:
        return f"{spec.n}:{spec.m}"
    if spec.pattern is Pattern.BLOCK:
        return f"1x{spec.block} {spec.sparsity:.3f}{' rearranged' if spec.rearrange else ''}"
    return f"unstructured {spec.sparsity:.3f}"


def _parse_enum(op: str, name: str, enum_cls, value):
    try:
        return enum_cls(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"{op}: unknown {name} {value!r}; choose one of {[e.value for e in enum_cls]}") from None


def _parse_target(op: str, target) -> Pattern:
    pattern = pattern_in(target, TARGETS)
    if pattern is None:
        raise ValueError(f"{op}: unknown target {target!r}; choose one of {[t.value for t in TARGETS]}")
    return pattern


def group_dim(module: nn.Module) -> int:
    """Dimension N:M groups run along: in_features for Linear, input channels for Conv."""
    return -1 if isinstance(module, nn.Linear) else 1


def prunable_layers(op: str, model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """``{name: module}`` in model order: the named layers, or every Linear/Conv1d/Conv2d."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    found = {name: mod for name, mod in model.named_modules() if isinstance(mod, PRUNABLE_TYPES)}
    if layers is None:
        if not found:
            raise ValueError(f"{op}: the model has no nn.Linear / nn.Conv1d / nn.Conv2d layer to prune")
        return found
    if isinstance(layers, str):
        raise TypeError(f"{op}: layers must be an iterable of layer names, got the single string {layers!r}; wrap it in a list")
    wanted = list(layers)
    if not wanted:
        raise ValueError(f"{op}: layers is empty; name at least one layer or pass layers=None for all")
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise ValueError(f"{op}: unknown or non-prunable layers {unknown}; prunable layers are {list(found)}")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"{op}: layers lists a name twice: {wanted}")
    chosen = set(wanted)
    return {name: mod for name, mod in found.items() if name in chosen}


def erk_sparsities(layers: Mapping[str, nn.Module], sparsity: float) -> dict[str, float]:
    """Per-layer sparsity with density ~ sum(shape)/prod(shape), meeting ``sparsity`` overall.

    Layers whose scaled density would exceed 1 are kept dense and the rest rescaled
    (the RigL recipe), so the total number of kept weights is (1 - sparsity) * total.
    """
    numel = {k: mod.weight.numel() for k, mod in layers.items()}
    raw = {k: sum(mod.weight.shape) / numel[k] for k, mod in layers.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = (1.0 - sparsity) * total - sum(numel[k] for k in dense)
        free = [k for k in layers if k not in dense]
        scale = budget / sum(raw[k] * numel[k] for k in free)
        over = [k for k in free if raw[k] * scale > 1.0]
        if not over:
            break
        dense.update(over)
    return {k: 0.0 if k in dense else 1.0 - raw[k] * scale for k in layers}


def resolve_targets(
    op: str,
    layers: Mapping[str, nn.Module],
    target: Pattern | str,
    *,
    sparsity: float | Mapping[str, float] | None = None,
    n: int | None = None,
    m: int | None = None,
    scheme: Mapping[str, tuple[int, int]] | None = None,
    block: int | None = None,
    rearrange: bool | Iterable[str] | Mapping[str, bool] = False,
    distribution: Distribution | str = Distribution.UNIFORM,
) -> dict[str, LayerSpec]:
    """One spec (:class:`~nmkern.spec.NMSpec`, :class:`~nmkern.spec.BlockSpec` or
    :class:`~nmkern.spec.UnstructuredSpec`) per layer, every argument checked against every layer's shape."""
    target = _parse_target(op, target)
    distribution = _parse_enum(op, "distribution", Distribution, distribution)
    if target is Pattern.NM:
        if sparsity is not None:
            raise ValueError(f"{op}: target='nm' takes n and m (or scheme=), not sparsity={sparsity!r}")
        return _nm_specs(op, layers, n, m, scheme)
    if n is not None or m is not None or scheme is not None:
        raise ValueError(f"{op}: n, m and scheme belong to target='nm'; target={target.value!r} takes sparsity=")
    per_layer = _layer_sparsities(op, layers, target, sparsity, distribution)
    if target is Pattern.UNSTRUCTURED:
        if block is not None:
            raise ValueError(f"{op}: block= belongs to target='1xn'")
        return {k: UnstructuredSpec(s) for k, s in per_layer.items()}
    return _block_specs(op, layers, per_layer, block, rearrange)


def _nm_specs(op: str, layers: Mapping[str, nn.Module], n, m, scheme) -> dict[str, NMSpec]:
    """Uniform ``(n, m)`` or one pattern per layer from ``scheme`` (names or globs), checked against the shapes."""
    if scheme is not None:
        if n is not None or m is not None:
            raise ValueError(f"{op}: pass either scheme= or n and m, not both")
        if not isinstance(scheme, Mapping):
            raise TypeError(f"{op}: scheme must be a Mapping[str, (n, m)] such as nmkern.Scheme, got {type(scheme).__name__}")
        specs = SpecResolver(scheme, op=op, allowed=[Pattern.NM]).resolve(layers)
        missing = [k for k, spec in specs.items() if spec is None]
        if missing:
            raise ValueError(f"{op}: the scheme has no (n, m) for layers {missing}; give every prunable layer an entry")
        dense = [k for k, spec in specs.items() if spec.pattern is Pattern.DENSE]
        if dense:
            raise ValueError(f"{op}: the scheme keeps layers {dense} dense (None); leave them out with layers=[...]")
    else:
        if n is None or m is None:
            raise ValueError(f"{op}: target='nm' needs n and m (e.g. n=2, m=4) or a scheme=")
        spec = NMSpec(*v.check_nm(op, n, m))
        specs = {k: spec for k in layers}
    for k, spec in specs.items():
        w = layers[k].weight
        size = w.shape[group_dim(layers[k])]
        if size % spec.m:
            raise ValueError(
                f"{op}: layer {k!r} (weight {tuple(w.shape)}) has {size} input features/channels, not divisible by "
                f"m={spec.m}; leave it out with layers=[...] or choose an m that divides {size}"
            )
    return specs


def _layer_sparsities(op: str, layers: Mapping[str, nn.Module], target: Pattern, sparsity,
                      distribution: Distribution) -> dict[str, float]:
    """The sparsity of every layer: one float (uniform or ERK-distributed) or a per-layer mapping."""
    if sparsity is None:
        raise ValueError(f"{op}: target={target.value!r} needs sparsity= (a float in [0, 1) or a per-layer mapping)")
    if isinstance(sparsity, Mapping):
        if distribution is not Distribution.UNIFORM:
            raise ValueError(f"{op}: a per-layer sparsity mapping already fixes the distribution; drop distribution={distribution.value!r}")
        missing = [k for k in layers if k not in sparsity]
        if missing:
            raise ValueError(f"{op}: the sparsity mapping has no entry for layers {missing}")
        return {k: v.check_fraction(f"{op} (layer {k!r})", "sparsity", sparsity[k]) for k in layers}
    s = v.check_fraction(op, "sparsity", sparsity)
    return erk_sparsities(layers, s) if distribution is Distribution.ERK else {k: s for k in layers}


def _block_specs(op: str, layers: Mapping[str, nn.Module], per_layer: Mapping[str, float], block,
                 rearrange) -> dict[str, BlockSpec]:
    """1xN blocks of ``block`` output channels for every layer, checked against the shapes."""
    if block is None:
        raise ValueError(f"{op}: target='1xn' needs block=N, a positive int (e.g. 4), got None")
    check_block(op, block)
    rearranged = rearrange_set(op, layers, rearrange)
    out = {}
    for k in layers:
        out_ch = layers[k].weight.shape[0]
        if out_ch % block:
            raise ValueError(
                f"{op}: layer {k!r} has {out_ch} output channels, not divisible by block={block}; "
                f"leave it out with layers=[...] or pick a block size that divides {out_ch}"
            )
        if getattr(layers[k], "groups", 1) != 1:
            raise ValueError(f"{op}: layer {k!r} is a grouped convolution (groups={layers[k].groups}); 1xN blocks need groups=1")
        out[k] = BlockSpec(block, per_layer[k], rearrange=k in rearranged)
    return out


def rearrange_set(op: str, layers: Mapping[str, nn.Module], rearrange) -> set[str]:
    """Which layers get filter rearrangement: a bool for all, an iterable of names, or name -> bool."""
    if isinstance(rearrange, bool):
        return set(layers) if rearrange else set()
    if isinstance(rearrange, Mapping):
        names = [k for k, on in rearrange.items() if on]
        keys = list(rearrange)
    elif isinstance(rearrange, Iterable) and not isinstance(rearrange, str):
        names = keys = list(rearrange)
    else:
        raise TypeError(f"{op}: rearrange must be a bool, a list of layer names or a dict name -> bool, got {rearrange!r}")
    unknown = [k for k in keys if k not in layers]
    if unknown:
        raise ValueError(f"{op}: rearrange names layers {unknown} that are not being pruned; pruned layers: {list(layers)}")
    return set(names)


def _backend_for(w: torch.Tensor) -> str:
    # Training masks are recomputed a few times per run on small CPU weights: the
    # Triton interpreter (TRITON_INTERPRET=1 makes "auto" pick it) costs seconds per
    # call there, so CPU tensors use the pure-torch reference; CUDA gets the kernels.
    return "auto" if w.is_cuda else "reference"


def unstructured_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask without the floor(sparsity*numel) smallest |w| (ties: lower flat index goes first)."""
    return drop_lowest_fraction(w.detach().abs(), sparsity)


def compute_mask(module: nn.Module, spec: LayerSpec, *, criterion=BlockCriterion.L1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep-mask for ``module.weight`` that meets ``spec`` exactly."""
    w = module.weight.detach()
    if spec.pattern is Pattern.UNSTRUCTURED:
        return unstructured_mask(w, spec.sparsity)
    if spec.pattern is Pattern.NM:
        return nm_mask(w, spec.n, spec.m, dim=group_dim(module), backend=_backend_for(w))
    return block_mask_1xn(w, spec.block, spec.sparsity, rearrange=spec.rearrange, criterion=criterion,
                          generator=generator, backend=_backend_for(w))


def expected_kept(module: nn.Module, spec: LayerSpec) -> int:
    """Number of weights a mask meeting ``spec`` keeps."""
    numel = module.weight.numel()
    if spec.pattern is Pattern.NM:
        return numel // spec.m * spec.n
    if spec.pattern is Pattern.BLOCK:
        per_block = numel // (module.weight.shape[0] // spec.block * module.weight.shape[1])
        blocks = module.weight.shape[0] // spec.block * module.weight.shape[1]
        return (blocks - int(spec.sparsity * blocks)) * per_block
    return numel - int(spec.sparsity * numel)


def meets_target(module: nn.Module, spec: LayerSpec, mask: torch.Tensor) -> bool:
    """``mask`` has exactly the kept count of ``spec``, its pattern is valid and the weight is zero outside it."""
    w = module.weight.detach()
    if int(mask.sum()) != expected_kept(module, spec) or bool((w[~mask] != 0).any()):
        return False
    if spec.pattern is Pattern.NM:
        x = mask.movedim(group_dim(module), -1).reshape(-1, spec.m)
        return bool((x.sum(-1) == spec.n).all())
    if spec.pattern is Pattern.BLOCK:
        o, i = w.shape[0], w.shape[1]
        per_input = mask.reshape(o, i, -1)
        if not bool((per_input == per_input[:, :, :1]).all()):  # a block spans the whole kernel
            return False
        rows = per_input[:, :, 0]
        if not spec.rearrange:
            blocks = rows.reshape(o // spec.block, spec.block, i)
            return bool((blocks == blocks[:, :1]).all())
        # Rearranged: some filter order makes every block uniform, i.e. the output rows
        # split into groups of `block` identical rows: each distinct row occurs k*block times.
        _, counts = torch.unique(rows, dim=0, return_counts=True)
        return bool((counts % spec.block == 0).all())
    return True


class MaskSet:
    """Keep-masks for some layers of a model; a layer without a mask (None) is dense (grown)."""

    def __init__(self, layers: Mapping[str, nn.Module]):
        self.layers = dict(layers)
        self.masks: dict[str, torch.Tensor | None] = {k: None for k in self.layers}

    def set(self, name: str, mask: torch.Tensor | None) -> None:
        # Checkpoints and gathered worker masks arrive on the CPU: keep each mask on its weight's device.
        self.masks[name] = None if mask is None else mask.to(self.layers[name].weight.device)

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked weight."""
        for k, mask in self.masks.items():
            if mask is not None:
                self.layers[k].weight.mul_(mask)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        for k, mask in self.masks.items():
            g = self.layers[k].weight.grad
            if mask is not None and g is not None:
                g.mul_(mask)

    def prune_(self, names: Iterable[str], specs: Mapping[str, LayerSpec], **kw) -> None:
        """Recompute the masks of ``names`` from the current weights and apply them."""
        for k in names:
            self.masks[k] = compute_mask(self.layers[k], specs[k], **kw)
        self.apply_()

    def state(self) -> dict[str, torch.Tensor | None]:
        return {k: (None if mk is None else mk.clone()) for k, mk in self.masks.items()}

    def load(self, state: Mapping[str, torch.Tensor | None]) -> None:
        for k in self.masks:
            self.set(k, state[k])


def weight_sparsity(modules: Iterable[nn.Module]) -> float:
    """Fraction of exactly-zero weights over the given layers."""
    zeros = total = 0
    for mod in modules:
        zeros += int((mod.weight.detach() == 0).sum())
        total += mod.weight.numel()
    return zeros / total if total else 0.0


# ----------------------------------------------------------------------------- training loop


def _batches(data, batch_size: int, generator: torch.Generator):
    """Shuffled mini-batches of a (inputs, labels) tensor pair or an indexable Dataset."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
        return
    from torch.utils.data import default_collate

    order = torch.randperm(len(data), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        yield default_collate([data[i] for i in order[start:start + batch_size]])


def check_data(op: str, data) -> int:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if len(data[0]) != len(data[1]) or len(data[0]) == 0:
            raise ValueError(f"{op}: data inputs and labels must be non-empty and of equal length, got {len(data[0])} and {len(data[1])}")
        return len(data[0])
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        if len(data) == 0:
            raise ValueError(f"{op}: data is empty")
        return len(data)
    raise TypeError(f"{op}: data must be an (inputs, labels) tensor pair or a map-style Dataset, got {type(data).__name__}")


@dataclasses.dataclass
class TrainConfig:
    """SGD with momentum and a per-phase cosine learning-rate decay."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    loss_fn: object = None  # default: cross entropy

    def check(self, op: str) -> None:
        for name in ("lr", "momentum", "weight_decay"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 or not math.isfinite(x):
                raise ValueError(f"{op}: {name} must be a finite float >= 0, got {x!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"{op}: batch_size must be a positive int, got {self.batch_size!r}")


def train_masked(model: nn.Module, masks: MaskSet, data, epochs: int, *, seed: int, cfg: TrainConfig,
                 desc: str = "train", progress: bool = True, device=None) -> float:
    """Train ``epochs`` epochs keeping ``masks`` (pure function of model state, masks, data and seed).

    A fresh optimizer per call and a data order drawn from ``seed`` make each
    phase reproducible on its own, which is what checkpoint/resume relies on.
    Runs :func:`nmkern.methods.loop.train_epochs` (masked gradients zeroed before
    each step, masked weights after it). Returns the mean training loss per example
    of the last epoch.
    """
    if epochs <= 0:
        return float("nan")
    device = device or next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(check_data("train_masked", data) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    masks.apply_()
    with torch.random.fork_rng(devices=[]):  # dropout etc. seeded per phase, caller's RNG untouched
        torch.manual_seed(seed)
        epochs_out = train_epochs(model, lambda _: _batches(data, cfg.batch_size, gen), opt, epochs=epochs,
                                  loss_fn=cfg.loss_fn or nn.functional.cross_entropy, scheduler=sched,
                                  before_step=masks.mask_grads_, after_step=masks.apply_, device=device,
                                  steps_per_epoch=steps_per_epoch, progress=progress, desc=desc)
    return epochs_out[-1].per_example
