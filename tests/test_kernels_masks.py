"""Triton N:M mask and 1xN block-score kernels against the pure-torch references.

Run on the CPU under ``TRITON_INTERPRET=1`` (skipped otherwise without a GPU).
Masks must be exactly equal; masked values are compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import nmkern
from nmkern.kernels.block_1xn import block_scores_1xn_triton
from nmkern.kernels.nm_mask import nm_mask_configs, nm_mask_triton
from nmkern.reference import apply_nm_ref, block_mask_1xn_ref, block_scores_1xn_ref, nm_mask_ref

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}
# Every m the brief names (2, 3, 4, 5, 8, 16), n from 1 to m - 1.
PATTERNS = [(1, 2), (2, 3), (1, 4), (2, 4), (3, 4), (2, 5), (2, 8), (5, 8), (1, 16), (8, 16), (15, 16)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS_VIEW[a.dtype]), b.view(BITS_VIEW[b.dtype]))


def tie_heavy(shape, m: int, dtype, seed: int) -> torch.Tensor:
    """Five magnitudes with both signs (-0.0 included) and ~30% all-zero groups."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, shape, generator=g).to(torch.float64) * 0.75
    w = torch.where(torch.rand(shape, generator=g) < 0.1, torch.full_like(w, -0.0), w)
    groups = w.reshape(-1, m)
    groups[torch.rand(groups.shape[0], generator=g) < 0.3] = 0.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_nm_mask_kernel_equals_reference(interpret, device, dtype, n, m):
    # About 1.5 programs' worth of groups in rows of 7 groups: two programs, the second
    # ragged (a program takes 4096 / next_pow2(m)^2 groups: 1024 for m = 2, 16 for m = 16).
    block_g = nm_mask_configs(m)[0]["BLOCK_G"]  # the launcher runs the first config
    rows = -(-(block_g + block_g // 2 + 1) // 7)
    for seed, w in enumerate([tie_heavy((rows, 7 * m), m, dtype, seed=n * 31 + m),
                              torch.randn(rows, 7 * m, generator=torch.Generator().manual_seed(m)).to(dtype)]):
        assert block_g < w.numel() // m < 2 * block_g and (w.numel() // m) % block_g
        w = w.to(device)
        mask = nm_mask_triton(w, n, m, apply=False)
        assert mask.dtype == torch.bool
        assert torch.equal(mask, nm_mask_ref(w, n, m)), f"mask differs (input {seed})"
        assert same_bits(nm_mask_triton(w, n, m, apply=True), apply_nm_ref(w, n, m)), f"values differ (input {seed})"


def test_nm_mask_kernel_ties_go_to_the_lower_index(interpret, device):
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -3.0, 3.0, 1.0, -3.0, 0.5, -2.0, 2.0, 0.1]],
                     device=device)
    want = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool, device=device)
    assert torch.equal(nm_mask_triton(w, 2, 4, apply=False), want)


def test_nm_mask_kernel_single_small_group_and_all_zero(interpret, device):
    w = torch.tensor([[0.0, -0.0, 2.0]], device=device)
    assert torch.equal(nm_mask_triton(w, 2, 3, apply=False), torch.tensor([[True, False, True]], device=device))
    zeros = torch.zeros(3, 48, dtype=torch.bfloat16, device=device)
    assert torch.equal(nm_mask_triton(zeros, 3, 16, apply=False), nm_mask_ref(zeros, 3, 16))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_public_ops_with_triton_backend_follow_dim(interpret, device, dim):
    # Conv weight (O, I, kh, kw) grouped along I (dim=1) and the other dims: the ops
    # move dim innermost, run the kernel on the 2-D view and move it back.
    w = tie_heavy((8, 12, 3, 4), 4, torch.float32, seed=dim + 5).to(device)
    assert torch.equal(nmkern.nm_mask(w, 2, 4, dim=dim, backend="triton"), nm_mask_ref(w, 2, 4, dim))
    assert same_bits(nmkern.apply_nm(w, 2, 4, dim=dim, backend="triton"), apply_nm_ref(w, 2, 4, dim))


def test_public_op_rejects_nan_before_the_kernel(interpret, device):
    w = torch.randn(4, 8, device=device)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"nm_mask: w contains NaN or Inf \(first at index \(1, 3\)\)"):
        nmkern.nm_mask(w, 2, 4, backend="triton")


# --------------------------------------------------------------------------- 1xN block scores

# (shape, n): Linear (E = 1), 3x3 conv, 9x9 conv (E = 81 > 64: two element chunks),
# I not a multiple of the 64..1024 input channels a program covers, 3-D and 5-D weights.
SCORE_CASES = [((8, 5), 4), ((16, 1100), 2), ((12, 7, 3, 3), 2), ((6, 3, 9, 9), 3), ((4, 70, 5), 4),
               ((4, 3, 1, 3, 3), 1)]


def score_rtol(dtype) -> float:
    # Sums of at most n * E = 243 magnitudes, accumulated in fp32 (fp64 for fp64) in a
    # different order than torch's: relative error at most ~243 ulp of the accumulator.
    return 243 * (2.0**-52 if dtype == torch.float64 else 2.0**-23)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape,n", SCORE_CASES)
def test_block_scores_kernel_equals_reference(interpret, device, dtype, shape, n):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype).to(device)
    got = block_scores_1xn_triton(w.reshape(shape[0], shape[1], -1).contiguous(), n)
    want = block_scores_1xn_ref(w, n)
    assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=score_rtol(dtype), atol=0)


@pytest.mark.parametrize("rearrange", [False, True])
@pytest.mark.parametrize("shape,n", [((16, 24), 4), ((8, 8, 3, 3), 2), ((12, 5, 5), 3)])
def test_block_mask_triton_equals_reference(interpret, device, shape, n, rearrange):
    # Continuous random weights: no two block scores within the fp32 summation error.
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) + n)).to(device)
    for sparsity in (0.0, 0.3, 0.75):
        got = nmkern.block_mask_1xn(w, n, sparsity, rearrange=rearrange, backend="triton")
        want = block_mask_1xn_ref(w, n, sparsity, rearrange=rearrange)
        assert torch.equal(got, want), sparsity
    assert torch.equal(nmkern.block_scores_1xn(w, n, backend="triton"), block_scores_1xn_triton(
        w.reshape(shape[0], shape[1], -1).contiguous(), n))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (3, 5), (8, 16)])
def test_mask_kernels_on_gpu_large(dtype, n, m):
    w = torch.randn(4096, 320 * m, device="cuda").to(dtype)
    w[::7] = w[::7].round()  # ties
    assert torch.equal(nmkern.nm_mask(w, n, m, backend="triton"), nm_mask_ref(w, n, m))
    assert same_bits(nmkern.apply_nm(w, n, m, backend="triton"), apply_nm_ref(w, n, m))
    conv = torch.randn(256, 128, 3, 3, device="cuda").to(dtype)
    torch.testing.assert_close(nmkern.block_scores_1xn(conv, 4, backend="triton"), block_scores_1xn_ref(conv, 4),
                               rtol=score_rtol(dtype), atol=0)
