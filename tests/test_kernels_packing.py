"""Triton 2:4 CUTLASS compress/decompress and general N:M pack/unpack kernels.

Checked against the pure-torch references (and, for 2:4, torch's own CUTLASS
converter) bit for bit, on the CPU under ``TRITON_INTERPRET=1``. Inputs carry
ties, all-zero and underfull groups, -0.0, and (where the op only moves values)
NaN and Inf.
"""

from __future__ import annotations

import pytest
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

import nmkern
from nmkern.kernels.compress_24 import compress_24_triton
from nmkern.kernels.decompress_24 import decompress_24_triton
from nmkern.kernels.pack_nm import pack_nm_configs, pack_nm_triton
from nmkern.kernels.unpack_nm import unpack_nm_triton
from nmkern.reference import compress_24_ref, decompress_24_ref, pack_nm_ref, unpack_nm_ref
from nmkern.reference.nm_pack import indices_per_word
from nmkern.reference.semi24 import NIBBLE_OF_PATTERN

HALF = [torch.float16, torch.bfloat16]
PACKABLE = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8]
BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64, torch.int8: torch.int8}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS_VIEW[a.dtype]), b.view(BITS_VIEW[b.dtype]))


def nm_sparse(rows: int, groups: int, n: int, m: int, dtype, seed: int, specials: bool = False) -> torch.Tensor:
    """(rows, groups*m) with at most n non-zeros per group: every count 0..n occurs, ties, -0.0.

    ``specials`` puts NaN/Inf among the non-zeros (packing only moves values).
    """
    g = torch.Generator().manual_seed(seed)
    total = rows * groups
    keep_count = torch.randint(0, n + 1, (total, 1), generator=g)
    rank = torch.rand(total, m, generator=g).argsort(1).argsort(1)  # random permutation per group
    keep = rank < keep_count
    vals = torch.randint(1, 4, (total, m), generator=g).to(torch.float64) * torch.where(
        torch.rand(total, m, generator=g) < 0.5, -1.0, 1.0)
    zero = torch.where(torch.rand(total, m, generator=g) < 0.3, -0.0, 0.0)
    w = torch.where(keep, vals, zero)
    if dtype == torch.int8:
        return w.to(torch.int8).reshape(rows, groups * m)
    if specials:
        special = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
        pick = keep & (torch.rand(total, m, generator=g) < 0.15)
        w = torch.where(pick, special[torch.randint(0, 3, (total, m), generator=g)], w)
    return w.to(dtype).reshape(rows, groups * m)


# --------------------------------------------------------------------------- 2:4 CUTLASS


# rows % 32 == 0 and k % 32 == 0 (the layout's rule); 2 .. 15 programs of 64 metadata words.
SHAPES_24 = [(32, 64), (64, 96), (96, 32), (32, 480)]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rows,k", SHAPES_24)
def test_compress_24_kernel_bit_identical_to_reference_and_torch(interpret, device, dtype, rows, k):
    w = nm_sparse(rows, k // 4, 2, 4, dtype, seed=rows + k).to(device)
    values, meta, first_bad = compress_24_triton(w)
    assert first_bad == -1
    ref_values, ref_meta = compress_24_ref(w)
    torch_values, torch_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert meta.dtype == torch.int16 and torch.equal(meta, ref_meta) and torch.equal(meta, torch_meta)
    assert same_bits(values, ref_values) and same_bits(values, torch_values)


def test_compress_24_kernel_every_group_pattern(interpret, device):
    # Each of the 11 legal non-zero patterns of a group (underfull ones included) in
    # every group position of a metadata word and of the 32-row interleave.
    legal = [p for p, nib in enumerate(NIBBLE_OF_PATTERN) if nib >= 0]
    assert len(legal) == 11
    rows, k = 64, 64
    pattern = torch.tensor(legal).repeat(rows * k // 4 // len(legal) + 1)[: rows * k // 4]
    pattern = pattern[torch.randperm(pattern.numel(), generator=torch.Generator().manual_seed(0))]
    bits = (pattern.unsqueeze(1) >> torch.arange(4)) & 1
    w = (bits * torch.arange(1, rows * k + 1).reshape(-1, 4) % 7 + bits).to(torch.float16).reshape(rows, k)
    w = w.to(device)
    values, meta, first_bad = compress_24_triton(w)
    torch_values, torch_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert first_bad == -1 and torch.equal(meta, torch_meta) and same_bits(values, torch_values)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_compress_24_kernel_carries_nan_inf_and_negative_zero(interpret, device, dtype):
    w = nm_sparse(32, 16, 2, 4, dtype, seed=3, specials=True).to(device)
    assert torch.isnan(w).any() and torch.isinf(w).any() and (torch.signbit(w) & (w == 0)).any()
    values, meta, first_bad = compress_24_triton(w)
    ref_values, ref_meta = compress_24_ref(w)
    assert first_bad == -1 and torch.equal(meta, ref_meta) and same_bits(values, ref_values)
    assert same_bits(decompress_24_triton(values, meta), decompress_24_ref(ref_values, ref_meta))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rows,k", SHAPES_24)
def test_decompress_24_kernel_bit_identical(interpret, device, dtype, rows, k):
    w = nm_sparse(rows, k // 4, 2, 4, dtype, seed=7 * rows + k).to(device)
    values, meta = compress_24_ref(w)
    dense = decompress_24_triton(values, meta)
    assert same_bits(dense, decompress_24_ref(values, meta))
    assert same_bits(dense, sparse_semi_structured_to_dense_cutlass(values, meta))
    assert torch.equal(dense, w)  # round trip (a -0.0 in a dropped slot comes back as +0.0)


def test_compress_24_kernel_first_bad_group(interpret, device):
    w = nm_sparse(64, 16, 2, 4, torch.float16, seed=11)
    w[40, 20:23] = 1.0  # row 40, group 5: three non-zeros
    w[41, 0:4] = 1.0  # a later bad group
    w[63, 60:64] = 2.0
    _, _, first_bad = compress_24_triton(w.to(device))
    assert first_bad == 40 * 16 + 5
    # The public op reports it (row and group), never truncating silently.
    with pytest.raises(ValueError, match=r"compress_24: w \(shape \(64, 64\)\) is not 2:4 sparse: row 40, group 5 "
                                         r"\(columns 20\.\.23\) has more than 2 non-zeros"):
        nmkern.compress_24(w.to(device), backend="triton")


def test_compress_24_public_round_trip_with_triton_backend(interpret, device):
    w = nmkern.apply_nm(torch.randn(64, 128, generator=torch.Generator().manual_seed(5)), 2, 4).bfloat16().to(device)
    values, meta = nmkern.compress_24(w, backend="triton")
    assert torch.equal(meta, sparse_semi_structured_from_dense_cutlass(w)[1])
    assert torch.equal(nmkern.decompress_24(values, meta, backend="triton"), w)


# --------------------------------------------------------------------------- general N:M packing

# Every index width (1..4 bits), a non-power-of-two m, n from 1 to m - 1.
PACK_PATTERNS = [(1, 2), (2, 3), (2, 4), (3, 4), (2, 5), (3, 8), (5, 16), (15, 16)]


def pack_shape(n: int, m: int) -> tuple[int, int]:
    """(rows, groups): rows of 7 groups, words spread over 2 programs, the last one ragged."""
    block_w = pack_nm_configs(m)[0]["BLOCK_W"]  # the launcher runs the first config
    words_per_row = -(-7 * n // indices_per_word(m))
    rows = -(-(block_w + block_w // 2 + 1) // words_per_row)
    return rows, 7


@pytest.mark.parametrize("dtype", PACKABLE, ids=str)
@pytest.mark.parametrize("n,m", PACK_PATTERNS)
def test_pack_nm_kernel_identical_to_reference(interpret, device, dtype, n, m):
    rows, groups = pack_shape(n, m)
    w = nm_sparse(rows, groups, n, m, dtype, seed=100 * n + m, specials=dtype.is_floating_point).to(device)
    values, indices, first_bad = pack_nm_triton(w, n, m)
    ref_values, ref_indices = pack_nm_ref(w, n, m)
    assert first_bad == -1
    assert indices.dtype == torch.int32 and torch.equal(indices, ref_indices)
    assert same_bits(values, ref_values)
    # And back: the unpack kernel rebuilds the reference's dense tensor bit for bit.
    assert same_bits(unpack_nm_triton(values, indices, n, m), unpack_nm_ref(ref_values, ref_indices, n, m))


@pytest.mark.parametrize("n,m", [(1, 2), (3, 5), (15, 16)])
def test_pack_nm_kernel_long_rows_span_many_words(interpret, device, n, m):
    # 41 groups per row: words straddle group boundaries (e.g. 3 bits x 10 per word).
    w = nm_sparse(3, 41, n, m, torch.float32, seed=n + m).to(device)
    values, indices, first_bad = pack_nm_triton(w, n, m)
    ref_values, ref_indices = pack_nm_ref(w, n, m)
    assert first_bad == -1 and torch.equal(indices, ref_indices) and same_bits(values, ref_values)


@pytest.mark.parametrize("dtype", PACKABLE, ids=str)
@pytest.mark.parametrize("n,m", [(1, 2), (2, 3), (2, 4), (3, 8), (15, 16)])
def test_unpack_nm_kernel_identical_to_reference(interpret, device, dtype, n, m):
    rows = 70  # 70 * 7 groups: more than one program for every m, the last one ragged
    w = nm_sparse(rows, 7, n, m, dtype, seed=n * m + 1, specials=dtype.is_floating_point)
    values, indices = pack_nm_ref(w, n, m)
    dense = unpack_nm_triton(values.to(device), indices.to(device), n, m)
    assert same_bits(dense, unpack_nm_ref(values, indices, n, m).to(device))


def test_pack_nm_all_zero_tensor(interpret, device):
    w = torch.zeros(5, 48, dtype=torch.bfloat16, device=device)
    values, indices, first_bad = pack_nm_triton(w, 3, 8)
    ref_values, ref_indices = pack_nm_ref(w, 3, 8)
    assert first_bad == -1 and torch.equal(indices, ref_indices) and same_bits(values, ref_values)


def test_pack_nm_kernel_first_bad_group(interpret, device):
    w = nm_sparse(9, 6, 2, 5, torch.float32, seed=2)
    w[4, 10:13] = 1.0  # row 4, group 2 (columns 10..14): at least three non-zeros
    w[8, 0:5] = 1.0
    _, _, first_bad = pack_nm_triton(w.to(device), 2, 5)
    assert first_bad == 4 * 6 + 2
    with pytest.raises(ValueError, match=r"pack_nm: w \(shape \(9, 30\)\) is not 2:5 sparse along dim 1: row 4 "
                                         r"\(of the 2-D view \(9, 30\)\), group 2 has more than 2 non-zeros"):
        nmkern.pack_nm(w.to(device), 2, 5, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int8], ids=str)
def test_pack_unpack_public_round_trip_with_triton_backend(interpret, device, dtype):
    # A conv weight grouped along input channels (dim=1): NMPacked through the kernels.
    dense = nm_sparse(8 * 3 * 3, 2, 2, 8, dtype, seed=9).reshape(8, 3, 3, 16).permute(0, 3, 1, 2).to(device)
    packed = nmkern.pack_nm(dense, 2, 8, dim=1, backend="triton")
    ref = nmkern.pack_nm(dense, 2, 8, dim=1, backend="reference")
    assert torch.equal(packed.indices, ref.indices) and same_bits(packed.values, ref.values)
    back = packed.to_dense(backend="triton")
    assert back.shape == dense.shape and torch.equal(back, dense)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", PACKABLE, ids=str)
def test_packing_kernels_on_gpu_large(dtype):
    for n, m in [(2, 4), (3, 5), (4, 16)]:
        w = nm_sparse(1024, 96, n, m, dtype, seed=m).cuda()
        packed = nmkern.pack_nm(w, n, m, backend="triton")
        ref_values, ref_indices = pack_nm_ref(w, n, m)
        assert torch.equal(packed.indices, ref_indices) and same_bits(packed.values, ref_values)
        assert same_bits(nmkern.unpack_nm(packed, backend="triton"), unpack_nm_ref(ref_values, ref_indices, n, m))
    if dtype in HALF:
        w = nm_sparse(4096, 1024, 2, 4, dtype, seed=1).cuda()
        values, meta = nmkern.compress_24(w, backend="triton")
        torch_values, torch_meta = sparse_semi_structured_from_dense_cutlass(w)
        assert torch.equal(meta, torch_meta) and same_bits(values, torch_values)
        assert same_bits(nmkern.decompress_24(values, meta, backend="triton"), decompress_24_ref(values, meta))
