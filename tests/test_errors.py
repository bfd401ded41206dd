"""Bad input gets a ValueError/TypeError that names the op, the shape/dtype and the fix."""

from __future__ import annotations

import pytest
import torch

import nmkern


def test_n_not_less_than_m():
    with pytest.raises(ValueError, match=r"nm_mask: n=4, m=4 is not an N:M pattern; need 1 <= n < m"):
        nmkern.nm_mask(torch.randn(4, 8), 4, 4)


def test_n_below_one():
    with pytest.raises(ValueError, match=r"apply_nm: n=0, m=4"):
        nmkern.apply_nm(torch.randn(4, 8), 0, 4)


def test_m_too_large():
    with pytest.raises(ValueError, match=r"m=32 is out of range; N:M sparsity needs 2 <= m <= 16"):
        nmkern.nm_mask(torch.randn(4, 32), 2, 32)


def test_n_m_must_be_ints():
    with pytest.raises(TypeError, match=r"nm_mask: n must be an int, got float"):
        nmkern.nm_mask(torch.randn(4, 8), 2.0, 4)


def test_size_not_divisible_by_m():
    with pytest.raises(ValueError, match=r"size 6 along dim 1 of shape \(4, 6\) is not divisible by m=4"):
        nmkern.nm_mask(torch.randn(4, 6), 2, 4)


def test_dim_out_of_range():
    with pytest.raises(ValueError, match=r"dim=3 is out of range for a tensor of shape \(4, 8\)"):
        nmkern.nm_mask(torch.randn(4, 8), 2, 4, dim=3)


def test_integer_tensor_rejected_for_masks():
    with pytest.raises(TypeError, match=r"nm_mask: w has dtype int64; supported dtypes are .*float32.*cast with"):
        nmkern.nm_mask(torch.ones(4, 8, dtype=torch.int64), 2, 4)


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"apply_nm: w must be a torch.Tensor, got list"):
        nmkern.apply_nm([[1.0, 2.0, 3.0, 4.0]], 2, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected_by_masks(bad):
    w = torch.randn(2, 8)
    w[1, 5] = bad
    with pytest.raises(ValueError, match=r"nm_mask: w contains NaN or Inf \(first at index \(1, 5\)\)"):
        nmkern.nm_mask(w, 2, 4)
    with pytest.raises(ValueError, match=r"block_mask_1xn: w contains NaN or Inf"):
        nmkern.block_mask_1xn(w, 2, 0.5)


def test_compress_24_not_sparse_names_row_and_group():
    w = nmkern.apply_nm(torch.randn(32, 64), 2, 4).half()
    w[3, 9] = w[3, 10] = w[3, 11] = w[3, 8] = 1.0
    with pytest.raises(ValueError, match=r"compress_24: .* row 3, group 2 \(columns 8..11\) has more than 2 non-zeros"):
        nmkern.compress_24(w)


def test_compress_24_alignment():
    with pytest.raises(ValueError, match=r"compress_24: shape \(16, 32\) does not fit .* rows % 32 == 0 and columns % 32 == 0"):
        nmkern.compress_24(torch.zeros(16, 32, dtype=torch.half))
    with pytest.raises(ValueError, match=r"compress_24: shape \(32, 48\)"):
        nmkern.compress_24(torch.zeros(32, 48, dtype=torch.half))


def test_compress_24_dtype():
    with pytest.raises(TypeError, match=r"compress_24: w has dtype float32; supported dtypes are float16, bfloat16"):
        nmkern.compress_24(torch.zeros(32, 32))
    with pytest.raises(ValueError, match=r"compress_24: w must have 2 dimensions, got shape \(32,\)"):
        nmkern.compress_24(torch.zeros(32, dtype=torch.half))


def test_decompress_24_meta_shape_and_dtype():
    values, meta = nmkern.compress_24(torch.zeros(32, 64, dtype=torch.half))
    with pytest.raises(ValueError, match=r"decompress_24: .* expected meta of shape \(32, 4\)"):
        nmkern.decompress_24(values, meta[:, :2])
    with pytest.raises(TypeError, match=r"decompress_24: meta has dtype int32; supported dtypes are int16"):
        nmkern.decompress_24(values, meta.int())


def test_pack_nm_not_sparse():
    with pytest.raises(ValueError, match=r"pack_nm: .* not 1:4 sparse along dim 1: row 0 .* group 0 has more than 1 non-zeros"):
        nmkern.pack_nm(torch.ones(2, 8), 1, 4)


def test_unpack_nm_type():
    with pytest.raises(TypeError, match=r"unpack_nm: expected an nmkern.NMPacked"):
        nmkern.unpack_nm(torch.zeros(4))


def test_block_mask_bad_block_size_and_sparsity():
    with pytest.raises(ValueError, match=r"block_mask_1xn: 6 output channels .* not divisible by the block size block=4"):
        nmkern.block_mask_1xn(torch.randn(6, 8), 4, 0.5)
    with pytest.raises(ValueError, match=r"block_mask_1xn: sparsity=1.0 must lie in \[0, 1\)"):
        nmkern.block_mask_1xn(torch.randn(8, 8), 4, 1.0)
    with pytest.raises(ValueError, match=r"block_mask_1xn: unknown criterion 'l2'"):
        nmkern.block_mask_1xn(torch.randn(8, 8), 4, 0.5, criterion="l2")
    with pytest.raises(ValueError, match=r"block_mask_1xn: w must have 2 or 3 or 4 or 5 dimensions"):
        nmkern.block_mask_1xn(torch.randn(8), 4, 0.5)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"nm_mask: unknown backend 'tpu'"):
        nmkern.nm_mask(torch.randn(4, 8), 2, 4, backend="tpu")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"nm_mask: the triton backend needs a CUDA tensor .* TRITON_INTERPRET=1"):
        nmkern.nm_mask(torch.randn(4, 8), 2, 4, backend="triton")


def test_env_backend_overrides_auto(monkeypatch):
    from nmkern.backend import Backend
    from nmkern.dispatch import resolve_backend

    monkeypatch.setenv("NMKERN_BACKEND", "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("op", "auto", torch.zeros(1)) is Backend.REFERENCE
    monkeypatch.delenv("NMKERN_BACKEND")
    assert resolve_backend("op", "auto", torch.zeros(1)) is Backend.TRITON
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("op", "auto", torch.zeros(1)) is Backend.REFERENCE


def test_different_devices():
    values, meta = nmkern.compress_24(torch.zeros(32, 32, dtype=torch.half))
    with pytest.raises(ValueError, match=r"decompress_24: tensors are on different devices \(values on cpu, meta on meta\)"):
        nmkern.decompress_24(values, meta.to("meta"))


def test_empty_tensors():
    assert nmkern.nm_mask(torch.zeros(0, 8), 2, 4, backend="reference").shape == (0, 8)
    packed = nmkern.pack_nm(torch.zeros(0, 8), 2, 4, backend="reference")
    assert packed.values.shape == (0, 4) and nmkern.unpack_nm(packed, backend="reference").shape == (0, 8)
    with pytest.raises(ValueError, match=r"block_scores_1xn: w of shape \(0, 8\) is empty"):
        nmkern.block_scores_1xn(torch.zeros(0, 8), 2)
