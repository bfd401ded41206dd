"""Packed weight layouts of the CPU kernels (csrc/cpu), in pure torch.

Both convert losslessly from a masked dense ``(rows, K)`` weight and back, keeping its dtype
(the kernels take fp32, bf16 and fp16);
``csrc/cpu/nmkern_cpu.h`` documents the same layouts from the C side.

N:M row-tile layout (n kept of every m along K, m <= 16):
    rows are cut into tiles of 8 (the last one zero-padded); ``J = K // m * n``
    kept slots per row, each group's kept columns in ascending order.
    ``values[t, j, l]`` (flattened) is slot j of row ``8t + l``; its in-group
    index (kept column minus ``m * (j // n)``) sits at ``bits = ceil(log2 m)``
    bits: the 8 lanes of slot j form one little-endian field of ``8 * bits`` bits
    (lane l at bit ``l * bits``), stored in ``bits`` bytes at byte offset
    ``(t * J + j) * bits``; 4 zero pad bytes follow the last field. Index bytes
    are ``bits / 32`` of the value bytes: 2:4 and 1:4 carry 1/16 extra.

1xN BSR layout (blocks of N consecutive output rows x 1 input column):
    ``rowptr`` int32 ``(rows/N + 1,)``, ``col`` uint16 when K <= 65536 (else
    int32) ``(nnzb,)`` ascending per block row, ``values`` ``(nnzb, N)``.
    A block is stored when any of its N weights is non-zero.
"""

from __future__ import annotations

import torch

from .block_1xn import to_bsr_1xn_ref
from .nm_pack import index_bits, kept_positions_ref, pack_words, unpack_words

TILE_ROWS = 8
INDEX_PAD_BYTES = 4
UINT16_MAX_K = 65536


def nm_tile_pack_ref(w2: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values ``(tiles*J*8,)`` in w2's dtype, index bytes uint8 ``(tiles*J*bits + 4,)``) of an N:M-sparse ``w2``."""
    rows, k = w2.shape
    bits = index_bits(m)
    tiles = -(-rows // TILE_ROWS)
    padded = torch.zeros(tiles * TILE_ROWS, k, dtype=w2.dtype)
    padded[:rows] = w2
    pos = kept_positions_ref(padded, n, m)  # (rows8, G, n) in-group indices, ascending
    groups = k // m
    cols = pos + (torch.arange(groups) * m).view(1, groups, 1)
    values = padded.gather(1, cols.reshape(tiles * TILE_ROWS, -1))  # (rows8, J)
    return nm_tiles_from_slots_ref(values, pos.reshape(tiles * TILE_ROWS, -1), m)


def nm_tiles_from_slots_ref(values: torch.Tensor, positions: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-tile layout of kept slots: ``values`` and in-group ``positions``, both ``(rows8, J)`` with rows a
    multiple of 8 (padding rows included), into (values ``(tiles*J*8,)``, index bytes) as :func:`nm_tile_pack_ref`."""
    bits = index_bits(m)
    rows8, j = values.shape
    tiles = rows8 // TILE_ROWS
    values = values.reshape(tiles, TILE_ROWS, j).transpose(1, 2).contiguous()  # (tiles, J, 8)
    lanes = positions.reshape(tiles, TILE_ROWS, j).transpose(1, 2).to(torch.int64)  # (tiles, J, 8)
    fields = (lanes << (torch.arange(TILE_ROWS) * bits)).sum(-1)  # disjoint bit ranges: sum == or
    field_bytes = (fields.unsqueeze(-1) >> (torch.arange(bits) * 8)) & 0xFF  # (tiles, J, bits), little-endian
    index = torch.cat([field_bytes.reshape(-1).to(torch.uint8), torch.zeros(INDEX_PAD_BYTES, dtype=torch.uint8)])
    return values.reshape(-1), index


def nm_tile_positions_ref(index: torch.Tensor, tile0: int, tile1: int, j: int, m: int) -> torch.Tensor:
    """In-group positions ``(tile1 - tile0, J, 8)`` int64 of tiles ``[tile0, tile1)`` from the layout's index bytes
    (``positions`` of :func:`nm_tiles_from_slots_ref`, tile by tile)."""
    bits = index_bits(m)
    field_bytes = index[tile0 * j * bits: tile1 * j * bits].to(torch.int64).reshape(tile1 - tile0, j, bits)
    fields = (field_bytes << (torch.arange(bits) * 8)).sum(-1)  # (tiles, J)
    return (fields.unsqueeze(-1) >> (torch.arange(TILE_ROWS) * bits)) & ((1 << bits) - 1)


def nm_layout_from_packed_ref(values: torch.Tensor, indices: torch.Tensor, n: int, m: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values ``(tiles*J*8,)``, index bytes) of the row-tile layout from packed rows: ``values (O, J)`` and
    ``indices`` (int32 words, :func:`nmkern.reference.nm_pack.pack_words`); the last tile's padding rows keep
    the first n positions of each group (any in-range position reads a zero value)."""
    rows, slots = values.shape
    tiles = -(-rows // TILE_ROWS)
    padded = torch.zeros(tiles * TILE_ROWS, slots, dtype=values.dtype)
    padded[:rows] = values
    positions = torch.arange(n, dtype=torch.int64).repeat(slots // n).expand(tiles * TILE_ROWS, slots).clone()
    positions[:rows] = unpack_words(indices, m, slots)
    return nm_tiles_from_slots_ref(padded, positions, m)


def nm_words_from_layout_ref(index: torch.Tensor, rows: int, k: int, n: int, m: int,
                             tiles_per_step: int = 64) -> torch.Tensor:
    """The packed int32 words ``(rows, W)`` (unused bits zero) of a row-tile layout's index bytes: the inverse of
    :func:`nm_layout_from_packed_ref` for the indices. ``tiles_per_step`` tiles at a time: the int64 positions of
    a 4096x4096 2:4 layer at once would be a 64 MB temporary."""
    slots = k // m * n
    words = torch.empty(rows, -(-slots // (32 // index_bits(m))), dtype=torch.int32)
    for tile0 in range(0, -(-rows // TILE_ROWS), tiles_per_step):
        row0, row1 = tile0 * TILE_ROWS, min(rows, (tile0 + tiles_per_step) * TILE_ROWS)
        lanes = nm_tile_positions_ref(index, tile0, -(-row1 // TILE_ROWS), slots, m)  # (tiles, J, 8)
        words[row0:row1] = pack_words(lanes.transpose(1, 2).reshape(-1, slots)[:row1 - row0], m)
    return words


def nm_tile_unpack_ref(values: torch.Tensor, index: torch.Tensor, rows: int, k: int, n: int, m: int) -> torch.Tensor:
    """Dense ``(rows, k)`` from the row-tile layout (inverse of :func:`nm_tile_pack_ref`)."""
    tiles = -(-rows // TILE_ROWS)
    j = k // m * n
    lanes = nm_tile_positions_ref(index, 0, tiles, j, m)  # (tiles, J, 8)
    cols = lanes + (torch.arange(j) // n * m).view(1, j, 1)
    dense = torch.zeros(tiles, TILE_ROWS, k, dtype=values.dtype)
    dense.scatter_(2, cols.transpose(1, 2), values.reshape(tiles, j, TILE_ROWS).transpose(1, 2))
    return dense.reshape(tiles * TILE_ROWS, k)[:rows]


def bsr_1xn_pack_ref(w2: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rowptr int32, col uint16/int32, values ``(nnzb, block)`` in w2's dtype) of 2-D ``w2``."""
    bsr = to_bsr_1xn_ref(w2, block)
    k = w2.shape[1]
    col_dtype = torch.uint16 if k <= UINT16_MAX_K else torch.int32
    rowptr = bsr.crow_indices().to(torch.int32)
    col = bsr.col_indices().to(col_dtype)
    values = bsr.values().reshape(-1, block).contiguous()
    return rowptr.contiguous(), col.contiguous(), values


def bsr_1xn_unpack_ref(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """Dense ``(rows, k)`` from the BSR layout (inverse of :func:`bsr_1xn_pack_ref`)."""
    block = values.shape[1]
    counts = (rowptr[1:] - rowptr[:-1]).to(torch.int64)
    brow = torch.repeat_interleave(torch.arange(rows // block), counts)
    dense = torch.zeros(rows // block, k, block, dtype=values.dtype)
    dense[brow, col.to(torch.int64)] = values
    return dense.permute(0, 2, 1).reshape(rows, k)
