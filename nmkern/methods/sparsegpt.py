"""The per-layer math of one-shot pruning: magnitude, Wanda and SparseGPT masks and weights.

All functions work on a weight as GEMM rows ``w2 (out, K)``: a Linear's weight, or a conv
weight's ``(O, C*kh*kw)`` flattening in PyTorch's order (channel-major, as ``F.unfold`` gives the
columns). ``group_order`` (:func:`nm_column_order`) reorders those columns so that N:M groups
(m consecutive input channels at one kernel position, the order nmkern packs a conv in) become
m consecutive columns; a Linear needs no reordering.

* Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2``, keep the top n of every m inputs of a row
  (1xN: the blocks with the largest summed score).
* Unstructured: magnitude drops the lowest fraction of the layer; Wanda of each output row (the
  paper's comparison group); SparseGPT of each column block, chosen at the block's start (the paper's
  adaptive mask selection).
* SparseGPT (Frantar & Alistarh 2023): with ``H = 2 X^T X`` (dampened by ``damp * mean(diag H)``;
  dead inputs zeroed), the upper Cholesky factor ``U`` of ``H^-1``; columns in blocks of
  ``blocksize``; every m columns the n:m mask keeps the largest ``w^2 / U_jj^2``; each pruned
  weight's error ``(w - q) / U_jj`` is spread over the later columns of its block with row j of
  ``U``, and over the later blocks in one matmul per block (the paper's lazy batch update).
  1xN blocks: the mask is chosen once, up front, from the same saliency summed per block.

Ties (a dequantised checkpoint has many equal |w|) go to the lower input index, as
:func:`nmkern.nm_mask` breaks them: a stable descending sort.
"""

from __future__ import annotations

import torch

from ..functional import block_mask_1xn
from ..reference.block_1xn import drop_lowest_fraction
from ..reference.nm_mask import nm_mask_ref
from ..spec import BlockSpec, NMSpec, UnstructuredSpec


class SingularHessianError(ValueError):
    """The dampened Hessian of a layer is not positive definite (its Cholesky factorisation failed)."""


def nm_column_order(weight_shape, m: int) -> torch.Tensor | None:
    """The column order of ``(O, C*kh*kw)`` conv rows that puts N:M groups (m channels at one kernel
    position) next to each other; None for a Linear (its columns are already in group order)."""
    if len(weight_shape) != 4:
        return None
    c, taps = weight_shape[1], weight_shape[2] * weight_shape[3]
    return (torch.arange(c).reshape(c, 1) * taps + torch.arange(taps).reshape(1, taps)).t().reshape(-1)


def select_mask(score: torch.Tensor, spec, weight_shape, *, per_row: bool = False) -> torch.Tensor:
    """Keep-mask ``(out, K)`` of a non-negative ``score`` (GEMM rows, PyTorch column order) under ``spec``.

    Unstructured: the lowest ``sparsity`` fraction of the layer, or of each row with ``per_row`` (Wanda)."""
    if isinstance(spec, NMSpec):
        order = nm_column_order(weight_shape, spec.m)
        if order is None:
            return nm_mask_ref(score, spec.n, spec.m, dim=1)
        keep = torch.empty_like(score, dtype=torch.bool)
        keep[:, order] = nm_mask_ref(score[:, order], spec.n, spec.m, dim=1)
        return keep
    if isinstance(spec, BlockSpec):  # the blocks with the largest summed score (L1 of a non-negative score)
        shaped = score.reshape(weight_shape)
        return block_mask_1xn(shaped, spec.block, spec.sparsity, backend="reference").reshape(score.shape)
    if isinstance(spec, UnstructuredSpec):
        if not per_row:  # the floor(sparsity * numel) lowest of the layer, ties to the lower index
            return drop_lowest_fraction(score, spec.sparsity)
        keep = torch.ones_like(score, dtype=torch.bool)  # Wanda's comparison group: each output row alone
        k = int(spec.sparsity * score.shape[1])
        rows = torch.arange(score.shape[0], device=score.device).reshape(-1, 1)
        keep[rows, torch.sort(score, dim=1, stable=True).indices[:, :k]] = False
        return keep
    raise TypeError(f"prune_oneshot: pattern {spec} is not N:M, 1xN or unstructured")


def wanda_score(w2: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (fp32)."""
    return w2.abs().float() * col_norm.float().reshape(1, -1)


def _inverse_cholesky(op: str, h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``."""
    h = h.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if int(info) != 0:
        raise SingularHessianError(f"{op}: the Hessian stays singular after dampening with damp={damp}; raise damp "
                                   "(e.g. 0.1) or calibrate with more (and more varied) inputs")
    return factor


def sparsegpt_prune(op: str, w2: torch.Tensor, hessian: torch.Tensor, spec, weight_shape, *, blocksize: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """The SparseGPT weights (new tensor, ``w2``'s dtype and column order) of GEMM rows ``w2`` under ``spec``.

    ``hessian``: ``2 X^T X`` over the layer's inputs ``X (rows, K)`` in ``w2``'s column order
    (any positive scale: masks and updates do not depend on it). Computes in the Hessian's dtype.
    """
    dtype = hessian.dtype
    order = nm_column_order(weight_shape, spec.m) if isinstance(spec, NMSpec) else None
    w = w2.to(dtype).clone()
    h = hessian.clone()
    if order is not None:
        w, h = w[:, order], h[order][:, order]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = _inverse_cholesky(op, h, damp)
    fixed = None
    if isinstance(spec, BlockSpec):  # 1xN: one mask for the layer, from the saliency summed per block
        saliency = w ** 2 / u.diagonal().reshape(1, -1) ** 2
        fixed = ~select_mask(saliency, spec, weight_shape)
    # columns go in chunks: an N:M group (m columns, its mask chosen from the updated weights), or 16 columns
    # of a fixed mask. Inside a chunk the error spreads column by column over the chunk only; past it,
    # one matmul per chunk (per column, a full-width outer product cost 2-3x more on 576x576 layers).
    step = spec.m if isinstance(spec, NMSpec) else 16
    blocksize = max(step, blocksize // step * step)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block, errors = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        u_block = u[i1:i2, i1:i2]
        if isinstance(spec, UnstructuredSpec):  # the paper's adaptive mask: the lowest fraction of this block
            pruned_block = ~drop_lowest_fraction(block ** 2 / u_block.diagonal().reshape(1, -1) ** 2, spec.sparsity)
        elif fixed is not None:
            pruned_block = fixed[:, i1:i2]
        for g1 in range(0, i2 - i1, step):
            g2 = min(g1 + step, i2 - i1)
            if isinstance(spec, NMSpec):  # N:M: choose this group's mask from the updated weights
                group = block[:, g1:g2] ** 2 / u_block.diagonal()[g1:g2].reshape(1, -1) ** 2
                pruned = ~nm_mask_ref(group, spec.n, spec.m, dim=1)
            else:
                pruned = pruned_block[:, g1:g2]
            _spread_chunk(block[:, g1:g2], pruned, u_block[g1:g2, g1:g2], errors[:, g1:g2])
            block[:, g2:].addmm_(errors[:, g1:g2], u_block[g1:g2, g2:], alpha=-1)
        w[:, i1:i2] = block
        w[:, i2:].addmm_(errors, u[i1:i2, i2:], alpha=-1)
    if order is not None:
        out = torch.empty_like(w)
        out[:, order] = w
        w = out
    return w.to(w2.dtype)


def _spread_chunk(chunk: torch.Tensor, pruned: torch.Tensor, u_chunk: torch.Tensor, errors: torch.Tensor) -> None:
    """OBS inside one chunk of columns, in place: zero the pruned weights column by column, spreading each one's
    error ``w / U_jj`` over the chunk's later columns; the errors go to ``errors`` for the update past the chunk."""
    for i in range(chunk.shape[1]):
        err = torch.where(pruned[:, i], chunk[:, i], 0.0) / u_chunk[i, i]
        errors[:, i] = err
        chunk[:, i + 1:].sub_(err.reshape(-1, 1) * u_chunk[i, i + 1:].reshape(1, -1))
        chunk[:, i].masked_fill_(pruned[:, i], 0.0)
