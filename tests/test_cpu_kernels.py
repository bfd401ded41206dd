"""nmkern CPU kernels (csrc/cpu through nmkern._cpu) vs the pure-torch reference.

Every ISA library the machine can run is forced in turn through NMKERN_CPU_ISA
(reloading nmkern._cpu's library); one subprocess checks that the variable works
in a fresh process. Tolerance: a multiple of the fp32 reference's own error
against fp64 (F.linear / F.conv2d in fp32 vs fp64 on the same masked weight).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import nmkern
from _cpu_isa import ISAS, isa  # noqa: F401  (isa: a fixture, one run per runnable library)
from nmkern import _cpu
from nmkern.reference.cpu_layouts import (
    bsr_1xn_pack_ref,
    bsr_1xn_unpack_ref,
    nm_tile_pack_ref,
    nm_tile_unpack_ref,
)

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="nmkern CPU library not built")


def _tolerance(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """8x the fp32 reference's own max error vs fp64, plus a floor for exact-ish cases."""
    err = (ref32.double() - ref64).abs().max().item()
    return 8 * err + 1e-5 * max(1.0, ref64.abs().max().item())


def _check_linear(layer, w, x, bias, algo=_cpu.Algo.AUTO):
    y = layer(x, bias, algo=algo)
    ref32 = F.linear(x, w, bias)
    ref64 = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert y.shape == ref32.shape and y.dtype == torch.float32
    assert (y.double() - ref64).abs().max().item() <= _tolerance(ref32, ref64)


NM_SHAPES = [  # (n, m, out, in, batch): odd batches, out not a multiple of the 8-row tile
    (2, 4, 13, 36, 1),
    (2, 4, 40, 100, 3),
    (2, 4, 24, 260, 17),
    (2, 4, 9, 64, 50),
    (1, 4, 33, 68, 1),
    (1, 4, 16, 128, 5),
    (1, 4, 7, 44, 49),
    (1, 2, 11, 30, 2),
    (2, 3, 17, 33, 7),
    (3, 8, 21, 120, 1),
    (3, 8, 21, 120, 30),
    (4, 8, 8, 64, 9),
    (2, 16, 19, 160, 1),
    (5, 16, 10, 96, 26),
    (1, 16, 5, 48, 3),
    (7, 12, 12, 84, 4),
]


@pytest.mark.parametrize("n,m,out_f,in_f,batch", NM_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_nm_linear_matches_reference(isa, n, m, out_f, in_f, batch, with_bias):
    g = torch.Generator().manual_seed(out_f * 1000 + in_f + batch)
    w = nmkern.apply_nm(torch.randn(out_f, in_f, generator=g), n, m)
    x = torch.randn(batch, in_f, generator=g)
    bias = torch.randn(out_f, generator=g) if with_bias else None
    layer = _cpu.prepare_cpu_linear(w, "nm", n, m)
    for algo in layer.algos:
        _check_linear(layer, w, x, bias, algo)


@pytest.mark.parametrize("block,out_f,in_f,batch,sparsity", [
    (4, 12, 37, 1, 0.75), (4, 40, 100, 3, 0.5), (4, 16, 65, 29, 0.75), (4, 8, 16, 50, 0.9),
    (1, 7, 20, 2, 0.5), (2, 10, 33, 9, 0.6), (3, 9, 17, 5, 0.4), (8, 24, 50, 1, 0.75),
    (8, 16, 40, 26, 0.5), (16, 32, 24, 7, 0.7), (5, 15, 31, 25, 0.3),
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_1xn_linear_matches_reference(isa, block, out_f, in_f, batch, sparsity, with_bias):
    g = torch.Generator().manual_seed(block * 7 + in_f + batch)
    w0 = torch.randn(out_f, in_f, generator=g)
    w = w0 * nmkern.block_mask_1xn(w0, block, sparsity)
    x = torch.randn(batch, in_f, generator=g)
    bias = torch.randn(out_f, generator=g) if with_bias else None
    layer = _cpu.prepare_cpu_linear(w, "1xn", block=block)
    for algo in layer.algos:
        _check_linear(layer, w, x, bias, algo)


@pytest.mark.parametrize("n", [1, 2])
def test_large_batch_kernel_every_panel_tail_and_output_stride(isa, n):
    """The large-batch N:M kernel's panel tails (16, 32 and 48 columns run the zmm tile with the index bit width
    known at compile time, other widths the ymm one) and outputs whose rows lie a multiple of 4 KiB
    apart (1024 fp32: y's stores go column by column), against F.linear."""
    g = torch.Generator().manual_seed(40 + n)
    for out_f, in_f in ((1024, 64), (1029, 96)):
        w = nmkern.apply_nm(torch.randn(out_f, in_f, generator=g), n, 4)
        layer = _cpu.prepare_cpu_linear(w, "nm", n, 4)
        bias = torch.randn(out_f, generator=g)
        for batch in (9, 16, 24, 32, 48, 64, 80, 96, 113):
            _check_linear(layer, w, torch.randn(batch, in_f, generator=g), bias if batch % 2 else None,
                          _cpu.Algo.LARGE_BATCH)


def test_1xn_all_zero_and_empty_batch(isa):
    w = torch.zeros(8, 12)
    layer = _cpu.prepare_cpu_linear(w, "1xn", block=4)
    bias = torch.arange(8, dtype=torch.float32)
    assert torch.equal(layer(torch.randn(3, 12), bias), bias.expand(3, 8))
    assert layer(torch.randn(0, 12)).shape == (0, 8)


def test_large_k_uses_int32_columns(isa):
    # K > 65536 does not fit uint16 column indices: the packer switches to int32.
    w = torch.zeros(4, 70000)
    w[:, [3, 65537, 69999]] = torch.randn(4, 3)
    layer = _cpu.prepare_cpu_linear(w, "1xn", block=4)
    assert layer._t["col"].dtype == torch.int32
    _check_linear(layer, w, torch.randn(2, 70000), None)


@pytest.mark.parametrize("kind,n,m,block", [("nm", 2, 4, 0), ("nm", 1, 8, 0), ("1xn", 0, 0, 4)])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), ((1, 2), (0, 1), (2, 1))])
def test_conv2d_matches_reference(isa, kind, n, m, block, stride, padding, dilation):
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(12, 16, 3, 3, generator=g)
    w = nmkern.apply_nm(w0, n, m, dim=1) if kind == "nm" else w0 * nmkern.block_mask_1xn(w0, block, 0.5)
    x = torch.randn(3, 16, 9, 8, generator=g)
    bias = torch.randn(12, generator=g)
    conv = _cpu.prepare_cpu_conv2d(w, kind, n, m, block)
    y = conv(x, bias, stride, padding, dilation)
    ref32 = F.conv2d(x, w, bias, stride, padding, dilation)
    ref64 = F.conv2d(x.double(), w.double(), bias.double(), stride, padding, dilation)
    assert y.shape == ref32.shape and y.is_contiguous()
    assert (y.double() - ref64).abs().max().item() <= _tolerance(ref32, ref64)


@pytest.mark.parametrize("threading", ["openmp", "pool", "auto"])
def test_threading_modes_match(monkeypatch, threading):
    monkeypatch.setenv("NMKERN_CPU_THREADING", threading)
    _cpu._reset()
    try:
        want = threading if threading != "auto" else ("openmp" if _cpu.shares_torch_openmp(lib=_cpu._load()) else
                                                      "pool")
        assert _cpu.threading_mode() == want
        assert _cpu._load().nmkern_cpu_get_threading() == _cpu.THREADING_MODES[want]
        g = torch.Generator().manual_seed(3)
        for kind, n, m, block in (("nm", 2, 4, 0), ("1xn", 0, 0, 4)):
            w0 = torch.randn(64, 96, generator=g)
            w = nmkern.apply_nm(w0, n, m) if kind == "nm" else w0 * nmkern.block_mask_1xn(w0, block, 0.5)
            layer = _cpu.prepare_cpu_linear(w, kind, n, m, block)
            for batch in (1, 5, 61):
                x = torch.randn(batch, 96, generator=g)
                for algo in layer.algos:
                    y = layer(x, None, algo=algo, num_threads=2)
                    assert torch.allclose(y, F.linear(x, w), rtol=1e-4, atol=1e-4)
    finally:
        monkeypatch.delenv("NMKERN_CPU_THREADING")
        _cpu._reset()


_MAPS_LINE = "7f00-7f10 r-xp 00000000 08:01 42 {}"


def test_openmp_runtimes_read_from_maps():
    maps = "\n".join([_MAPS_LINE.format("/site-packages/torch/lib/libgomp.so.1"),
                      _MAPS_LINE.format("/site-packages/torch/lib/libgomp.so.1"),  # one file, several mappings
                      _MAPS_LINE.format("/usr/lib/libc.so.6"), "7f20-7f30 rw-p 00000000 00:00 0"])
    assert _cpu.openmp_runtimes(maps) == {"/site-packages/torch/lib/libgomp.so.1"}
    assert _cpu.shares_torch_openmp(maps) == ("OpenMP" in torch.__config__.parallel_info())
    # a second runtime (torch bundling its own under a hashed name, nmkern then loading the system's): two teams
    two = maps + "\n" + _MAPS_LINE.format("/usr/lib/x86_64-linux-gnu/libgomp.so.1")
    assert len(_cpu.openmp_runtimes(two)) == 2 and not _cpu.shares_torch_openmp(two)
    assert not _cpu.shares_torch_openmp(_MAPS_LINE.format("/usr/lib/libc.so.6"))


_SECOND_RUNTIME = """
import ctypes, shutil, sys, tempfile, torch
from pathlib import Path
torch.ones(64, 64) @ torch.ones(64, 64)  # torch's runtime is up
gomps = [p for p in __import__("nmkern._openmp")._openmp.openmp_runtimes() if Path(p).name.startswith("libgomp")]
if len(gomps) != 1:
    print("skip", gomps)
    sys.exit(0)
copy = Path(tempfile.mkdtemp()) / "libgomp-0123abcd.so.1"
gomp = gomps[0]
shutil.copy(gomp, copy)
ctypes.CDLL(str(copy))  # a second runtime mapped, as scikit-learn's wheel maps one
from nmkern import _cpu
print(len(_cpu.openmp_runtimes()), _cpu.threading_mode())
shutil.rmtree(copy.parent)  # mapped still: Linux keeps the file's pages until the process exits
"""


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="torch without OpenMP")
def test_a_second_openmp_runtime_mapped_does_not_split_the_teams():
    """scikit-learn (imported by transformers) maps its own libgomp under a hashed name before nmkern's library
    loads: nmkern's library still binds torch's libgomp.so.1, so "auto" must still pick torch's team."""
    env = {k: v for k, v in os.environ.items() if k != "NMKERN_CPU_THREADING"}
    out = subprocess.run([sys.executable, "-c", _SECOND_RUNTIME], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("skip"):
        pytest.skip(f"torch's OpenMP runtime is not one libgomp here: {out.stdout.strip()}")
    assert out.stdout.split() == ["2", "openmp"], out.stdout


def test_bad_threading_env_warns(monkeypatch):
    monkeypatch.setenv("NMKERN_CPU_THREADING", "tbb")
    _cpu._reset()
    try:
        with pytest.warns(RuntimeWarning, match="NMKERN_CPU_THREADING='tbb' is not one of"):
            assert not _cpu.available()
    finally:
        monkeypatch.delenv("NMKERN_CPU_THREADING")
        _cpu._reset()


# ---------------------------------------------------------------- layouts (exact)
@pytest.mark.parametrize("n,m,rows,k", [(2, 4, 13, 40), (1, 4, 8, 16), (3, 8, 9, 48), (5, 16, 17, 64), (1, 2, 3, 6),
                                        (2, 3, 10, 9)])
def test_nm_tile_layout_round_trip(n, m, rows, k):
    w = nmkern.apply_nm(torch.randn(rows, k), n, m)
    values, index = nm_tile_pack_ref(w, n, m)
    assert index.dtype == torch.uint8 and values.dtype == torch.float32
    tiles, bits = -(-rows // 8), max(1, (m - 1).bit_length())
    assert values.numel() == tiles * 8 * (k // m * n) and index.numel() == tiles * (k // m * n) * bits + 4
    assert torch.equal(nm_tile_unpack_ref(values, index, rows, k, n, m), w)


def test_nm_tile_layout_golden():
    # One tile, one group of 4: row l keeps columns {l % 4, 3} (lane 3 keeps {2, 3}).
    w = torch.zeros(8, 4)
    for lane in range(8):
        keep = sorted({lane % 4, 3}) if lane % 4 != 3 else [2, 3]
        w[lane, keep] = torch.tensor([lane + 1.0, -(lane + 1.0)])
    values, index = nm_tile_pack_ref(w, 2, 4)
    slot0 = [lane % 4 if lane % 4 != 3 else 2 for lane in range(8)]
    field0 = sum(i << (2 * lane) for lane, i in enumerate(slot0))
    field1 = sum(3 << (2 * lane) for lane in range(8))
    expect = [field0 & 0xFF, field0 >> 8, field1 & 0xFF, field1 >> 8, 0, 0, 0, 0]
    assert index.tolist() == expect
    assert values[:8].tolist() == [lane + 1.0 for lane in range(8)]


def test_bsr_layout_round_trip_and_dtype():
    w0 = torch.randn(16, 40)
    w = w0 * nmkern.block_mask_1xn(w0, 4, 0.6)
    rowptr, col, values = bsr_1xn_pack_ref(w, 4)
    assert rowptr.dtype == torch.int32 and col.dtype == torch.uint16 and values.shape[1] == 4
    assert torch.equal(bsr_1xn_unpack_ref(rowptr, col, values, 16, 40), w)


def test_nbytes_and_density():
    w = nmkern.apply_nm(torch.randn(64, 256), 2, 4)
    layer = _cpu.prepare_cpu_linear(w, "nm", 2, 4)
    assert layer.nbytes == 64 * 128 * 4 + 64 * 128 * 2 // 8 + 4  # values + 2-bit indices + pad
    assert layer.density == 0.5


# ---------------------------------------------------------------- ISA selection
def test_env_var_forces_isa_in_fresh_process():
    for isa_name in ISAS:
        env = dict(os.environ, NMKERN_CPU_ISA=isa_name)
        code = "from nmkern import _cpu; print(_cpu.available(), _cpu.isa())"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["True", isa_name]


def test_bad_env_isa_warns_and_is_unavailable(monkeypatch):
    monkeypatch.setenv("NMKERN_CPU_ISA", "sse9")
    _cpu._reset()
    try:
        with pytest.warns(RuntimeWarning, match="NMKERN_CPU_ISA='sse9' is not one of"):
            assert _cpu.available() is False
        assert _cpu.isa() is None
    finally:
        monkeypatch.delenv("NMKERN_CPU_ISA")
        _cpu._reset()
    assert _cpu.available()


def test_missing_library_warns_once(monkeypatch, tmp_path):
    monkeypatch.setattr(_cpu, "LIB_DIR", tmp_path)
    _cpu._reset()
    try:
        with pytest.warns(RuntimeWarning, match="cpu backend is unavailable"):
            assert not _cpu.available()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _cpu.available()  # no second warning
        w = nmkern.apply_nm(torch.randn(8, 8), 2, 4)
        layer = _cpu.prepare_cpu_linear(w, "nm", 2, 4)  # packing is pure torch
        with pytest.raises(RuntimeError, match="CPU library is unavailable"):
            layer(torch.randn(1, 8))
    finally:
        monkeypatch.undo()
        _cpu._reset()


def test_default_isa_is_best_supported():
    _cpu._reset()
    assert _cpu.available()
    assert _cpu.isa().value == ISAS[-1]


# ---------------------------------------------------------------- dispatch table
def test_cpu_beats_dense_decisions():
    beats = _cpu.cpu_beats_dense
    assert beats("nm", 2, 4, 0, 0.5, 1, 4096, 4096)
    assert beats("1xn", 0, 0, 4, 0.75, 16, 4096, 4096)
    assert not beats("nm", 2, 4, 0, 0.5, 4096, 4096, 4096)  # compute-bound: MKL wins
    assert beats("nm", 2, 4, 0, 0.5, 8, 384, 1536) and not beats("nm", 2, 4, 0, 0.5, 32, 384, 1536)
    assert beats("nm", 1, 4, 0, 0.75, 512, 384, 1536)
    assert not beats("nm", 2, 4, 0, 0.5, 1, 8, 8)  # call overhead dominates a tiny layer
    assert not beats("nm", 7, 8, 0, 0.875, 1, 4096, 4096)  # too dense to save bytes
    assert not beats("1xn", 0, 0, 4, 0.1, 1, 4096, 4096)
    assert not beats("nm", 2, 4, 0, 0.5, 0, 4096, 4096)


# ---------------------------------------------------------------- errors
def test_errors_prepare():
    w = nmkern.apply_nm(torch.randn(8, 16), 2, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        _cpu.prepare_cpu_linear(w, "csr", 2, 4)
    with pytest.raises(ValueError, match="not 2:4 sparse: row 0, group 0 has 4 non-zeros"):
        _cpu.prepare_cpu_linear(torch.ones(8, 16), "nm", 2, 4)
    with pytest.raises(ValueError, match="in_features=18 is not divisible by m=4"):
        _cpu.prepare_cpu_linear(torch.zeros(8, 18), "nm", 2, 4)
    with pytest.raises(ValueError, match="n=4, m=4 is not an N:M pattern"):
        _cpu.prepare_cpu_linear(w, "nm", 4, 4)
    with pytest.raises(ValueError, match="m=32 is out of range"):
        _cpu.prepare_cpu_linear(torch.zeros(8, 32), "nm", 2, 32)
    with pytest.raises(ValueError, match="out_features=8 is not divisible by block=3"):
        _cpu.prepare_cpu_linear(w, "1xn", block=3)
    with pytest.raises(TypeError, match="block must be an int"):
        _cpu.prepare_cpu_linear(w, "1xn", block=4.0)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        _cpu.prepare_cpu_linear(w.reshape(-1), "nm", 2, 4)
    with pytest.raises(TypeError, match="weight has dtype int32"):
        _cpu.prepare_cpu_linear(w.int(), "nm", 2, 4)
    with pytest.raises(ValueError, match="in_channels=6 is not divisible by m=4"):
        _cpu.prepare_cpu_conv2d(torch.zeros(4, 6, 3, 3), "nm", 2, 4)
    with pytest.raises(ValueError, match="weight must have 4 dimensions"):
        _cpu.prepare_cpu_conv2d(w, "nm", 2, 4)


def test_errors_call():
    w = nmkern.apply_nm(torch.randn(8, 16), 2, 4)
    layer = _cpu.prepare_cpu_linear(w, "nm", 2, 4)
    with pytest.raises(ValueError, match=r"x has shape \(2, 12\) but the weight has in_features=16"):
        layer(torch.randn(2, 12))
    with pytest.raises(TypeError, match="x has dtype float64"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        layer(torch.randn(16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[0.0] * 16])
    with pytest.raises(ValueError, match=r"bias has shape \(7,\), expected \(8,\)"):
        layer(torch.randn(2, 16), torch.randn(7))
    with pytest.raises(TypeError, match="bias has dtype float16"):
        layer(torch.randn(2, 16), torch.randn(8).half())
    # Non-contiguous input is copied, not rejected.
    x = torch.randn(16, 2).t()
    assert torch.allclose(layer(x), F.linear(x, w), atol=1e-5)
    conv = _cpu.prepare_cpu_conv2d(nmkern.apply_nm(torch.randn(4, 8, 3, 3), 2, 4, dim=1), "nm", 2, 4)
    with pytest.raises(ValueError, match="x has 3 channels"):
        conv(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="gives an empty output"):
        conv(torch.randn(1, 8, 2, 2))
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        conv(torch.randn(1, 8, 5, 5), None, "2")
    with pytest.raises(ValueError, match="stride=0 must be >= 1"):
        conv(torch.randn(1, 8, 5, 5), None, 0)


def test_c_side_rejects_bad_scalars():
    # Second line of defence: the C entry points refuse bad sizes without touching memory.
    lib = _cpu._load()
    buf = torch.zeros(64)
    p = buf.data_ptr()
    assert lib.nmkern_nm_linear_f32(p, 1, 6, p, p, 8, 2, 4, None, p, 1, 0) == 1  # K % m != 0
    assert lib.nmkern_nm_linear_f32(p, 1, 8, p, p, 8, 2, 17, None, p, 1, 0) == 1  # m > 16
    assert lib.nmkern_nm_linear_f32(None, 1, 8, p, p, 8, 2, 4, None, p, 1, 0) == 1  # NULL x
    assert lib.nmkern_nm_linear_f32(p, 1, 8, p, p, 8, 2, 4, None, p, 1, 7) == 1  # unknown algo
    rowptr = torch.tensor([0, 5], dtype=torch.int32)
    assert lib.nmkern_bsr_linear_f32(p, 1, 8, p, rowptr.data_ptr(), p, 2, 4, 4, 4, None, p, 1, 0) == 1  # nnzb != rowptr
    assert lib.nmkern_bsr_linear_f32(p, 1, 8, p, rowptr.data_ptr(), p, 3, 5, 4, 4, None, p, 1, 0) == 1  # col_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["nm", "1xn"])
def test_check_finite_flag_refuses_nan_and_inf_without_writing(isa, dtype, kind):
    """NMKERN_FLAG_CHECK_FINITE: the kernel scans x and returns NMKERN_ENONFINITE, y untouched, for one NaN, +Inf
    or -Inf anywhere (first element, inside a 256-element block, the ragged tail); finite x runs as without it.
    The largest finite value of each dtype is finite."""
    torch.manual_seed(11)
    out_f, in_f, batch = 16, 100, 7  # 700 elements: two whole 256-blocks and a tail of 188
    w = (torch.randn(out_f, in_f) * (torch.rand(out_f, in_f) < 0.5)).to(dtype)
    if kind == "nm":
        w = nmkern.functional.apply_nm(w.float(), 2, 4).to(dtype)
    layer = _cpu.prepare_cpu_linear(w, kind, 2, 4, 4) if kind == "nm" else _cpu.prepare_cpu_linear(w, kind, block=4)
    t = layer.tensors
    run = _cpu.nm_linear if kind == "nm" else _cpu.bsr_linear
    args = (t["values"], t["index"], 2, 4) if kind == "nm" else (t["values"], t["rowptr"], t["col"], 4)
    x = torch.randn(batch, in_f).to(dtype)
    plain = run(x, *args, out_f)
    assert torch.equal(run(x, *args, out_f, check_finite=True), plain)
    big = x.clone()
    big[3, 7] = torch.finfo(dtype).max
    assert run(big, *args, out_f, check_finite=True) is not None
    for where in [(0, 0), (2, 60), (6, 99)]:
        for bad in (float("nan"), float("inf"), -float("inf")):
            xb = x.clone()
            xb[where] = bad
            y = torch.full((batch, out_f), 7.0, dtype=dtype)
            entry = getattr(_cpu._load(), f"nmkern_{'nm' if kind == 'nm' else 'bsr'}_linear_{_cpu._SUFFIX[dtype]}")
            c_args = ((t["values"].data_ptr(), t["index"].data_ptr(), out_f, 2, 4) if kind == "nm" else
                      (*_cpu._bsr_args(t["values"], t["rowptr"], t["col"]), out_f, 4))
            rc = entry(xb.data_ptr(), batch, in_f, *c_args, None, y.data_ptr(), 1, _cpu.CHECK_FINITE)
            assert rc == _cpu.NONFINITE and torch.equal(y, torch.full_like(y, 7.0)), (where, bad)
            assert run(xb, *args, out_f, check_finite=True) is None
            assert run(xb, *args, out_f) is not None  # without the flag the kernel runs (and skips pruned weights)
