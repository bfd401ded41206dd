"""When the CPU kernel beats dense ``F.linear`` without measuring (NMKERN_TUNE=0, and the tuner's fallback):
the crossovers measured on the CI machines, per pattern class, batch and dtype."""

from __future__ import annotations

import enum
import math

import torch

from . import _cpu
from .spec import Pattern, pattern_in

# Measured crossovers: the largest batch (rows of x) at which the sparse kernel's
# median time stayed below dense F.linear at 4096x4096 and at the MiniLM shapes
# 384x1536 / 1536x384, on the 2-core AMD EPYC (Zen 3, AVX2) CI machine, shared with
# other jobs, with
#   python bench/cpu_ratio_table.py --minilm --batches 1,16,64,256 --threads 1
#   python bench/cpu_ratio_table.py --minilm --batches 1,4,16,64,128,256      (2 threads)
# The 1-thread run compares the kernels alone (no thread wake-ups); ratios:
#   2:4   4096^2: 0.83 (b1) 0.43 (b16) 0.70 (b64) 0.92 (b256);
#         MiniLM: 0.75-0.80 (b1), 0.73-0.78 (b8), 0.99-1.03 (b32), 1.06-1.18 (b128, b512)
#         -> <= 16 rows below 4M weights, <= 128 rows above.
#   1:4   4096^2: 0.41 .. 0.58 (b256); MiniLM 0.45 .. 0.80 (b512)          -> 512 rows.
#   1x4 @ 75%: 4096^2 0.28 .. 0.74 (b256); MiniLM 0.44 .. 0.87 (b512)       -> 512 rows.
# Denser classes were not measured: they get the conservative limits below.
_MAX_ROWS = (  # (kind, highest density of the class, largest batch that wins, same above 4M weights)
    (Pattern.NM, 0.25, 512, 512),
    (Pattern.NM, 0.50, 16, 128),
    (Pattern.BLOCK, 0.25, 512, 512),
    (Pattern.BLOCK, 0.50, 16, 16),
)
LARGE_WEIGHTS = 1 << 22
# bf16 / fp16: the sparse kernel won only at decode batches (bench/cpu_half_ratio.py, 4096x4096, 2
# threads, AVX-512 Xeon with AMX: batch 1 ratios 0.14-0.73; batch 16 1.2-2.3 for bf16, whose dense
# GEMM runs on AMX, 0.6-2.0 for fp16): at most this many rows, within the fp32 limits above.
HALF_MAX_ROWS = 8
# bf16 2:4 / 1:4 on the AMX kernel (amx_runs) at 4096x4096, same machine, 2 threads: bench/cpu_half_ratio.py
# at 16 rows 0.73 / 0.52 (warm), at 256 rows 1.11 / 1.01; a side-by-side run at 8-64 rows 0.67-0.82 / 0.50-0.58:
# at most this many rows (above, dense and the kernel do the same tile work). fp16 on the AMX kernel has
# no such limit: dense fp16 runs on AVX512-FP16 FMAs, and the kernel's three bf16 tile products per fp16
# product still beat it (side by side, 2:4 / 1:4: 0.49 / 0.33 at 16 rows, 0.35 / 0.28 at 64, 0.53 / 0.54 at 256).
AMX_MAX_ROWS = {torch.bfloat16: 64, torch.float16: math.inf}
# Below ~256K weights a dense GEMV takes a few microseconds and the ctypes call plus
# packing of x costs about as much: stay dense.
MIN_WEIGHTS = 1 << 18


def cpu_beats_dense(kind, n: int, m: int, block: int, sparsity: float, batch: int, out_features: int,
                    in_features: int, dtype: torch.dtype = torch.float32) -> bool:
    """True where the CPU kernel measured faster than dense ``F.linear`` for this layer and batch.

    ``batch`` is the number of rows of the GEMM (tokens, or B*OH*OW for a conv);
    ``in_features`` is K (``I*kh*kw`` for a conv). Conservative: False for anything
    the table above does not cover, for the portable (non-SIMD) library, for a ``dtype``
    the kernels do not take, and when the library is unavailable; bf16 / fp16 stop at
    ``HALF_MAX_ROWS`` rows, except on the AMX kernel (bf16 up to ``AMX_MAX_ROWS``, fp16 at any batch).
    """
    kind = pattern_in(kind.value if isinstance(kind, enum.Enum) else str(kind), _cpu._KINDS)
    if kind is None:
        return False
    if not _cpu.available() or _cpu.isa() not in (_cpu.CpuIsa.AVX2, _cpu.CpuIsa.AVX512):
        return False
    if batch < 1 or out_features * in_features < MIN_WEIGHTS or dtype not in _cpu.KERNEL_DTYPES:
        return False
    if dtype != torch.float32 and batch > HALF_MAX_ROWS:
        return batch <= AMX_MAX_ROWS[dtype] and out_features * in_features >= LARGE_WEIGHTS and _cpu.amx_runs(
            kind, n, m, in_features, dtype)
    if kind is Pattern.NM:
        if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m <= 16):
            return False
        density = n / m
    else:
        if not isinstance(block, int) or block < 4 or block % 4 or out_features % block:
            return False  # blocks of 1-3 rows run the scalar path
        density = 1.0 - float(sparsity)
    large = out_features * in_features >= LARGE_WEIGHTS
    for k, max_density, max_rows, max_rows_large in _MAX_ROWS:
        if k is kind and density <= max_density + 1e-9:
            return batch <= (max_rows_large if large else max_rows)
    return False
