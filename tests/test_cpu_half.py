"""bf16 / fp16 CPU kernels (csrc/cpu ``*_bf16`` / ``*_f16`` through nmkern._cpu) vs an fp32 reference.

The reference is F.linear in fp32 on the same half-rounded weight, input and bias. Tolerance
(flash-attention style): the kernel's max error against it may be at most twice the error
torch's own same-dtype ``F.linear`` makes against it, plus a small floor; the kernels
accumulate in fp32 and round once, so both errors are about half an ulp of the output.
Where every product and sum is exact in fp32 the kernel must round exactly like
``ref32.to(dtype)`` (round to nearest even, fp16 subnormals and overflow included).
Every test runs on every ISA library the machine can run (the ``isa`` fixture).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nmkern
from _cpu_isa import isa  # noqa: F401  (a fixture: one run per runnable library)
from nmkern import _cpu

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="nmkern CPU library not built")

HALF = [torch.bfloat16, torch.float16]
BATCHES = (1, 3, 8, 9, 50)


def _check(layer, w, x, bias, what: str) -> None:
    """Every algo of ``layer`` on (x, bias) within 2x torch's own same-dtype error of the fp32 reference."""
    ref32 = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    err_torch = (F.linear(x, w, bias).float() - ref32).abs().max().item()
    atol = 1e-5 * max(1.0, ref32.abs().max().item())
    for algo in layer.algos:
        y = layer(x, bias, algo=algo)
        assert y.dtype == x.dtype and y.shape == ref32.shape
        err = (y.float() - ref32).abs().max().item()
        assert err <= 2 * err_torch + atol, f"{what} algo {algo.name}: err {err:.3g} vs torch {err_torch:.3g}"


def _data(g, out_f, in_f, batch, dtype, bias: bool):
    x = torch.randn(batch, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    return x, b


NM_CASES = [(n, m) for m in (4, 8, 16) for n in range(1, m)]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("n,m", NM_CASES)
def test_nm_linear_half(isa, dtype, n, m):
    g = torch.Generator().manual_seed(100 * m + n)
    out_f, in_f = 13 + 2 * n, m * (3 + n % 3)  # out never a multiple of the 8-row tile
    w = nmkern.apply_nm(torch.randn(out_f, in_f, generator=g), n, m).to(dtype)
    layer = _cpu.prepare_cpu_linear(w, "nm", n, m)
    assert layer.dtype == dtype and layer.tensors["values"].dtype == dtype
    for batch in BATCHES:
        for bias in (False, True):
            x, b = _data(g, out_f, in_f, batch, dtype, bias)
            _check(layer, w, x, b, f"{n}:{m} {out_f}x{in_f} batch {batch} bias {bias}")


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("groups", [1, 5, 6, 129])
def test_bf16_two_slot_small_batch_kernel(isa, n, groups):
    # bf16 m = 4 at 1-8 rows takes two slots per step (one 32-byte load for 16 values): 1:4 with an odd
    # group count ends on one slot alone; every column count 1..8 and a ragged last tile (out 21).
    g = torch.Generator().manual_seed(7 * groups + n)
    w = nmkern.apply_nm(torch.randn(21, 4 * groups, generator=g), n, 4).to(torch.bfloat16)
    layer = _cpu.prepare_cpu_linear(w, "nm", n, 4)
    for batch in range(1, 9):
        x, b = _data(g, 21, 4 * groups, batch, torch.bfloat16, batch % 2 == 0)
        _check(layer, w, x, b, f"{n}:4 21x{4 * groups} batch {batch}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("n,m,out_f,in_f", [(2, 4, 37, 1024), (1, 4, 21, 776), (3, 16, 45, 272)])
def test_nm_linear_half_wider(isa, dtype, n, m, out_f, in_f):
    # Several K blocks of the large-batch kernel and several work chunks.
    g = torch.Generator().manual_seed(in_f)
    w = nmkern.apply_nm(torch.randn(out_f, in_f, generator=g), n, m).to(dtype)
    layer = _cpu.prepare_cpu_linear(w, "nm", n, m)
    for batch in (1, 9, 50):
        x, b = _data(g, out_f, in_f, batch, dtype, batch != 9)
        _check(layer, w, x, b, f"{n}:{m} {out_f}x{in_f} batch {batch}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("block,out_f,in_f", [(4, 20, 37), (4, 12, 100), (8, 24, 65), (16, 32, 50), (1, 7, 20),
                                              (3, 9, 33), (5, 15, 31)])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_1xn_linear_half(isa, dtype, block, out_f, in_f, sparsity):
    g = torch.Generator().manual_seed(block * 1000 + in_f + int(100 * sparsity))
    w0 = torch.randn(out_f, in_f, generator=g)
    w = (w0 * nmkern.block_mask_1xn(w0, block, sparsity)).to(dtype)
    layer = _cpu.prepare_cpu_linear(w, "1xn", block=block)
    assert layer.dtype == dtype
    for batch in BATCHES:
        for bias in (False, True):
            x, b = _data(g, out_f, in_f, batch, dtype, bias)
            _check(layer, w, x, b, f"1x{block} {out_f}x{in_f} @ {sparsity} batch {batch} bias {bias}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_1xn_half_all_zero_and_empty_batch(isa, dtype):
    layer = _cpu.prepare_cpu_linear(torch.zeros(8, 12, dtype=dtype), "1xn", block=4)
    bias = torch.arange(8).to(dtype)
    for algo in layer.algos:
        assert torch.equal(layer(torch.randn(3, 12).to(dtype), bias, algo=algo), bias.expand(3, 8))
    assert layer(torch.randn(0, 12).to(dtype)).shape == (0, 8)


def _exact_case(g, kind, out_f, in_f, w_scale, x_scale, dtype):
    """Weights and inputs that are small integers times powers of two: every product and every fp32
    partial sum is exact, so the only rounding is the final one to ``dtype``."""
    w0 = torch.randint(-8, 9, (out_f, in_f), generator=g).float() * w_scale
    w = nmkern.apply_nm(w0, 2, 4) if kind == "nm" else w0 * nmkern.block_mask_1xn(w0, 4, 0.5)
    x = torch.randint(-64, 65, (50, in_f), generator=g).float() * x_scale
    bias = torch.randint(-64, 65, (out_f,), generator=g).float() * (w_scale * x_scale)
    return w.to(dtype), x.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("dtype,w_scale,x_scale", [
    (torch.bfloat16, 1.0, 2.0 ** -6),   # sums of ~9 significant bits: many round-to-even ties in bf16
    (torch.float16, 1.0, 2.0 ** -4),    # ties in fp16's 11 bits
    (torch.float16, 2.0 ** -14, 2.0 ** -12),  # results below 2^-14, steps of 2^-26: fp16 subnormals
    (torch.float16, 64.0, 4.0),         # results past 65504: overflow to +-Inf
], ids=["bf16-ties", "fp16-ties", "fp16-subnormal", "fp16-overflow"])
@pytest.mark.parametrize("kind", ["nm", "1xn"])
def test_half_output_rounds_like_torch(isa, dtype, w_scale, x_scale, kind):
    g = torch.Generator().manual_seed(7)
    w, x, bias = _exact_case(g, kind, 20, 64, w_scale, x_scale, dtype)
    layer = _cpu.prepare_cpu_linear(w, kind, 2, 4, 4)
    for batch in (1, 3, 50):
        expect = F.linear(x[:batch].float(), w.float(), bias.float()).to(dtype)  # exact in fp32, rounded once
        for algo in layer.algos:
            y = layer(x[:batch], bias, algo=algo)
            assert torch.equal(y.view(torch.int16), expect.view(torch.int16)), f"batch {batch} algo {algo.name}"


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_conv2d(isa, dtype):
    g = torch.Generator().manual_seed(11)
    w = nmkern.apply_nm(torch.randn(12, 16, 3, 3, generator=g), 2, 4, dim=1).to(dtype)
    x = torch.randn(2, 16, 7, 6, generator=g).to(dtype)
    bias = torch.randn(12, generator=g).to(dtype)
    y = _cpu.prepare_cpu_conv2d(w, "nm", 2, 4)(x, bias, 1, 1)
    ref32 = F.conv2d(x.float(), w.float(), bias.float(), 1, 1)
    err_torch = (F.conv2d(x, w, bias, 1, 1).float() - ref32).abs().max().item()
    assert y.dtype == dtype and y.shape == ref32.shape
    assert (y.float() - ref32).abs().max().item() <= 2 * err_torch + 1e-5 * ref32.abs().max().item()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_registered_ops_take_half(dtype):
    g = torch.Generator().manual_seed(3)
    w = nmkern.apply_nm(torch.randn(24, 32, generator=g), 2, 4).to(dtype)
    x = torch.randn(5, 32, generator=g).to(dtype)
    bias = torch.randn(24, generator=g).to(dtype)
    ref32 = F.linear(x.float(), w.float(), bias.float())
    err_torch = (F.linear(x, w, bias).float() - ref32).abs().max().item()
    nm = _cpu.prepare_cpu_linear(w, "nm", 2, 4).tensors
    bsr = _cpu.prepare_cpu_linear(w, "1xn", block=4).tensors
    calls = {
        "cpu_nm_linear": (x, nm["values"], nm["index"], 2, 4, 32, 24, bias),
        "cpu_bsr_linear": (x, bsr["values"], bsr["rowptr"], bsr["col"], 4, 32, 24, bias),
    }
    for name, args in calls.items():
        op = getattr(torch.ops.nmkern, name)
        y = op(*args)
        assert y.dtype == dtype and (y.float() - ref32).abs().max().item() <= 2 * err_torch + 1e-5
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        xn = x.clone()
        xn[1, 3] = float("nan")  # NaN input: the dense op on the decompressed weight, same dtype
        yn = op(xn, *args[1:])
        assert yn.dtype == dtype and yn[1].isnan().all() and yn[[0, 2, 3, 4]].isfinite().all()


# ---------------------------------------------------------------- errors
def test_half_dtype_errors_name_op_shapes_and_fix():
    w = nmkern.apply_nm(torch.randn(8, 16), 2, 4).to(torch.bfloat16)
    layer = _cpu.prepare_cpu_linear(w, "nm", 2, 4)
    with pytest.raises(TypeError, match=r"nmkern cpu sparse linear: x has dtype float32 \(shape \(2, 16\)\) but the "
                                        r"packed weight is bfloat16.*cast x with \.to\(torch\.bfloat16\), or pack "
                                        r"the weight in float32"):
        layer(torch.randn(2, 16))
    with pytest.raises(TypeError, match=r"x has dtype float64 .*cast x with \.to\(torch\.bfloat16\)$"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="x has dtype float16 .* packed weight is bfloat16"):
        layer(torch.randn(2, 16, dtype=torch.float16))
    with pytest.raises(TypeError, match="bias has dtype float32; supported dtypes are bfloat16"):
        layer(torch.randn(2, 16).bfloat16(), torch.randn(8))
    conv = _cpu.prepare_cpu_conv2d(nmkern.apply_nm(torch.randn(4, 8, 3, 3), 2, 4, dim=1).half(), "nm", 2, 4)
    with pytest.raises(TypeError, match="nmkern cpu sparse conv2d: x has dtype float32; supported dtypes are float16"):
        conv(torch.randn(1, 8, 5, 5))


def test_registered_op_refuses_mixed_and_fp64_dtypes():
    w = nmkern.apply_nm(torch.randn(8, 16), 2, 4)
    t = _cpu.prepare_cpu_linear(w, "nm", 2, 4).tensors
    with pytest.raises(TypeError, match=r"nmkern::cpu_nm_linear: x has dtype bfloat16 .* packed weight is float32"):
        torch.ops.nmkern.cpu_nm_linear(torch.randn(2, 16).bfloat16(), t["values"], t["index"], 2, 4, 16, 8, None)
    with pytest.raises(TypeError, match=r"nmkern::cpu_bsr_linear: the packed values have dtype float64; the CPU "
                                        r"kernels take float32, bfloat16, float16 layouts"):
        torch.ops.nmkern.cpu_bsr_linear(torch.randn(2, 16).double(), torch.zeros(0, 4, dtype=torch.float64),
                                        torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.uint16), 4, 16,
                                        8, None)


def test_cpu_beats_dense_half_decode_only():
    beats = _cpu.cpu_beats_dense
    for dtype in HALF:
        assert beats("nm", 2, 4, 0, 0.5, 1, 4096, 4096, dtype) and beats("1xn", 0, 0, 8, 0.75, 8, 4096, 4096, dtype)
        # Past 8 rows only the AMX kernel beat dense (2:4 / 1:4); the FMA kernels measured slower.
        amx = _cpu.amx_available()
        assert beats("nm", 1, 4, 0, 0.75, 16, 4096, 4096, dtype) == amx
        assert not beats("nm", 1, 4, 0, 0.75, 16, 4096, 4096 + 4, dtype)  # K % 32 != 0: no AMX kernel
        assert not beats("nm", 2, 8, 0, 0.75, 16, 4096, 4096, dtype)
        # At 256 rows bf16 dense runs on AMX too and wins; fp16 dense runs on FMAs and the AMX kernel wins.
        assert beats("nm", 2, 4, 0, 0.5, 256, 4096, 4096, dtype) == (amx and dtype == torch.float16)
    assert beats("nm", 1, 4, 0, 0.75, 16, 4096, 4096)  # fp32 (the default) unchanged
    assert not beats("nm", 2, 4, 0, 0.5, 1, 4096, 4096, torch.float64)


def test_fp64_weight_packs_as_fp32():
    layer = _cpu.prepare_cpu_linear(nmkern.apply_nm(torch.randn(8, 16, dtype=torch.float64), 2, 4), "nm", 2, 4)
    assert layer.dtype == torch.float32


@pytest.mark.parametrize("suffix", ["bf16", "f16"])
def test_c_side_half_rejects_bad_scalars(suffix):
    lib = _cpu._load()
    nm, bsr = getattr(lib, f"nmkern_nm_linear_{suffix}"), getattr(lib, f"nmkern_bsr_linear_{suffix}")
    p = torch.zeros(64).data_ptr()
    assert nm(p, 1, 6, p, p, 8, 2, 4, None, p, 1, 0) == 1  # K % m != 0
    assert nm(p, 1, 8, p, p, 8, 2, 17, None, p, 1, 0) == 1  # m > 16
    assert nm(None, 1, 8, p, p, 8, 2, 4, None, p, 1, 0) == 1  # NULL x
    assert nm(p, 1, 8, p, p, 8, 2, 4, None, p, 1, 7) == 1  # unknown algo
    rowptr = torch.tensor([0, 5], dtype=torch.int32)
    assert bsr(p, 1, 8, p, rowptr.data_ptr(), p, 2, 4, 4, 4, None, p, 1, 0) == 1  # nnzb != rowptr[-1]
    assert bsr(p, 1, 8, p, rowptr.data_ptr(), p, 3, 5, 4, 4, None, p, 1, 0) == 1  # col_bytes


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("spec", ["2:4", "1x4:0.5"])
def test_packed_layers_run_half_on_the_cpu_path(dtype, spec):
    """SparseLinear / SparseConv2d in bf16 / fp16, forced onto backend="cpu" (the dispatch table's CPU row takes
    half weights): the same tolerance against the fp32 reference of the same half-rounded tensors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(16 * 36, 40))
    nmkern.sparsify(model, spec, pack=True)
    model = model.to(dtype)
    x = torch.randn(3, 8, 6, 6).to(dtype)
    ref_model = torch.nn.Sequential(model[0].to_dense(), torch.nn.Flatten(), model[2].to_dense())
    for layer in (model[0], model[2]):
        layer.backend = "cpu"
        assert layer._cpu_cache.dtype == dtype  # built when the backend is set: a half layout
    with torch.no_grad():
        y = model(x)
        ref32 = ref_model.float()(x.float())
        err_torch = (ref_model.to(dtype)(x).float() - ref32).abs().max().item()
    assert y.dtype == dtype
    err = (y.float() - ref32).abs().max().item()
    assert err <= 2 * err_torch + 1e-5 * ref32.abs().max().item(), (err, err_torch)


AMX_SHAPES = [(8, 32), (13, 96), (24, 64), (37, 1024), (300, 1024)]  # 300: several strip groups of 8 blocks


@pytest.mark.skipif(not _cpu.amx_available(), reason="this CPU (or OS) has no AMX-BF16")
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("out_f,in_f", AMX_SHAPES)
def test_amx_kernel_matches_reference(dtype, n, out_f, in_f):
    # Batches below one 16-row tile, ragged 16-row blocks, the fused path (<= 64 rows) and the strip path.
    g = torch.Generator().manual_seed(out_f + in_f + n)
    w = nmkern.apply_nm(torch.randn(out_f, in_f, generator=g), n, 4).to(dtype)
    layer = _cpu.prepare_cpu_linear(w, "nm", n, 4)
    assert _cpu.Algo.AMX in layer.algos
    for batch in (1, 7, 16, 17, 64, 65, 130):
        for threads in (1, 2):
            x, b = _data(g, out_f, in_f, batch, dtype, batch % 2 == 1)
            ref32 = F.linear(x.float(), w.float(), None if b is None else b.float())
            err_torch = (F.linear(x, w, b).float() - ref32).abs().max().item()
            y = layer(x, b, algo=_cpu.Algo.AMX, num_threads=threads)
            err = (y.float() - ref32).abs().max().item()
            assert err <= 2 * err_torch + 1e-5 * max(1.0, ref32.abs().max().item()), (
                f"{n}:4 {out_f}x{in_f} batch {batch} threads {threads}: err {err:.3g} vs torch {err_torch:.3g}")


def test_amx_refusal_names_what_it_needs():
    g = torch.Generator().manual_seed(5)
    cases = [(torch.float16, 2, 8, 64), (torch.bfloat16, 2, 8, 64), (torch.bfloat16, 3, 4, 64),
             (torch.bfloat16, 2, 4, 48), (torch.float32, 2, 4, 64)]
    if not _cpu.amx_available():
        cases.append((torch.bfloat16, 2, 4, 64))
    for dtype, n, m, in_f in cases:
        layer = _cpu.prepare_cpu_linear(nmkern.apply_nm(torch.randn(16, in_f, generator=g), n, m).to(dtype), "nm",
                                        n, m)
        assert _cpu.Algo.AMX not in layer.algos
        with pytest.raises(RuntimeError,
                           match=r"Algo.AMX needs bf16 or fp16, m = 4 with n <= 2, in_features % 32 == 0"):
            layer(torch.randn(2, in_f).to(dtype), algo=_cpu.Algo.AMX)
