"""Dense matrix from 2:4 values + CUTLASS SM80 metadata (inverse of compress_24).

Layout: :mod:`nmkern.reference.semi24`. One program handles ``BLOCK_Q`` logical
int16 metadata words (16 dense elements each): it reads each word from its
interleaved CUTLASS position, splits it into four nibbles ``idx0 | idx1 << 2``
and writes the two values of every group to those slots, zeros elsewhere.
Values move as raw 16-bit patterns (int16 views), so the result is bit-exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nmkern.reference.semi24 import META_GROUP

from ._configs import aot_spec, launch
from .compress_24 import cutlass_meta_offset


@triton.jit
def decompress_24_kernel(
    values_ptr,  # (rows, k/2) int16 view
    meta_ptr,  # (rows, k/16) int16, CUTLASS order
    out_ptr,  # (rows, k) int16 view
    rows,
    meta_cols,  # k / 16
    BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < rows * meta_cols
    gi = tl.arange(0, 4)
    lane = tl.arange(0, 4)
    word = tl.load(meta_ptr + cutlass_meta_offset(q // meta_cols, q % meta_cols, rows), mask=q_ok, other=0)
    word = word.to(tl.int32) & 0xFFFF
    nib = (word[:, None] >> (gi[None, :] * 4)) & 0xF  # (BLOCK_Q, 4)
    idx0 = nib & 3
    idx1 = nib >> 2
    group = q[:, None] * 4 + gi[None, :]
    ok2 = q_ok[:, None] & (gi[None, :] < 4)
    v0 = tl.load(values_ptr + group * 2, mask=ok2, other=0)
    v1 = tl.load(values_ptr + group * 2 + 1, mask=ok2, other=0)
    slot = lane[None, None, :]
    dense = tl.where(slot == idx0[:, :, None], v0[:, :, None],
                     tl.where(slot == idx1[:, :, None], v1[:, :, None], tl.zeros_like(v0)[:, :, None]))
    tl.store(out_ptr + group[:, :, None] * 4 + slot, dense, mask=ok2[:, :, None])


def decompress_24_configs() -> list[dict]:
    """Configs of :func:`decompress_24_kernel`; the launcher runs the first.

    ``BLOCK_Q = 64`` metadata words = 1024 dense elements per program, 8 per thread
    at ``num_warps = 4``, the same tile as :func:`.compress_24.compress_24_configs`.
    """
    return [{"BLOCK_Q": 64, "num_warps": 4}]


def decompress_24_triton(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense ``(rows, 2 * values.shape[1])`` from contiguous ``values`` (fp16/bf16) and int16 ``meta``."""
    rows, half = values.shape
    k = 2 * half
    meta_cols = k // META_GROUP
    out = torch.empty(rows, k, dtype=values.dtype, device=values.device)
    if out.numel() == 0:
        return out
    configs = decompress_24_configs()
    launch(decompress_24_kernel, configs, configs[0], lambda cfg: (triton.cdiv(rows * meta_cols, cfg["BLOCK_Q"]),),
           values.view(torch.int16), meta, out.view(torch.int16), rows, meta_cols)
    return out


AOT_SPECS = [
    aot_spec("decompress_24", decompress_24_kernel,
             {"values_ptr": "*i16", "meta_ptr": "*i16", "out_ptr": "*i16", "rows": "i32", "meta_cols": "i32"},
             decompress_24_configs()[0])
]
