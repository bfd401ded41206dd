"""SparseLinear (packed, 2:4) vs nn.Linear at real layer shapes; cuSPARSELt as a third column on a GPU.

    pytest bench/bench_linear.py --benchmark-only            # pytest-benchmark table, grouped by shape/batch
    python bench/bench_linear.py                             # interleaved timing table (fairer on a busy machine)

Shapes (in_features x out_features): BERT-base FFN 768x3072, Llama-7B MLP
4096x11008, MiniLM FFN 384x1536; batches 1, 16, 256. On the CPU the weights are
fp32 and Llama-7B at batch 256 is skipped (about 23 GFLOP per call, seconds per
round on a 2-core machine; ``NMKERN_BENCH_FULL=1`` keeps it); on a GPU they are
fp16 and torch's cuSPARSELt (``to_sparse_semi_structured``) is added.

Columns: ``dense`` (nn.Linear on the masked weight), ``sparse`` (packed
SparseLinear, ``backend="auto"``: whatever dispatch picks, recorded as
``path``), and where present ``sparse-<forced path>`` (the native CPU kernel,
the Triton / CUDA kernels) and ``cusparselt``. ``extra_info`` holds TFLOP/s
(2*B*in*out dense-equivalent flops / median time) and GB/s (bytes of weight read
by that path + input + output, / median time).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern import dispatch

SHAPES = {"minilm-384x1536": (384, 1536), "bert-768x3072": (768, 3072), "llama7b-4096x11008": (4096, 11008)}
BATCHES = (1, 16, 256)
FULL = os.environ.get("NMKERN_BENCH_FULL", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


def _skip_reason(shape: str, batch: int) -> str | None:
    if DEVICE == "cpu" and not FULL and shape.startswith("llama") and batch == 256:
        return "Llama-7B at batch 256 is ~23 GFLOP per call: seconds per round on this CPU (NMKERN_BENCH_FULL=1 runs it)"
    return None


class Layers:
    """Dense and packed sparse twins of one shape (built once per shape: masking 45M weights takes seconds)."""

    def __init__(self, in_f: int, out_f: int):
        torch.manual_seed(0)
        self.in_f, self.out_f = in_f, out_f
        lin = nn.Linear(in_f, out_f, device=DEVICE, dtype=DTYPE)
        self.sparse = nmkern.SparseLinear.from_dense(lin, n=2, m=4).pack()
        self.dense = self.sparse.to_dense()  # same masked weight, dense storage
        self.dense_bytes = self.dense.weight.numel() * self.dense.weight.element_size()
        self.cslt = None
        if DEVICE == "cuda" and dispatch.cusparselt_available():
            self.cslt = nmkern.SparseLinear.from_dense(lin, n=2, m=4, backend="cusparselt").pack()

    def runners(self, x: torch.Tensor) -> dict:
        """name -> (callable, weight bytes that call reads, path)."""
        info = self.sparse._layer_info()
        auto_path = dispatch.choose_linear_backend("auto", x, info)
        sparse_bytes = self.sparse.packed_nbytes()
        out = {
            "dense": (lambda: self.dense(x), self.dense_bytes, "dense"),
            "sparse": (lambda: self.sparse(x), self.dense_bytes if auto_path is dispatch.ExecPath.DENSE else sparse_bytes,
                       auto_path.value),
        }
        for path in (dispatch.ExecPath.CPU, dispatch.ExecPath.CUDA, dispatch.ExecPath.TRITON):
            if path is auto_path or dispatch._why_not(path, x, info) is not None:
                continue
            forced = _share_packed(self.sparse, path)
            out[f"sparse-{path.value}"] = (lambda f=forced: f(x), sparse_bytes, path.value)
        if self.cslt is not None:
            out["cusparselt"] = (lambda: self.cslt(x), sparse_bytes, "cusparselt")
        return out


def _share_packed(layer: nmkern.SparseLinear, path) -> nmkern.SparseLinear:
    """A packed twin of ``layer`` that shares its buffers but forces ``path``."""
    twin = nmkern.SparseLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta",
                               dtype=layer.dtype)
    twin.load_state_dict(layer.state_dict(), assign=True)
    twin.backend = path.value
    return twin


_LAYERS: dict[str, Layers] = {}


def layers_for(shape: str) -> Layers:
    if shape not in _LAYERS:
        _LAYERS.clear()  # one shape resident at a time (Llama-7B: 180 MB dense fp32 + packed)
        _LAYERS[shape] = Layers(*SHAPES[shape])
    return _LAYERS[shape]


def _rounds(in_f: int, out_f: int, batch: int) -> int:
    work = batch * in_f * out_f
    return max(3, min(50, int(2e9 / max(work, 1))))


def _record(benchmark, in_f, out_f, batch, weight_bytes, path):
    elem = torch.empty((), dtype=DTYPE).element_size()
    benchmark.extra_info.update(path=path, device=DEVICE, dtype=str(DTYPE).replace("torch.", ""),
                                weight_bytes=weight_bytes)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:  # --benchmark-disable
        return
    seconds = stats.median
    flops = 2 * batch * in_f * out_f
    moved = weight_bytes + batch * (in_f + out_f) * elem
    benchmark.extra_info.update(tflops=flops / seconds / 1e12, gbps=moved / seconds / 1e9)


def _cases():
    for shape in SHAPES:
        for batch in BATCHES:
            marks = []
            reason = _skip_reason(shape, batch)
            if reason:
                marks.append(pytest.mark.skip(reason=reason))
            yield pytest.param(shape, batch, id=f"{shape}-b{batch}", marks=marks)


IMPLS = ["dense", "sparse", "sparse-cpu", "sparse-cuda", "sparse-triton", "cusparselt"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,batch", list(_cases()))
def test_linear_latency(benchmark, shape, batch, impl):
    layers = layers_for(shape)
    x = torch.randn(batch, layers.in_f, device=DEVICE, dtype=DTYPE)
    runners = layers.runners(x)
    if impl not in runners:
        pytest.skip(f"{impl} does not run here ({DEVICE}, {DTYPE})")
    fn, weight_bytes, path = runners[impl]
    benchmark.group = f"{shape} batch={batch} ({DEVICE}, {str(DTYPE).replace('torch.', '')})"
    with torch.no_grad():
        expected = layers.dense(x)
        got = fn()
        assert torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2 if DTYPE != torch.float32 else 1e-4)
        if DEVICE == "cuda":
            sync = torch.cuda.synchronize

            def run():
                fn()
                sync()
        else:
            run = fn
        benchmark.pedantic(run, rounds=_rounds(layers.in_f, layers.out_f, batch), warmup_rounds=1, iterations=1)
    _record(benchmark, layers.in_f, layers.out_f, batch, weight_bytes, path)


def main(rounds: int = 7) -> None:
    """Interleaved timing: every round runs each implementation once, in turn (medians reported)."""
    print(f"device={DEVICE} dtype={DTYPE} threads={torch.get_num_threads()}")
    print(f"{'shape':<22}{'batch':>6}  {'impl':<16}{'path':<11}{'median ms':>10}{'TFLOP/s':>9}{'GB/s':>8}{'vs dense':>9}")
    for shape, (in_f, out_f) in SHAPES.items():
        layers = layers_for(shape)
        for batch in BATCHES:
            if _skip_reason(shape, batch):
                print(f"{shape:<22}{batch:>6}  skipped: {_skip_reason(shape, batch)}")
                continue
            x = torch.randn(batch, in_f, device=DEVICE, dtype=DTYPE)
            runners = layers.runners(x)
            times = {k: [] for k in runners}
            with torch.no_grad():
                for _ in range(rounds + 1):
                    for name, (fn, _, _) in runners.items():
                        if DEVICE == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        fn()
                        if DEVICE == "cuda":
                            torch.cuda.synchronize()
                        times[name].append(time.perf_counter() - t0)
            med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}  # first round is warm-up
            elem = torch.empty((), dtype=DTYPE).element_size()
            for name, (_, wbytes, path) in runners.items():
                s = med[name]
                tflops = 2 * batch * in_f * out_f / s / 1e12
                gbps = (wbytes + batch * (in_f + out_f) * elem) / s / 1e9
                print(f"{shape:<22}{batch:>6}  {name:<16}{path:<11}{s * 1e3:>10.3f}{tflops:>9.3f}{gbps:>8.1f}"
                      f"{med['dense'] / s:>8.2f}x")


if __name__ == "__main__":
    main()
