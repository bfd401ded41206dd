"""1xN block pruning (Lin et al., "1xN Pattern for Pruning Convolutional Neural Networks").

:func:`prune_1xn` computes each layer's block mask once, from the given
(pretrained) weights: blocks of ``block`` consecutive output channels x 1 input
channel (x the whole kernel) are scored by L1 norm and the lowest ``sparsity``
fraction of the layer's blocks is zeroed (``criterion="random"``: random blocks,
the paper's baseline). With rearrangement, a layer's output filters are first
sorted by L1 norm, the blocks are formed in that order and the mask is scattered
back. Then the model is fine-tuned with the masks frozen and exported to the
packed BSR form (blocksize ``(block, 1)``). (``block`` was called ``n`` in nmkern 0.1;
``n=`` still works, with a DeprecationWarning.)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ..functional import BlockCriterion, to_bsr_1xn
from ..reference.block_1xn import drop_lowest_fraction
from ..spec import BlockSpec, Pattern, accepts_n_for_block, check_block
from .masking import (
    PRUNABLE_TYPES,
    MaskSet,
    TrainConfig,
    _parse_enum,
    check_data,
    compute_mask,
    prunable_layers,
    resolve_targets,
    train_masked,
)


@dataclasses.dataclass
class BlockPruneResult:
    model: nn.Module  # the fine-tuned model, dense modules with masked (zeroed) weights
    masks: dict[str, torch.Tensor]  # keep-masks, same shapes as the weights
    targets: dict[str, BlockSpec]
    bsr: dict[str, torch.Tensor]  # torch.sparse_bsr_tensor, blocksize (block, 1), of weight[orders[k]] as (O, I*kh*kw)
    orders: dict[str, torch.Tensor]  # filter order in which the layer is block-structured (identity unless rearranged)
    exported: nn.Module | None  # copy of the model with packed SparseConv2d/SparseLinear, when nmkern.nn provides them
    skipped: list[str]  # prunable layers left dense (out channels not divisible by block, grouped conv)
    train_loss: float


def _default_layers(model: nn.Module, block: int) -> tuple[list[str], list[str]]:
    chosen, skipped = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, PRUNABLE_TYPES):
            ok = mod.weight.shape[0] % block == 0 and getattr(mod, "groups", 1) == 1
            (chosen if ok else skipped).append(name)
    return chosen, skipped


@accepts_n_for_block
def prune_1xn(
    model: nn.Module,
    block: int = 4,
    sparsity: float = 0.5,
    *,
    rearrange: bool | Iterable[str] | Mapping[str, bool] = True,
    criterion: BlockCriterion | str = BlockCriterion.L1,
    layers: Iterable[str] | None = None,
    data=None,
    epochs: int = 0,
    seed: int = 0,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    loss_fn: Callable | None = None,
    export: bool = True,
    progress: bool = True,
) -> BlockPruneResult:
    """Prune ``model`` in place to 1xN blocks, fine-tune with frozen masks, export BSR.

    ``layers``: names of the layers to prune; ``None`` takes every Linear/Conv1d/
    Conv2d whose output channels are divisible by ``block`` (the others are listed in
    ``result.skipped``). ``rearrange``: True/False for every pruned layer, a list
    of the layer names to rearrange, or a dict name -> bool. ``data`` (an
    (inputs, labels) pair or a Dataset) and ``epochs`` > 0 fine-tune.
    """
    op = "prune_1xn"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    check_block(op, block)
    criterion = _parse_enum(op, "criterion", BlockCriterion, criterion)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"{op}: epochs must be an int >= 0, got {epochs!r}")
    if epochs and data is None:
        raise ValueError(f"{op}: epochs={epochs} but no data to fine-tune on; pass data=(inputs, labels) or epochs=0")
    if data is not None:
        check_data(op, data)
    cfg = TrainConfig(lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, loss_fn=loss_fn)
    cfg.check(op)

    skipped: list[str] = []
    if layers is None:
        names, skipped = _default_layers(model, block)
        if not names:
            raise ValueError(f"{op}: no Linear/Conv layer of the model has output channels divisible by block={block}")
    else:
        names = list(prunable_layers(op, model, layers))
    selected = prunable_layers(op, model, names)
    targets = resolve_targets(op, selected, Pattern.BLOCK, sparsity=sparsity, block=block, rearrange=rearrange)

    # Masks once, from the given weights; random blocks draw from one seeded generator in layer order.
    generator = torch.Generator().manual_seed(seed)
    masks = MaskSet(selected)
    for name in selected:
        masks.set(name, compute_mask(selected[name], targets[name], criterion=criterion, generator=generator))
    masks.apply_()

    loss = float("nan")
    if epochs:
        loss = train_masked(model, masks, data, epochs, seed=seed, cfg=cfg, desc=f"{op} finetune", progress=progress)
    final = {k: mk for k, mk in masks.state().items()}
    orders = {k: block_order(final[k], block) for k in selected}
    bsr = {k: to_bsr_1xn(selected[k].weight.detach()[orders[k]], block) for k in selected}
    exported = export_1xn(model, final, block, targets) if export else None
    return BlockPruneResult(model=model, masks=final, targets=targets, bsr=bsr, orders=orders, exported=exported,
                            skipped=skipped, train_loss=loss)


def _sparse_modules():
    """``(SparseLinear, SparseConv2d)`` from :mod:`nmkern.nn`, or None while that module is absent."""
    try:
        from .. import nn as nmnn
    except ImportError:
        return None
    lin, conv = getattr(nmnn, "SparseLinear", None), getattr(nmnn, "SparseConv2d", None)
    return (lin, conv) if lin is not None and conv is not None else None


class OutputPermuted(nn.Module):
    """A layer stored with its output channels in block order, put back in model order after the op.

    Rearranged 1xN layers are block-structured only in L1-sorted filter order, so
    the packed layer holds the sorted rows and this wrapper gathers its output
    channels back (``y[:, inverse]``): exact, one index_select per call.
    """

    def __init__(self, inner: nn.Module, order: torch.Tensor, channel_dim: int):
        super().__init__()
        self.inner = inner
        self.channel_dim = channel_dim
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        self.register_buffer("inverse", inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).index_select(self.channel_dim, self.inverse)


@accepts_n_for_block
def block_order(mask: torch.Tensor, block: int) -> torch.Tensor:
    """A filter order in which ``mask`` is 1xN block-uniform (identity when it already is).

    Rows with the same keep pattern are interchangeable, and in a valid rearranged
    mask each pattern occurs a multiple of ``block`` times, so grouping equal rows
    (stable) lines the blocks up.
    """
    o = mask.shape[0]
    rows = mask.reshape(o, mask.shape[1], -1)[:, :, 0]
    ident = torch.arange(o, device=mask.device)
    blocks = rows.reshape(o // block, block, -1)
    if bool((blocks == blocks[:, :1]).all()):
        return ident
    _, inverse_ids = torch.unique(rows, dim=0, return_inverse=True)
    order = torch.sort(inverse_ids, stable=True).indices
    permuted = rows[order].reshape(o // block, block, -1)
    if not bool((permuted == permuted[:, :1]).all()):
        raise ValueError(f"block_order: the mask (shape {tuple(mask.shape)}) is not a (rearranged) 1x{block} block mask")
    return order


@accepts_n_for_block
def export_1xn(model: nn.Module, masks: Mapping[str, torch.Tensor], block: int,
               targets: Mapping[str, BlockSpec]) -> nn.Module | None:
    """A copy of ``model`` whose pruned Linear/Conv2d layers are packed 1xN ``SparseLinear``/``SparseConv2d``.

    Rearranged layers are packed in block order inside :class:`OutputPermuted`.
    Returns None when :mod:`nmkern.nn` has no such modules. Conv1d layers stay
    dense (masked) modules: nmkern has no sparse Conv1d.
    """
    classes = _sparse_modules()
    if classes is None:
        return None
    sparse_linear, sparse_conv = classes
    out = copy.deepcopy(model)
    for name, mask in masks.items():
        mod = out.get_submodule(name)
        if isinstance(mod, nn.Linear):
            cls, channel_dim = sparse_linear, -1
        elif isinstance(mod, nn.Conv2d):
            cls, channel_dim = sparse_conv, 1
        else:
            continue
        order = block_order(mask, block)
        rearranged = not torch.equal(order, torch.arange(order.numel(), device=order.device))
        if rearranged:
            with torch.no_grad():
                mod.weight.copy_(mod.weight[order])
                if mod.bias is not None:
                    mod.bias.copy_(mod.bias[order])
            mask = mask[order]
        sparse = cls.from_dense(mod, pattern="1xn", block=block, sparsity=targets[name].sparsity)
        sparse.set_mask(mask)
        sparse.pack()
        new = OutputPermuted(sparse, order, channel_dim) if rearranged else sparse
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, new)
    return out


def filter_prune_masks(model: nn.Module, sparsity: float, layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """Filter-pruning baseline: per layer, the ``floor(sparsity * O)`` output filters with the lowest L1 norm go."""
    op = "filter_prune_masks"
    from .. import _validate as v

    sparsity = v.check_fraction(op, "sparsity", sparsity)
    out = {}
    for name, mod in prunable_layers(op, model, layers).items():
        w = mod.weight.detach()
        keep = drop_lowest_fraction(w.abs().reshape(w.shape[0], -1).sum(1), sparsity)
        out[name] = keep.reshape(-1, *([1] * (w.dim() - 1))).expand(w.shape).contiguous()
    return out
