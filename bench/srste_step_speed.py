"""One SR-STE training step on the CPU (forward, backward, SGD) with the native N:M mask against the torch reference
mask it replaced (csrc/cpu/nm_mask.cpp; every step recomputes the mask from the dense weight).

    python bench/srste_step_speed.py          # ~10 s

Two 2:4 ``SparseLinear`` layers in their training form; the two masks alternate step by step in one process
(medians of 30 steps each), 2 threads.
"""

from __future__ import annotations

import sys
import time

import torch

import nmkern
from nmkern.nn import _layer
from nmkern.timing import cpu_name

NATIVE = _layer._nm_backend


def _median_ms(times: list[float]) -> float:
    return sorted(times)[len(times) // 2] * 1e3


def main() -> int:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"SR-STE training step, two 2:4 layers, 2 threads, {cpu_name()}")
    for width, batch in ((1024, 32), (256, 64)):
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))
        nmkern.sparsify(model, "2:4")
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(batch, width)

        def step() -> float:
            start = time.perf_counter()
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            return time.perf_counter() - start

        times = {"native": [], "reference": []}
        for name in list(times) * 32:
            _layer._nm_backend = NATIVE if name == "native" else (lambda t: "reference")
            times[name].append(step())
        native, reference = _median_ms(times["native"][2:]), _median_ms(times["reference"][2:])
        print(f"{width}x{width}, batch {batch}: native mask {native:.2f} ms, reference mask {reference:.2f} ms, "
              f"ratio {native / reference:.2f}")
    _layer._nm_backend = NATIVE
    return 0


if __name__ == "__main__":
    sys.exit(main())
