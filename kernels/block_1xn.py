"""1xN block scores: the L1 norm of every block of n output channels x 1 input channel.

Semantics: :func:`nmkern.reference.block_1xn.block_scores_1xn_ref`. The weight is
viewed as ``(O, I, E)`` (E = kernel elements, 1 for Linear); block ``(b, i)`` sums
``|w[b*n + r, i, e]|`` over r < n and e < E, accumulated in fp32 (fp64 for fp64
weights). One program owns one block row b and ``BLOCK_I`` input channels and
walks the n filters and the kernel elements in ``BLOCK_E`` chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 1024  # BLOCK_I * BLOCK_E accumulators per program (8 per thread at 4 warps)
_MAX_BLOCK_E = 64  # a 7x7 kernel (49 elements) in one chunk
_NUM_WARPS = 4


@triton.jit
def block_scores_1xn_kernel(
    w_ptr,  # (O, I, E) contiguous
    out_ptr,  # (O / n, I) fp32 or fp64
    I,
    E,
    n,
    BLOCK_I: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < I
    e = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_I, BLOCK_E), dtype=ACC_DTYPE)
    for r in range(0, n):
        row = (b * n + r) * I * E
        for e0 in range(0, E, BLOCK_E):
            ee = e0 + e
            ok = i_ok[:, None] & (ee[None, :] < E)
            x = tl.load(w_ptr + row + i[:, None] * E + ee[None, :], mask=ok, other=0)
            acc += tl.abs(x.to(ACC_DTYPE))
    tl.store(out_ptr + b * I + i, tl.sum(acc, axis=1), mask=i_ok)


def _config(e: int) -> tuple[int, int]:
    block_e = min(triton.next_power_of_2(max(e, 1)), _MAX_BLOCK_E)
    return _TILE // block_e, block_e


def block_scores_1xn_triton(w3: torch.Tensor, n: int) -> torch.Tensor:
    """``(O/n, I)`` block L1 norms of contiguous ``(O, I, E)`` ``w3``: fp32, fp64 for fp64 input."""
    o, i, e = w3.shape
    acc = torch.float64 if w3.dtype == torch.float64 else torch.float32
    out = torch.empty(o // n, i, dtype=acc, device=w3.device)
    if out.numel() == 0:
        return out.zero_()
    block_i, block_e = _config(e)
    grid = (o // n, triton.cdiv(i, block_i))
    block_scores_1xn_kernel[grid](w3, out, i, e, n, BLOCK_I=block_i, BLOCK_E=block_e,
                                  ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
                                  num_warps=_NUM_WARPS)
    return out


def _spec(dtype: str, e: int) -> dict:
    block_i, block_e = _config(e)
    acc = "fp64" if dtype == "fp64" else "fp32"
    return {
        "name": f"block_scores_1xn_{dtype}_e{e}",
        "fn": block_scores_1xn_kernel,
        "signature": {"w_ptr": f"*{dtype}", "out_ptr": f"*{acc}", "I": "i32", "E": "i32", "n": "i32",
                      "BLOCK_I": "constexpr", "BLOCK_E": "constexpr", "ACC_DTYPE": "constexpr"},
        "constexprs": {"BLOCK_I": block_i, "BLOCK_E": block_e,
                       "ACC_DTYPE": tl.float64 if dtype == "fp64" else tl.float32},
        "num_warps": _NUM_WARPS,
    }


# Linear (E = 1), 3x3 conv (E = 9) and 7x7 conv (E = 49).
AOT_SPECS = [_spec("fp16", 1), _spec("bf16", 9), _spec("fp32", 9), _spec("fp64", 49)]
