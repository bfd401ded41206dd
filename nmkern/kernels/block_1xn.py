"""1xN block scores: the L1 norm of every block of ``block`` output channels x 1 input channel.

Semantics: :func:`nmkern.reference.block_1xn.block_scores_1xn_ref`. The weight is
viewed as ``(O, I, E)`` (E = kernel elements, 1 for Linear); block ``(b, i)`` sums
``|w[b*block + r, i, e]|`` over r < block and e < E, accumulated in fp32 (fp64 for fp64
weights). One program owns one block row b and ``BLOCK_I`` input channels and
walks the ``block`` filters and the kernel elements in ``BLOCK_E`` chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._configs import aot_spec, launch


@triton.jit
def block_scores_1xn_kernel(
    w_ptr,  # (O, I, E) contiguous
    out_ptr,  # (O / block, I) fp32 or fp64
    I,
    E,
    block,
    BLOCK_I: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < I
    e = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_I, BLOCK_E), dtype=ACC_DTYPE)
    for r in range(0, block):
        row = (b * block + r) * I * E
        for e0 in range(0, E, BLOCK_E):
            ee = e0 + e
            ok = i_ok[:, None] & (ee[None, :] < E)
            x = tl.load(w_ptr + row + i[:, None] * E + ee[None, :], mask=ok, other=0)
            acc += tl.abs(x.to(ACC_DTYPE))
    tl.store(out_ptr + b * I + i, tl.sum(acc, axis=1), mask=i_ok)


def block_scores_1xn_configs(e: int) -> list[dict]:
    """Configs of :func:`block_scores_1xn_kernel` for ``e`` kernel elements; the launcher runs the first.

    ``BLOCK_E = next_pow2(e)`` capped at 64, so a 7x7 kernel (49 elements) is one
    chunk; ``BLOCK_I = 1024 // BLOCK_E`` keeps ``BLOCK_I * BLOCK_E`` at 1024
    accumulators per program, 8 per thread at ``num_warps = 4``.
    """
    block_e = min(triton.next_power_of_2(max(e, 1)), 64)
    return [{"BLOCK_I": 1024 // block_e, "BLOCK_E": block_e, "num_warps": 4}]


def block_scores_1xn_triton(w3: torch.Tensor, block: int) -> torch.Tensor:
    """``(O/block, I)`` block L1 norms of contiguous ``(O, I, E)`` ``w3``: fp32, fp64 for fp64 input."""
    o, i, e = w3.shape
    acc = torch.float64 if w3.dtype == torch.float64 else torch.float32
    out = torch.empty(o // block, i, dtype=acc, device=w3.device)
    if out.numel() == 0:
        return out.zero_()
    configs = block_scores_1xn_configs(e)
    launch(block_scores_1xn_kernel, configs, configs[0], lambda cfg: (o // block, triton.cdiv(i, cfg["BLOCK_I"])),
           w3, out, i, e, block, ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32)
    return out


def _spec(dtype: str, e: int) -> dict:
    acc = "fp64" if dtype == "fp64" else "fp32"
    return aot_spec(f"block_scores_1xn_{dtype}_e{e}", block_scores_1xn_kernel,
                    {"w_ptr": f"*{dtype}", "out_ptr": f"*{acc}", "I": "i32", "E": "i32", "block": "i32"},
                    block_scores_1xn_configs(e)[0], {"ACC_DTYPE": tl.float64 if dtype == "fp64" else tl.float32})


# Linear (E = 1), 3x3 conv (E = 9) and 7x7 conv (E = 49).
AOT_SPECS = [_spec("fp16", 1), _spec("bf16", 9), _spec("fp32", 9), _spec("fp64", 49)]
