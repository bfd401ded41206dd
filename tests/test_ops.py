"""torch.library ops (opcheck, wrappers, input errors) and the dispatch decision (with fakes)."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

import nmkern
from nmkern import dispatch, ops
from nmkern.backend import Backend
from nmkern.dispatch import LayerInfo, LayerOp, choose_linear_backend
from nmkern.reference import apply_nm_ref, block_mask_1xn_ref, compress_24_ref, to_bsr_1xn_ref


def _nm(out_f=32, in_f=64, n=2, m=4, dtype=torch.float32, seed=0):
    w = apply_nm_ref(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)), n, m).to(dtype)
    return w, nmkern.pack_nm(w, n, m, backend="reference")


def _bsr(out_f=16, in_f=24, block=4):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1))
    w = w * block_mask_1xn_ref(w, block, 0.5)
    bsr = to_bsr_1xn_ref(w, block)
    return (w, bsr.crow_indices().to(torch.int32).clone(), bsr.col_indices().to(torch.int32).clone(),
            bsr.values().reshape(-1, block).clone())


def _conv():
    w = apply_nm_ref(torch.randn(8, 8, 3, 3, generator=torch.Generator().manual_seed(2)), 2, 4, dim=1)
    return w, nmkern.pack_nm(w, 2, 4, dim=1, backend="reference")


# --------------------------------------------------------------------------- opcheck


def _grad(*tensors):
    """Inputs that require grad: opcheck then also checks the autograd formula (x and bias)."""
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_linear_ops_reference(requires_grad):
    w, p = _nm()
    x, b = torch.randn(3, 64), torch.randn(32)
    if requires_grad:
        x, b = _grad(x, b)
    torch.library.opcheck(torch.ops.nmkern.nm_linear_reference.default, (x, p.values, p.indices, 2, 4, b))
    torch.library.opcheck(torch.ops.nmkern.nm_linear_reference.default, (x, p.values, p.indices, 2, 4, None))
    w24 = apply_nm_ref(torch.randn(32, 64), 2, 4).half()
    v24, meta = compress_24_ref(w24)
    torch.library.opcheck(torch.ops.nmkern.semi24_linear_reference.default,
                          (x.detach().half().requires_grad_(requires_grad), v24, meta, b.detach().half()))
    wb, crow, col, vals = _bsr()
    xb = torch.randn(5, 24, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.nmkern.bsr_linear_reference.default, (xb, crow, col, vals, 16, None))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_conv_ops_reference(requires_grad):
    w, p = _conv()
    x, b = torch.randn(2, 8, 5, 5), torch.randn(8)
    if requires_grad:
        x, b = _grad(x, b)
    torch.library.opcheck(torch.ops.nmkern.nm_conv2d_reference.default,
                          (x, p.values, p.indices, 2, 4, list(w.shape), b, [1, 1], [1, 1], [1, 1]))
    wb = torch.randn(8, 8, 3, 3)
    wb = wb * block_mask_1xn_ref(wb, 4, 0.5)
    bsr = to_bsr_1xn_ref(wb.reshape(8, -1), 4)
    torch.library.opcheck(torch.ops.nmkern.bsr_conv2d_reference.default,
                          (x, bsr.crow_indices().clone(), bsr.col_indices().clone(),
                           bsr.values().reshape(-1, 4).clone(), list(wb.shape), None,
                           [2, 1], [0, 1], [1, 1]))


def test_opcheck_triton_backend(interpret):
    w, p = _nm(16, 32)
    torch.library.opcheck(torch.ops.nmkern.nm_linear_triton.default,
                          (torch.randn(2, 32), p.values, p.indices, 2, 4, None))
    torch.library.opcheck(torch.ops.nmkern.nm_linear_triton.default,
                          (torch.randn(2, 32, requires_grad=True), p.values, p.indices, 2, 4, None))
    wb, crow, col, vals = _bsr()
    torch.library.opcheck(torch.ops.nmkern.bsr_linear_triton.default,
                          (torch.randn(2, 24), crow, col, vals, 16, torch.randn(16)))
    torch.library.opcheck(torch.ops.nmkern.bsr_linear_triton.default,
                          (*_grad(torch.randn(2, 24)), crow, col, vals, 16, *_grad(torch.randn(16))))


# --------------------------------------------------------------------------- wrappers


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_wrappers_match_dense(backend):
    w, p = _nm()
    x, b = torch.randn(2, 3, 64), torch.randn(32)
    assert torch.allclose(ops.nm_linear(x, p, b, backend=backend), F.linear(x, w, b), atol=1e-5)
    wb, crow, col, vals = _bsr()
    xb = torch.randn(4, 24)
    assert torch.allclose(ops.bsr_linear(xb, crow, col, vals, 16, backend=backend), F.linear(xb, wb), atol=1e-5)
    wc, pc = _conv()
    xc = torch.randn(2, 8, 6, 6)
    assert torch.allclose(ops.nm_conv2d(xc, pc, None, 2, 1, backend=backend), F.conv2d(xc, wc, None, 2, 1), atol=1e-5)
    bsr = to_bsr_1xn_ref(wc.reshape(8, -1), 2)
    yb = ops.bsr_conv2d(xc, bsr.crow_indices(), bsr.col_indices(), bsr.values().reshape(-1, 2), wc.shape, padding=1)
    assert torch.allclose(yb, F.conv2d(xc, wc, None, 1, 1), atol=1e-5)
    w24 = apply_nm_ref(torch.randn(32, 64), 2, 4).half()
    v24, meta = compress_24_ref(w24)
    assert torch.equal(ops.semi24_linear(x.half(), v24, meta, backend="reference"), F.linear(x.half(), w24))


def test_wrapper_errors(monkeypatch):
    w, p = _nm()
    with pytest.raises(ValueError, match=r"nm_linear: x has shape \(3, 60\).*in_features=64"):
        ops.nm_linear(torch.randn(3, 60), p)
    with pytest.raises(TypeError, match="nm_linear: x has dtype torch.float16 but the weight is torch.float32"):
        ops.nm_linear(torch.randn(3, 64).half(), p)
    with pytest.raises(TypeError, match="nm_linear: packed must be an nmkern.NMPacked"):
        ops.nm_linear(torch.randn(3, 64), w)
    with pytest.raises(ValueError, match=r"nm_linear: bias has shape \(31,\), expected \(32,\)"):
        ops.nm_linear(torch.randn(3, 64), p, torch.randn(31))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the dtype check comes before any kernel runs
    with pytest.raises(TypeError, match="nm_linear: the triton backend takes fp16, bf16 or fp32"):
        ops.nm_linear(torch.randn(3, 64, dtype=torch.float64), nmkern.pack_nm(w.double(), 2, 4, backend="reference"),
                      backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="nm_linear: the triton backend needs a CUDA tensor"):
        ops.nm_linear(torch.randn(3, 64), p, backend="triton")
    with pytest.raises(ValueError,
                       match=r"nm_conv2d: x has shape \(1, 4, 5, 5\) \(4 channels\) but the weight \(8, 8, 3, 3\) expects 8"):
        ops.nm_conv2d(torch.randn(1, 4, 5, 5), _conv()[1])
    with pytest.raises(ValueError, match="nm_conv2d: input height 2 is too small for kernel 3"):
        ops.nm_conv2d(torch.randn(1, 8, 2, 5), _conv()[1])
    with pytest.raises(ValueError, match="semi24_linear: values .* do not match the CUTLASS 2:4 layout"):
        ops.semi24_linear(torch.randn(1, 64).half(), torch.zeros(32, 32).half(), torch.zeros(32, 3, dtype=torch.int16))
    wb, crow, col, vals = _bsr()
    with pytest.raises(ValueError, match="bsr_linear: crow .* are not BSR buffers"):
        ops.bsr_linear(torch.randn(1, 24), crow[:-1], col, vals, 16)


# --------------------------------------------------------------------------- dispatch


def _layer(**kw):
    base = dict(op=LayerOp.LINEAR, pattern="nm", n=2, m=4, block=4, sparsity=0.5, in_features=768,
                out_features=3072, dtype=torch.float16, semi24_fits=True)
    base.update(kw)
    return LayerInfo(**base)


class _FakeX:
    """Stands in for an input tensor: the decision only reads .device and .numel()."""

    def __init__(self, device: str, rows: int = 1, k: int = 768):
        self.device = torch.device(device)
        self._numel = rows * k

    def numel(self):
        return self._numel


@pytest.fixture
def no_native(monkeypatch):
    monkeypatch.setattr(dispatch, "cpu_kernels", lambda: None)
    monkeypatch.setattr(dispatch, "cuda_kernels", lambda: None)
    monkeypatch.delenv("NMKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _fake_cpu(beats: bool, calls: list, dtypes: list | None = None):
    def cpu_beats_dense(kind, n, m, block, sparsity, batch, out_features, in_features, dtype=torch.float32):
        calls.append((kind, n, m, block, sparsity, batch, out_features, in_features))
        if dtypes is not None:
            dtypes.append(dtype)
        return beats

    return types.SimpleNamespace(cpu_beats_dense=cpu_beats_dense, prepare_cpu_linear=None, prepare_cpu_conv2d=None)


def test_auto_cpu_without_native_is_dense(no_native):
    assert choose_linear_backend("auto", _FakeX("cpu"), _layer(dtype=torch.float32)) is Backend.DENSE
    assert choose_linear_backend("auto", _FakeX("cpu"), _layer(pattern="1xn")) is Backend.DENSE


def test_auto_cpu_asks_the_native_kernel(no_native, monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "cpu_kernels", lambda: _fake_cpu(True, calls))
    layer = _layer(dtype=torch.float32, semi24_fits=False)
    assert choose_linear_backend("auto", _FakeX("cpu", rows=3), layer) is Backend.CPU
    assert calls == [("nm", 2, 4, 4, 0.5, 3, 3072, 768)]
    monkeypatch.setattr(dispatch, "cpu_kernels", lambda: _fake_cpu(False, calls))
    assert choose_linear_backend("auto", _FakeX("cpu", rows=512), layer) is Backend.DENSE
    assert calls[-1][5] == 512
    # bf16 / fp16 weights have kernels too: the crossover is asked for the layer's dtype.
    dtypes = []
    monkeypatch.setattr(dispatch, "cpu_kernels", lambda: _fake_cpu(True, calls, dtypes))
    assert choose_linear_backend("auto", _FakeX("cpu"), _layer(dtype=torch.bfloat16)) is Backend.CPU
    assert dtypes == [torch.bfloat16]
    # ... but not fp64 (no kernel), whatever the crossover would say
    assert choose_linear_backend("auto", _FakeX("cpu"), _layer(dtype=torch.float64, semi24_fits=False)) is Backend.DENSE


def test_auto_cuda(no_native, monkeypatch):
    fake_cuda = types.SimpleNamespace(sparse24_linear=None)
    # small batch, 2:4 half fitting CUTLASS: the CUDA kernel when present, else Triton
    assert choose_linear_backend("auto", _FakeX("cuda", rows=1), _layer()) is Backend.TRITON
    monkeypatch.setattr(dispatch, "cuda_kernels", lambda: fake_cuda)
    assert choose_linear_backend("auto", _FakeX("cuda", rows=16), _layer()) is Backend.CUDA
    assert choose_linear_backend("auto", _FakeX("cuda", rows=16), _layer(semi24_fits=False)) is Backend.TRITON
    # large batch: compute-bound, dense wins
    assert choose_linear_backend("auto", _FakeX("cuda", rows=17), _layer()) is Backend.DENSE
    # too dense a pattern saves too few bytes (6:8 fp16 reads 89% of the dense bytes)
    assert _layer(n=6, m=8, semi24_fits=False).packed_bytes_ratio() == pytest.approx(0.75 * (1 + 3 / 16))
    assert choose_linear_backend("auto", _FakeX("cuda"), _layer(n=6, m=8, semi24_fits=False)) is Backend.DENSE
    # 1xN: Triton when sparse enough, dense otherwise; 1xN convs always dense
    lin1xn = _layer(pattern="1xn", semi24_fits=False)
    assert choose_linear_backend("auto", _FakeX("cuda"), dataclasses.replace(lin1xn, sparsity=0.6)) is Backend.TRITON
    assert choose_linear_backend("auto", _FakeX("cuda"), dataclasses.replace(lin1xn, sparsity=0.2)) is Backend.DENSE
    conv1xn = _layer(op=LayerOp.CONV2D, pattern="1xn", sparsity=0.7, semi24_fits=False)
    assert choose_linear_backend("auto", _FakeX("cuda"), conv1xn, rows=4) is Backend.DENSE
    conv_nm = _layer(op=LayerOp.CONV2D, semi24_fits=False)
    assert choose_linear_backend("auto", _FakeX("cuda"), conv_nm, rows=4) is Backend.TRITON
    assert choose_linear_backend("auto", _FakeX("cuda"), conv_nm, rows=4096) is Backend.DENSE
    # devices nmkern has no kernel for
    assert choose_linear_backend("auto", _FakeX("meta"), _layer()) is Backend.DENSE


def test_explicit_backend_is_obeyed_or_refused(no_native, monkeypatch):
    x = _FakeX("cpu")
    assert choose_linear_backend("reference", x, _layer()) is Backend.REFERENCE
    assert choose_linear_backend(nmkern.Backend.REFERENCE, x, _layer()) is Backend.REFERENCE
    assert choose_linear_backend("dense", x, _layer()) is Backend.DENSE
    with pytest.raises(ValueError, match="backend 'triton' cannot run this layer: the triton backend needs a CUDA"):
        choose_linear_backend("triton", x, _layer())
    with pytest.raises(ValueError, match=r"nmkern._cpu\) are not built"):
        choose_linear_backend("cpu", x, _layer())
    with pytest.raises(ValueError, match="the cuda backend needs a CUDA tensor"):
        choose_linear_backend("cuda", x, _layer())
    with pytest.raises(ValueError, match="cusparselt backend runs 2:4 layers with fp16/bf16 weights"):
        choose_linear_backend("cusparselt", _FakeX("cuda"), _layer(n=1, m=4, semi24_fits=False))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        choose_linear_backend("fast", x, _layer())
    with pytest.raises(ValueError, match="no Triton 1xN conv kernel"):
        choose_linear_backend("triton", _FakeX("cuda"), _layer(op=LayerOp.CONV2D, pattern="1xn"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_linear_backend("triton", x, _layer()) is Backend.TRITON
    # auto never picks the (slow) interpreter on the CPU
    assert choose_linear_backend("auto", x, _layer()) is Backend.DENSE


def test_env_override_applies_to_auto_only_when_possible(no_native, monkeypatch):
    monkeypatch.setenv("NMKERN_BACKEND", "reference")
    assert choose_linear_backend("auto", _FakeX("cpu"), _layer()) is Backend.REFERENCE
    assert choose_linear_backend("dense", _FakeX("cpu"), _layer()) is Backend.DENSE
    monkeypatch.setenv("NMKERN_BACKEND", "triton")  # not possible on the CPU without the interpreter
    assert choose_linear_backend("auto", _FakeX("cpu"), _layer()) is Backend.DENSE


def test_native_lookup_survives_missing_modules(monkeypatch):
    monkeypatch.setattr(dispatch, "_NATIVE_CACHE", {})
    monkeypatch.setattr(dispatch.importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name)))
    assert dispatch.cpu_kernels() is None and dispatch.cuda_kernels() is None
    monkeypatch.setattr(dispatch, "_NATIVE_CACHE", {})
    monkeypatch.setattr(dispatch.importlib, "import_module", lambda name: types.SimpleNamespace(available=lambda: False))
    assert dispatch.cpu_kernels() is None


@pytest.mark.gpu
def test_gpu_dispatch_runs_every_available_path():
    w = apply_nm_ref(torch.randn(256, 512), 2, 4).half().cuda()
    lin = torch.nn.Linear(512, 256, device="cuda", dtype=torch.half)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = nmkern.SparseLinear.from_dense(lin).pack()
    x = torch.randn(4, 512, device="cuda", dtype=torch.half)
    _run_every_path(layer, x, F.linear(x.double(), w.double(), lin.bias.double()))


def _run_every_path(layer, x, ref) -> list:
    """Force each backend in turn: it runs within 5e-2 of the float64 reference, or is refused."""
    ran = []
    for path in Backend:
        try:
            layer.backend = path.value
            y = layer(x)
        except ValueError as e:
            assert "cannot run this layer" in str(e)
            continue
        ran.append(path)
        assert (y.double() - ref).abs().max() < 5e-2, path
    return ran


@pytest.mark.gpu
def test_gpu_conv_dispatch_runs_every_available_path():
    """Every path of the table for a packed 2:4 conv whose GEMM fits the CUTLASS layout (K = 3*3*64)."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, device="cuda", dtype=torch.half)
    layer = nmkern.SparseConv2d.from_dense(conv).pack()
    x = torch.randn(1, 64, 4, 4, device="cuda", dtype=torch.half)  # 16 GEMM rows: decode-sized
    ran = _run_every_path(layer, x, F.conv2d(x.double(), layer.dense_weight().double(), conv.bias.double(), padding=1))
    assert Backend.DENSE in ran and Backend.TRITON in ran
