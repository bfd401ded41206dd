"""pytest-benchmark cases for the nmkern CPU kernels vs dense F.linear.

    python -m pytest bench/bench_cpu.py --benchmark-only --benchmark-group-by=param:shape,param:batch
    python -m pytest bench/bench_cpu.py --benchmark-only -k "4096 and batch1"

Each (pattern, shape, batch) has a `sparse` and a `dense` case with the same
thread count (torch.get_num_threads() for MKL, the same for nmkern): compare the
two within a group (pytest-benchmark's own statistics, one case after another; the
machine, as ``nmkern.timing.machine_info()`` records it, is in the JSON's
``machine_info["nmkern"]``, see bench/conftest.py). The issue-5 targets (fp32, 4096x4096, sparse/dense time):
2:4 <= 0.55 / 0.80 / 1.00, 1x4 @ 75% <= 0.30 / 0.50 / 0.80, 1:4 <= 0.35 / 0.60 / 1.00
at batch 1 / 16 / 256. bench/cpu_ratio_table.py prints those ratios directly, timed interleaved
with nmkern.timing, warm and cold cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nmkern import _cpu  # noqa: E402

from cpu_ratio_table import CASES, masked_weight, prepare  # noqa: E402

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="nmkern CPU library not built")

ISSUE_POINTS = [(case, 4096, 4096, b) for case in CASES for b in (1, 16, 256)]
MINILM_POINTS = [(case, o, i, t) for case in CASES for (o, i) in ((384, 1536), (1536, 384)) for t in (1, 8, 32, 128, 512)]
POINTS = ISSUE_POINTS + MINILM_POINTS


def _ids(p):
    case, o, i, b = p
    return f"{case}-{o}x{i}-batch{b}"


_WEIGHTS: dict = {}


def _layer(case, o, i):
    key = (case, o, i)
    if key not in _WEIGHTS:
        w = masked_weight(case, o, i)
        _WEIGHTS.clear()  # keep at most one 4096x4096 weight alive
        _WEIGHTS[key] = (w, prepare(case, w))
    return _WEIGHTS[key]


@pytest.mark.parametrize("point", POINTS, ids=[_ids(p) for p in POINTS])
@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_cpu_linear(benchmark, point, impl):
    case, o, i, batch = point
    w, layer = _layer(case, o, i)
    x = torch.randn(batch, i)
    benchmark.group = _ids(point)
    benchmark.extra_info.update(case=case, shape=f"{o}x{i}", batch=batch, threads=torch.get_num_threads(),
                                isa=str(_cpu.isa()), packed_bytes=layer.nbytes, dense_bytes=w.numel() * 4)
    fn = (lambda: layer(x)) if impl == "sparse" else (lambda: F.linear(x, w))
    with torch.no_grad():
        y = benchmark(fn)
    assert y.shape == (batch, o)
