"""2:4 sparse linear latency on a GPU: dense cuBLAS vs cuSPARSELt vs nmkern cuda vs nmkern triton.

Run on a machine with an sm_80+ GPU:

    pytest bench/bench_cuda.py --benchmark-only --benchmark-group-by=param:shape,param:m

Shapes are real layers: MiniLM-L6 FFN (384 <-> 1536), LLaMA-7B attention and MLP
(4096 x 4096, 4096 -> 11008, 11008 -> 4096); batch rows M in {1, 16, 128, 1024, 4096}. Every case
first checks the implementation against F.linear on the same 2:4 weight, then times it with CUDA
events (``extra_info["cuda_ms"]``: mean per call over ``ITERS`` back-to-back launches on the
current stream); pytest-benchmark's own columns time the same loop plus one synchronize.
Without a GPU the whole module is skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("the CUDA benchmarks need a GPU", allow_module_level=True)

import nmkern  # noqa: E402
from nmkern import _cuda  # noqa: E402

DTYPE = torch.float16
M_VALUES = (1, 16, 128, 1024, 4096)
SHAPES = {  # name: (out_features N, in_features K)
    "minilm_ffn_up_1536x384": (1536, 384),
    "minilm_ffn_down_384x1536": (384, 1536),
    "llama7b_attn_4096x4096": (4096, 4096),
    "llama7b_mlp_up_11008x4096": (11008, 4096),
    "llama7b_mlp_down_4096x11008": (4096, 11008),
}
IMPLS = ("dense_cublas", "cusparselt", "nmkern_cuda", "nmkern_triton")
WARMUP, ITERS = 10, 50


def _cuda_event_ms(fn, iters: int = ITERS) -> float:
    for _ in range(WARMUP):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _make_impl(impl: str, w24: torch.Tensor, bias: torch.Tensor):
    """A callable x -> y for one implementation, or a skip reason string."""
    if impl == "dense_cublas":
        return lambda x: F.linear(x, w24, bias)
    if impl == "cusparselt":
        try:
            from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

            SparseSemiStructuredTensor._FORCE_CUTLASS = False
            ws = to_sparse_semi_structured(w24)
        except Exception as e:  # no cuSPARSELt in this torch build / arch
            return f"cuSPARSELt unavailable: {type(e).__name__}: {e}"
        return lambda x: F.linear(x, ws, bias)
    if impl == "nmkern_cuda":
        if not _cuda.available():
            return "nmkern cuda backend unavailable (CuPy / built kernels)"
        values, meta = _cuda.prune_compress_24(w24)
        return lambda x: _cuda.sparse24_linear(x, values, meta, bias)
    if impl == "nmkern_triton":
        sparse_linear = getattr(nmkern, "SparseLinear", None)
        if sparse_linear is None:
            return "nmkern.SparseLinear is not available"
        lin = torch.nn.Linear(w24.shape[1], w24.shape[0], device="cuda", dtype=w24.dtype)
        with torch.no_grad():
            lin.weight.copy_(w24)
            lin.bias.copy_(bias)
        try:
            layer = sparse_linear.from_dense(lin, n=2, m=4, backend="triton").pack()
        except Exception as e:
            return f"SparseLinear triton path unavailable: {type(e).__name__}: {e}"
        return layer
    raise ValueError(impl)


_CACHE: dict = {}


def _weights(shape: str):
    if shape not in _CACHE:
        n, k = SHAPES[shape]
        gen = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) / k**0.5
        w24 = nmkern.apply_nm(w, 2, 4)
        bias = torch.randn(n, device="cuda", dtype=DTYPE, generator=gen)
        _CACHE[shape] = (w24, bias)
    return _CACHE[shape]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear_latency(benchmark, shape, m, impl):
    w24, bias = _weights(shape)
    fn = _make_impl(impl, w24, bias)
    if isinstance(fn, str):
        pytest.skip(fn)
    x = torch.randn(m, w24.shape[1], device="cuda", dtype=DTYPE)
    with torch.no_grad():
        y = fn(x)
        ref = F.linear(x, w24, bias)
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)  # same answer before timing it

        def loop():
            for _ in range(ITERS):
                fn(x)
            torch.cuda.synchronize()

        cuda_ms = _cuda_event_ms(lambda: fn(x))
        benchmark.group = f"{shape} M={m}"
        benchmark.extra_info.update({
            "cuda_ms": cuda_ms,
            "impl": impl,
            "device": torch.cuda.get_device_name(),
            "dense_equiv_tflops": 2 * m * w24.shape[0] * w24.shape[1] / (cuda_ms * 1e-3) / 1e12,
        })
        benchmark.pedantic(loop, rounds=5, iterations=1, warmup_rounds=1)
