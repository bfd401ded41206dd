"""References vs independent numpy implementations, torch's CUTLASS converter and scipy.

Exact equality throughout: masks and packing have one right answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

import nmkern
from nmkern.reference.nm_pack import index_bits

REF = dict(backend="reference")
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


# --------------------------------------------------------------------------- numpy twins


def np_nm_mask(a: np.ndarray, n: int, m: int) -> np.ndarray:
    """Rank by pairwise comparison: rank_i = #{|a_j| > |a_i|} + #{j < i, |a_j| == |a_i|}."""
    g = np.abs(a.astype(np.float64)).reshape(-1, m)
    gi, gj = g[:, :, None], g[:, None, :]
    lower = np.arange(m)[None, :] < np.arange(m)[:, None]  # [i, j]: j < i
    rank = (gj > gi).sum(-1) + ((gj == gi) & lower[None]).sum(-1)
    return (rank < n).reshape(a.shape)


def np_pack(a2: np.ndarray, n: int, m: int):
    rows, k = a2.shape
    bits = index_bits(m)
    per = 32 // bits
    values, words = [], []
    for r in range(rows):
        vals, idxs = [], []
        for g in range(k // m):
            grp = a2[r, g * m:(g + 1) * m]
            nz = [i for i in range(m) if grp[i] != 0]
            kept = sorted(nz + [i for i in range(m) if grp[i] == 0][: n - len(nz)])
            vals += [grp[i] for i in kept]
            idxs += kept
        row_words = []
        for s in range(0, len(idxs), per):
            word = 0
            for j, ix in enumerate(idxs[s:s + per]):
                word |= ix << (bits * j)
            row_words.append(word - (1 << 32) if word >= 1 << 31 else word)
        values.append(vals)
        words.append(row_words)
    return np.array(values, dtype=a2.dtype), np.array(words, dtype=np.int32)


def np_block_mask(w: np.ndarray, n: int, sparsity: float) -> np.ndarray:
    o, i = w.shape[:2]
    flat = np.abs(w.astype(np.float64)).reshape(o, i, -1)
    scores = np.array([[flat[b * n:(b + 1) * n, c].sum() for c in range(i)] for b in range(o // n)])
    order = np.argsort(scores.reshape(-1), kind="stable")
    keep = np.ones(scores.size, dtype=bool)
    keep[order[: int(sparsity * scores.size)]] = False
    keep = keep.reshape(o // n, i)
    full = np.repeat(keep, n, axis=0)
    return np.broadcast_to(full.reshape(o, i, *([1] * (w.ndim - 2))), w.shape)


def random_weight(shape, dtype, seed, ties=False, zero_groups=False, m=4):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct magnitudes, both signs: lots of ties
        w = torch.randint(-2, 3, shape, generator=g).to(torch.float64) * 0.5
    else:
        w = torch.randn(shape, generator=g, dtype=torch.float64)
    if zero_groups:
        z = torch.rand(shape[:-1] + (shape[-1] // m, 1), generator=g) < 0.3
        w = w.masked_fill(z.expand(*shape[:-1], shape[-1] // m, m).reshape(shape), 0)
    return w.to(dtype)


# --------------------------------------------------------------------------- N:M masks


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (5, 8), (1, 16), (8, 16), (2, 3), (4, 6), (3, 12)])
@pytest.mark.parametrize("ties", [False, True])
def test_nm_mask_matches_numpy(dtype, n, m, ties):
    w = random_weight((7, m * 5), dtype, seed=n * 100 + m, ties=ties, zero_groups=True, m=m)
    got = nmkern.nm_mask(w, n, m, **REF)
    want = np_nm_mask(w.double().numpy(), n, m)
    assert got.dtype == torch.bool
    assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("dim", [0, 1, 2, 3, -1])
def test_nm_mask_along_any_dim(dim):
    w = random_weight((8, 8, 4, 4), torch.float32, seed=dim + 7, ties=True)
    got = nmkern.nm_mask(w, 2, 4, dim=dim, **REF)
    moved = w.movedim(dim, -1)
    want = torch.from_numpy(np_nm_mask(moved.numpy(), 2, 4)).movedim(-1, dim)
    assert torch.equal(got, want)


def test_nm_mask_golden_ties_to_lower_index():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 3.0, 1.0, -3.0], [0.5, -2.0, 2.0, 0.1]])
    want = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(nmkern.nm_mask(w, 2, 4, **REF), want)
    assert torch.equal(nmkern.apply_nm(w, 2, 4, **REF), w * want)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(2, 16),
    data=st.data(),
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
)
def test_mask_properties(m, data, rows, groups, seed, ties):
    n = data.draw(st.integers(1, m - 1))
    w = random_weight((rows, groups * m), torch.float32, seed, ties=ties, zero_groups=True, m=m)
    mask = nmkern.nm_mask(w, n, m, **REF)
    grouped_mask = mask.reshape(-1, m)
    assert bool((grouped_mask.sum(-1) == n).all())  # exactly n per group
    mag = w.abs().reshape(-1, m)
    kept_min = torch.where(grouped_mask, mag, torch.inf).min(-1).values
    dropped_max = torch.where(grouped_mask, -torch.inf, mag).max(-1).values
    assert bool((kept_min >= dropped_max).all())  # kept values are the largest
    once = nmkern.apply_nm(w, n, m, **REF)
    assert torch.equal(nmkern.apply_nm(once, n, m, **REF), once)  # idempotent
    packed = nmkern.pack_nm(once, n, m, **REF)
    assert torch.equal(nmkern.unpack_nm(packed, **REF), once)  # exact round trip


# --------------------------------------------------------------------------- 2:4 CUTLASS layout


def pruned_24(shape, dtype, seed, underfull=0.3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w = nmkern.apply_nm(w, 2, 4, **REF)
    w = w.masked_fill(torch.rand(shape, generator=g) < underfull, 0)  # groups with 0 or 1 non-zeros too
    return w.to(dtype)


SHAPES_24 = [(32, 32), (32, 64), (64, 32), (64, 96), (96, 128), (128, 64), (32, 256), (160, 32), (64, 64), (256, 128)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES_24)
@pytest.mark.parametrize("underfull", [0.0, 0.4])
def test_compress_24_bit_identical_to_torch(shape, dtype, underfull):
    # 10 shapes x 2 dtypes x 2 fills = 40 random matrices
    w = pruned_24(shape, dtype, seed=shape[0] * 7 + shape[1], underfull=underfull)
    values, meta = nmkern.compress_24(w, **REF)
    t_values, t_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert values.dtype == dtype and meta.dtype == torch.int16
    assert torch.equal(values.view(torch.int16), t_values.view(torch.int16))
    assert torch.equal(meta, t_meta)
    assert torch.equal(nmkern.decompress_24(values, meta, **REF), w)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, meta), w)


def test_compress_24_all_zero():
    w = torch.zeros(32, 32, dtype=torch.float16)
    values, meta = nmkern.compress_24(w, **REF)
    # an empty group names slots (2, 3): nibble 0b1110, four per int16
    assert torch.equal(meta, torch.full((32, 2), 0xEEEE - 0x10000, dtype=torch.int16))
    assert not values.any()


@pytest.mark.parametrize(
    "group,nibble",
    [
        ([1, 2, 0, 0], 0b0100),  # slots (0, 1)
        ([1, 0, 2, 0], 0b1000),  # (0, 2)
        ([0, 1, 2, 0], 0b1001),  # (1, 2)
        ([1, 0, 0, 2], 0b1100),  # (0, 3)
        ([0, 1, 0, 2], 0b1101),  # (1, 3)
        ([0, 0, 1, 2], 0b1110),  # (2, 3)
        ([3, 0, 0, 0], 0b1000),  # underfull: torch's choice (0, 2)
        ([0, 3, 0, 0], 0b1001),  # (1, 2)
        ([0, 0, 3, 0], 0b1110),  # (2, 3)
        ([0, 0, 0, 3], 0b1110),  # (2, 3)
    ],
)
def test_compress_24_golden_groups(group, nibble):
    # every group of the 32x32 matrix is the same, so the metadata reorder is invisible
    w = torch.tensor(group, dtype=torch.float16).repeat(32, 8)
    values, meta = nmkern.compress_24(w, **REF)
    word = nibble * 0x1111
    assert torch.equal(meta, torch.full((32, 2), word - (0x10000 if word >= 0x8000 else 0), dtype=torch.int16))
    lo, hi = nibble & 3, nibble >> 2
    assert values[0, :2].tolist() == [group[lo], group[hi]]
    assert torch.equal(nmkern.decompress_24(values, meta, **REF), w)


def test_meta_reorder_is_a_permutation():
    from nmkern.reference.semi24 import meta_reorder_offsets

    for rows, cols in [(32, 2), (64, 4), (96, 6)]:
        off = meta_reorder_offsets(rows, cols).reshape(-1)
        assert torch.equal(off.sort().values, torch.arange(rows * cols))


# --------------------------------------------------------------------------- general N:M packing

PACK_DTYPES = FLOATS + [torch.int8]


@pytest.mark.parametrize("dtype", PACK_DTYPES)
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (2, 5), (3, 8), (7, 8), (1, 16), (5, 16), (15, 16), (4, 12)])
def test_pack_nm_matches_numpy(dtype, n, m):
    w = random_weight((5, m * 11), torch.float64, seed=n * 31 + m, zero_groups=True, m=m)
    w = nmkern.apply_nm(w, n, m, **REF)
    w = (w * 20).to(dtype) if dtype == torch.int8 else w.to(dtype)
    packed = nmkern.pack_nm(w, n, m, **REF)
    np_src = w.numpy() if dtype not in (torch.bfloat16,) else w.float().numpy()
    want_values, want_words = np_pack(np_src, n, m)
    assert packed.values.shape == (5, 11 * n) and packed.indices.dtype == torch.int32
    assert np.array_equal(packed.values.to(torch.float64 if dtype == torch.bfloat16 else dtype).numpy(), want_values)
    assert np.array_equal(packed.indices.numpy(), want_words)
    assert torch.equal(nmkern.unpack_nm(packed, **REF), w)


def test_pack_nm_conv_is_nhwc_and_round_trips():
    w = nmkern.apply_nm(torch.randn(6, 8, 3, 3), 2, 4, dim=1, **REF)
    packed = nmkern.pack_nm(w, 2, 4, dim=1, **REF)
    assert packed.values.shape == (6, 3 * 3 * 8 // 2)  # (O, kh*kw*I*n/m): NHWC rows
    nhwc = w.permute(0, 2, 3, 1).reshape(6, -1)
    want_values, _ = np_pack(nhwc.numpy(), 2, 4)
    assert np.array_equal(packed.values.numpy(), want_values)
    assert torch.equal(packed.to_dense(backend="reference"), w)


def test_pack_nm_keeps_nan_and_inf():
    w = torch.tensor([[float("nan"), 0, 0, 1.0, 0, float("inf"), 0, 0]])
    packed = nmkern.pack_nm(w, 2, 4, **REF)
    out = nmkern.unpack_nm(packed, **REF)
    assert torch.equal(out.isnan(), w.isnan()) and torch.equal(torch.nan_to_num(out), torch.nan_to_num(w))


def test_pack_nm_bytes():
    w = nmkern.apply_nm(torch.randn(64, 256), 1, 4, **REF)
    packed = nmkern.pack_nm(w, 1, 4, **REF)
    # 64 values/row fp32 + 64 2-bit indices = 4 int32 words/row
    assert packed.nbytes == 64 * 64 * 4 + 64 * 4 * 4
    assert packed.bits == 2 and packed.indices_per_word == 16


# --------------------------------------------------------------------------- 1xN blocks


@pytest.mark.parametrize("shape", [(16, 8), (32, 6, 3, 3), (8, 5, 1, 1), (12, 4, 2, 3)])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_block_mask_matches_numpy(shape, n, sparsity):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + n))
    got = nmkern.block_mask_1xn(w, n, sparsity, **REF)
    assert np.array_equal(got.numpy(), np_block_mask(w.numpy(), n, sparsity))


def test_block_mask_rearrange_same_count_and_scatter():
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(3))
    plain = nmkern.block_mask_1xn(w, 4, 0.5, **REF)
    rearranged = nmkern.block_mask_1xn(w, 4, 0.5, rearrange=True, **REF)
    assert int(plain.sum()) == int(rearranged.sum())
    assert not torch.equal(plain, rearranged)
    # independent check: sort filters by L1 (descending, stable), mask, scatter back
    order = np.argsort(-np.abs(w.numpy()).reshape(32, -1).sum(1), kind="stable")
    want = np.empty(w.shape, dtype=bool)
    want[order] = np_block_mask(w.numpy()[order], 4, 0.5)
    assert np.array_equal(rearranged.numpy(), want)


def test_block_mask_random_criterion_reproducible():
    w = torch.randn(16, 8)
    a = nmkern.block_mask_1xn(w, 4, 0.5, criterion="random", generator=torch.Generator().manual_seed(1))
    b = nmkern.block_mask_1xn(w, 4, 0.5, criterion=nmkern.BlockCriterion.RANDOM, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and int((~a).sum()) == 16 * 8 // 2


@pytest.mark.parametrize("shape,n", [((16, 12), 4), ((8, 6, 3, 3), 2), ((32, 32), 8)])
def test_to_bsr_matches_torch_and_scipy(shape, n):
    w = torch.randn(shape, dtype=torch.float64)
    w = w * nmkern.block_mask_1xn(w, n, 0.5, **REF)
    bsr = nmkern.to_bsr_1xn(w, n)
    w2 = w.reshape(shape[0], -1)
    assert bsr.layout == torch.sparse_bsr and tuple(bsr.values().shape[1:]) == (n, 1)
    assert torch.equal(bsr.to_dense(), w2)
    ref = w2.to_sparse_bsr((n, 1))
    assert torch.equal(bsr.crow_indices(), ref.crow_indices())
    assert torch.equal(bsr.col_indices(), ref.col_indices())
    assert torch.equal(bsr.values(), ref.values())
    sp = scipy.sparse.bsr_matrix(
        (bsr.values().numpy(), bsr.col_indices().numpy(), bsr.crow_indices().numpy()), shape=tuple(w2.shape)
    )
    assert np.array_equal(sp.toarray(), w2.numpy())
    assert int(bsr.values().shape[0]) == int((w2.reshape(-1, n, w2.shape[1]) != 0).any(1).sum())
