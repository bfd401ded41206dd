"""Triton sparse GEMM / conv kernels vs the references and the dense op on the masked weight.

CPU runs need TRITON_INTERPRET=1 (the ``interpret`` fixture skips otherwise); sizes
stay tiny because the interpreter is slow. Tolerance: the kernel's error against
an fp64 reference may be at most ``TOL_FACTOR`` times torch's own error in the
same precision (floored at one ulp of the largest output).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmkern.reference import apply_nm_ref, block_mask_1xn_ref, compress_24_ref, pack_nm_ref, to_bsr_1xn_ref
from nmkern.reference.linear import (
    bsr_dense_ref,
    bsr_linear_ref,
    nm_conv2d_ref,
    nm_dense_rows_ref,
    nm_linear_ref,
    semi24_linear_ref,
)
from nmkern.reference.nm_pack import as_rows

TOL_FACTOR = 4.0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_matches_torch(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor) -> None:
    """``out`` is within TOL_FACTOR x torch's same-precision error of the fp64 reference."""
    assert out.dtype == torch_out.dtype and out.shape == ref64.shape
    err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * max(ref64.abs().max().item(), 1e-30)
    assert err <= TOL_FACTOR * max(torch_err, ulp), f"error {err:.3g} vs torch's {torch_err:.3g} (ulp {ulp:.3g})"


def _nm_case(out_f, in_f, n, m, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = apply_nm_ref(torch.randn(out_f, in_f, generator=g), n, m).to(dtype).to(device)
    values, indices = pack_nm_ref(w, n, m)
    return w, values, indices


def _linear_check(y, x, w, bias):
    ref64 = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert_matches_torch(y, ref64, F.linear(x, w, bias))


def _kernels():
    from nmkern.kernels import bsr_linear, nm_linear, sparse_conv2d

    return nm_linear, bsr_linear, sparse_conv2d


# --------------------------------------------------------------------------- references


def test_references_are_the_dense_op_on_the_unpacked_weight():
    w, values, indices = _nm_case(24, 48, 3, 8, torch.float64, "cpu")
    assert torch.equal(nm_dense_rows_ref(values, indices, 3, 8), w)
    x = torch.randn(5, 48, dtype=torch.float64)
    b = torch.randn(24, dtype=torch.float64)
    assert torch.equal(nm_linear_ref(x, values, indices, 3, 8, b), F.linear(x, w, b))
    w24 = apply_nm_ref(torch.randn(32, 64), 2, 4).half()
    v24, meta = compress_24_ref(w24)
    xh = torch.randn(3, 64).half()
    assert torch.equal(semi24_linear_ref(xh, v24, meta), F.linear(xh, w24))
    wb = torch.randn(16, 40)
    wb = wb * block_mask_1xn_ref(wb, 4, 0.5)
    bsr = to_bsr_1xn_ref(wb, 4)
    assert torch.equal(bsr_dense_ref(bsr.crow_indices(), bsr.col_indices(), bsr.values().reshape(-1, 4), 16, 40), wb)
    assert torch.equal(bsr_dense_ref(bsr.crow_indices(), bsr.col_indices(), bsr.values().reshape(-1, 4), 16, 40),
                       bsr.to_dense())


# --------------------------------------------------------------------------- nm_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 8), (3, 8), (2, 6), (4, 16)])
def test_nm_linear_kernel(interpret, device, dtype, n, m):
    nm_linear, _, _ = _kernels()
    in_f = 48 if m != 16 else 64  # 48: a partial BLOCK_K=32 tile; 6 divides it
    w, values, indices = _nm_case(24, in_f, n, m, dtype, device, seed=n * 31 + m)  # 24 outputs: partial BLOCK_O
    for batch, with_bias in ((1, True), (5, False), (17, True)):  # 17: two BLOCK_B=16 tiles
        x = torch.randn(batch, in_f, device=device).to(dtype)
        bias = torch.randn(24, device=device).to(dtype) if with_bias else None
        y = nm_linear.nm_linear_triton(x, values, indices, n, m, bias)
        _linear_check(y, x, w, bias)
        b64 = None if bias is None else bias.double()
        ref = nm_linear_ref(x.double(), values.double(), indices, n, m, b64)
        assert torch.allclose(ref, F.linear(x.double(), w.double(), b64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi24_linear_kernel(interpret, device, dtype):
    nm_linear, _, _ = _kernels()
    w = apply_nm_ref(torch.randn(64, 96, generator=torch.Generator().manual_seed(7)), 2, 4).to(dtype)
    w[5, :8] = 0  # under-full groups take torch's slot choice: still decoded to zeros
    values, meta = (t.to(device) for t in compress_24_ref(w))
    w = w.to(device)
    for batch, with_bias in ((1, False), (3, True), (20, True)):
        x = torch.randn(batch, 96, device=device).to(dtype)
        bias = torch.randn(64, device=device).to(dtype) if with_bias else None
        y = nm_linear.semi24_linear_triton(x, values, meta, bias)
        _linear_check(y, x, w, bias)
        ref = semi24_linear_ref(x.double(), values.double(), meta, None if bias is None else bias.double())
        assert torch.allclose(ref, F.linear(x.double(), w.double(), None if bias is None else bias.double()))


def test_nm_linear_kernel_strided_input_and_empty_batch(interpret, device):
    nm_linear, _, _ = _kernels()
    w, values, indices = _nm_case(16, 32, 2, 4, torch.float32, device)
    x = torch.randn(32, 6, device=device).t()  # (6, 32), stride (1, 6)
    _linear_check(nm_linear.nm_linear_triton(x, values, indices, 2, 4), x, w, None)
    assert nm_linear.nm_linear_triton(x[:0], values, indices, 2, 4).shape == (0, 16)


# --------------------------------------------------------------------------- bsr_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [2, 4, 16])
def test_bsr_linear_kernel(interpret, device, dtype, block):
    _, bsr_linear, _ = _kernels()
    g = torch.Generator().manual_seed(block)
    out_f = 2 * max(block, 8)  # few block rows: one interpreted program each
    w = torch.randn(out_f, 40, generator=g)
    w = (w * block_mask_1xn_ref(w, block, 0.6)).to(dtype)
    w[:block] = 0  # a block row with no stored block: its outputs are the bias
    bsr = to_bsr_1xn_ref(w, block)
    crow, col = bsr.crow_indices().to(torch.int32), bsr.col_indices().to(torch.int32)
    values = bsr.values().reshape(-1, block)
    assert values.shape[0] < (out_f // block) * 40  # zero blocks are not stored
    crow, col, values, w = (t.to(device) for t in (crow, col, values, w))
    for batch, with_bias in ((1, True), (5, False), (33, True)):
        x = torch.randn(batch, 40, device=device).to(dtype)
        bias = torch.randn(out_f, device=device).to(dtype) if with_bias else None
        y = bsr_linear.bsr_linear_triton(x, crow, col, values, out_f, bias)
        _linear_check(y, x, w, bias)
        ref = bsr_linear_ref(x.double(), crow, col, values.double(), out_f, None if bias is None else bias.double())
        assert torch.allclose(ref, F.linear(x.double(), w.double(), None if bias is None else bias.double()))


def test_bsr_linear_int64_indices(interpret, device):
    _, bsr_linear, _ = _kernels()
    w = torch.randn(8, 24)
    w = w * block_mask_1xn_ref(w, 2, 0.5)
    bsr = to_bsr_1xn_ref(w, 2)
    x = torch.randn(3, 24)
    y = bsr_linear.bsr_linear_triton(x.to(device), bsr.crow_indices().to(device), bsr.col_indices().to(device),
                                     bsr.values().reshape(-1, 2).to(device), 8)
    _linear_check(y, x.to(device), w.to(device), None)


# --------------------------------------------------------------------------- nm_conv2d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,m,kernel,stride,padding,dilation",
    [
        (2, 4, (3, 3), (1, 1), (1, 1), (1, 1)),
        (1, 8, (3, 3), (2, 1), (0, 2), (1, 2)),
        (2, 4, (1, 1), (1, 1), (0, 0), (1, 1)),
        (3, 8, (2, 3), (2, 2), (1, 0), (2, 1)),
    ],
)
def test_nm_conv2d_kernel(interpret, device, dtype, n, m, kernel, stride, padding, dilation):
    _, _, sparse_conv2d = _kernels()
    g = torch.Generator().manual_seed(n + m)
    w = apply_nm_ref(torch.randn(12, 8, *kernel, generator=g), n, m, dim=1).to(dtype)
    values, indices = pack_nm_ref(as_rows(w, 1).contiguous(), n, m)
    w, values, indices = w.to(device), values.to(device), indices.to(device)
    for batch, with_bias, channels_last in ((1, True, False), (2, False, True)):
        x = torch.randn(batch, 8, 6, 5, device=device).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bias = torch.randn(12, device=device).to(dtype) if with_bias else None
        y = sparse_conv2d.nm_conv2d_triton(x, values, indices, n, m, w.shape, bias, stride, padding, dilation)
        b64 = None if bias is None else bias.double()
        ref64 = F.conv2d(x.double(), w.double(), b64, stride, padding, dilation)
        assert_matches_torch(y, ref64, F.conv2d(x, w, bias, stride, padding, dilation))
        assert torch.allclose(nm_conv2d_ref(x.double(), values.double(), indices, n, m, w.shape, b64, stride, padding,
                                            dilation), ref64)


# --------------------------------------------------------------------------- GPU duplicates


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 7, 16, 64, 130])
def test_nm_linear_kernel_gpu_real_shapes(dtype, batch):
    nm_linear, _, _ = _kernels()
    w, values, indices = _nm_case(768, 3072, 2, 4, dtype, "cuda")
    x = torch.randn(batch, 3072, device="cuda").to(dtype)
    bias = torch.randn(768, device="cuda").to(dtype)
    _linear_check(nm_linear.nm_linear_triton(x, values, indices, 2, 4, bias), x, w, bias)
    if dtype != torch.float32:
        v24, meta = compress_24_ref(w.cpu())
        _linear_check(nm_linear.semi24_linear_triton(x, v24.cuda(), meta.cuda(), bias), x, w, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bsr_and_conv_kernels_gpu(dtype):
    _, bsr_linear, sparse_conv2d = _kernels()
    w = torch.randn(512, 384)
    w = (w * block_mask_1xn_ref(w, 4, 0.7)).to(dtype)
    bsr = to_bsr_1xn_ref(w, 4)
    x = torch.randn(9, 384).to(dtype).cuda()
    y = bsr_linear.bsr_linear_triton(x, bsr.crow_indices().int().cuda(), bsr.col_indices().int().cuda(),
                                     bsr.values().reshape(-1, 4).cuda(), 512)
    _linear_check(y, x, w.cuda(), None)
    wc = apply_nm_ref(torch.randn(64, 32, 3, 3), 2, 4, dim=1).to(dtype)
    values, indices = pack_nm_ref(as_rows(wc, 1).contiguous(), 2, 4)
    xc = torch.randn(4, 32, 17, 15).to(dtype).cuda()
    yc = sparse_conv2d.nm_conv2d_triton(xc, values.cuda(), indices.cuda(), 2, 4, wc.shape, None, (1, 1), (1, 1), (1, 1))
    ref64 = F.conv2d(xc.double(), wc.cuda().double(), None, 1, 1)
    assert_matches_torch(yc, ref64, F.conv2d(xc, wc.cuda(), None, 1, 1))
