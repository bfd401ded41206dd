"""N:M top-k mask (and the fused masked weight) in one pass over the weight.

Semantics: :func:`nmkern.reference.nm_mask.nm_mask_ref` - keep the n largest |w|
of every group of m consecutive elements, ties to the lower index. Element i of a
group ranks ``#{j: |w_j| > |w_i|} + #{j < i: |w_j| == |w_i|}`` and is kept when
its rank is below n; this is exactly the position a stable descending sort gives.

The tensor is contiguous ``(rows, K)`` with K % m == 0, so groups are consecutive
runs of m elements in memory and the kernel walks them flat. m need not be a power
of two: a group occupies ``MP = next_pow2(m)`` lanes and the padding lanes get
magnitude -1, which never beats a real |w| >= 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._configs import aot_spec, launch


@triton.jit
def nm_mask_kernel(
    x_ptr,  # (rows, K) contiguous, float
    out_ptr,  # same shape: uint8 mask (APPLY=False) or x's dtype (APPLY=True)
    num_groups,  # rows * K / M
    n,  # keep n of every M
    M: tl.constexpr,
    MP: tl.constexpr,  # next power of two >= M
    BLOCK_G: tl.constexpr,  # groups per program
    APPLY: tl.constexpr,
    MAG_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 input
):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # (BLOCK_G,) group ids
    lane = tl.arange(0, MP)
    ok = (g[:, None] < num_groups) & (lane[None, :] < M)
    offs = g[:, None] * M + lane[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0)
    # Rank in fp32 (fp64 for fp64 input): exact for fp16/bf16, and the interpreter
    # compares bf16 as raw 16-bit patterns, which would put the -1 padding on top.
    mag = tl.where(ok, tl.abs(x.to(MAG_DTYPE)), -1.0)
    mag_i = mag[:, :, None]  # the element being ranked
    mag_j = mag[:, None, :]  # every rival in the group
    i_idx = lane[None, :, None]
    j_idx = lane[None, None, :]
    beats = (mag_j > mag_i) | ((mag_j == mag_i) & (j_idx < i_idx))
    rank = tl.sum(beats.to(tl.int32), axis=2)
    keep = rank < n
    if APPLY:
        tl.store(out_ptr + offs, tl.where(keep, x, tl.zeros_like(x)), mask=ok)
    else:
        tl.store(out_ptr + offs, keep.to(tl.uint8), mask=ok)


def nm_mask_configs(m: int) -> list[dict]:
    """Configs of :func:`nm_mask_kernel` for groups of ``m``; the launcher runs the first.

    Pairwise ranking holds a ``(BLOCK_G, MP, MP)`` tile (``MP = next_pow2(m)``), so
    ``BLOCK_G = 4096 // MP**2`` groups keep that tile at 4096 elements whatever m:
    32 values per thread at ``num_warps = 4``, which compiles without spills for
    every m (1024 groups for m = 2, 16 for m = 16; see reports/aot.json).
    """
    mp = triton.next_power_of_2(m)
    return [{"BLOCK_G": max(1, 4096 // (mp * mp)), "num_warps": 4}]


def nm_mask_triton(x2: torch.Tensor, n: int, m: int, *, apply: bool) -> torch.Tensor:
    """Bool mask (``apply=False``) or masked copy (``apply=True``) of contiguous ``(rows, K)`` ``x2``.

    The public ops in :mod:`nmkern.functional` validate the input (dtype, K % m,
    1 <= n < m <= 16, finite values) before calling this.
    """
    num_groups = x2.numel() // m
    if apply:
        out = torch.empty_like(x2)
        out_arg = out
    else:
        out = torch.empty(x2.shape, dtype=torch.bool, device=x2.device)
        out_arg = out.view(torch.uint8)  # store 0/1 bytes; torch.bool is one byte
    if num_groups:
        configs = nm_mask_configs(m)
        launch(nm_mask_kernel, configs, configs[0], lambda cfg: (triton.cdiv(num_groups, cfg["BLOCK_G"]),),
               x2, out_arg, num_groups, n, M=m, MP=triton.next_power_of_2(m), APPLY=apply,
               MAG_DTYPE=tl.float64 if x2.dtype == torch.float64 else tl.float32)
    return out


def _spec(dtype: str, n: int, m: int, apply: bool) -> dict:
    out = dtype if apply else "u8"
    return aot_spec(f"nm_mask_{'apply' if apply else 'mask'}_{dtype}_{n}of{m}", nm_mask_kernel,
                    {"x_ptr": f"*{dtype}", "out_ptr": f"*{out}", "num_groups": "i64", "n": "i32"},
                    nm_mask_configs(m)[0],
                    {"M": m, "MP": triton.next_power_of_2(m), "APPLY": apply,
                     "MAG_DTYPE": tl.float64 if dtype == "fp64" else tl.float32})


# Representative configs: 2:4 (the tensor-core pattern), m = 5 (non-power-of-two padding),
# the widest group (m = 16) in fp32 and bf16, and the mask output.
AOT_SPECS = [
    _spec("fp16", 2, 4, True),
    _spec("bf16", 8, 16, True),
    _spec("fp32", 2, 5, False),
    _spec("fp32", 4, 16, False),
    _spec("fp64", 1, 8, True),
]
