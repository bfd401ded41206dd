"""2:4 compression into the CUTLASS SM80 layout (values + reordered int16 metadata).

Semantics and layout: :mod:`nmkern.reference.semi24`. One program handles
``BLOCK_Q`` int16 metadata words; a word covers 16 consecutive elements of a row
(four groups of four), so the tile is ``(BLOCK_Q, 4 groups, 4 lanes)``.

Everything moves as raw 16-bit patterns (the launcher passes an int16 view), so
-0.0, NaN payloads and Inf survive bit for bit; "non-zero" is "any bit other than
the sign bit set", which is ``w != 0`` for fp16 and bf16 alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nmkern.reference.semi24 import META_GROUP, NIBBLE_OF_PATTERN

from ._configs import aot_spec, launch

# NIBBLE_OF_PATTERN as one 64-bit constant: nibble of pattern p at bits 4p..4p+3.
# Entries -1 (more than two non-zeros) become 0 here; those groups are flagged
# separately through first_bad and never returned.
NIBBLE_TABLE_BITS = sum((nib if nib >= 0 else 0) << (4 * p) for p, nib in enumerate(NIBBLE_OF_PATTERN))

_NO_BAD = 2**62  # first_bad sentinel before the atomic_min


@triton.jit
def cutlass_meta_offset(r, c, rows):
    """Flat offset of logical int16 metadata (r, c) in CUTLASS's interleaved layout.

    Rows are permuted within each 32-row block (r -> 4*(r%8) + (r%32)//8), the
    off-diagonal elements of every 2x2 block are swapped, and the result is stored
    column-major in pairs of columns (ColumnMajorInterleaved<2>); see
    nmkern.reference.semi24.meta_reorder_offsets.
    """
    dr = (r // 32) * 32 + (r % 8) * 4 + (r % 32) // 8
    swap_down = ((dr % 2) == 0) & ((c % 2) == 1)
    swap_up = ((dr % 2) == 1) & ((c % 2) == 0)
    shift = swap_down.to(r.dtype) - swap_up.to(r.dtype)
    dr = dr + shift
    dc = c - shift
    return (dc // 2) * (rows * 2) + dr * 2 + (dc % 2)


@triton.jit
def compress_24_kernel(
    w_ptr,  # (rows, k) int16 view of fp16/bf16
    values_ptr,  # (rows, k/2) int16 view
    meta_ptr,  # (rows, k/16) int16, CUTLASS order
    first_bad_ptr,  # (1,) int64: min flat group index with > 2 non-zeros
    rows,
    meta_cols,  # k / 16
    TABLE: tl.constexpr,  # NIBBLE_TABLE_BITS
    BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)  # flat logical word = r * meta_cols + c
    num_words = rows * meta_cols
    gi = tl.arange(0, 4)
    lane = tl.arange(0, 4)
    q_ok = q < num_words
    group = q[:, None] * 4 + gi[None, :]  # flat group index (BLOCK_Q, 4) = row * (k/4) + group
    ok2 = q_ok[:, None] & (gi[None, :] < 4)
    offs = group[:, :, None] * 4 + lane[None, None, :]
    bits = tl.load(w_ptr + offs, mask=ok2[:, :, None], other=0)
    nonzero = ((bits.to(tl.int32) & 0x7FFF) != 0).to(tl.int32)
    pattern = tl.sum(nonzero << lane[None, None, :], axis=2)  # (BLOCK_Q, 4)
    count = tl.sum(nonzero, axis=2)
    nib = (TABLE >> (pattern.to(tl.int64) * 4)) & 0xF
    idx0 = nib & 3
    idx1 = nib >> 2
    v0 = tl.load(w_ptr + group * 4 + idx0, mask=ok2)
    v1 = tl.load(w_ptr + group * 4 + idx1, mask=ok2)
    tl.store(values_ptr + group * 2, v0, mask=ok2)
    tl.store(values_ptr + group * 2 + 1, v1, mask=ok2)
    word = tl.sum(nib << (gi[None, :] * 4).to(tl.int64), axis=1)  # (BLOCK_Q,) in [0, 0xFFFF]
    r = q // meta_cols
    c = q % meta_cols
    dst = cutlass_meta_offset(r, c, rows)
    tl.store(meta_ptr + dst, word.to(tl.int16), mask=q_ok)
    bad = ok2 & (count > 2)
    first = tl.min(tl.min(tl.where(bad, group, 2**62), axis=1), axis=0)
    if first < 2**62:
        tl.atomic_min(first_bad_ptr, first)


def compress_24_configs() -> list[dict]:
    """Configs of :func:`compress_24_kernel`; the launcher runs the first.

    ``BLOCK_Q = 64`` metadata words = 1024 elements per program (a ``(64, 4, 4)``
    tile), 8 per thread at ``num_warps = 4``.
    """
    return [{"BLOCK_Q": 64, "num_warps": 4}]


def compress_24_triton(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(values, meta, first_bad)`` of contiguous fp16/bf16 ``w`` (rows % 32 == 0, k % 32 == 0).

    ``first_bad`` is the flat index ``row * (k // 4) + group`` of the first group
    holding more than two non-zeros, or -1; values/meta are meaningless then.
    """
    rows, k = w.shape
    meta_cols = k // META_GROUP
    values = torch.empty(rows, k // 2, dtype=w.dtype, device=w.device)
    meta = torch.empty(rows, meta_cols, dtype=torch.int16, device=w.device)
    first_bad = torch.full((1,), _NO_BAD, dtype=torch.int64, device=w.device)
    configs = compress_24_configs()
    launch(compress_24_kernel, configs, configs[0], lambda cfg: (triton.cdiv(rows * meta_cols, cfg["BLOCK_Q"]),),
           w.view(torch.int16), values.view(torch.int16), meta, first_bad, rows, meta_cols, TABLE=NIBBLE_TABLE_BITS)
    bad = int(first_bad.item())
    return values, meta, (-1 if bad == _NO_BAD else bad)


AOT_SPECS = [
    aot_spec("compress_24", compress_24_kernel,
             {"w_ptr": "*i16", "values_ptr": "*i16", "meta_ptr": "*i16", "first_bad_ptr": "*i64", "rows": "i32",
              "meta_cols": "i32"},
             compress_24_configs()[0], {"TABLE": NIBBLE_TABLE_BITS})
]
