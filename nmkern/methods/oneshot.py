"""One-shot N:M / 1xN pruning of a pretrained model from calibration inputs: magnitude, Wanda, SparseGPT.

:func:`prune_oneshot` prunes the selected ``nn.Linear`` / ``nn.Conv2d`` layers in place (they
keep their module type; ``swap=True`` then packs them as nmkern sparse layers). The per-layer
math is :mod:`.sparsegpt`; this module gathers each layer's input statistics with forward
hooks and runs the layers in forward order.

* Statistics are accumulated per layer, never stored as activations: ``H = 2 X^T X / rows``
  (SparseGPT) or the column sums of squares (Wanda), from ``torch.addmm`` over each batch.
  Layers that receive the same input tensor (q/k/v of attention, gate/up of an MLP) form one
  group and share one pass (and, for Linear layers, one ``H``): at most one group's statistics
  are alive at a time.
* ``sequential=True``: group by group in forward order, each from the inputs the already pruned
  groups produce (the reference code's block-by-block order, generalised). A pass stops the
  forward once the group's layers have seen their inputs, so group g costs the forward up to it.
  ``sequential=False``: every group from the dense model's inputs, applied at the end.
* A model whose targets all sit in one ``nn.ModuleList`` of repeated blocks (a transformer's layers)
  runs sequentially block by block instead, as the reference code does: the first block's inputs
  are cached for every batch, each block is calibrated on them group by group, pruned, and run
  once more to give the next block its inputs. Each block then runs about twice per batch, instead
  of the model up to every group (quadratic in depth); the price is one hidden-state tensor per
  calibration batch held in memory. A KV-cache object handed to a block is dropped.
* ``permute=True``: each N:M layer with a producer to fold into gets its input channels permuted first
  (:mod:`.permute`), its statistics permuted with them.
* Every failure (bad calibration input, NaN/Inf activations, a singular Hessian, Ctrl-C) restores
  every weight already changed: the model is left bit-identical.
"""

from __future__ import annotations

import dataclasses
import enum
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec import DENSE, BlockSpec, NMSpec, Pattern, SpecResolver, UnstructuredSpec
from .permute import apply_fold, find_folds, kept_score, search_permutation
from .sparsegpt import select_mask, sparsegpt_prune, wanda_score

_OP = "prune_oneshot"


class OneShotMethod(str, enum.Enum):
    """How :func:`prune_oneshot` chooses and corrects the kept weights."""

    MAGNITUDE = "magnitude"  # the n largest |w| of every m inputs; no calibration statistics
    WANDA = "wanda"  # |w| * ||X_j||_2 (Sun et al. 2023)
    SPARSEGPT = "sparsegpt"  # OBS masks and weight updates (Frantar & Alistarh 2023)


@dataclasses.dataclass
class OneShotReport:
    """What :func:`prune_oneshot` did: per pruned layer (name, shape, pattern, kept fraction, seconds)."""

    method: OneShotMethod
    layers: list[dict] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unmatched_keys: list[str] = dataclasses.field(default_factory=list)
    calibration_batches: int = 0
    seconds: float = 0.0
    blocks: str = ""  # the repeated blocks calibrated one by one from cached inputs, if any
    # permute=True: per consumer layer its producers, kept score before/after, and the permutation of the producers' rows
    permuted: list[dict] = dataclasses.field(default_factory=list)
    unpermuted: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # permute=True: name, why not

    def __str__(self) -> str:
        lines = [f"nmkern.prune_oneshot ({self.method.value}): {len(self.layers)} layer(s) pruned, "
                 f"{len(self.skipped)} skipped, {self.calibration_batches} calibration batch(es), {self.seconds:.1f} s"]
        width = max([len(r["name"]) for r in self.layers] + [len(n) for n, _ in self.skipped] + [4])
        lines += [f"  pruned   {r['name']:<{width}}  {r['pattern']}  kept {r['density']:.3f}" for r in self.layers]
        lines += [f"  skipped  {n:<{width}}  {why}" for n, why in self.skipped]
        lines += [f"  permuted {r['name']:<{width}}  into {', '.join(r['producers'])}: kept score "
                  f"{r['kept_before']:.4g} -> {r['kept_after']:.4g}" for r in self.permuted]
        lines += [f"  unpermuted {n:<{width}}  {why}" for n, why in self.unpermuted]
        return "\n".join(lines)


class _StopForward(Exception):
    """Raised by a hook once the group being calibrated has seen this batch: the rest of the forward is not needed."""


class _BadActivation(Exception):
    def __init__(self, name: str, what: str):
        super().__init__(name, what)
        self.name, self.what = name, what


@dataclasses.dataclass
class _Target:
    module: nn.Module
    names: list[str]
    spec: object
    calls: int = 0  # calls per forward of a calibration batch (the recording pass counts them)


@dataclasses.dataclass
class _BlockInput:
    """One calibration batch's call of a repeated block (a transformer layer): its args and kwargs."""

    args: tuple
    kwargs: dict


def _call(model: nn.Module, batch):
    if isinstance(batch, _BlockInput):
        return model(*batch.args, **batch.kwargs)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(**batch)


def _batches(calib) -> list:
    """The calibration batches, read once and checked for their kind."""
    if calib is None or isinstance(calib, (str, bytes)):
        raise TypeError(f"{_OP}: calib must be an iterable of model inputs, got {type(calib).__name__}")
    batches = [calib] if isinstance(calib, torch.Tensor) and calib.dim() == 0 else list(calib)
    if not batches:
        raise ValueError(f"{_OP}: calib is empty; give an iterable of model inputs (e.g. a list of 8-128 batches)")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, tuple, list, dict)):
            raise TypeError(f"{_OP}: calibration batch {i} is a {type(batch).__name__}; a batch must be a tensor "
                            "(model(x)), a tuple/list (model(*b)) or a dict (model(**b))")
    return batches


def _plan(model: nn.Module, scheme, layers) -> tuple[list[_Target], OneShotReport]:
    """The layers to prune; refuses (ValueError) a matched layer the pattern cannot fit."""
    from ..sparsify import SparsifyReport
    from ..sparsify import _plan as sparsify_plan

    resolver = SpecResolver(scheme, op=_OP, allowed=(Pattern.NM, Pattern.BLOCK, Pattern.UNSTRUCTURED))
    sreport = SparsifyReport()
    plan = sparsify_plan(model, _UnstructuredAsDense(resolver), sreport)
    skipped = []
    for name, reason in sreport.skipped:
        spec = resolver.lookup(name)
        if isinstance(spec, UnstructuredSpec):  # any plain Linear / Conv2d takes it (no packed form needed)
            module, parent = model.get_submodule(name), model.get_submodule(name.rpartition(".")[0])
            if type(module) in (nn.Linear, nn.Conv2d) and not isinstance(parent, nn.MultiheadAttention):
                entry = next((e for e in plan if e[0] is module), None)
                if entry is None:
                    plan.append((module, [name], spec))
                else:
                    entry[1].append(name)
                continue
            reason = f"{type(module).__name__} inside {type(parent).__name__}: only plain Linear / Conv2d are pruned"
        if isinstance(spec, (NMSpec, BlockSpec)) and "MultiheadAttention" not in reason:
            raise ValueError(f"{_OP}: layer {name!r} cannot take {spec}: {reason}; keep it dense with a mapping "
                             f"scheme ({{{name!r}: None, ...}}) or choose a pattern it fits")
        skipped.append((name, reason))
    wanted = None if layers is None else set(layers)
    targets = []
    for module, names, spec in plan:
        if wanted is not None and not wanted & set(names):
            skipped += [(n, "not in layers=") for n in names]
            continue
        if module.weight.is_meta or not module.weight.is_floating_point():
            raise ValueError(f"{_OP}: layer {names[0]!r} has no float weight values ({module.weight.dtype} on "
                             f"{module.weight.device}); materialise the model first")
        targets.append(_Target(module, list(names), spec))
    if wanted is not None:
        known = {n for t in targets for n in t.names} | {n for n, _ in skipped}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"{_OP}: layers={unknown} name no Linear/Conv2d of the model")
    report = OneShotReport(OneShotMethod.MAGNITUDE, skipped=skipped)
    report.unmatched_keys = resolver.unused_keys() if resolver.is_mapping else []
    return targets, report


class _UnstructuredAsDense:
    """The scheme as sparsify's planner sees it: unstructured layers dense (it plans packed forms only);
    :func:`_plan` takes them back."""

    def __init__(self, resolver: SpecResolver):
        self.resolver = resolver

    def lookup(self, name: str):
        spec = self.resolver.lookup(name)
        return DENSE if isinstance(spec, UnstructuredSpec) else spec

    def __getattr__(self, attr):
        return getattr(self.resolver, attr)


def _input_key(x: torch.Tensor) -> tuple:
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)


def _record(model: nn.Module, targets: list[_Target], batch) -> list[list[_Target]]:
    """Run one batch; count each target's calls; group targets called in a row on the same input tensor."""
    order: list[tuple[_Target, tuple]] = []
    by_id = {id(t.module): t for t in targets}
    for t in targets:
        t.calls = 0
    last: list = [None]  # the previous call's input, held so that its memory cannot be reused by the next one

    def hook(module, args):
        target = by_id[id(module)]
        target.calls += 1
        if target.calls == 1:
            order.append((target, _input_key(args[0])))
        last[0] = args[0]

    handles = [t.module.register_forward_pre_hook(hook) for t in targets]
    try:
        with torch.no_grad():
            _call(model, batch)
    except Exception as e:
        raise ValueError(f"{_OP}: the model rejects calibration batch 0 ({type(e).__name__}: {e}); give batches "
                         "the model takes: a tensor (model(x)), a tuple (model(*b)) or a dict (model(**b))") from None
    finally:
        for h in handles:
            h.remove()
    groups: list[list[_Target]] = []
    prev = None
    for target, key in order:
        if groups and key == prev:
            groups[-1].append(target)
        else:
            groups.append([target])
        prev = key
    return groups


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's GEMM input rows ``(rows, K)`` in fp32 (a conv's im2col columns in PyTorch's order)."""
    if isinstance(module, nn.Conv2d):
        x4 = x if x.dim() == 4 else x.unsqueeze(0)
        cols = F.unfold(x4.float(), module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1]).float()


def _stat_key(module: nn.Module):
    """Linear layers of one group see one input tensor: they share one accumulator (one ``H``)."""
    return ("linear", module.in_features) if isinstance(module, nn.Linear) else id(module)


class _Stats:
    """Accumulators for one group: ``2 X^T X`` (SparseGPT) or column sums of squares (Wanda)."""

    def __init__(self, group: list[_Target], method: OneShotMethod, key=_stat_key):
        self.method, self.group, self.key = method, group, key  # key(module): which accumulator it feeds
        self.sums: dict = {}
        self.rows: dict = {}
        self.seen: dict[int, int] = {}  # calls per module in this batch
        self.last: dict = {}  # the input an accumulator last took in this batch

    def new_batch(self) -> None:
        self.seen.clear()
        self.last.clear()

    def hook(self, module, args):
        key, inp = self.key(module), _input_key(args[0])
        held = self.last.get(key)
        if held is None or held[0] != inp:  # not the tensor a group sibling already accumulated
            self._accumulate(module, key, args[0])
            self.last[key] = (inp, args[0])  # held: its memory cannot be reused by another input meanwhile
        self.seen[id(module)] = self.seen.get(id(module), 0) + 1
        if all(self.seen.get(id(t.module), 0) >= t.calls for t in self.group):
            raise _StopForward

    def _accumulate(self, module, key, inp: torch.Tensor) -> None:
        x = _rows(module, inp.detach())
        if not bool(torch.isfinite(x).all()):
            raise _BadActivation(next(t.names[0] for t in self.group if t.module is module), "NaN/Inf")
        if key not in self.sums:
            k = x.shape[1]
            self.sums[key] = torch.zeros((k, k) if self.method is OneShotMethod.SPARSEGPT else (k,), device=x.device)
            self.rows[key] = 0
        if self.method is OneShotMethod.SPARSEGPT:
            self.sums[key].addmm_(x.t(), x, alpha=2.0)
        else:
            self.sums[key].add_((x * x).sum(0))
        self.rows[key] += x.shape[0]

    def result(self, target: _Target) -> torch.Tensor:
        key = self.key(target.module)
        if key not in self.sums:
            raise ValueError(f"{_OP}: layer {target.names[0]!r} saw no calibration input")
        return self.sums[key] / max(self.rows[key], 1)


def _gather(model: nn.Module, group: list[_Target], batches: list, method: OneShotMethod, key=_stat_key) -> _Stats:
    stats = _Stats(group, method, key)
    handles = [t.module.register_forward_pre_hook(stats.hook) for t in group]
    try:
        for i, batch in enumerate(batches):
            stats.new_batch()
            try:
                with torch.no_grad():
                    _call(model, batch)
            except _StopForward:
                pass
            except _BadActivation:
                raise
            except Exception as e:
                raise ValueError(f"{_OP}: the model rejects calibration batch {i} ({type(e).__name__}: {e})") from None
    finally:
        for h in handles:
            h.remove()
    return stats


def _shared_rows(group: list[_Target], method: OneShotMethod) -> list[list[_Target]]:
    """SparseGPT: Linear layers of a group with one ``H`` and one pattern are pruned as one matrix (their rows
    stacked: q/k/v, gate/up), since OBS treats every row alone under a shared ``H``; one column loop instead of
    three. Everything else alone (a 1xN mask is chosen per layer, over all its blocks)."""
    if method is not OneShotMethod.SPARSEGPT:
        return [[t] for t in group]
    runs: dict = {}
    for t in group:
        key = (_stat_key(t.module), str(t.spec), t.module.weight.dtype) \
            if isinstance(t.module, nn.Linear) and isinstance(t.spec, NMSpec) else id(t)
        runs.setdefault(key, []).append(t)
    return list(runs.values())


def _new_weights(targets: list[_Target], method: OneShotMethod, stats: _Stats | None, blocksize: int,
                 damp: float) -> list[torch.Tensor]:
    """The pruned weights of ``targets`` (several only for :func:`_shared_rows`' stacked Linear layers)."""
    ws = [t.module.weight.detach() for t in targets]
    if method is OneShotMethod.SPARSEGPT:
        first = targets[0]
        w2 = torch.cat([w.reshape(w.shape[0], -1) for w in ws]) if len(ws) > 1 else ws[0].reshape(ws[0].shape[0], -1)
        names = ", ".join(repr(t.names[0]) for t in targets)
        new = sparsegpt_prune(f"{_OP}: layer {names}", w2, stats.result(first), first.spec,
                              (w2.shape[0],) + tuple(ws[0].shape[1:]), blocksize=blocksize, damp=damp)
        return [part.reshape(w.shape) for part, w in zip(new.split([w.shape[0] for w in ws]), ws)]
    (target,), (w,) = targets, ws
    w2 = w.reshape(w.shape[0], -1)
    score = wanda_score(w2, stats.result(target).sqrt()) if method is OneShotMethod.WANDA else w2.abs().float()
    keep = select_mask(score, target.spec, tuple(w.shape), per_row=method is OneShotMethod.WANDA)
    return [torch.where(keep, w2, torch.zeros((), dtype=w.dtype, device=w.device)).reshape(w.shape)]


def _find_blocks(model: nn.Module, targets: list[_Target]) -> tuple[str, nn.ModuleList, list] | None:
    """The ``nn.ModuleList`` of repeated blocks (transformer layers) holding every target, with the targets of
    each block in order; None when no such list exists (the targets then run on the whole model)."""
    for name, mods in model.named_modules():
        if not isinstance(mods, nn.ModuleList) or len(mods) < 2:
            continue
        owner = {id(m): i for i, block in enumerate(mods) for m in block.modules()}
        if all(id(t.module) in owner for t in targets):
            per_block = [[t for t in targets if owner[id(t.module)] == i] for i in range(len(mods))]
            return name, mods, per_block
    return None


def _block_inputs(model: nn.Module, first: nn.Module, batches: list) -> list[_BlockInput]:
    """The first block's args/kwargs for every batch (the forward stops there). A KV cache object handed to
    the block is dropped: running the block again on a cache would grow it."""
    cached: list[_BlockInput] = []

    def hook(module, args, kwargs):
        kwargs = {k: (None if type(v).__name__.endswith("Cache") else v) for k, v in kwargs.items()}
        cached.append(_BlockInput(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            try:
                with torch.no_grad():
                    _call(model, batch)
            except _StopForward:
                pass
            except Exception as e:
                raise ValueError(f"{_OP}: the model rejects calibration batch {i} ({type(e).__name__}: {e})") from None
    finally:
        handle.remove()
    if len(cached) != len(batches) or not all(c.args and isinstance(c.args[0], torch.Tensor) for c in cached):
        return []  # the block is not called once per batch with its hidden state first: use the whole model
    return cached


def _next_inputs(block: nn.Module, cached: list[_BlockInput]) -> list[_BlockInput]:
    """The next block's inputs: this (pruned) block's output in place of the hidden state."""
    out = []
    with torch.no_grad():
        for c in cached:
            y = block(*c.args, **c.kwargs)
            y = y[0] if isinstance(y, (tuple, list)) else y
            if not isinstance(y, torch.Tensor) or y.shape != c.args[0].shape:
                raise ValueError(f"{_OP}: a block returned {type(y).__name__} {getattr(y, 'shape', '')}, not its "
                                 "input's shape; prune with sequential=False")
            out.append(_BlockInput((y,) + c.args[1:], c.kwargs))
    return out


def _run_groups(runner: nn.Module, groups: list, batches: list, ctx: dict) -> None:
    """Calibrate, prune and (sequential) apply each group on ``runner`` (the model, or one block)."""
    method = ctx["method"]
    for group in groups:
        stats = None if method is OneShotMethod.MAGNITUDE else _gather(runner, group, batches, method)
        if ctx["folds"] is not None:
            for target in group:
                _permute(target, group, stats, ctx)
        for targets in _shared_rows(group, method):
            t0 = time.perf_counter()
            news = _new_weights(targets, method, stats, ctx["blocksize"], ctx["damp"])
            seconds = (time.perf_counter() - t0) / len(targets)
            ctx["pending"] += [(t, new, seconds) for t, new in zip(targets, news)]
        del stats
        if ctx["sequential"]:
            _apply(ctx["pending"], ctx["backup"], ctx["report"])
        ctx["bar"].update(len(group))


def _by_blocks(model: nn.Module, targets: list[_Target], batches: list, ctx: dict) -> bool:
    """Sequential pruning block by block from cached block inputs (each block runs twice per batch, instead of
    the model up to each group); False when the model has no such blocks (nothing was changed then)."""
    found = _find_blocks(model, targets)
    if found is None:
        return False
    name, blocks, per_block = found
    cached = _block_inputs(model, blocks[0], batches)
    if not cached:
        return False
    ctx["report"].blocks = f"{name} ({len(blocks)} blocks)"
    ctx["bar"].reset(total=len(targets))
    for i, block in enumerate(blocks):
        if per_block[i]:
            groups = _record(block, per_block[i], cached[0])
            reached = {id(t.module) for g in groups for t in g}
            ctx["report"].skipped += [(t.names[0], "not reached by the calibration inputs") for t in per_block[i]
                                      if id(t.module) not in reached]
            _run_groups(block, groups, cached, ctx)
        if i + 1 < len(blocks):
            cached = _next_inputs(block, cached)
    return True


def _check_args(method, blocksize, damp, permute) -> OneShotMethod:
    try:
        method = OneShotMethod(method)
    except ValueError:
        raise ValueError(f"{_OP}: unknown method {method!r}; choose one of "
                         f"{[m.value for m in OneShotMethod]}") from None
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{_OP}: blocksize must be a positive int, got {blocksize!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < 10:
        raise ValueError(f"{_OP}: damp must be a number in [0, 10), got {damp!r} (the usual value is 0.01)")
    return method


def prune_oneshot(model: nn.Module, calib, scheme, method="sparsegpt", *, layers=None, blocksize: int = 128,
                  damp: float = 0.01, sequential: bool = True, permute: bool = False, swap: bool = False,
                  progress: bool = True) -> OneShotReport:
    """Prune ``model``'s Linear / Conv2d layers to ``scheme`` in one shot, in place; returns a :class:`OneShotReport`.

    ``calib``: an iterable of model inputs (a tensor: ``model(x)``; a tuple/list: ``model(*b)``; a
    dict: ``model(**b)``), read once and kept for the passes. ``scheme``: what
    :func:`nmkern.sparsify` takes (``"n:m"``, ``"1x4:0.5"``, a name/glob mapping with ``None``
    for dense, a DominoSearch ``Scheme``). ``method``: ``"magnitude"``, ``"wanda"`` or
    ``"sparsegpt"`` (:class:`OneShotMethod`). ``layers``: restrict to these module names.
    ``blocksize`` / ``damp``: SparseGPT's column block and dampening (``H += damp * mean(diag H) I``).
    ``sequential``: calibrate each group of layers on the already pruned earlier ones.
    ``permute=True``: before each N:M layer is pruned, search an input-channel permutation that keeps
    more of its score (|w|; Wanda / SparseGPT: |w| * ||X_j||) and fold it into the layer's producers
    (:mod:`.permute`: gated MLP gate/up -> down, MLP through an elementwise activation, attention value
    -> output inside each head), so the model computes the same function at no runtime cost; layers
    without a foldable producer are listed in ``report.unpermuted``.
    ``swap=True``: then swap the pruned layers for packed nmkern sparse layers (same function).

    The pruned weights are exactly pattern-sparse (SparseGPT also updates the kept ones), so
    ``nmkern.sparsify(model, scheme, pack=True)`` afterwards computes the same function. Bad input
    raises ``ValueError`` naming the layer and the fix, and leaves the model bit-identical.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OP}: model must be an nn.Module, got {type(model).__name__}")
    method = _check_args(method, blocksize, damp, permute)
    start = time.perf_counter()
    targets, report = _plan(model, scheme, layers)
    report.method = method
    batches = _batches(calib)
    report.calibration_batches = len(batches)
    if not targets:
        raise ValueError(f"{_OP}: no layer of the model matches the scheme; nothing to prune")
    backup: dict[int, tuple] = {}  # id(module) -> (module, weight, bias) as they were
    bar = tqdm(total=len(targets), desc=f"prune_oneshot ({method.value})", disable=not progress, leave=False)
    ctx = {"method": method, "blocksize": blocksize, "damp": damp, "sequential": sequential, "pending": [],
           "backup": backup, "report": report, "bar": bar, "folds": find_folds(model) if permute else None,
           "names": {id(mod): name for name, mod in model.named_modules()}}
    try:
        if not (sequential and method is not OneShotMethod.MAGNITUDE and _by_blocks(model, targets, batches, ctx)):
            groups = _record(model, targets, batches[0])
            reached = {id(t.module) for g in groups for t in g}
            report.skipped += [(t.names[0], "not reached by the calibration inputs") for t in targets
                               if id(t.module) not in reached]
            _run_groups(model, groups, batches, ctx)
        _apply(ctx["pending"], backup, report)
    except BaseException as e:
        _restore(backup)
        if isinstance(e, _BadActivation):
            raise ValueError(f"{_OP}: layer {e.name!r} receives {e.what} activations from the calibration inputs; "
                             "check the model and its inputs (nothing was changed)") from None
        raise
    finally:
        bar.close()
    if swap:
        from ..sparsify import sparsify

        pruned = {r["name"] for r in report.layers}
        packable = {n: t.spec for t in targets if t.names[0] in pruned and not isinstance(t.spec, UnstructuredSpec)
                    for n in t.names}  # unstructured layers have no packed form: they stay plain
        if packable:
            sparsify(model, packable, pack=True)
    report.seconds = time.perf_counter() - start
    return report


def _backup(backup: dict, module: nn.Module) -> None:
    bias = getattr(module, "bias", None)
    backup.setdefault(id(module), (module, module.weight.detach().clone(),
                                   None if bias is None else bias.detach().clone()))


def _apply(pending: list, backup: dict, report: OneShotReport) -> None:
    with torch.no_grad():
        for target, new, seconds in pending:
            w = target.module.weight
            _backup(backup, target.module)
            w.copy_(new)
            report.layers.append({"name": target.names[0], "shape": list(w.shape), "pattern": str(target.spec),
                                  "density": round(float((new != 0).float().mean()), 6),
                                  "seconds": round(seconds, 4)})
    pending.clear()


def _restore(backup: dict) -> None:
    with torch.no_grad():
        for module, weight, bias in backup.values():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)


def _permute(target: _Target, group: list[_Target], stats: _Stats | None, ctx: dict) -> None:
    """permute=True: search ``target``'s input-channel permutation and fold it into its producers (their output
    rows and biases, and any pruned weights still pending); the statistics follow the columns."""
    name, report, module = target.names[0], ctx["report"], target.module
    fold = ctx["folds"].get(id(module))
    key = _stat_key(module)
    why = ("its pattern is not N:M" if not isinstance(target.spec, NMSpec) else
           "no producer to fold a permutation into (a gated MLP, an MLP through an elementwise activation, "
           "or attention's value projection)" if fold is None else
           "it shares its input statistics with another layer" if any(
               t is not target and _stat_key(t.module) == key for t in group) else
           f"its heads ({fold.head_dim} channels) are not a multiple of m={target.spec.m}"
           if fold.head_dim % target.spec.m else "")
    if why:
        report.unpermuted.append((name, why))
        return
    w = module.weight.detach()
    score = w.abs().double()
    if stats is not None:
        diag = stats.result(target)
        score = score * (diag.diagonal() if diag.dim() == 2 else diag).double().sqrt().reshape(1, -1)
    folded = fold.fold_score(score)
    perm = search_permutation(folded, target.spec.n, target.spec.m, segment=fold.head_dim or None)
    before, after = kept_score(folded, target.spec.n, target.spec.m), kept_score(folded[:, perm], target.spec.n,
                                                                                   target.spec.m)
    report.permuted.append({"name": name, "producers": [ctx["names"].get(id(p), "?") for p in fold.producers],
                            "kept_before": before, "kept_after": after, "perm": perm.tolist()})
    if torch.equal(perm, torch.arange(perm.numel())):
        return
    for mod in fold.producers + [module]:
        _backup(ctx["backup"], mod)
    apply_fold(fold, perm)
    ctx["pending"][:] = [(t, new[perm] if t.module in fold.producers else new, sec) for t, new, sec in ctx["pending"]]
    if stats is not None:
        cols = fold.consumer_order(perm)
        held = stats.sums[key]
        stats.sums[key] = held[cols][:, cols] if held.dim() == 2 else held[cols]
