"""SparseLinear (packed, 2:4) vs nn.Linear at real layer shapes; cuSPARSELt as a third column on a GPU.

    pytest bench/bench_linear.py --benchmark-only            # pytest-benchmark table, grouped by shape/batch
    python bench/bench_linear.py                             # interleaved timing table (fairer on a busy machine)
    python bench/bench_linear.py --quick                     # smoke run: MiniLM shape, batch 1/16, 0.2 s per point

The interleaved table times with ``nmkern.timing`` (warm-up, candidates alternating
round by round, medians), warm cache (one layer) and cold cache (a stack of distinct
layers whose dense bytes exceed 4x the last-level cache, run like a model; ``--no-cold``
skips it), and prints ``nmkern.timing.machine_info()`` first.

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

import argparse
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern import dispatch, timing

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
            "sparse": (lambda: self.sparse(x), self.dense_bytes if auto_path is nmkern.Backend.DENSE else sparse_bytes,
                       auto_path.value),
        }
        call = dispatch.Call(info, x.device.type, x.numel() // self.in_f)
        for path in (nmkern.Backend.CPU, nmkern.Backend.CUDA, nmkern.Backend.TRITON):
            if path is auto_path or dispatch.why_not(path, call) is not None:
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


def time_point(shape: str, batch: int, *, seconds: float, cold: bool) -> tuple[dict, dict]:
    """Every implementation of one (shape, batch), interleaved: (runners of the first copy, WarmCold columns)."""
    in_f, _ = SHAPES[shape]
    first = layers_for(shape)
    copies = timing.cold_stack_size(first.dense_bytes, llc_bytes=timing.last_level_cache_bytes(DEVICE)) if cold else 1
    stack = [first] + [copy.deepcopy(first) for _ in range(copies - 1)]  # own weights each: the cold-cache stack
    x = torch.randn(batch, in_f, device=DEVICE, dtype=DTYPE)
    runners = [layers.runners(x) for layers in stack]
    with torch.no_grad():
        res = timing.time_warm_cold({k: [r[k][0] for r in runners] for k in runners[0]}, cold=cold, seconds=seconds,
                                    sync=timing.device_sync(DEVICE))
    return runners[0], res.columns("dense")


def _print_point(shape: str, batch: int, runners: dict, cols: dict) -> None:
    in_f, out_f = SHAPES[shape]
    elem = torch.empty((), dtype=DTYPE).element_size()
    for name, (_, wbytes, path) in runners.items():
        s = cols[f"{name}_median_ms"] * 1e-3
        tflops = 2 * batch * in_f * out_f / s / 1e12
        gbps = (wbytes + batch * (in_f + out_f) * elem) / s / 1e9
        cold = cols.get(f"cold_{name}_median_ms")
        cold_cells = f"{cold:>10.3f}{cols['cold_dense_median_ms'] / cold:>8.2f}x" if cold else ""
        print(f"{shape:<22}{batch:>6}  {name:<16}{path:<11}{s * 1e3:>10.3f}{tflops:>9.3f}{gbps:>8.1f}"
              f"{cols['dense_median_ms'] * 1e-3 / s:>8.2f}x{cold_cells}")


def main(argv=None) -> int:
    """Interleaved timing table (nmkern.timing), warm and cold cache, medians."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--seconds", type=float, default=1.0, help="timing budget per point and cache state")
    ap.add_argument("--no-cold", action="store_true", help="warm cache only")
    ap.add_argument("--quick", action="store_true", help="smoke run: MiniLM shape, batch 1/16, 0.2 s")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.batches, args.seconds = "minilm-384x1536", "1,16", 0.2
    print(json.dumps(timing.machine_info(DEVICE)))
    print(f"device={DEVICE} dtype={DTYPE} threads={torch.get_num_threads()}")
    print(f"{'shape':<22}{'batch':>6}  {'impl':<16}{'path':<11}{'median ms':>10}{'TFLOP/s':>9}{'GB/s':>8}{'vs dense':>9}"
          + ("" if args.no_cold else f"{'cold ms':>10}{'vs dense':>9}"))
    for shape in args.shapes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            if _skip_reason(shape, batch):
                print(f"{shape:<22}{batch:>6}  skipped: {_skip_reason(shape, batch)}")
                continue
            runners, cols = time_point(shape, batch, seconds=args.seconds, cold=not args.no_cold)
            _print_point(shape, batch, runners, cols)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
