"""CUDA kernels' index and metadata logic, checked on the CPU (no GPU needed).

tests/cuda_host/sp24_host_test.cpp includes csrc/cuda/sp24_layout.cuh and sp24_epilogue.cuh (the
helpers the kernels use) and is compiled here with g++. It

* decodes nmkern.compress_24's CUTLASS-layout metadata and rebuilds the dense matrix,
* runs the prune-and-compress kernel's per-thread logic, compared byte for byte with
  compress_24(apply_nm(w, 2, 4)),
* emulates the GEMM kernel and the split-K reduce: the stage schedule, loader, ldmatrix
  addresses, metadata word per lane, accumulator mapping, epilogue and reduce come from the
  headers; cp.async groups in flight, ldmatrix and mma.sp from the PTX ISA. Shared memory starts
  as NaN, copies not yet waited for read as NaN (and stop the run), and every cp.async / ldmatrix
  / vector address must be 16-byte aligned. Y (fp16/bf16, written only by the kernel's epilogue
  or the reduce) is compared with a float64 matmul of the decompressed weight.
* negative controls: builds with a planted bug (NMKERN_EMU_* flags) must fail that comparison.

No GPU runs here: what only hardware can settle (the real instruction semantics, barriers between
warps, timing) is left to tests/test_cuda_gpu.py.
"""

from __future__ import annotations

import math
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


def _compile(out_dir: Path, flags: tuple[str, ...]) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/clang++) to build the emulation program")
    exe = out_dir / ("sp24_host_test" + "".join("_" + f.lstrip("-D").lower() for f in flags))
    proc = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-Werror", *flags, f"-I{HEADER_DIR}", str(HOST_SRC), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"host test program failed to compile:\n{proc.stderr}"
    return exe


@pytest.fixture(scope="session")
def host_build(tmp_path_factory):
    """build(*flags) -> executable; one g++ run per flag set per session (about 1.5 s each)."""
    out_dir = tmp_path_factory.mktemp("sp24_host")
    cache: dict[tuple[str, ...], Path] = {}

    def build(*flags: str) -> Path:
        if flags not in cache:
            cache[flags] = _compile(out_dir, flags)
        return cache[flags]

    return build


@pytest.fixture(scope="session")
def host_prog(host_build) -> Path:
    return host_build()


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
    # (config, requested splits, M, N, K, bias)
    ("small", 1, 1, 64, 64, False),
    ("small", 1, 5, 96, 96, True),  # N % BN != 0, K % 64 == 32 (k tail), M < BM
    ("small", 3, 17, 64, 320, True),  # split-K (5 k tiles over 3 splits), 2 batch tiles, bias in the reduce
    ("large", 1, 130, 160, 160, True),  # ragged M and N, k tail
    ("large", 2, 64, 128, 256, False),
    ("large", 1, 5, 64, 64, True),  # idle warps: W rows 64..127 and batch rows 64..127 are past N / M
    ("small", 2, 64, 32, 128, False),  # four batch tiles, one warp past N
    ("large", 4, 70, 96, 352, True),  # split-K with a k tail (K % 64 == 32), 4 asked -> 3 splits of 2 tiles
    ("small", 4, 3, 64, 224, False),  # split-K, k tail in the last split, no bias
]
REDUCE_THREADS = 256  # nmkern/_cuda.py's reduce launch
REDUCE_SMS = 1  # launcher: blocks = min(ceil(M*N/4/256), 8 * SMs); 1 SM -> <= 8 blocks, so the grid-stride loop repeats


def _launch_geometry(m: int, n: int, k: int, splits: int) -> tuple[int, int, int]:
    """(splits, kt_per_split, reduce blocks) exactly as _cuda.sparse24_linear computes them."""
    ktiles = math.ceil(k / _cuda.BK)
    splits = min(splits, ktiles)
    kt_per_split = math.ceil(ktiles / splits)
    splits = math.ceil(ktiles / kt_per_split)  # no empty split
    blocks = min(math.ceil(m * n // 4 / REDUCE_THREADS), 8 * REDUCE_SMS)
    return splits, kt_per_split, blocks


def _emulate(exe, tmp_path, dtype, cfg, splits, x, values, meta, bias):
    m, k = x.shape
    n = values.shape[0]
    splits, kt_per_split, red_blocks = _launch_geometry(m, n, k, splits)
    f_in, f_out = tmp_path / "g.in", tmp_path / "g.out"
    payload = _header(dtype is torch.bfloat16, 0 if cfg == "small" else 1, splits, kt_per_split, red_blocks,
                      REDUCE_THREADS, m, n, k, bias is not None)
    payload += _bits(x) + _bits(values) + _bits(meta) + (_bits(bias) if bias is not None else b"")
    f_in.write_bytes(payload)
    out = _run(exe, "gemm", f_in, f_out)
    if out.returncode != 0:
        return out, None
    y = torch.from_numpy(np.frombuffer(f_out.read_bytes(), dtype="<i2").copy()).view(dtype).reshape(m, n)
    return out, y


def _gemm_error(x, w, bias, y) -> tuple[float, float]:
    """(max excess of |Y - fp64| over its bound, the bound at that element); <= 0 passes.

    Bound per element: 8x torch's own fp32 error (floored at one fp32 ulp of the largest
    |x| @ |w| partial sum, for shapes where torch happens to be exact), for the fp32 accumulation,
    plus the final rounding to fp16/bf16 (round to nearest: half an ulp, <= eps/2 * |v| for
    normal v, plus half the smallest subnormal).
    """
    ref = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
    torch32 = x.float() @ w.float().T + (bias.float() if bias is not None else 0)
    scale = (x.double().abs() @ w.double().abs().T).max().item()
    acc_tol = 8 * max((torch32.double() - ref).abs().max().item(), torch.finfo(torch.float32).eps * scale)
    fi = torch.finfo(y.dtype)
    bound = acc_tol + (fi.eps / 2) * (ref.abs() + acc_tol) + fi.smallest_normal * fi.eps / 4
    err = (y.double() - ref).abs()
    excess = torch.nan_to_num(err - bound, nan=float("inf"))
    i = int(excess.argmax())
    return excess.flatten()[i].item(), bound.flatten()[i].item()


def _gemm_case(dtype, m, n, k, with_bias, seed_extra=0):
    gen = torch.Generator().manual_seed(m * 31 + n * 7 + k + seed_extra)
    w = _sparse_weight(n, k, dtype, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    return w, x, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg,splits,m,n,k,with_bias", GEMM_CASES)
def test_gemm_emulation_matches_dense(host_prog, tmp_path, dtype, cfg, splits, m, n, k, with_bias):
    w, x, bias = _gemm_case(dtype, m, n, k, with_bias)
    values, meta = nmkern.compress_24(w, backend="reference")
    out, y = _emulate(host_prog, tmp_path, dtype, cfg, splits, x, values, meta, bias)
    assert out.returncode == 0, out.stdout + out.stderr
    excess, bound = _gemm_error(x, w, bias, y)
    assert excess <= 0, f"|emulated - fp64| exceeds its bound {bound:.3g} by {excess:.3g}"


def test_weights_have_random_per_group_patterns():
    """The GEMM weights mix all six 2:4 patterns (plus underfull groups) across rows and columns.

    A uniform pattern would hide a metadata word placed on the wrong lane / row (every row's
    nibbles would be equal); the negative controls below rely on this.
    """
    from nmkern.reference.semi24 import nibbles_24_ref

    w = _sparse_weight(64, 128, torch.float16, torch.Generator().manual_seed(0))
    nib = nibbles_24_ref(w)  # (N, K/4)
    assert set(nib.unique().tolist()) >= {0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110}
    assert (nib[:8] != nib[8:16]).float().mean() > 0.5  # rows g and g + 8 differ in most groups
    assert (nib[:, :4] != nib[:, 4:8]).float().mean() > 0.5  # k halves of a k32 step differ


# ---- negative controls: a planted bug must make the emulated GEMM fail --------------------------

# One small case that covers the k tail, split-K with the reduce, bias, ragged M and two batch tiles.
NEG_CASE = ("small", 2, 17, 64, 224, True)
NEGATIVE_CONTROLS = [
    # (flag, what the failure must say: None = Y differs from the fp64 reference)
    ("NMKERN_EMU_BAD_SELECTOR", None),
    ("NMKERN_EMU_BAD_META", None),
    ("NMKERN_EMU_BAD_B_ORDER", None),
    ("NMKERN_EMU_EARLY_READ", "while a cp.async to it is in flight"),
    ("NMKERN_EMU_MISALIGN", "is not 16-byte aligned"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flag,message", NEGATIVE_CONTROLS)
def test_gemm_emulation_negative_controls(host_build, tmp_path, dtype, flag, message):
    cfg, splits, m, n, k, with_bias = NEG_CASE
    w, x, bias = _gemm_case(dtype, m, n, k, with_bias)
    values, meta = nmkern.compress_24(w, backend="reference")
    # The same case passes without the planted bug.
    out, y = _emulate(host_build(), tmp_path, dtype, cfg, splits, x, values, meta, bias)
    assert out.returncode == 0 and _gemm_error(x, w, bias, y)[0] <= 0, out.stdout + out.stderr
    out, y = _emulate(host_build(f"-D{flag}"), tmp_path, dtype, cfg, splits, x, values, meta, bias)
    if message is None:
        assert out.returncode == 0, out.stdout + out.stderr  # runs to the end, but computes a wrong Y
        excess, bound = _gemm_error(x, w, bias, y)
        assert excess > 100 * bound, f"{flag}: Y still within {excess + bound:.3g} of the reference"
    else:
        assert out.returncode == 1 and message in out.stdout, out.stdout + out.stderr


def test_early_read_without_the_in_flight_check_gives_nan(host_build, tmp_path):
    """A stage read before its wait also shows in Y: the bytes of a copy in flight are NaN.

    NMKERN_EMU_EARLY_READ alone stops at the first in-flight read; with the poison alone
    (NMKERN_EMU_NO_INFLIGHT_CHECK) the metadata read as 0xFFFFFFFF is rejected by mma.sp.
    """
    cfg, splits, m, n, k, with_bias = NEG_CASE
    w, x, bias = _gemm_case(torch.float16, m, n, k, with_bias)
    values, meta = nmkern.compress_24(w, backend="reference")
    exe = host_build("-DNMKERN_EMU_EARLY_READ", "-DNMKERN_EMU_NO_INFLIGHT_CHECK")
    out, _ = _emulate(exe, tmp_path, torch.float16, cfg, splits, x, values, meta, bias)
    assert out.returncode == 1 and "metadata nibble not ordered" in out.stdout, out.stdout + out.stderr


def test_uniform_pattern_would_hide_a_misplaced_metadata_row(host_build, tmp_path):
    """Why the weights use random per-group patterns: with one 2:4 pattern everywhere, metadata
    applied to the wrong row (NMKERN_EMU_BAD_META) goes unnoticed."""
    m, n, k = 16, 64, 64
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=gen)
    w[:, 1::4] = 0
    w[:, 3::4] = 0  # pattern 0101 in every group: nibble 0b1000 everywhere
    w = w.half()
    x = torch.randn(m, k, generator=gen).half()
    values, meta = nmkern.compress_24(w, backend="reference")
    out, y = _emulate(host_build("-DNMKERN_EMU_BAD_META"), tmp_path, torch.float16, "small", 1, x, values, meta, None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert _gemm_error(x, w, None, y)[0] <= 0


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
    assert _gemm_error(x, w, None, y)[0] > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_rounding_matches_torch(host_prog, tmp_path, dtype):
    """The emulated epilogue's fp32 -> fp16/bf16 conversion (round to nearest even) is torch's, bit for bit."""
    fi = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(11)
    vals = torch.cat([
        torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-9, 6, (4000,), generator=gen).float(),
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), fi.max, 65519.0, 65520.0, 3e38,
                      fi.smallest_normal, fi.smallest_normal / 3, 2.0 ** -25, 2.0 ** -24 * 1.5, 2.0 ** -26]),
    ]).float()
    # exact ties between two neighbouring 16-bit values (round half to even picks the even one)
    lo = (torch.randn(500, generator=gen).abs() + fi.smallest_normal).to(dtype)
    lo = lo[lo < fi.max]
    hi = (lo.view(torch.int16) + 1).view(dtype)
    mid = (lo.double() + hi.double()) / 2  # exact in fp32: one bit more than the 16-bit mantissa
    vals = torch.cat([vals, mid.float(), -mid.float()])
    f_in, f_out = tmp_path / "r.in", tmp_path / "r.out"
    f_in.write_bytes(_header(dtype is torch.bfloat16, vals.numel()) + vals.numpy().astype("<f4").tobytes())
    out = _run(host_prog, "round", f_in, f_out)
    assert out.returncode == 0, out.stdout + out.stderr
    got = torch.from_numpy(np.frombuffer(f_out.read_bytes(), dtype="<i2").copy())
    assert torch.equal(got, vals.to(dtype).view(torch.int16))


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
