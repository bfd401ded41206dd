"""Packed weight containers."""

from __future__ import annotations

import dataclasses

import torch

from .reference.nm_pack import from_rows, index_bits, indices_per_word


@dataclasses.dataclass(frozen=True)
class NMPacked:
    """A general N:M-sparse tensor: kept values plus bit-packed in-group indices.

    Attributes:
        values: ``(rows, K*n/m)``, same dtype as the dense tensor; the kept
            elements of each group in index order. ``rows``/``K`` are the dense
            tensor viewed 2-D with ``dim`` innermost (see
            :func:`nmkern.reference.nm_pack.as_rows`).
        indices: ``(rows, ceil(K*n/m / (32 // bits)))`` int32, in-group index of
            each kept value at ``bits = ceil(log2 m)`` bits, LSB first, each row
            starting a new word.
        n, m: the pattern (n kept of every m).
        shape: shape of the dense tensor.
        dim: the (non-negative) dimension the groups run along.
    """

    values: torch.Tensor
    indices: torch.Tensor
    n: int
    m: int
    shape: torch.Size
    dim: int

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    @property
    def bits(self) -> int:
        return index_bits(self.m)

    @property
    def indices_per_word(self) -> int:
        return indices_per_word(self.m)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed tensors (values + indices)."""
        return self.values.numel() * self.values.element_size() + self.indices.numel() * 4

    def to_dense(self, backend="auto") -> torch.Tensor:
        from .functional import unpack_nm

        return unpack_nm(self, backend=backend)

    def to(self, device) -> "NMPacked":
        return dataclasses.replace(self, values=self.values.to(device), indices=self.indices.to(device))

    def dense_from_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """Reshape a ``(rows, K)`` tensor back to :attr:`shape`."""
        return from_rows(x2, self.shape, self.dim)
