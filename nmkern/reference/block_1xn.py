"""Reference 1xN block pruning (Lin et al., "1xN Pattern for Pruning CNNs").

A block is ``block`` (the N of 1xN) consecutive output channels x 1 input channel (x the whole kernel for
conv weights). Blocks are scored by L1 norm and the lowest ``floor(sparsity *
blocks)`` of the layer are zeroed, ties to the lower block index (row-major over
(output block, input channel)). With ``rearrange``, output filters are first
sorted by their L1 norm (descending, stable), blocks are formed in that order and
the mask is scattered back to the original filter order.
"""

from __future__ import annotations

import warnings

import torch


def block_scores_1xn_ref(w: torch.Tensor, block: int) -> torch.Tensor:
    """L1 norm of every block: ``(O/block, I)`` in fp32 (fp64 for fp64 weights)."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    o, i = w.shape[0], w.shape[1]
    return w.to(acc).abs().reshape(o // block, block, i, -1).sum(dim=(1, 3))


def filter_order_1xn(w: torch.Tensor) -> torch.Tensor:
    """Output filters sorted by L1 norm, largest first (stable)."""
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    norms = w.to(acc).abs().reshape(w.shape[0], -1).sum(1)
    return torch.sort(norms, descending=True, stable=True).indices


def drop_lowest_fraction(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of ``scores``' shape: False for the floor(sparsity * numel) lowest, ties to the lower flat index.

    Used for 1xN block scores, whole-tensor magnitudes (unstructured) and filter norms.
    """
    flat = scores.reshape(-1)
    k = int(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[torch.sort(flat, stable=True).indices[:k]] = False
    return keep.reshape(scores.shape)


def expand_block_mask_1xn(block_keep: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    o, i = shape[0], shape[1]
    tail = (1,) * (len(shape) - 2)
    full = block_keep.repeat_interleave(block, dim=0).reshape(o, i, *tail)
    return full.expand(shape).contiguous()


def block_mask_1xn_ref(w: torch.Tensor, block: int, sparsity: float, *, rearrange: bool = False,
                       criterion: str = "l1", generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean keep-mask, same shape as ``w``; no checks."""
    order = filter_order_1xn(w) if rearrange else None
    src = w[order] if order is not None else w
    if criterion == "random":
        scores = torch.rand(src.shape[0] // block, src.shape[1], generator=generator).to(w.device)
    else:
        scores = block_scores_1xn_ref(src, block)
    mask_sorted = expand_block_mask_1xn(drop_lowest_fraction(scores, sparsity), w.shape, block)
    if order is None:
        return mask_sorted
    mask = torch.empty_like(mask_sorted)
    mask[order] = mask_sorted
    return mask


def to_bsr_1xn_ref(w: torch.Tensor, block: int) -> torch.Tensor:
    """``torch.sparse_bsr_tensor`` with blocksize (block, 1) holding every non-zero (block, 1) block of 2-D ``w``."""
    o, k = w.shape
    blocks = w.reshape(o // block, block, k).permute(0, 2, 1)  # (block rows, k, block)
    present = (blocks != 0).any(-1)  # (block rows, k)
    crow = torch.zeros(o // block + 1, dtype=torch.int64, device=w.device)
    crow[1:] = present.sum(1).cumsum(0)
    brow, col = present.nonzero(as_tuple=True)
    values = blocks[brow, col].reshape(-1, block, 1)
    with warnings.catch_warnings():  # "BSR support is in beta" on every call
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_bsr_tensor(crow, col, values, size=(o, k), dtype=w.dtype, device=w.device,
                                       check_invariants=False)
