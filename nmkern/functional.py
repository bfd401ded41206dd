"""Public mask and packing ops: validate, pick a backend, run.

Each op checks its input at the boundary (``ValueError``/``TypeError`` naming the
op, the shape/dtype and the fix), then runs the pure-torch reference
(:mod:`nmkern.reference`), the Triton kernel (:mod:`nmkern.kernels`) or, for the N:M
mask and pack ops on CPU tensors, the native CPU kernel (:mod:`nmkern._cpu_nm_pack`),
chosen by ``backend=`` (see :func:`nmkern.dispatch.resolve_backend`).

NaN/Inf: ops that rank magnitudes (``nm_mask``, ``apply_nm``, ``block_mask_1xn``)
reject non-finite input with ``ValueError``; ops that only move values
(``pack_nm``, ``compress_24``) carry them through unchanged.

Packed input (``unpack_nm``, ``decompress_24``) is checked before any kernel reads it:
shapes and dtypes against the format, then its indices / metadata (one reduction and
one host sync), so corrupted buffers raise ``ValueError`` instead of reading out of
bounds or decoding differently per backend.

Meta tensors: ops whose result shape does not depend on the values (``nm_mask``,
``apply_nm``, ``block_mask_1xn``, ``pack_nm``, ``unpack_nm``, ``compress_24``,
``decompress_24``, ``block_scores_1xn``) return meta tensors of the right shapes (no
value checks); ``to_bsr_1xn`` (its size depends on the values) raises ``ValueError``.

Gradients: ``apply_nm`` is differentiable on every backend (``grad * mask``).
"""

from __future__ import annotations

import enum

import torch

from . import _cpu_nm_pack
from . import _validate as v
from .backend import Backend
from .dispatch import resolve_backend
from .spec import accepts_n_for_block, check_block
from .formats import NMPacked
from .reference import (
    apply_nm_ref,
    block_mask_1xn_ref,
    block_scores_1xn_ref,
    compress_24_ref,
    decompress_24_ref,
    nm_mask_ref,
    pack_nm_ref,
    to_bsr_1xn_ref,
    unpack_nm_ref,
)
from .reference.block_1xn import expand_block_mask_1xn, filter_order_1xn, drop_lowest_fraction
from .reference.nm_pack import as_rows, first_overfull_group_ref
from .reference.semi24 import COL_ALIGN, META_GROUP, ROW_ALIGN, nibbles_24_ref

# Weight dtypes the packers accept: every floating dtype plus int8 (quantized weights).
PACK_DTYPES = v.FLOAT_DTYPES + (torch.int8,)


class BlockCriterion(str, enum.Enum):
    L1 = "l1"  # lowest L1-norm blocks go
    RANDOM = "random"  # the paper's baseline


def _kernels():
    try:
        from . import kernels
    except ImportError as e:  # pragma: no cover - triton missing, or a source tree that was never installed
        raise ImportError(
            f"nmkern: the triton backend could not import nmkern.kernels ({e}); it needs the 'triton' package and an "
            "installed nmkern (`pip install -e .` maps the top-level kernels/ folder to nmkern.kernels); "
            "or use backend='reference'"
        ) from e
    return kernels


def _masked_op(op: str, w, n, m, dim, backend):
    v.check_tensor(op, "w", w, v.FLOAT_DTYPES)
    v.check_nm(op, n, m)
    dim = v.check_group_dim(op, w, dim, m)
    b = _cpu_nm_pack.resolve_path(op, backend, w)
    if not w.is_meta and b is not Backend.CPU:  # meta: shape only; the CPU kernel scans w itself
        v.check_finite(op, "w", w)
    return dim, b


def _nm_mask_cpu(op: str, w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    x = w.movedim(dim, -1)
    keep = _cpu_nm_pack.nm_mask_rows(x.reshape(-1, x.shape[-1]), n, m, check_finite=True)
    if keep is None:  # w holds a NaN or an Inf: the message names the first one
        v.check_finite(op, "w", w)
        raise RuntimeError(f"{op}: the CPU kernel found a NaN or an Inf in w that torch.isfinite did not")
    return keep.reshape(x.shape).movedim(-1, dim)


def _nm_mask_triton(w: torch.Tensor, n: int, m: int, dim: int, apply: bool) -> torch.Tensor:
    x2 = w.movedim(dim, -1).contiguous()
    out = _kernels().nm_mask_triton(x2.reshape(-1, x2.shape[-1]), n, m, apply=apply)
    return out.reshape(x2.shape).movedim(-1, dim)


class _ApplyNMTriton(torch.autograd.Function):
    """The fused Triton ``apply_nm`` with the reference's gradient, ``grad * mask`` (mask recomputed)."""

    @staticmethod
    def forward(ctx, w, n: int, m: int, dim: int):
        ctx.n, ctx.m, ctx.dim = n, m, dim
        ctx.save_for_backward(w)
        return _nm_mask_triton(w, n, m, dim, apply=True)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        mask = _nm_mask_triton(w, ctx.n, ctx.m, ctx.dim, apply=False)
        return grad * mask, None, None, None


def nm_mask(w: torch.Tensor, n: int, m: int, dim: int = -1, *, backend="auto") -> torch.Tensor:
    """Boolean mask keeping the n largest |w| of each group of m consecutive elements along ``dim``.

    Ties go to the lower index. Linear weights ``(out, in)`` group along ``in``
    (``dim=-1``); conv weights ``(O, I, kh, kw)`` along input channels (``dim=1``).
    """
    dim, b = _masked_op("nm_mask", w, n, m, dim, backend)
    if b is Backend.REFERENCE:
        return nm_mask_ref(w, n, m, dim)
    if b is Backend.CPU:
        return _nm_mask_cpu("nm_mask", w, n, m, dim)
    return _nm_mask_triton(w, n, m, dim, apply=False)


def apply_nm(w: torch.Tensor, n: int, m: int, dim: int = -1, *, backend="auto") -> torch.Tensor:
    """``w`` with all but the n largest |w| of each group of m set to zero (one fused pass).

    Differentiable on every backend: the gradient reaching ``w`` is ``grad * nm_mask(w)``.
    """
    dim, b = _masked_op("apply_nm", w, n, m, dim, backend)
    if b is Backend.REFERENCE:
        return apply_nm_ref(w, n, m, dim)
    if b is Backend.CPU:  # torch.where carries the gradient, grad * mask, as in the reference
        return torch.where(_nm_mask_cpu("apply_nm", w, n, m, dim), w, torch.zeros((), dtype=w.dtype))
    return _ApplyNMTriton.apply(w, n, m, dim)


def _first_bad_group_24(w: torch.Tensor) -> int:
    bad = (nibbles_24_ref(w) < 0).reshape(-1).nonzero()
    return int(bad[0]) if bad.numel() else -1


def compress_24(w: torch.Tensor, *, backend="auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse fp16/bf16 matrix into (values, metadata) in the CUTLASS SM80 layout.

    ``w`` is ``(rows, k)`` with rows % 32 == 0 and k % 32 == 0 and at most two
    non-zeros in every group of four along ``k`` (use :func:`apply_nm` with n=2, m=4
    first). Returns ``values (rows, k/2)`` in ``w.dtype`` and ``meta (rows, k/16)``
    int16, bit-identical to torch's ``sparse_semi_structured_from_dense_cutlass``.
    """
    op = "compress_24"
    v.check_tensor(op, "w", w, v.HALF_DTYPES, ndim=2)
    rows, k = w.shape
    if rows == 0 or rows % ROW_ALIGN or k == 0 or k % COL_ALIGN:
        raise ValueError(
            f"{op}: shape {tuple(w.shape)} does not fit the CUTLASS 2:4 layout, which needs rows % {ROW_ALIGN} == 0 "
            f"and columns % {COL_ALIGN} == 0; pad the weight (zero rows/columns) or use pack_nm(w, 2, 4)"
        )
    b = resolve_backend(op, backend, w)
    if b is Backend.REFERENCE:
        first_bad = _first_bad_group_24(w) if not w.is_meta else -1
        if first_bad < 0:
            return compress_24_ref(w)
    else:
        values, meta, first_bad = _kernels().compress_24_triton(w.contiguous())
        if first_bad < 0:
            return values, meta
    row, group = divmod(first_bad, k // 4)
    raise ValueError(
        f"{op}: w (shape {tuple(w.shape)}) is not 2:4 sparse: row {row}, group {group} (columns {4 * group}.."
        f"{4 * group + 3}) has more than 2 non-zeros; prune it first with nmkern.apply_nm(w, 2, 4)"
    )


def decompress_24(values: torch.Tensor, meta: torch.Tensor, *, backend="auto") -> torch.Tensor:
    """Dense ``(rows, 2 * values.shape[1])`` matrix from :func:`compress_24` output.

    ``meta`` is checked first: every nibble must name two distinct slots in increasing
    order (``idx0 | idx1 << 2``, ``idx0 < idx1``); anything else raises ``ValueError``.
    """
    op = "decompress_24"
    v.check_tensor(op, "values", values, v.HALF_DTYPES, ndim=2)
    v.check_tensor(op, "meta", meta, (torch.int16,), ndim=2)
    v.check_same_device(op, values=values, meta=meta)
    rows, half = values.shape
    if rows % ROW_ALIGN or (2 * half) % COL_ALIGN or meta.shape != (rows, 2 * half // META_GROUP):
        raise ValueError(
            f"{op}: values {tuple(values.shape)} and meta {tuple(meta.shape)} do not match the CUTLASS 2:4 layout; "
            f"expected meta of shape ({rows}, {2 * half // META_GROUP}) with rows % {ROW_ALIGN} == 0 - pass what compress_24 returned"
        )
    v.check_meta_24(op, meta)
    b = resolve_backend(op, backend, values)
    if b is Backend.REFERENCE:
        return decompress_24_ref(values, meta)
    return _kernels().decompress_24_triton(values.contiguous(), meta.contiguous())


def pack_nm(w: torch.Tensor, n: int, m: int, dim: int = -1, *, backend="auto") -> NMPacked:
    """Pack an N:M-sparse tensor into values plus ceil(log2 m)-bit in-group indices.

    ``w`` must have at most n non-zeros in every group of m along ``dim`` (prune
    it with :func:`apply_nm` first). The round trip ``unpack_nm(pack_nm(w))`` gives
    back every kept value bit for bit (NaN/Inf and -0.0 included); dropped slots come
    back as +0.0, so a dropped -0.0 loses its sign (it compares equal: ``-0.0 == 0.0``).
    """
    op = "pack_nm"
    v.check_tensor(op, "w", w, PACK_DTYPES)
    v.check_nm(op, n, m)
    dim = v.check_group_dim(op, w, dim, m)
    w2 = as_rows(w, dim).contiguous()
    b = _cpu_nm_pack.resolve_path(op, backend, w)
    if b is Backend.REFERENCE:
        first_bad = first_overfull_group_ref(w2, n, m) if not w.is_meta else -1
        if first_bad < 0:
            values, indices = pack_nm_ref(w2, n, m)
    elif b is Backend.CPU:
        values, indices, first_bad = _cpu_nm_pack.pack_nm_rows(w2, n, m)
    else:
        values, indices, first_bad = _kernels().pack_nm_triton(w2, n, m)
    if first_bad >= 0:
        row, group = divmod(first_bad, w2.shape[1] // m)
        raise ValueError(
            f"{op}: w (shape {tuple(w.shape)}) is not {n}:{m} sparse along dim {dim}: row {row} (of the 2-D view "
            f"{tuple(w2.shape)}), group {group} has more than {n} non-zeros; prune it first with "
            f"nmkern.apply_nm(w, {n}, {m}, dim={dim})"
        )
    return NMPacked(values=values, indices=indices, n=n, m=m, shape=w.shape, dim=dim)


def unpack_nm(packed: NMPacked, *, backend="auto") -> torch.Tensor:
    """The dense tensor an :class:`NMPacked` holds.

    ``packed`` is checked first (shapes against ``shape``/``n``/``m``/``dim``, dtypes, and
    every group's indices distinct, increasing and ``< m``): ``ValueError`` otherwise.
    """
    op = "unpack_nm"
    if not isinstance(packed, NMPacked):
        raise TypeError(f"{op}: expected an nmkern.NMPacked (from pack_nm), got {type(packed).__name__}")
    v.check_nm_packed(op, packed, PACK_DTYPES)
    b = resolve_backend(op, backend, packed.values)
    if b is Backend.REFERENCE:
        dense2 = unpack_nm_ref(packed.values, packed.indices, packed.n, packed.m)
    else:
        dense2 = _kernels().unpack_nm_triton(packed.values.contiguous(), packed.indices.contiguous(), packed.n, packed.m)
    return packed.dense_from_rows(dense2)


def _check_block_weight(op: str, w, block) -> None:
    v.check_tensor(op, "w", w, v.FLOAT_DTYPES, ndim=(2, 3, 4, 5))
    if w.numel() == 0:
        raise ValueError(f"{op}: w of shape {tuple(w.shape)} is empty; there are no blocks to score or prune")
    check_block(op, block)
    if w.shape[0] % block:
        raise ValueError(
            f"{op}: {w.shape[0]} output channels (shape {tuple(w.shape)}) are not divisible by the block size "
            f"block={block}; choose a block that divides {w.shape[0]}"
        )


@accepts_n_for_block
def block_mask_1xn(
    w: torch.Tensor,
    block: int,
    sparsity: float,
    *,
    rearrange: bool = False,
    criterion: BlockCriterion | str = BlockCriterion.L1,
    generator: torch.Generator | None = None,
    backend="auto",
) -> torch.Tensor:
    """1xN block keep-mask: blocks of ``block`` output channels x 1 input channel (x the whole kernel).

    The ``floor(sparsity * blocks)`` blocks with the lowest L1 norm are dropped
    (``criterion="random"``: random blocks, the paper's baseline; pass
    ``generator`` for reproducibility). ``rearrange=True`` first sorts output
    filters by L1 norm, forms blocks in that order and scatters the mask back.
    """
    op = "block_mask_1xn"
    _check_block_weight(op, w, block)
    sparsity = v.check_fraction(op, "sparsity", sparsity)
    try:
        criterion = BlockCriterion(criterion)
    except ValueError:
        raise ValueError(f"{op}: unknown criterion {criterion!r}; choose 'l1' or 'random'") from None
    if not w.is_meta:  # meta: shape only
        v.check_finite(op, "w", w)
    b = resolve_backend(op, backend, w)
    if b is Backend.REFERENCE or criterion is BlockCriterion.RANDOM:
        return block_mask_1xn_ref(w, block, sparsity, rearrange=rearrange, criterion=criterion.value,
                                  generator=generator)
    order = filter_order_1xn(w) if rearrange else None
    src = (w[order] if order is not None else w).contiguous()
    scores = _kernels().block_scores_1xn_triton(src.reshape(src.shape[0], src.shape[1], -1), block)
    mask_sorted = expand_block_mask_1xn(drop_lowest_fraction(scores, sparsity), w.shape, block)
    if order is None:
        return mask_sorted
    mask = torch.empty_like(mask_sorted)
    mask[order] = mask_sorted
    return mask


@accepts_n_for_block
def block_scores_1xn(w: torch.Tensor, block: int, *, backend="auto") -> torch.Tensor:
    """L1 norm of every 1xN block, ``(O/block, I)`` fp32."""
    op = "block_scores_1xn"
    _check_block_weight(op, w, block)
    b = resolve_backend(op, backend, w)
    if b is Backend.REFERENCE:
        return block_scores_1xn_ref(w, block)
    return _kernels().block_scores_1xn_triton(w.contiguous().reshape(w.shape[0], w.shape[1], -1), block)


@accepts_n_for_block
def to_bsr_1xn(w: torch.Tensor, block: int) -> torch.Tensor:
    """``torch.sparse_bsr_tensor`` with blocksize (block, 1) of a 1xN block-sparse weight.

    Conv weights ``(O, I, kh, kw)`` are viewed as ``(O, I*kh*kw)`` (PyTorch's own
    flattening). Only non-zero blocks are stored.
    """
    op = "to_bsr_1xn"
    _check_block_weight(op, w, block)
    v.reject_meta(op, "w", w, "the number of stored blocks depends on its values")
    return to_bsr_1xn_ref(w.reshape(w.shape[0], -1), block)
