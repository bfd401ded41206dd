"""Dense weights from packed buffers, in ops that every graph exporter translates (ONNX first of all).

The reference decoders (:func:`~nmkern.reference.nm_pack.unpack_words`,
:func:`~nmkern.reference.linear.bsr_dense_ref`) use int64 bit shifts and masks, ``scatter`` and
``searchsorted``. ONNX has no ``searchsorted``, and its ``BitShift`` is defined on unsigned
integers only, so a shifted int64 word (the layout's words are int32 read as unsigned) does not
survive translation. These decoders give the same dense matrix with integer remainders, exact
divisions, comparisons, ``where``, ``sum``, ``cumsum``, ``index_add`` and indexed assignment, all on static
shapes; the tests compare them to the reference decoders bit for bit and run the exported graphs
in onnxruntime.

Cost: the N:M decode builds a ``(rows, K/m, n, m)`` comparison, n times the dense weight's
elements, once per graph run (or once at export, where the exporter folds constants).
"""

from __future__ import annotations

import torch

from .nm_pack import index_bits, indices_per_word

_WORD = 2 ** 32  # an int32 index word read as unsigned (the layout's words are bit patterns)


def nm_indices_graph(indices: torch.Tensor, m: int, length: int) -> torch.Tensor:
    """The in-group indices ``(rows, length)`` uint8 of packed int32 ``indices`` (as ``unpack_words``)."""
    bits, per = index_bits(m), indices_per_word(m)
    words = torch.remainder(indices.to(torch.int64), _WORD)  # two's complement back to [0, 2**32)
    parts = []
    for j in range(per):  # index j sits at bit bits*j
        low, below = (torch.remainder(words, 2 ** (bits * i)) for i in (j + 1, j))
        # (low - below) is idx_j * 2**(bits*j): at most 4 significant bits, so even the ONNX
        # translation, which divides int64 in float32 (24-bit mantissa), divides it exactly
        parts.append(torch.div(low - below, 2 ** (bits * j), rounding_mode="floor").to(torch.uint8))
    # one byte per index, stacked after the cast: where the exporter folds this decode into
    # constants (small layers), it stores uint8 indices, not int64 (which would outweigh the weight)
    idx = torch.stack(parts, -1)
    return idx.reshape(indices.shape[0], indices.shape[1] * per)[:, :length]


def nm_dense_rows_graph(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The dense ``(rows, K)`` matrix of packed N:M ``values (rows, K*n/m)`` / ``indices`` (as ``unpack_nm_ref``)."""
    rows, kept = values.shape
    groups = kept // n
    pos = nm_indices_graph(indices, m, kept).reshape(rows, groups, n, 1)
    slots = torch.arange(m, dtype=torch.uint8, device=values.device)
    # slot j of a group takes the kept value whose index is j (indices within a group differ);
    # where/sum, not multiply: 0 * inf would turn a pruned slot into NaN
    hit = pos == slots
    dense = torch.where(hit, values.reshape(rows, groups, n, 1), torch.zeros((), dtype=values.dtype,
                                                                            device=values.device))
    return dense.sum(2).reshape(rows, groups * m)


def bsr_dense_graph(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
                    in_features: int) -> torch.Tensor:
    """The dense ``(out, K)`` matrix of 1xN BSR buffers (blocksize ``(block, 1)``; as ``bsr_dense_ref``)."""
    nnzb, block = values.shape
    crow = crow.to(torch.int64)
    # block row of stored block b = how many rows end at or before b: count the row ends
    # (crow[1:]) at each position, then a running sum; static shapes, no searchsorted
    ends = torch.zeros(nnzb + 1, dtype=torch.int64, device=crow.device)
    ends = ends.index_add(0, crow[1:], torch.ones_like(crow[1:]))
    block_row = torch.cumsum(ends, 0)[:nnzb]
    flat = block_row * in_features + col.to(torch.int64)
    dense = torch.zeros(out_features // block * in_features, block, dtype=values.dtype, device=values.device)
    dense = dense.index_put((flat,), values)
    return dense.reshape(out_features // block, in_features, block).permute(0, 2, 1).reshape(out_features,
                                                                                            in_features)
