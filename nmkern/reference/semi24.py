"""Reference 2:4 compression in the CUTLASS SM80 layout (fp16 / bf16).

Format facts (the layout torch's ``sparse_semi_structured_from_dense_cutlass``
produces, which CUTLASS's SM80 sparse GEMM reads):

* ``values``: ``(rows, k/2)``; each group of 4 contributes its two kept elements in
  index order.
* one nibble per group, ``idx0 | idx1 << 2`` with idx0 < idx1; four consecutive
  groups of a row fill one int16 (group g at bits ``4*(g%4)``), so metadata is
  ``(rows, k/16)`` int16.
* groups with fewer than two non-zeros still name two slots; the choice below is
  the one torch makes (its boolean encoding), so the bytes are identical.
* the int16 metadata is then scattered into CUTLASS's interleaved column-major
  order (:func:`meta_reorder_offsets`).
"""

from __future__ import annotations

import torch

# Non-zero pattern of a group (bit i set <=> element i != 0) -> metadata nibble.
# -1: more than two non-zeros, not 2:4. Underfull groups use torch's choices:
# 0000, 0100, 1000, 1100 -> slots (2, 3); 0001 -> (0, 2); 0010 -> (1, 2).
NIBBLE_OF_PATTERN = (
    0b1110, 0b1000, 0b1001, 0b0100,  # 0000 0001 0010 0011
    0b1110, 0b1000, 0b1001, -1,      # 0100 0101 0110 0111
    0b1110, 0b1100, 0b1101, -1,      # 1000 1001 1010 1011
    0b1110, -1, -1, -1,              # 1100 1101 1110 1111
)

ROW_ALIGN = 32  # int16 metadata rows are interleaved in groups of 32
META_GROUP = 16  # one int16 holds the nibbles of 16 consecutive elements
COL_ALIGN = 32  # ColumnMajorInterleaved<2> pairs int16 metadata columns: k % 32 == 0


def meta_reorder_offsets(rows: int, meta_cols: int, device=None) -> torch.Tensor:
    """Flat destination offset of logical int16 metadata element (r, c), shape (rows, meta_cols).

    CUTLASS keeps int16 metadata "ColumnMajorInterleaved<2>" after permuting rows
    within each 32-row group (row r -> 4*(r%8) + (r%32)//8) and swapping the
    off-diagonal elements of every 2x2 block.
    """
    r = torch.arange(rows, device=device).unsqueeze(1).expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device).unsqueeze(0).expand(rows, meta_cols)
    dr = (r // 32) * 32 + (r % 8) * 4 + (r % 32) // 8
    swap_down = (dr % 2 == 0) & (c % 2 == 1)  # top-right of a 2x2 block -> bottom-left
    swap_up = (dr % 2 == 1) & (c % 2 == 0)
    shift = swap_down.long() - swap_up.long()
    dr = dr + shift
    dc = c - shift
    return (dc // 2) * (rows * 2) + dr * 2 + (dc % 2)


def nibbles_24_ref(w: torch.Tensor) -> torch.Tensor:
    """Metadata nibble per group of 4, ``(rows, k/4)`` int64; -1 marks a group with > 2 non-zeros."""
    nz = (w != 0).reshape(w.shape[0], -1, 4).long()
    pattern = nz[..., 0] | nz[..., 1] << 1 | nz[..., 2] << 2 | nz[..., 3] << 3
    table = torch.tensor(NIBBLE_OF_PATTERN, dtype=torch.int64, device=w.device)
    return table[pattern]


def compress_24_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (rows, k/2), meta (rows, k/16) int16) of a 2:4-sparse ``w``; no checks."""
    rows, k = w.shape
    nib = nibbles_24_ref(w)
    idx = torch.stack((nib & 3, (nib >> 2) & 3), dim=-1)  # (rows, k/4, 2)
    values = w.reshape(rows, k // 4, 4).gather(2, idx).reshape(rows, k // 2)
    quad = nib.reshape(rows, k // META_GROUP, 4)
    meta = quad[..., 0] | quad[..., 1] << 4 | quad[..., 2] << 8 | quad[..., 3] << 12
    meta = meta.to(torch.int32).to(torch.int16)  # keep the bit pattern (wraps above 0x7fff)
    out = torch.empty(rows * (k // META_GROUP), dtype=torch.int16, device=w.device)
    out[meta_reorder_offsets(rows, k // META_GROUP, w.device).reshape(-1)] = meta.reshape(-1)
    return values, out.reshape(rows, k // META_GROUP)


def decompress_24_ref(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense ``(rows, 2 * values.shape[1])`` from CUTLASS-layout values and metadata; no checks."""
    rows, half = values.shape
    k = half * 2
    logical = meta.reshape(-1)[meta_reorder_offsets(rows, k // META_GROUP, meta.device).reshape(-1)]
    logical = logical.to(torch.int32) & 0xFFFF
    shifts = torch.arange(4, device=meta.device) * 4
    nib = (logical.reshape(rows, k // META_GROUP, 1) >> shifts) & 0xF  # (rows, k/16, 4)
    nib = nib.reshape(rows, k // 4).long()
    idx = torch.stack((nib & 3, (nib >> 2) & 3), dim=-1)
    dense = torch.zeros(rows, k // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(2, idx, values.reshape(rows, k // 4, 2))
    return dense.reshape(rows, k)
