"""Reference general N:M packing: kept values plus in-group indices at ceil(log2 m) bits.

Layout (shared with the Triton / CPU kernels):

* the tensor is viewed as 2-D ``(rows, K)`` with the grouped dim innermost
  (:func:`as_rows`); ``values`` is ``(rows, K*n/m)``, the kept elements of each
  group in index order;
* each kept element has an in-group index in ``[0, m)`` stored at
  ``bits = ceil(log2 m)`` bits; a 32-bit word holds ``32 // bits`` indices,
  LSB first, and each row starts a new word: ``indices`` is ``(rows, words)``
  int32. Index j of a row lives in word ``j // per_word`` at bit
  ``bits * (j % per_word)``.
"""

from __future__ import annotations

import math

import torch


def index_bits(m: int) -> int:
    """Bits per in-group index: 1 for m=2, 2 for m<=4, 3 for m<=8, 4 for m<=16."""
    return max(1, math.ceil(math.log2(m)))


def indices_per_word(m: int) -> int:
    return 32 // index_bits(m)


def as_rows(w: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D view ``(rows, K)`` with ``dim`` innermost; rows = leading size after the move.

    A Linear weight ``(out, in)`` grouped along ``in`` stays ``(out, in)``; a conv
    weight ``(O, I, kh, kw)`` grouped along ``I`` becomes ``(O, kh*kw*I)``, the NHWC
    order the hardware wants.
    """
    x = w.movedim(dim, -1)
    if x.dim() < 2:
        return x.reshape(1, x.numel())
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # explicit K: reshape(0, -1) is ambiguous


def from_rows(x2: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    moved_shape = list(shape)
    size = moved_shape.pop(dim)
    moved_shape.append(size)
    return x2.reshape(moved_shape).movedim(-1, dim)


def pack_words(idx: torch.Tensor, m: int) -> torch.Tensor:
    """(rows, L) int indices in [0, m) -> (rows, ceil(L/per_word)) int32 words."""
    rows, length = idx.shape
    bits, per = index_bits(m), indices_per_word(m)
    words = -(-length // per)
    padded = torch.zeros(rows, words * per, dtype=torch.int64, device=idx.device)
    padded[:, :length] = idx
    shifts = torch.arange(per, device=idx.device, dtype=torch.int64) * bits
    packed = (padded.reshape(rows, words, per) << shifts).sum(-1)  # disjoint bits: sum == or
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement into int32
    return packed.to(torch.int32)


def unpack_words(words: torch.Tensor, m: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_words`: (rows, W) int32 -> (rows, length) int64."""
    bits, per = index_bits(m), indices_per_word(m)
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
    u = words.to(torch.int64) & 0xFFFFFFFF
    idx = (u.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return idx.reshape(words.shape[0], words.shape[1] * per)[:, :length]


def kept_positions_ref(w2: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In-group indices (rows, K/m, n) of the n slots a packed group keeps, ascending.

    The non-zeros of the group plus, when it has fewer than n, its lowest-index
    zeros (for an N:M-sparse group this is its N:M mask). Only "is it zero" is
    looked at, so NaN/Inf values pack and unpack unchanged.
    """
    rows, k = w2.shape
    nonzero = (w2 != 0).reshape(rows, k // m, m).to(torch.int8)
    first = torch.sort(nonzero, dim=-1, descending=True, stable=True).indices[..., :n]
    return first.sort(-1).values


def first_overfull_group_ref(w2: torch.Tensor, n: int, m: int) -> int:
    """Flat index ``row * (K/m) + group`` of the first group of 2-D ``w2`` with more than n non-zeros, or -1."""
    rows, k = w2.shape
    over = ((w2 != 0).reshape(rows, k // m, m).sum(-1) > n).reshape(-1).nonzero()
    return int(over[0]) if over.numel() else -1


def pack_nm_ref(w2: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (rows, K*n/m), indices int32 (rows, words)) of an N:M-sparse 2-D ``w2``; no checks."""
    rows, k = w2.shape
    pos = kept_positions_ref(w2, n, m)
    values = w2.reshape(rows, k // m, m).gather(2, pos).reshape(rows, k // m * n)
    return values, pack_words(pos.reshape(rows, k // m * n), m)


def unpack_nm_ref(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Dense 2-D ``(rows, K)`` from packed values and indices; no checks."""
    rows, kept = values.shape
    groups = kept // n
    pos = unpack_words(indices, m, kept).reshape(rows, groups, n)
    dense = torch.zeros(rows, groups, m, dtype=values.dtype, device=values.device)
    dense.scatter_(2, pos, values.reshape(rows, groups, n))
    return dense.reshape(rows, groups * m)
