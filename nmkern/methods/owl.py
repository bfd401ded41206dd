"""An OWL-style layer-wise N:M scheme: blocks with more activation outliers keep more weights.

OWL (Yin et al. 2023, "Outlier Weighed Layerwise sparsity") observes that LLM blocks differ in
their share of *outlier* weights: Wanda scores ``|W_ij| * ||X_j||`` above ``ratio`` times their
layer's mean (ratio 5 in the paper). Pruning the outlier-rich blocks less, at the same total
budget, loses less. Under N:M the per-block sparsity takes steps of 1/m, so here every block gets
one of ``n - spread .. n + spread`` of m, by rank of its outlier share: the third of the blocks
with the most outliers keeps ``n + spread``, the third with the fewest ``n - spread``, the rest n.
With blocks of equal size (a transformer's layers) the budget is exactly n/m; the scheme reports
the density it reaches.

Statistics: one dense forward of the calibration inputs with prune_oneshot's hooks, summing each
layer's input column squares (Wanda's norms; nothing else is held).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..spec import NMSpec, parse_spec
from . import oneshot
from .sparsegpt import wanda_score

_OP = "owl_scheme"


@dataclasses.dataclass
class OutlierScheme:
    """What :func:`owl_scheme` chose: ``scheme`` (layer name -> "n:m", for :func:`nmkern.prune_oneshot`), each
    block's outlier share and pattern, and the density reached over the pruned layers."""

    scheme: dict[str, str]
    blocks: list[dict]
    density: float


def _column_norms(model: nn.Module, targets: list, calib) -> dict[int, torch.Tensor]:
    """``id(module) -> ||X_j||_2`` over every calibration batch: prune_oneshot's Wanda statistics, gathered for
    every layer at once (one accumulator per layer) in one dense pass."""
    try:
        batches = oneshot._batches(calib)
        oneshot._record(model, targets, batches[0])  # calls per batch: each pass stops after the last layer
        stats = oneshot._gather(model, targets, batches, oneshot.OneShotMethod.WANDA, key=id)
    except oneshot._BadActivation as e:
        raise ValueError(f"{_OP}: layer {e.name!r} receives NaN/Inf activations from the calibration inputs; "
                         "check the model and its inputs") from None
    except ValueError as e:  # the shared readers name prune_oneshot; the caller called owl_scheme
        raise ValueError(str(e).replace(f"{oneshot._OP}:", f"{_OP}:", 1)) from None
    return {id(t.module): stats.result(t).sqrt() for t in targets if id(t.module) in stats.sums}


def owl_scheme(model: nn.Module, calib, scheme="4:8", *, spread: int = 1, ratio: float = 5.0) -> OutlierScheme:
    """A per-layer N:M scheme at ``scheme``'s budget, shifted by outlier share (see the module docstring).

    ``model``, ``calib``: as :func:`nmkern.prune_oneshot` takes them (the model is only run, never changed).
    ``scheme``: a uniform ``"n:m"``, or a mapping whose N:M entries share one n:m (``None`` keeps a layer
    dense, as in :func:`nmkern.sparsify`). ``spread``: blocks get ``n - spread .. n + spread`` of m (each
    within 1 .. m-1). ``ratio``: a weight is an outlier when its Wanda score exceeds ``ratio`` times its
    layer's mean. Blocks are the entries of the ``nn.ModuleList`` holding every layer (a transformer's
    layers), else single layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OP}: model must be an nn.Module, got {type(model).__name__}")
    targets, _ = oneshot._plan(model, scheme, None)
    specs = {str(t.spec) for t in targets}
    if not targets or len(specs) != 1 or not isinstance(targets[0].spec, NMSpec):
        raise ValueError(f"{_OP}: the scheme must give every pruned layer one N:M pattern (e.g. '4:8'); got "
                         f"{sorted(specs) or 'no layer'}")
    n, m = targets[0].spec.n, targets[0].spec.m
    if isinstance(spread, bool) or not isinstance(spread, int) or spread < 0 or n - spread < 1 or n + spread > m - 1:
        raise ValueError(f"{_OP}: spread={spread!r} must keep n-spread >= 1 and n+spread <= m-1 for {n}:{m}; "
                         f"use spread=1 with 4:8, or 0 for the uniform scheme")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio > 0:
        raise ValueError(f"{_OP}: ratio must be a positive number (the paper's 5), got {ratio!r}")
    norms = _column_norms(model, targets, calib)
    found = oneshot._find_blocks(model, targets)
    units = [u for u in found[2] if u] if found else [[t] for t in targets]
    shares = []
    for unit in units:
        outliers = total = 0
        for t in unit:
            w = t.module.weight.detach()
            score = wanda_score(w.reshape(w.shape[0], -1), norms.get(id(t.module), torch.zeros(1, device=w.device)))
            outliers += int((score > ratio * score.mean()).sum())
            total += score.numel()
        shares.append(outliers / total)
    order = sorted(range(len(units)), key=lambda i: -shares[i])
    third = len(units) // 3
    chosen = {i: n + spread if r < third else n - spread if r >= len(units) - third else n
              for r, i in enumerate(order)}
    result = {name: f"{chosen[i]}:{m}" for i, unit in enumerate(units) for t in unit for name in t.names}
    kept = sum(chosen[i] / m * t.module.weight.numel() for i, unit in enumerate(units) for t in unit)
    size = sum(t.module.weight.numel() for unit in units for t in unit)
    blocks = [{"layers": [t.names[0] for t in unit], "outlier_share": round(shares[i], 6),
               "pattern": str(parse_spec(f"{chosen[i]}:{m}", op=_OP))} for i, unit in enumerate(units)]
    return OutlierScheme(result, blocks, kept / size)
