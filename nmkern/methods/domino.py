"""DominoSearch (Sun et al., NeurIPS 2021): find a layer-wise N:M scheme from a dense model.

The search fine-tunes a copy of a dense pretrained model while it decides, layer by
layer, how many weights of every group of M to keep (as in the official code; the
defaults below are its values):

- every prunable layer starts dense, ``N = N_inter = M``; N only takes powers of two
  ``{M, M/2, ..., 1}``, ``N_inter`` any integer;
- once, from the pretrained weights, each group of M gets a threshold T: the mean of
  its M/2 smallest magnitudes;
- forward uses the top-``N_inter`` weights of each group; pruned weights get no
  gradient, kept ones (every ``penalty_every``-th iteration) an extra decay
  ``decay * factor * w``; ``decay`` starts at 0.1 and doubles at fixed iterations;
- ``factor = w_erk * ERK-part + w_flops * FLOPs-part``, layer-normalised and
  recomputed whenever a layer's N changes: the ERK part is the layer's remaining
  sparsity up to its ERK target (ERK at the budget's sparsity; for a FLOPs budget r,
  at 1 - 1/r), over the largest one; the FLOPs part is its current
  sparse FLOPs over the largest one - big, under-pruned layers are pushed hardest;
- every ``check_every`` iterations each layer with N > 1 votes: if at least
  ``vote_ratio`` of its groups have fewer than ``N_inter`` weights above T,
  ``N_inter`` drops by one; when ``N_inter`` reaches a power of two, N becomes it;
- the search stops as soon as the budget is met: parameter sparsity (model size)
  or FLOPs reduction over the searched layers. (The official FLOPs branch is
  commented out; here it counts real MACs from a forward pass, convs included:
  :mod:`nmkern.flops`.)

The result is a :class:`~nmkern.Scheme`; retrain it with SR-STE
(:func:`nmkern.methods.srste.apply_srste` or ``nmkern.sparsify``).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import os
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .. import _validate as v
from ..flops import count_flops
from .masking import erk_sparsities, group_dim, prunable_layers
from ..reference.nm_mask import nm_mask_ref
from ..scheme import Scheme

_OP = "domino_search"

# Official defaults (search/find_mix_from_dense_imagenet.py and its ResNet configs).
DEFAULT_DECAY = 0.1  # sparse_decay
DEFAULT_DECAY_MILESTONES = (30000, 40000, 50000, 60000, 70000, 80000)  # decay *= 2 at these iterations
DEFAULT_LR = 0.01  # finetue_lr, SGD
BUDGET_TOLERANCE = 0.001  # the budget counts as met at target - 0.001


class Policy(str, enum.Enum):
    FIXED_M = "fixed_m"  # N:16 with N in {1, 2, 4, 8, 16}
    FIXED_N = "fixed_n"  # the same densities as 1:2, 1:4, 1:8, 1:16


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the search must reach: exactly one of

    - ``params``: parameter sparsity of the searched layers, in (0, 1) - 0.875 keeps
      one weight in eight;
    - ``flops``: FLOPs reduction factor of the searched layers, > 1 - 8.0 means 8x
      fewer weight MACs.
    """

    params: float | None = None
    flops: float | None = None

    def __post_init__(self):
        if (self.params is None) == (self.flops is None):
            raise ValueError("Budget: give exactly one of params= (sparsity, e.g. 0.875) or flops= (reduction, e.g. 8.0)")
        for name in ("params", "flops"):
            x = getattr(self, name)
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
                raise TypeError(f"Budget: {name} must be a float, got {type(x).__name__}")
        if self.params is not None and not (0.0 < self.params < 1.0):
            raise ValueError(f"Budget: params={self.params} must be a sparsity in (0, 1), e.g. 0.875 for 87.5% zeros")
        if self.flops is not None and not (1.0 < self.flops < math.inf):
            raise ValueError(f"Budget: flops={self.flops} must be a reduction factor > 1, e.g. 8.0 for 8x fewer FLOPs")

    @property
    def target_sparsity(self) -> float:
        """The budget as a sparsity of the counted quantity (params, or weight MACs)."""
        return float(self.params) if self.params is not None else 1.0 - 1.0 / float(self.flops)

    def describe(self) -> str:
        return f"params {self.params:.4f}" if self.params is not None else f"flops {self.flops:g}x"

    def to_dict(self) -> dict:
        return {"params": self.params} if self.params is not None else {"flops": self.flops}


class _SearchMask(torch.autograd.Function):
    """Forward: top-``n_inter`` of every group of m. Backward: kept weights only, plus ``coef * w``."""

    @staticmethod
    def forward(ctx, w, n_inter: int, m: int, dim: int, coef: float):
        mask = nm_mask_ref(w, n_inter, m, dim).to(w.dtype)
        ctx.save_for_backward(w, mask)
        ctx.coef = coef
        return w * mask

    @staticmethod
    def backward(ctx, grad):
        w, mask = ctx.saved_tensors
        g = grad * mask
        if ctx.coef:
            g = g + ctx.coef * w * mask
        return g, None, None, None, None


@dataclasses.dataclass
class _Layer:
    name: str
    module: nn.Module
    dim: int
    m: int
    params: int
    flops: int
    erk_target: float
    n: int = 0
    n_inter: int = 0
    threshold: torch.Tensor | None = None  # (groups, 1)
    factor: float = 0.0
    coef: float = 0.0  # decay * factor on penalty iterations, else 0

    def groups(self) -> torch.Tensor:
        w = self.module.parametrizations.weight.original.detach()
        return w.abs().movedim(self.dim, -1).reshape(-1, self.m)


class _Parametrization(nn.Module):
    def __init__(self, layer: _Layer):
        super().__init__()
        self.layer = [layer]  # a list: keep the dataclass out of nn.Module's attribute machinery

    def forward(self, w):
        st = self.layer[0]
        return _SearchMask.apply(w, st.n_inter, st.m, st.dim, st.coef)


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _check_int(name: str, x, lo: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{_OP}: {name}={x!r} must be an int >= {lo}")
    return x


def _check_float(name: str, x, lo: float = 0.0) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < lo:
        raise ValueError(f"{_OP}: {name}={x!r} must be a finite number >= {lo}")
    return float(x)


def _split_batch(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"{_OP}: data must yield (inputs, targets) pairs, got {type(batch).__name__}")


def _sparsity(layers: list[_Layer], weight: str) -> float:
    total = sum(getattr(st, weight) for st in layers)
    kept = sum(getattr(st, weight) * st.n / st.m for st in layers)
    return 1.0 - kept / total if total else 0.0


def _normalise(layers: list[_Layer], w_erk: float, w_flops: float) -> None:
    """The official layer-normalised penalty factor (ERK part + FLOPs part)."""
    sparse_flops = [st.flops * st.n / st.m for st in layers]
    top = max(sparse_flops)
    flops_part = [f / top if top > 0 else 0.0 for f in sparse_flops]
    remaining = [st.erk_target - (1.0 - st.n / st.m) for st in layers]
    if max(remaining) < 0.01:  # every layer reached its ERK share: the ERK part switches off
        erk_part = [0.0] * len(layers)
    else:
        scale = max(abs(r) for r in remaining)
        erk_part = [r / scale for r in remaining]
    for st, e, f in zip(layers, erk_part, flops_part):
        st.factor = w_erk * e + w_flops * f


def domino_search(
    model: nn.Module,
    data: Iterable,
    *,
    budget: Budget = Budget(params=0.875),
    m: int = 16,
    policy: Policy | str = Policy.FIXED_M,
    layers: Iterable[str] | None = None,
    loss_fn: Callable = F.cross_entropy,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr: float = DEFAULT_LR,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    decay: float = DEFAULT_DECAY,
    decay_milestones: Iterable[int] = DEFAULT_DECAY_MILESTONES,
    decay_gamma: float = 2.0,
    penalty_every: int = 5,
    check_every: int = 100,
    vote_ratio: float = 0.75,
    w_erk: float = 0.5,
    w_flops: float = 0.5,
    tolerance: float = BUDGET_TOLERANCE,
    max_iters: int = 100_000,
    sample_input=None,
    inplace: bool = False,
    progress: bool = True,
    plot: str | os.PathLike | None = None,
) -> Scheme:
    """Search a layer-wise N:M scheme meeting ``budget``; returns a :class:`~nmkern.Scheme`.

    Args:
        model: a dense (pretrained) model with ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
            layers; searched on a deep copy unless ``inplace=True`` (then the search's
            fine-tuning updates its weights; they stay dense).
        data: re-iterable ``(inputs, targets)`` batches (e.g. a DataLoader), cycled
            until the budget is met.
        budget: ``Budget(params=s)`` (parameter sparsity) or ``Budget(flops=r)`` (r x
            fewer weight MACs), over the searched layers.
        m: group size (16 in the paper); N takes the powers of two up to m.
        policy: ``"fixed_m"`` (N:m) or ``"fixed_n"`` (mapped to 1:2, 1:4, ... of the
            same density).
        layers: names of the layers to search; default every Linear/Conv whose input
            features/channels divide by m (the others stay dense and are recorded in
            ``scheme.meta["skipped"]``).
        loss_fn: ``loss_fn(model(inputs), targets)``.
        optimizer: factory ``params -> Optimizer``; default SGD(lr, momentum,
            weight_decay) as the official search (0.01, 0, 0).
        decay, decay_milestones, decay_gamma: the extra decay on kept weights, multiplied
            by ``decay_gamma`` at each milestone iteration.
        penalty_every: apply the decay on every n-th iteration (5).
        check_every: vote every n iterations (100).
        vote_ratio: fraction of groups that must agree to lower ``N_inter`` (0.75).
        w_erk, w_flops: weights of the ERK and FLOPs parts of the penalty factor (0.5, 0.5).
        tolerance: the budget counts as met at ``target - tolerance`` sparsity (0.001).
        max_iters: give up (RuntimeError) after this many iterations.
        sample_input: input for counting FLOPs; default the first batch of ``data``.
        progress: show a tqdm bar with the current sparsity against the budget.
        plot: write a PNG of the chosen N per layer to this path.
    """
    cfg = _check_args(budget, policy, m, loss_fn=loss_fn, lr=lr, momentum=momentum, weight_decay=weight_decay,
                      decay=decay, decay_milestones=decay_milestones, decay_gamma=decay_gamma,
                      penalty_every=penalty_every, check_every=check_every, vote_ratio=vote_ratio, w_erk=w_erk,
                      w_flops=w_flops, tolerance=tolerance, max_iters=max_iters, progress=progress)
    work = model if inplace else copy.deepcopy(model)
    chosen, skipped = _searchable(work, layers, m)
    device = next(work.parameters()).device
    state = _start_layers(work, chosen, data, sample_input, device, cfg)
    opt = optimizer(work.parameters()) if optimizer is not None else torch.optim.SGD(
        work.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    it, met, history = _run_search(work, state, data, opt, device, cfg)
    return _result(state, skipped, it, met, history, cfg, plot)


@dataclasses.dataclass(frozen=True)
class _Search:
    """The checked settings of one search (see :func:`domino_search`)."""

    budget: Budget
    policy: Policy
    m: int
    loss_fn: Callable
    decay: float
    milestones: frozenset[int]
    decay_gamma: float
    penalty_every: int
    check_every: int
    vote_ratio: float
    w_erk: float
    w_flops: float
    tolerance: float
    max_iters: int
    progress: bool

    @property
    def target(self) -> float:
        return self.budget.target_sparsity

    @property
    def weight_key(self) -> str:
        """What the budget counts: ``"params"`` or ``"flops"`` (a :class:`_Layer` attribute)."""
        return "params" if self.budget.params is not None else "flops"


def _check_args(budget, policy, m, *, loss_fn, lr, momentum, weight_decay, decay, decay_milestones, decay_gamma,
                penalty_every, check_every, vote_ratio, w_erk, w_flops, tolerance, max_iters, progress) -> _Search:
    if not isinstance(budget, Budget):
        raise TypeError(f"{_OP}: budget must be nmkern.Budget(params=...) or Budget(flops=...), got {type(budget).__name__}")
    policy = _parse_policy(policy)
    _check_int("m", m, 2)
    if not _is_pow2(m) or m > v.MAX_M:
        raise ValueError(f"{_OP}: m={m} must be a power of two <= {v.MAX_M} (N runs over the powers of two up to m)")
    for name, x in (("penalty_every", penalty_every), ("check_every", check_every), ("max_iters", max_iters)):
        _check_int(name, x, 1)
    for name, x in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("decay", decay),
                    ("decay_gamma", decay_gamma), ("w_erk", w_erk), ("w_flops", w_flops), ("tolerance", tolerance)):
        _check_float(name, x)
    if not (0.0 < vote_ratio <= 1.0):
        raise ValueError(f"{_OP}: vote_ratio={vote_ratio!r} must lie in (0, 1]")
    milestones = frozenset(_check_int("decay_milestones entry", x, 1) for x in decay_milestones)
    target = budget.target_sparsity
    best = 1.0 - 1.0 / m  # every layer at 1:m
    if target - tolerance > best:
        what = f"parameter sparsity {target:.4f}" if budget.params is not None else f"a {budget.flops:g}x FLOPs reduction"
        raise ValueError(
            f"{_OP}: budget {budget.describe()} is unreachable with m={m}: {what} needs more than every layer at 1:{m} "
            f"gives ({best:.4f} sparsity, {m}x fewer FLOPs); lower the budget or raise m"
        )
    return _Search(budget=budget, policy=policy, m=m, loss_fn=loss_fn, decay=decay, milestones=milestones,
                   decay_gamma=decay_gamma, penalty_every=penalty_every, check_every=check_every,
                   vote_ratio=vote_ratio, w_erk=w_erk, w_flops=w_flops, tolerance=tolerance, max_iters=max_iters,
                   progress=progress)


def _start_layers(work: nn.Module, chosen: dict[str, nn.Module], data, sample_input, device,
                  cfg: _Search) -> list[_Layer]:
    """Every searched layer dense (N = N_inter = M), parametrized, with its group thresholds and penalty factor."""
    if sample_input is None:
        first = next(iter(data), None)
        if first is None:
            raise ValueError(f"{_OP}: data yielded no batch")
        sample_input = _split_batch(first)[0]
    sample_input = sample_input.to(device) if isinstance(sample_input, torch.Tensor) else sample_input
    flops = count_flops(work, sample_input, chosen)
    erk = erk_sparsities(chosen, cfg.target)
    m = cfg.m
    state = [
        _Layer(name, mod, group_dim(mod) % mod.weight.dim(), m, mod.weight.numel(), flops[name], erk[name], n=m, n_inter=m)
        for name, mod in chosen.items()
    ]
    for st in state:
        parametrize.register_parametrization(st.module, "weight", _Parametrization(st))
        g = st.groups()
        st.threshold = g.sort(dim=1).values[:, : m // 2].mean(dim=1, keepdim=True)  # mean of the M/2 smallest |w|
    _normalise(state, cfg.w_erk, cfg.w_flops)
    return state


def _run_search(work: nn.Module, state: list[_Layer], data, opt, device, cfg: _Search) -> tuple[int, bool, list]:
    """Fine-tune and vote until the budget is met; (iterations, met, history). Removes the parametrizations."""
    from tqdm.auto import tqdm

    history: list[list] = []
    it, met, decay = 0, False, cfg.decay
    bar = tqdm(total=cfg.max_iters, desc="DominoSearch", disable=not cfg.progress, leave=False)
    _postfix(bar, state, cfg)
    was_training = work.training
    work.train()
    try:
        while not met and it < cfg.max_iters:
            batches = 0
            for batch in data:
                batches += 1
                x, y = _split_batch(batch)
                x, y = x.to(device), y.to(device)
                penalty = it % cfg.penalty_every == 0
                it += 1
                if it in cfg.milestones:
                    decay *= cfg.decay_gamma
                for st in state:
                    st.coef = decay * st.factor if penalty else 0.0
                loss = cfg.loss_fn(work(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if (it - 1) % cfg.check_every == 0:
                    met = _vote(state, cfg.vote_ratio, cfg.weight_key, cfg.target, cfg.tolerance, it, history,
                                cfg.w_erk, cfg.w_flops)
                    _postfix(bar, state, cfg)
                opt.step()
                bar.update(1)
                if met or it >= cfg.max_iters:
                    break
            if batches == 0:
                raise ValueError(f"{_OP}: data yielded no batch (pass a re-iterable such as a list or DataLoader)")
    finally:
        bar.close()
        for st in state:
            parametrize.remove_parametrizations(st.module, "weight", leave_parametrized=False)
        work.train(was_training)
    return it, met, history


def _postfix(bar, state: list[_Layer], cfg: _Search) -> None:
    cur = _sparsity(state, cfg.weight_key)
    if cfg.weight_key == "params":
        bar.set_postfix_str(f"param sparsity {cur:.3f} / {cfg.target:.3f}")
    else:
        bar.set_postfix_str(f"FLOPs {1.0 / (1.0 - cur):.2f}x / {cfg.budget.flops:g}x")


def _result(state: list[_Layer], skipped, it: int, met: bool, history: list, cfg: _Search, plot) -> Scheme:
    """The searched :class:`~nmkern.Scheme` (RuntimeError when the budget was not met)."""
    budget, m = cfg.budget, cfg.m
    # Layers left out (input size not divisible by m) stay dense and out of the scheme, so the
    # scheme's sparsity is over the searched layers - the quantity the budget constrains.
    scheme = Scheme(
        {st.name: (None if st.n == st.m else (st.n, st.m)) for st in state},
        layer_params={st.name: st.params for st in state},
        layer_flops={st.name: st.flops for st in state},
        meta={"budget": budget.to_dict(), "m": m, "policy": cfg.policy.value, "iterations": it,
              "skipped": list(skipped), "history": history, "budget_met": met},
    )
    if not met:
        raise RuntimeError(
            f"{_OP}: budget {budget.describe()} not met after max_iters={cfg.max_iters} iterations "
            f"(reached {_sparsity(state, cfg.weight_key):.4f} {cfg.weight_key} sparsity); raise max_iters, decay, or "
            f"lower decay_milestones / check_every. Scheme so far: {scheme!r}"
        )
    if cfg.policy is Policy.FIXED_N:
        scheme = scheme.fixed_n()
    if plot is not None:
        scheme.plot(plot, title=f"DominoSearch, budget {budget.describe()}: chosen N per layer (m={m})")
    return scheme


def _parse_policy(policy) -> Policy:
    if isinstance(policy, Policy):
        return policy
    try:
        return Policy(policy)
    except ValueError:
        raise ValueError(f"{_OP}: unknown policy {policy!r}; choose one of {[p.value for p in Policy]}") from None


def _searchable(model: nn.Module, layers, m: int) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    found = prunable_layers(_OP, model, layers)
    chosen, skipped = {}, {}
    for name, mod in found.items():
        size = mod.weight.shape[group_dim(mod)]
        if size % m == 0:
            chosen[name] = mod
        elif layers is not None:
            raise ValueError(
                f"{_OP}: layer {name!r} (weight {tuple(mod.weight.shape)}) has {size} input features/channels, "
                f"not divisible by m={m}; leave it out of layers=[...]"
            )
        else:
            skipped[name] = mod
    if not chosen:
        raise ValueError(f"{_OP}: no Linear/Conv layer has input features/channels divisible by m={m}; nothing to search")
    return chosen, skipped


def _vote(state: list[_Layer], vote_ratio: float, weight_key: str, target: float, tolerance: float, it: int,
          history: list, w_erk: float, w_flops: float) -> bool:
    """One round of the per-group vote; True once the budget is met."""
    for st in state:
        if st.n == 1:
            continue
        above = (st.groups() > st.threshold).sum(dim=1)
        if float((above < st.n_inter).float().mean()) >= vote_ratio:
            st.n_inter -= 1
        if _is_pow2(st.n_inter) and st.n_inter != st.n:
            st.n = st.n_inter
            history.append([it, st.name, st.n])
            _normalise(state, w_erk, w_flops)
            if _sparsity(state, weight_key) >= target - tolerance:
                return True
    return False
