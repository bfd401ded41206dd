"""The CUDA C++ kernels on a real GPU (marker ``gpu``; skipped without one).

* sparse24_linear vs F.linear on the decompressed weight, many shapes, fp16/bf16, with and
  without bias, both tile configs, automatic and forced split-K;
* prune_compress_24 bytes vs compress_24(apply_nm(w, 2, 4));
* errors without CuPy / on CPU tensors / on bad shapes raise helpful messages.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nmkern
from nmkern import _cuda

pytestmark = pytest.mark.gpu

DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def _needs_backend():
    if not _cuda.available():
        pytest.skip("cuda backend unavailable (CuPy, sm_80+ GPU and the built kernels are needed)")


def _weight(n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = nmkern.apply_nm(torch.randn(n, k, generator=gen), 2, 4, backend="reference").to(dtype)
    return w.cuda()


SHAPES = [
    # (M, N, K): decode, small batch, ragged M/N, K tails (K % 64 == 32), real layer shapes
    (1, 32, 32), (1, 384, 384), (1, 4096, 4096), (3, 96, 96), (16, 1536, 384), (17, 384, 1536),
    (64, 256, 160), (65, 256, 256), (128, 4096, 1024), (130, 160, 352), (1024, 1024, 4096),
    (4096, 384, 1536),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse24_linear_matches_dense(dtype, m, n, k, with_bias):
    w = _weight(n, k, dtype, seed=m + n + k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    values, meta = nmkern.compress_24(w.cpu(), backend="reference")
    y = _cuda.sparse24_linear(x, values.cuda(), meta.cuda(), bias)
    ref = F.linear(x.double(), w.double(), bias.double() if bias is not None else None)
    dense = F.linear(x, w, bias)  # cuBLAS, same precision
    torch.cuda.synchronize()
    err = (y.double() - ref).abs().max().item()
    torch_err = (dense.double() - ref).abs().max().item()
    # Both round fp32 sums to 16 bits; allow 2x torch's own error plus one 16-bit ulp of max |ref|.
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert err <= 2 * torch_err + ulp, f"max err {err:.3g} vs torch {torch_err:.3g}"


@pytest.mark.parametrize("split_k", [1, 2, 3, 7])
@pytest.mark.parametrize("m", [1, 64, 200])
def test_forced_split_k(split_k, m):
    dtype = torch.float16
    n, k = 256, 1024
    w = _weight(n, k, dtype, seed=split_k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    values, meta = nmkern.compress_24(w.cpu(), backend="reference")
    y = _cuda.sparse24_linear(x, values.cuda(), meta.cuda(), bias, split_k=split_k)
    ref = F.linear(x.double(), w.double(), bias.double())
    torch_err = (F.linear(x, w, bias).double() - ref).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= 2 * torch_err + ulp


def test_runs_on_current_stream():
    dtype = torch.float16
    w = _weight(128, 256, dtype, seed=1)
    x = torch.randn(512, 256, device="cuda", dtype=dtype)
    values, meta = nmkern.compress_24(w.cpu(), backend="reference")
    values, meta = values.cuda(), meta.cuda()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = _cuda.sparse24_linear(x, values, meta)
        ref = F.linear(x, w)
    s.synchronize()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(32, 32), (64, 96), (384, 1536), (4096, 4096)])
def test_prune_compress_bytes(dtype, n, k):
    gen = torch.Generator().manual_seed(n * k)
    w = torch.randint(-3, 4, (n, k), generator=gen).float()  # many ties
    w = torch.where(torch.rand(n, k, generator=gen) < 0.5, torch.randn(n, k, generator=gen), w)
    w[torch.rand(n, k, generator=gen) < 0.05] = -0.0
    w = w.to(dtype)
    want_v, want_m = nmkern.compress_24(nmkern.apply_nm(w, 2, 4, backend="reference"), backend="reference")
    got_v, got_m = _cuda.prune_compress_24(w.cuda())
    assert torch.equal(got_v.cpu().view(torch.int16), want_v.view(torch.int16))
    assert torch.equal(got_m.cpu(), want_m)


def test_compress_then_gemm_round_trip():
    dtype = torch.bfloat16
    w = torch.randn(512, 768, device="cuda", dtype=dtype)
    x = torch.randn(33, 768, device="cuda", dtype=dtype)
    values, meta = _cuda.prune_compress_24(w)
    y = _cuda.sparse24_linear(x, values, meta)
    w24 = nmkern.apply_nm(w.float().cpu(), 2, 4, backend="reference").to(dtype).cuda()
    torch.testing.assert_close(y, F.linear(x, w24), rtol=2e-2, atol=5e-2)


def test_errors_are_helpful():
    w = _weight(64, 64, torch.float16, seed=0)
    values, meta = nmkern.compress_24(w.cpu(), backend="reference")
    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _cuda.sparse24_linear(x.cpu(), values, meta)
    with pytest.raises(TypeError, match="differs from x2d dtype"):
        _cuda.sparse24_linear(x.bfloat16(), values.cuda(), meta.cuda())
    with pytest.raises(ValueError, match="encode 64"):
        _cuda.sparse24_linear(torch.randn(4, 96, device="cuda", dtype=torch.float16), values.cuda(), meta.cuda())
    with pytest.raises(ValueError, match="does not fit the CUTLASS 2:4 layout"):
        _cuda.prune_compress_24(torch.randn(48, 64, device="cuda", dtype=torch.float16))
