"""CUDA kernels' index and metadata logic, checked on the CPU (no GPU needed).

tests/cuda_host/sp24_host_test.cpp includes csrc/cuda/sp24_layout.cuh (the helpers the kernels
use) and is compiled here with g++. It

* decodes nmkern.compress_24's CUTLASS-layout metadata and rebuilds the dense matrix,
* runs the prune-and-compress kernel's per-thread logic, compared byte for byte with
  compress_24(apply_nm(w, 2, 4)),
* emulates the GEMM kernel (stage loader, ldmatrix addresses, metadata word per lane,
  accumulator mapping from the header; ldmatrix and mma.sp from the PTX ISA fragment
  description) and compares Y with a float64 matmul of the decompressed weight.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import nmkern
from nmkern import _cuda

ROOT = Path(__file__).resolve().parents[1]
HOST_SRC = ROOT / "tests" / "cuda_host" / "sp24_host_test.cpp"
HEADER_DIR = ROOT / "csrc" / "cuda"

DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="session")
def host_prog(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/clang++) to build the emulation program")
    exe = tmp_path_factory.mktemp("sp24_host") / "sp24_host_test"
    proc = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{HEADER_DIR}", str(HOST_SRC), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"host test program failed to compile:\n{proc.stderr}"
    return exe


def _run(exe: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()


def _header(*ints: int) -> bytes:
    return b"".join(struct.pack("<q", int(i)) for i in ints)


def _sparse_weight(n: int, k: int, dtype, gen: torch.Generator, underfull: float = 0.1) -> torch.Tensor:
    """A 2:4 weight with some groups holding fewer than two non-zeros (torch's slot choices)."""
    w = torch.randn(n, k, generator=gen)
    w = nmkern.apply_nm(w, 2, 4, backend="reference")
    drop = torch.rand(n, k, generator=gen) < underfull
    return w.masked_fill(drop, 0.0).to(dtype)


# ---- tile geometry ------------------------------------------------------------------------------


def test_launcher_configs_match_header(host_prog):
    out = _run(host_prog, "configs")
    assert out.returncode == 0, out.stderr
    parsed = {}
    for line in out.stdout.strip().splitlines():
        name, *fields = line.split()
        parsed[name] = {f.split("=")[0]: int(f.split("=")[1]) for f in fields}
    assert set(parsed) == set(_cuda.CONFIGS)
    for name, cfg in _cuda.CONFIGS.items():
        got = parsed[name]
        assert (got["BN"], got["BM"], got["THREADS"], got["STAGES"], got["SMEM"]) == (
            cfg.bn, cfg.bm, cfg.threads, cfg.stages, cfg.smem_bytes
        ), name


# ---- metadata layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(32, 32), (64, 96), (96, 256), (160, 64)])
def test_layout_decode_matches_compress_24(host_prog, tmp_path, dtype, n, k):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = _sparse_weight(n, k, dtype, gen)
    values, meta = nmkern.compress_24(w, backend="reference")
    dense = nmkern.decompress_24(values, meta, backend="reference")
    assert torch.equal(dense, w)
    f = tmp_path / "layout.bin"
    f.write_bytes(_header(n, k) + _bits(values) + _bits(meta) + _bits(dense))
    out = _run(host_prog, "layout", f)
    assert out.returncode == 0, out.stdout + out.stderr


def test_layout_decode_detects_wrong_order(host_prog, tmp_path):
    """The check can fail: metadata left in logical (un-reordered) order must be rejected."""
    n, k = 64, 64
    gen = torch.Generator().manual_seed(7)
    w = _sparse_weight(n, k, torch.float16, gen, underfull=0.0)
    values, _ = nmkern.compress_24(w, backend="reference")
    from nmkern.reference.semi24 import nibbles_24_ref

    nib = nibbles_24_ref(w).reshape(n, k // 16, 4)
    logical = (nib[..., 0] | nib[..., 1] << 4 | nib[..., 2] << 8 | nib[..., 3] << 12).to(torch.int32).to(torch.int16)
    f = tmp_path / "layout_bad.bin"
    f.write_bytes(_header(n, k) + _bits(values) + _bits(logical) + _bits(w))
    out = _run(host_prog, "layout", f)
    assert out.returncode == 1 and "FAIL" in out.stdout


# ---- prune + compress ---------------------------------------------------------------------------


def _tricky_dense(n: int, k: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random weights with ties (small integers), zeros and negative zeros."""
    w = torch.randint(-3, 4, (n, k), generator=gen).to(torch.float32)
    w = torch.where(torch.rand(n, k, generator=gen) < 0.5, torch.randn(n, k, generator=gen), w)
    w[torch.rand(n, k, generator=gen) < 0.05] = -0.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(32, 32), (64, 160), (128, 64)])
def test_prune_compress_bytes_match_reference(host_prog, tmp_path, dtype, n, k):
    gen = torch.Generator().manual_seed(n + 7 * k)
    w = _tricky_dense(n, k, dtype, gen)
    want_values, want_meta = nmkern.compress_24(nmkern.apply_nm(w, 2, 4, backend="reference"), backend="reference")
    f_in, f_out = tmp_path / "c.in", tmp_path / "c.out"
    f_in.write_bytes(_header(dtype is torch.bfloat16, n, k) + _bits(w))
    out = _run(host_prog, "compress", f_in, f_out)
    assert out.returncode == 0, out.stdout + out.stderr
    got = np.frombuffer(f_out.read_bytes(), dtype="<i2")
    got_values = torch.from_numpy(got[: n * k // 2].copy()).reshape(n, k // 2)
    got_meta = torch.from_numpy(got[n * k // 2 :].copy()).reshape(n, k // 16)
    assert torch.equal(got_values, want_values.view(torch.int16))  # bitwise, -0.0 included
    assert torch.equal(got_meta, want_meta)


# ---- GEMM emulation -----------------------------------------------------------------------------

GEMM_CASES = [
    # (config, splits, M, N, K, bias)
    ("small", 1, 1, 64, 64, False),
    ("small", 1, 5, 96, 96, True),  # N % BN != 0, K % 64 == 32 (k tail), M < BM
    ("small", 3, 17, 64, 320, True),  # split-K (5 k tiles over 3 splits), 2 batch tiles
    ("large", 1, 130, 160, 160, True),  # ragged M and N, k tail
    ("large", 2, 64, 128, 256, False),
    ("large", 1, 5, 64, 64, True),  # idle warps: W rows 64..127 and batch rows 64..127 are past N / M
    ("small", 2, 64, 32, 128, False),  # four batch tiles, one warp past N
]


def _emulate(host_prog, tmp_path, dtype, cfg, splits, x, values, meta, bias):
    m, k = x.shape
    n = values.shape[0]
    f_in, f_out = tmp_path / "g.in", tmp_path / "g.out"
    payload = _header(dtype is torch.bfloat16, 0 if cfg == "small" else 1, splits, m, n, k, bias is not None)
    payload += _bits(x) + _bits(values) + _bits(meta) + (_bits(bias) if bias is not None else b"")
    f_in.write_bytes(payload)
    out = _run(host_prog, "gemm", f_in, f_out)
    return out, (torch.from_numpy(np.frombuffer(f_out.read_bytes(), dtype="<f4").copy()).reshape(m, n)
                 if out.returncode == 0 else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg,splits,m,n,k,with_bias", GEMM_CASES)
def test_gemm_emulation_matches_dense(host_prog, tmp_path, dtype, cfg, splits, m, n, k, with_bias):
    gen = torch.Generator().manual_seed(m * 31 + n * 7 + k)
    w = _sparse_weight(n, k, dtype, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    values, meta = nmkern.compress_24(w, backend="reference")
    out, y = _emulate(host_prog, tmp_path, dtype, cfg, splits, x, values, meta, bias)
    assert out.returncode == 0, out.stdout + out.stderr

    ref = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
    torch32 = x.float() @ w.float().T + (bias.float() if bias is not None else 0)
    # fp32 accumulation on both sides: allow 8x torch's own fp32 error (floored at one fp32 ulp
    # of the largest |x| @ |w| partial sum, for shapes where torch happens to be exact).
    scale = (x.double().abs() @ w.double().abs().T).max().item()
    tol = 8 * max((torch32.double() - ref).abs().max().item(), torch.finfo(torch.float32).eps * scale)
    err = (y.double() - ref).abs().max().item()
    assert err <= tol, f"max |emulated - fp64| = {err:.3g} > {tol:.3g}"


def test_gemm_emulation_detects_bad_metadata(host_prog, tmp_path):
    """The emulation can fail: metadata in logical order (no CUTLASS reorder) gives a wrong Y."""
    dtype = torch.float16
    m, n, k = 16, 64, 64
    gen = torch.Generator().manual_seed(3)
    w = _sparse_weight(n, k, dtype, gen, underfull=0.0)
    x = torch.randn(m, k, generator=gen).to(dtype)
    values, meta = nmkern.compress_24(w, backend="reference")
    from nmkern.reference.semi24 import nibbles_24_ref

    nib = nibbles_24_ref(w).reshape(n, k // 16, 4)
    logical = (nib[..., 0] | nib[..., 1] << 4 | nib[..., 2] << 8 | nib[..., 3] << 12).to(torch.int32).to(torch.int16)
    assert not torch.equal(logical, meta)
    out, y = _emulate(host_prog, tmp_path, dtype, "small", 1, x, values, logical, None)
    assert out.returncode == 0, out.stdout + out.stderr
    ref = x.double() @ w.double().T
    assert (y.double() - ref).abs().max().item() > 1e-2


def test_split_k_choice():
    small = _cuda.CONFIGS["small"]
    # M = 1, N = 4096, K = 4096 on 132 SMs: 64 blocks -> split so that ~264 blocks run.
    s = _cuda.choose_split_k(1, 4096, 4096, small, 132)
    assert s == 5  # ceil(264 / 64) = 5, well under the 64 / 4 = 16 k-tile cap
    assert _cuda.choose_split_k(4096, 4096, 4096, _cuda.CONFIGS["large"], 132) == 1
    assert _cuda.choose_split_k(1, 64, 128, small, 132) == 1  # 2 k tiles: nothing to split


# ---- launcher checks that need no GPU -----------------------------------------------------------


def test_available_never_raises_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; test_cuda_gpu.py covers this path")
    assert _cuda.available() is False


def test_launcher_rejects_bad_input_before_touching_a_gpu():
    w = _sparse_weight(64, 64, torch.float16, torch.Generator().manual_seed(0))
    values, meta = nmkern.compress_24(w, backend="reference")
    x = torch.randn(4, 64).half()
    with pytest.raises(TypeError, match="sparse24_linear: x2d has dtype float32"):
        _cuda.sparse24_linear(x.float(), values, meta)
    with pytest.raises(TypeError, match="differs from x2d dtype"):
        _cuda.sparse24_linear(x.bfloat16(), values, meta)
    with pytest.raises(ValueError, match="x2d has 96 features but values"):
        _cuda.sparse24_linear(torch.randn(4, 96).half(), values, meta)
    with pytest.raises(ValueError, match=r"expected \(64, 4\)"):
        _cuda.sparse24_linear(x, values, meta[:, :2])
    with pytest.raises(ValueError, match="bias has 3 entries"):
        _cuda.sparse24_linear(x, values, meta, torch.randn(3).half())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA tensors, got one on cpu"):
            _cuda.sparse24_linear(x, values, meta)
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            _cuda.prune_compress_24(w)
    with pytest.raises(ValueError, match="does not fit the CUTLASS 2:4 layout"):
        _cuda.prune_compress_24(torch.randn(48, 64).half())


def test_launch_plumbing_without_gpu(monkeypatch):
    """Kernel choice, grid, split-K and argument order, with the CuPy launch replaced by a recorder."""
    calls = []
    monkeypatch.setattr(_cuda, "_require_device", lambda op, t: None)
    monkeypatch.setattr(_cuda, "_sm_count", lambda idx: 132)
    monkeypatch.setattr(_cuda, "_kernel", lambda idx, name, smem=0: name)
    monkeypatch.setattr(_cuda, "_launch", lambda k, dev, grid, block, args, smem=0: calls.append((k, grid, block, args, smem)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    n, k = 4096, 1024
    w = _sparse_weight(n, k, torch.float16, torch.Generator().manual_seed(1))
    values, meta = nmkern.compress_24(w, backend="reference")
    bias = torch.randn(n).half()

    # M = 1: small tile (64 x 16), 64 blocks on 132 SMs -> split K: ceil(264 / 64) = 5, capped at 16 // 4 = 4.
    _cuda.sparse24_linear(torch.randn(1, k).half(), values, meta, bias)
    (gemm, grid, block, args, smem), (red, rgrid, rblock, rargs, _) = calls
    assert gemm == "nmkern_sp24_gemm_small_f16" and red == "nmkern_sp24_splitk_reduce_f16"
    assert grid == (64, 1, 4) and block == (64, 1, 1) and smem == _cuda.CONFIGS["small"].smem_bytes
    assert args[0] != 0 and args[3] == bias.data_ptr() and args[5] != 0  # x, ..., bias, y, workspace
    assert [int(a) for a in args[6:]] == [1, n, k, 4]  # M, N, K, k tiles per split
    assert [int(a) for a in rargs[3:]] == [1, n, 4] and rargs[1] == bias.data_ptr()

    # M = 300, bf16, no bias: large tile (128 x 128), 32 x 3 = 96 blocks -> ceil(264 / 96) = 3 splits.
    calls.clear()
    vb = values.bfloat16()
    y = _cuda.sparse24_linear(torch.randn(300, k).bfloat16(), vb, meta)
    assert y.shape == (300, n) and y.dtype == torch.bfloat16
    (gemm, grid, block, args, smem), (red, *_rest) = calls
    assert gemm == "nmkern_sp24_gemm_large_bf16" and red == "nmkern_sp24_splitk_reduce_bf16"
    assert grid == (32, 3, 3) and block == (256, 1, 1) and smem == _cuda.CONFIGS["large"].smem_bytes
    assert int(args[3]) == 0 and [int(a) for a in args[6:]] == [300, n, k, 6]  # 16 k tiles -> 6, 6, 4

    # Forced split_k=1: one launch, no workspace.
    calls.clear()
    _cuda.sparse24_linear(torch.randn(8, k).half(), values, meta, split_k=1)
    assert len(calls) == 1 and int(calls[0][3][5]) == 0 and calls[0][1] == (64, 1, 1)
