"""2:4 sparse linear latency on a GPU: dense cuBLAS vs cuSPARSELt vs nmkern cuda vs nmkern triton.

Run on a machine with an sm_80+ GPU:

    pytest bench/bench_cuda.py --benchmark-only --benchmark-group-by=param:shape,param:m

Shapes are real layers: MiniLM-L6 FFN (384 <-> 1536), LLaMA-7B attention and MLP
(4096 x 4096, 4096 -> 11008, 11008 -> 4096); batch rows M in {1, 16, 128, 1024, 4096}. Every case
first checks the implementation against F.linear on the same 2:4 weight, then times it with
``nmkern.timing`` (``extra_info["cuda_ms"]``: median over ``ROUNDS`` samples of the time per call
of ``ITERS`` back-to-back launches between two synchronizes; ``cold_cuda_ms``: the same per layer
of a stack of distinct copies whose dense bytes exceed 4x the GPU's L2, ``cold_layers`` deep);
pytest-benchmark's own columns time the same loop plus one synchronize.
Without a GPU the whole module is skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("the CUDA benchmarks need a GPU", allow_module_level=True)

import nmkern  # noqa: E402
from nmkern import _cuda, timing  # noqa: E402

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
WARMUP, ITERS, ROUNDS = 10, 50, 5


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


_COPIES: dict = {}


def _stack(shape: str, impl: str, fn, w24: torch.Tensor, bias: torch.Tensor) -> list:
    """``fn`` and distinct copies of it (own weights each): a stack whose dense bytes exceed 4x the GPU's L2
    (nmkern.timing.cold_stack_size). Built once per (shape, impl); one shape's stacks are kept at a time."""
    if (shape, impl) not in _COPIES:
        if not any(k[0] == shape for k in _COPIES):
            _COPIES.clear()
        layers = timing.cold_stack_size(w24.numel() * w24.element_size(),
                                        llc_bytes=timing.last_level_cache_bytes("cuda"))
        _COPIES[(shape, impl)] = [fn] + [_make_impl(impl, w24.clone(), bias.clone()) for _ in range(layers - 1)]
    return _COPIES[(shape, impl)]


def _warm_cold_ms(stack: list, x: torch.Tensor) -> tuple[float, float]:
    """(warm, cold) ms per call with nmkern.timing: medians of ``ROUNDS`` samples, each ``ITERS`` back-to-back
    launches between two synchronizes, after >= ``WARMUP`` warm-up calls; warm: the first layer of ``stack``,
    cold: the whole stack run like a model, per layer."""
    res = timing.time_warm_cold({"fn": [lambda f=f: f(x) for f in stack]}, repeats=ROUNDS,
                                warmup=max(1, -(-WARMUP // ITERS)), number=ITERS, sync=torch.cuda.synchronize)
    return res.warm["fn"].median * 1e3, res.cold["fn"].median * 1e3


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

        stack = _stack(shape, impl, fn, w24, bias)
        cuda_ms, cold_ms = _warm_cold_ms(stack, x)
        benchmark.group = f"{shape} M={m}"
        benchmark.extra_info.update({
            "cuda_ms": cuda_ms,
            "cold_cuda_ms": cold_ms,
            "cold_layers": len(stack),
            "impl": impl,
            "device": torch.cuda.get_device_name(),
            "dense_equiv_tflops": 2 * m * w24.shape[0] * w24.shape[1] / (cuda_ms * 1e-3) / 1e12,
        })
        benchmark.pedantic(loop, rounds=5, iterations=1, warmup_rounds=1)
