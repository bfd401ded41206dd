"""torch.compile(fullgraph=True) of packed layers: every path is a registered op, so no graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nmkern
import nmkern._cuda
from nmkern import dispatch
from nmkern.backend import triton_interpret
from nmkern.nn import spec_kwargs

PATTERNS = ["2:4", "1x4:0.5"]


def _need(backend: str) -> None:
    if backend == "cpu" and dispatch.cpu_kernels() is None:
        pytest.skip("nmkern's native CPU kernels are not built here")
    if backend == "triton" and not torch.cuda.is_available() and not triton_interpret():
        pytest.skip("the triton path needs a GPU or TRITON_INTERPRET=1")


def _packed_linear(pattern: str, backend: str) -> nmkern.SparseLinear:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    return nmkern.SparseLinear.from_dense(lin, backend=backend, **spec_kwargs(nmkern.parse_spec(pattern))).pack()


def _packed_conv(pattern: str, backend: str) -> nmkern.SparseConv2d:
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1, stride=(2, 1))
    return nmkern.SparseConv2d.from_dense(conv, backend=backend, **spec_kwargs(nmkern.parse_spec(pattern))).pack()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("backend", ["cpu", "dense", "reference", "triton"])
def test_fullgraph_packed_linear_traces_every_path(pattern, backend):
    """Dynamo + AOT autograd (fake tensors through every op's register_fake), no graph break."""
    _need(backend)
    layer = _packed_linear(pattern, backend)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        eager = layer(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), eager)
        assert torch.equal(compiled(x[:1]), layer(x[:1]))  # a new row count: a new decision, still one graph


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("backend", ["cpu", "dense", "reference", "triton"])
def test_fullgraph_packed_conv2d_traces_every_path(pattern, backend):
    _need(backend)
    if backend == "triton" and pattern != "2:4":
        pytest.skip("there is no Triton 1xN conv kernel (the table refuses it)")
    layer = _packed_conv(pattern, backend)
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        eager = layer(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), eager)


@pytest.mark.parametrize("backend", ["cpu", "dense"])
def test_inductor_fullgraph_packed_model_matches_eager(backend):
    """The real compiler (Inductor) on a model holding a packed 2:4 and a packed 1xN layer."""
    _need(backend)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    nmkern.sparsify(model, {"0": "2:4", "2": "1x4:0.5"}, pack=True, backend=backend)
    x = torch.randn(4, 64)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager)  # fp32 default tolerance: Inductor may fuse the GELU


@pytest.mark.parametrize("requires_grad", [False, True])
def test_native_ops_pass_opcheck(requires_grad):
    """opcheck: fake kernels, and (inputs that require grad) the autograd formula for x and bias."""
    _need("cpu")
    torch.manual_seed(3)
    for pattern in PATTERNS:
        layer = _packed_linear(pattern, "cpu")
        packed, t = layer._cpu_cached(), layer._cpu_cached().tensors
        x, b = torch.randn(5, 64, requires_grad=requires_grad), torch.randn(32, requires_grad=requires_grad)
        if pattern == "2:4":
            args = (x, t["values"], t["index"], packed.n, packed.m, packed.in_features, packed.out_features, b)
            torch.library.opcheck(torch.ops.nmkern.cpu_nm_linear.default, args)
        else:
            args = (x, t["values"], t["rowptr"], t["col"], packed.block, packed.in_features, packed.out_features, None)
            torch.library.opcheck(torch.ops.nmkern.cpu_bsr_linear.default, args)


def test_cuda_op_has_a_fake_kernel():
    """The CUDA 2:4 GEMM traces through fake tensors (no GPU needed to trace; only to run)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 64, dtype=torch.float16)
        values, meta = torch.empty(32, 32, dtype=torch.float16), torch.empty(32, 4, dtype=torch.int16)
        y = torch.ops.nmkern.cuda_sparse24_linear(x, values, meta, None)
    assert y.shape == (5, 32) and y.dtype == torch.float16


def test_table_refuses_with_every_reason():
    layer = dispatch.LayerInfo(op=dispatch.LayerOp.CONV2D, pattern="1xn", n=2, m=4, block=4, sparsity=0.5,
                               in_features=72, out_features=8, dtype=torch.float64)
    reason = dispatch.why_not("cusparselt", dispatch.Call(layer, "cpu", 1))
    assert reason.startswith("the cusparselt backend needs a CUDA tensor (got one on cpu)")
    for part in ("take float16, bfloat16, not float64", "runs nm patterns, not 1xn", "GEMM K"):
        assert part in reason
    assert "no Triton 1xN conv kernel" in dispatch.why_not("triton", dispatch.Call(layer, "cuda", 1))
    assert dispatch.why_not("dense", dispatch.Call(layer, "cpu", 1)) is None
    assert set(dispatch.TABLE) == set(nmkern.Backend) - {nmkern.Backend.AUTO}


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_cuda_path_wiring_on_the_cpu(op, monkeypatch):
    """The CUDA row of the table (2:4 CUTLASS layout of the GEMM rows, NHWC for a conv, im2col, bias),
    run on the CPU with the kernel swapped for the pure-torch semantics of nmkern::semi24_linear."""
    from nmkern.reference.linear import semi24_linear_ref

    monkeypatch.setattr(nmkern._cuda, "sparse24_linear",
                        lambda x, values, meta, bias: semi24_linear_ref(x.float(), values.float(), meta,
                                                                        None if bias is None else bias.float()).half())
    torch.manual_seed(4)
    if op == "linear":
        dense = nn.Linear(64, 32).half()
        layer, x = nmkern.SparseLinear.from_dense(dense).pack(), torch.randn(2, 3, 64).half()
    else:  # K = 3*3*32 = 288, a multiple of 32
        dense = nn.Conv2d(32, 32, 3, padding=1, stride=2).half()
        layer, x = nmkern.SparseConv2d.from_dense(dense).pack(), torch.randn(2, 32, 7, 6).half()
    assert layer._layer_info().semi24_fits
    with torch.no_grad():
        y = dispatch.run(nmkern.Backend.CUDA, layer, x).float()
        ref = layer.to_dense().float()(x.float())  # fp32 reference
        torch_half = layer.to_dense()(x).float()  # torch's own fp16 op: the error to measure against
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 2 * (torch_half - ref).abs().max() + 1e-3


def _on_fake_cuda(layer):
    """Move a packed layer's tensors to fake CUDA tensors of the same shapes (no GPU: tracing only)."""
    def fake_like(t):
        return torch.empty(t.shape, dtype=t.dtype, device="cuda")

    for name, t in list(layer._buffers.items()):
        layer._buffers[name] = fake_like(t)
    if layer.bias is not None:
        layer._parameters["bias"] = nn.Parameter(fake_like(layer.bias), requires_grad=False)
    layer._clear_caches()
    if layer._layer_info().semi24_fits:  # what pack() builds on a GPU with nmkern._cuda present
        out, k = layer.weight_shape[0], layer._gemm_k()
        layer.__dict__["_semi24_cache"] = (torch.empty(out, k // 2, dtype=layer.dtype, device="cuda"),
                                           torch.empty(out, k // 16, dtype=torch.int16, device="cuda"))
    return layer


@pytest.mark.parametrize("case, backend, op", [
    ("linear 2:4", "auto", "nmkern.cuda_sparse24_linear"),
    ("linear 2:4", "triton", "nmkern.nm_linear_triton"),
    ("linear 1x4:0.5", "triton", "nmkern.bsr_linear_triton"),
    ("conv 2:4", "triton", "nmkern.nm_conv2d_triton"),
    # ("conv 2:4", "cuda"): F.unfold's decomposition makes index tensors on the device, which a CPU-only
    # torch cannot fake; test_cuda_path_wiring_on_the_cpu covers that row's im2col instead.
])
def test_gpu_paths_trace_into_one_graph_with_fake_cuda_tensors(case, backend, op, monkeypatch):
    """The cuda and triton rows of the table trace through fake tensors: one graph, the registered op in it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setitem(dispatch._NATIVE_CACHE, "_cuda", object())  # nmkern._cuda "present"
    kind, pattern = case.split()
    torch.manual_seed(5)
    if kind == "linear":
        layer = nmkern.SparseLinear.from_dense(nn.Linear(64, 32).half(), backend=backend,
                                               **spec_kwargs(nmkern.parse_spec(pattern))).pack()
        shape = (2, 3, 64)
    else:
        layer = nmkern.SparseConv2d.from_dense(nn.Conv2d(32, 32, 3, padding=1).half(), backend=backend).pack()
        shape = (1, 32, 4, 4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _on_fake_cuda(layer)
        x = torch.empty(shape, dtype=torch.half, device="cuda")
        graph = make_fx(lambda x: layer(x), tracing_mode="fake")(x).graph
        y = layer(x)
    targets = [str(n.target).removesuffix(".default") for n in graph.nodes if n.op == "call_function"]
    assert op in targets, targets
    assert y.device.type == "cuda" and y.dtype == torch.half
    assert y.shape == ((2, 3, 32) if kind == "linear" else (1, 32, 4, 4))


def test_native_cpu_ops_reject_bad_input():
    """The C kernels read raw pointers: the registered ops check dtype, device and width first."""
    _need("cpu")
    layer = _packed_linear("1x4:0.5", "cpu")
    packed = layer._cpu_cached()
    t = packed.tensors
    op = torch.ops.nmkern.cpu_bsr_linear

    def call(x, bias=None):
        return op(x, t["values"], t["rowptr"], t["col"], packed.block, packed.in_features, packed.out_features, bias)

    with pytest.raises(ValueError, match=r"nmkern::cpu_bsr_linear: x has shape \(2, 32\) but the weight has "
                                         r"in_features=64"):
        call(torch.randn(2, 32))
    with pytest.raises(TypeError, match="nmkern::cpu_bsr_linear: x has dtype float64"):
        call(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias has shape \(31,\), expected \(32,\)"):
        call(torch.randn(2, 64), torch.randn(31))
    x = torch.randn(2, 64)
    assert torch.equal(call(x, layer.bias), layer(x))  # the layer runs this very op


def test_native_layouts_are_built_only_for_paths_a_layer_may_take():
    _need("cpu")
    torch.manual_seed(6)
    small = nmkern.SparseLinear.from_dense(nn.Linear(128, 128)).pack()  # auto keeps 2^14 weights dense
    big = nmkern.SparseLinear.from_dense(nn.Linear(1024, 1024)).pack()  # auto may take the CPU kernel
    assert small._cpu_cache is None and big._cpu_cache is not None
    assert small._dense_cache is None and big._dense_cache is None  # the dense copy only when the dense path runs
    small.backend = "cpu"  # forcing a native path builds its layout now, outside any trace
    assert small._cpu_cache is not None
    with pytest.raises(ValueError, match="SparseLinear: unknown backend 'fast'"):
        small.backend = "fast"
    assert small.backend == "cpu"
