"""SR-STE training (Zhou et al., ICLR 2021): helpers around :func:`nmkern.srste_weight`.

Two ways to train a model N:M-sparse with SR-STE:

1. ``nmkern.sparsify(model, scheme)`` swaps ``nn.Linear`` / ``nn.Conv2d`` for
   :class:`~nmkern.SparseLinear` / :class:`~nmkern.SparseConv2d`, whose training form
   calls :func:`~nmkern.srste_weight` (``srste=True``, ``lambda_w=2e-4``).
2. :func:`apply_srste` keeps the model's own modules and registers a
   ``torch.nn.utils.parametrize`` parametrization on each weight instead - for
   ``nn.Conv1d``, subclasses of Linear/Conv, or when module types must not change.
   :func:`remove_srste` bakes the N:M-masked weights back in.

Either way the forward uses the masked weight, the mask recomputed from the dense
weight at every call, and the backward adds ``lambda_w * (1 - mask) * w`` to the
gradient; ``lambda_w=0`` is the plain straight-through estimator (the ablation). Any
optimizer works (the extra term is part of the gradient), and so does
``DistributedDataParallel``: DDP averages gradients so every rank applies the same
update to the same weights, and the mask, a pure function of the weights, agrees on
every rank without communication.

:func:`train_srste` is one pass of the shared training loop
(:func:`nmkern.methods.loop.train_epochs`) with a progress bar;
:func:`nm_sparse_weights` returns the effective weights, for checking that a trained
model is exactly N:M.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..autograd import check_lambda_w, srste_weight
from ..backend import parse_backend
from ..reference.srste import DEFAULT_LAMBDA_W
from ..spec import Pattern, SpecResolver
from .loop import evaluate, train_epochs
from .masking import group_dim, prunable_layers

__all__ = ["SRSTEWeight", "apply_srste", "remove_srste", "set_lambda_w", "train_srste", "nm_sparse_weights",
           "evaluate", "srste_weight", "DEFAULT_LAMBDA_W"]


class SRSTEWeight(nn.Module):
    """Parametrization: ``weight -> srste_weight(weight, n, m, dim, lambda_w)``."""

    def __init__(self, n: int, m: int, dim: int, lambda_w: float = DEFAULT_LAMBDA_W, backend="auto"):
        super().__init__()
        self.n, self.m, self.dim = n, m, dim
        self.lambda_w = lambda_w
        self.backend = backend

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        if backend == "auto" and not w.is_cuda:
            # Training on the CPU: the torch reference. "auto" would pick the Triton
            # interpreter under TRITON_INTERPRET=1, seconds per step; pass
            # backend="triton" to run it on purpose. (Same policy as nmkern.nn.)
            backend = "reference"
        return srste_weight(w, self.n, self.m, self.dim, self.lambda_w, backend=backend)

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, dim={self.dim}, lambda_w={self.lambda_w:g}"


def apply_srste(model: nn.Module, scheme, *, lambda_w: float = DEFAULT_LAMBDA_W, backend="auto",
                layers: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """Make ``model``'s Linear/Conv1d/Conv2d weights N:M-sparse with SR-STE, in place.

    ``scheme``: ``"2:4"``, ``(2, 4)`` or a Mapping ``{name or glob: (n, m) | None}`` such
    as a :class:`~nmkern.Scheme` (unlisted layers stay dense). With a uniform pattern,
    layers whose input features/channels do not divide by m stay dense (e.g. a first
    conv with one input channel); a Mapping that names such a layer is an error.
    ``backend="auto"`` runs the Triton kernels on CUDA weights and the torch reference on
    CPU weights. Returns ``{layer name: (n, m)}`` of the layers made sparse.
    """
    op = "apply_srste"
    lambda_w = check_lambda_w(op, lambda_w)
    parse_backend(op, backend)
    found = prunable_layers(op, model, layers)
    resolver = SpecResolver(scheme, op=op, allowed=[Pattern.NM])
    done = {}
    for name, mod in found.items():
        spec = resolver.lookup(name)
        if spec is None or spec.pattern is Pattern.DENSE:
            continue
        p = (spec.n, spec.m)
        if parametrize.is_parametrized(mod, "weight"):
            raise ValueError(f"{op}: layer {name!r} already has a weight parametrization; call remove_srste(model) first")
        dim = group_dim(mod) % mod.weight.dim()
        size = mod.weight.shape[dim]
        if size % p[1]:
            if not resolver.is_mapping:
                continue
            raise ValueError(f"{op}: layer {name!r} (weight {tuple(mod.weight.shape)}) has {size} input features/channels, "
                             f"not divisible by m={p[1]}; map it to None to keep it dense")
        parametrize.register_parametrization(mod, "weight", SRSTEWeight(p[0], p[1], dim, lambda_w, backend))
        done[name] = p
    if not done:
        raise ValueError(f"{op}: no layer matched the scheme {scheme!r}; nothing was made sparse")
    return done


def _srste_params(model: nn.Module):
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            for p in mod.parametrizations.weight:
                if isinstance(p, SRSTEWeight):
                    yield name, mod, p


def remove_srste(model: nn.Module) -> nn.Module:
    """Replace each SR-STE parametrization by its N:M-masked weight (a plain Parameter)."""
    for _, mod, _ in list(_srste_params(model)):
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return model


def set_lambda_w(model: nn.Module, lambda_w: float) -> int:
    """Set ``lambda_w`` on every SR-STE layer (both forms); 0 switches to plain STE. Returns the count."""
    lambda_w = check_lambda_w("set_lambda_w", lambda_w)
    count = 0
    for _, _, p in _srste_params(model):
        p.lambda_w = lambda_w
        count += 1
    from ..nn import SparseConv2d, SparseLinear

    for mod in model.modules():
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            mod.lambda_w = lambda_w
            mod.srste = lambda_w > 0
            count += 1
    return count


def nm_sparse_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, int, int, int]]:
    """``{name: (effective weight, n, m, dim)}`` for every SR-STE-parametrized and N:M sparse-module layer."""
    out = {}
    with torch.no_grad():
        for name, mod, p in _srste_params(model):
            out[name] = (mod.weight.detach().clone(), p.n, p.m, p.dim)
        from ..nn import SparseConv2d, SparseLinear

        for name, mod in model.named_modules():
            if isinstance(mod, (SparseLinear, SparseConv2d)) and mod.pattern == Pattern.NM:  # str enums: by value
                out[name] = (mod.dense_weight(), mod.n, mod.m, 1)
    return out


def train_srste(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, *,
                loss_fn: Callable = F.cross_entropy, scheduler=None, progress: bool = True,
                desc: str = "SR-STE") -> list[float]:
    """One pass of :func:`nmkern.methods.loop.train_epochs` over ``batches``; returns the per-step losses.

    Nothing here is SR-STE specific: the sparse layers (either form) carry the masking
    and the gradient term, so any optimizer and DDP-wrapped model work. ``scheduler``
    (optional) is stepped after every optimizer step.
    """
    return train_epochs(model, batches, optimizer, loss_fn=loss_fn, scheduler=scheduler, progress=progress,
                        desc=desc)[0].losses
