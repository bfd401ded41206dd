"""Triton: ``y = x @ W^T + b`` with W 1xN block-sparse, stored as BSR with blocksize (N, 1).

One program owns one block row (N consecutive output channels) and ``BLOCK_B``
batch rows, and walks only that row's stored blocks ``crow[r]:crow[r+1]``: pruned
blocks are never read. Per step it gathers ``BLOCK_NNZ`` input columns of ``x``
(one per stored block) and the matching ``(BLOCK_NNZ, N)`` weight values and
accumulates their product in fp32 with ``tl.dot``. ``tl.dot`` needs every dim
>= 16, so the N outputs are padded to ``BLOCK_N = max(16, next_pow2(N))`` lanes
(masked loads, never stored).

Buffers (see :mod:`nmkern.reference.linear`): ``crow (O/N + 1,)``, ``col (nnzb,)``
(int32 or int64), ``values (nnzb, N)`` contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nmkern.kernels._configs import aot_spec, launch, pick_by_rows
from nmkern.kernels.nm_linear import dot_precision, interpreter_upcast


@triton.jit
def bsr_linear_kernel(x_ptr, crow_ptr, col_ptr, values_ptr, bias_ptr, y_ptr,
                      B, stride_xb, stride_xk, stride_yb, stride_yo,
                      BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NNZ: tl.constexpr):
    pid_b = tl.program_id(0)
    block_row = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = tl.arange(0, BLOCK_N)
    b_ok = offs_b < B
    n_ok = offs_n < BLOCK
    start = tl.load(crow_ptr + block_row).to(tl.int32)
    end = tl.load(crow_ptr + block_row + 1).to(tl.int32)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_NNZ):
        offs_p = p0 + tl.arange(0, BLOCK_NNZ)
        p_ok = offs_p < end
        cols = tl.load(col_ptr + offs_p, mask=p_ok, other=0)
        xt = tl.load(x_ptr + offs_b[:, None].to(tl.int64) * stride_xb + cols[None, :] * stride_xk,
                     mask=b_ok[:, None] & p_ok[None, :], other=0.0)
        vt = tl.load(values_ptr + offs_p[:, None].to(tl.int64) * BLOCK + offs_n[None, :],
                     mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # bf16 tl.dot is wrong under the 3.9 interpreter: see nm_linear.interpreter_upcast
            xt = xt.to(tl.float32)
            vt = vt.to(tl.float32)
        acc += tl.dot(xt, vt, input_precision=PRECISION)
    offs_o = block_row * BLOCK + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_b[:, None].to(tl.int64) * stride_yb + offs_o[None, :] * stride_yo
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & n_ok[None, :])


def bsr_linear_configs() -> list[dict]:
    """Tiles of :func:`bsr_linear_kernel`, ``BLOCK_B`` ascending; the launcher takes the smallest covering the batch.

    * ``BLOCK_B`` 16 / 32 / 64 batch rows, as in
      :func:`nmkern.kernels.nm_linear.nm_linear_configs`: ``tl.dot`` needs >= 16, a
      decode batch fills one 16-row tile, bigger batches share each gathered block.
    * ``BLOCK_NNZ = 32`` stored blocks per step: the ``tl.dot`` reduction dim, 32
      gathered input columns and their ``(32, BLOCK_N)`` values per step.
    * ``num_warps = 4``, ``num_stages = 3``: Triton's defaults, which these tiles were
      sized and spill-checked with (all three are spill-free on sm_80 / sm_90 for 1x4
      and 1x16 blocks; nmkern.aot, Triton 3.9).

    ``BLOCK_N`` is not tuned: it is the block height padded for ``tl.dot``
    (:func:`_block_n`).
    """
    return [{"BLOCK_B": block_b, "BLOCK_NNZ": 32, "num_warps": 4, "num_stages": 3} for block_b in (16, 32, 64)]


def _block_n(block: int) -> int:
    """Lanes for the N outputs of a block row: ``tl.dot`` needs >= 16 and a power of two."""
    return max(16, triton.next_power_of_2(block))


def bsr_linear_triton(x2d: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                      out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d (B, K) @ W^T + bias`` with W the ``(out_features, K)`` 1xN BSR matrix."""
    batch = x2d.shape[0]
    block = values.shape[1]
    y = torch.empty(batch, out_features, dtype=x2d.dtype, device=x2d.device)
    if batch == 0:
        return y
    configs = bsr_linear_configs()
    has_bias = bias is not None
    values = values.contiguous()
    launch(
        bsr_linear_kernel, configs, pick_by_rows(configs, "BLOCK_B", batch),
        lambda cfg: (triton.cdiv(batch, cfg["BLOCK_B"]), out_features // block),
        x2d, crow.contiguous(), col.contiguous(), values, bias if has_bias else values, y,
        batch, x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1),
        BLOCK=block, HAS_BIAS=has_bias, PRECISION=dot_precision(x2d.dtype), UPCAST=interpreter_upcast(x2d.dtype),
        BLOCK_N=_block_n(block), tune_key=("B",),
    )
    return y


def _aot_spec(block: int, dtype: str) -> dict:
    sig = {arg: f"*{dtype}" for arg in ("x_ptr", "values_ptr", "bias_ptr", "y_ptr")}
    sig.update({"crow_ptr": "*i32", "col_ptr": "*i32"},
               **{arg: "i32" for arg in ("B", "stride_xb", "stride_xk", "stride_yb", "stride_yo")})
    return aot_spec(f"bsr_linear_1x{block}_{dtype}", bsr_linear_kernel, sig,
                    pick_by_rows(bsr_linear_configs(), "BLOCK_B", 1),
                    {"BLOCK": block, "HAS_BIAS": True, "PRECISION": "tf32", "UPCAST": False,
                     "BLOCK_N": _block_n(block)})


# Representative configs for the sm_80 / sm_90 AOT compile checks: the tile a decode batch
# gets, with 1x4 and 1x16 blocks.
AOT_SPECS = [_aot_spec(4, "fp16"), _aot_spec(16, "bf16")]
