"""Triton: ``y = x @ W^T + b`` with W kept compressed (N:M packed or 2:4 CUTLASS).

Each program computes a ``(BLOCK_B, BLOCK_O)`` tile of ``y``. Per ``BLOCK_K`` step
it loads the activations, rebuilds the ``(BLOCK_O, BLOCK_K)`` weight tile in
registers from the compressed tensors and feeds both to ``tl.dot`` with an fp32
accumulator. Only the compressed bytes come from DRAM: for 2:4 fp16 that is
``K/2`` values (2 B) plus ``K/4`` nibbles per row, 56% of the dense row; the
repeated loads of a value by the m columns of its group hit L1. That is the point
of the kernel: small-batch (decode-style) GEMM is bound by reading the weight.

Formats (see :mod:`nmkern.reference.linear`):

* ``FMT_NM``: ``values (O, K*n/m)`` plus ``indices`` int32, ``ceil(log2 m)`` bits
  per kept element, LSB first, each row starting a new word.
* ``FMT_SEMI24``: ``values (O, K/2)`` plus ``meta (O, K/16)`` int16 in the CUTLASS
  SM80 interleaved order (contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nmkern.backend import triton_interpret
from nmkern.kernels._configs import aot_spec, launch, pick_by_rows
from nmkern.kernels.compress_24 import cutlass_meta_offset
from nmkern.reference.nm_pack import index_bits, indices_per_word

FMT_NM = 0
FMT_SEMI24 = 1


@triton.jit
def nm_weight_tile(values_ptr, idx_ptr, stride_v, stride_i, offs_o, offs_k, mask,
                   N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr):
    """Dense ``(len(offs_o), len(offs_k))`` tile of an N:M-packed weight (zeros where masked)."""
    group = offs_k // M
    pos = (offs_k % M)[None, :]
    row_v = values_ptr + offs_o[:, None].to(tl.int64) * stride_v
    row_i = idx_ptr + offs_o[:, None].to(tl.int64) * stride_i
    tile = tl.zeros((offs_o.shape[0], offs_k.shape[0]), dtype=values_ptr.dtype.element_ty)
    for j in tl.static_range(N):
        slot = group * N + j  # the j-th kept element of the group
        val = tl.load(row_v + slot[None, :], mask=mask, other=0.0)
        word = tl.load(row_i + (slot // PER_WORD)[None, :], mask=mask, other=0)
        idx = (word >> (BITS * (slot % PER_WORD))[None, :]) & ((1 << BITS) - 1)
        tile = tl.where(idx == pos, val, tile)
    return tile


@triton.jit
def semi24_weight_tile(values_ptr, meta_ptr, stride_v, rows, offs_o, offs_k, mask):
    """Dense tile of a 2:4 weight in the CUTLASS SM80 layout (values + reordered int16 meta)."""
    group = offs_k // 4
    pos = (offs_k % 4)[None, :]
    r = offs_o[:, None]
    c = (offs_k // 16)[None, :]  # logical int16 metadata column
    offset = cutlass_meta_offset(r.to(tl.int64), c, rows)  # int64: rows * k/16 may pass 2**31 elements
    meta = tl.load(meta_ptr + offset, mask=mask, other=0).to(tl.int32) & 0xFFFF
    nib = (meta >> (4 * (group % 4))[None, :]) & 0xF
    row_v = values_ptr + r.to(tl.int64) * stride_v + (2 * group)[None, :]
    v0 = tl.load(row_v, mask=mask, other=0.0)
    v1 = tl.load(row_v + 1, mask=mask, other=0.0)
    zero = tl.zeros(v0.shape, dtype=v0.dtype)
    return tl.where(pos == (nib & 3), v0, tl.where(pos == ((nib >> 2) & 3), v1, zero))


@triton.jit
def nm_linear_kernel(x_ptr, values_ptr, aux_ptr, bias_ptr, y_ptr,
                     B, O, K, stride_xb, stride_xk, stride_v, stride_a, stride_yb, stride_yo,
                     N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr,
                     FMT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    b_ok = offs_b < B
    o_ok = offs_o < O
    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xt = tl.load(x_ptr + offs_b[:, None].to(tl.int64) * stride_xb + offs_k[None, :] * stride_xk,
                     mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = o_ok[:, None] & k_ok[None, :]
        if FMT == 0:
            wt = nm_weight_tile(values_ptr, aux_ptr, stride_v, stride_a, offs_o, offs_k, w_ok, N, M, BITS, PER_WORD)
        else:
            wt = semi24_weight_tile(values_ptr, aux_ptr, stride_v, O, offs_o, offs_k, w_ok)
        if UPCAST:  # see interpreter_upcast()
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc += tl.dot(xt, tl.trans(wt), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_b[:, None].to(tl.int64) * stride_yb + offs_o[None, :] * stride_yo
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & o_ok[None, :])


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """True where tl.dot must see fp32 operands: bf16 under TRITON_INTERPRET=1.

    Triton 3.9's interpreter returns garbage (~1e10) for a bf16 tl.dot (checked on a
    16x16 probe; fp16 and fp32 are right). A bf16 x bf16 product is exact in fp32
    (8 + 8 significand bits < 24), so upcasting first gives the same sums the bf16
    tensor-core MMA accumulates in fp32; compiled kernels keep the native bf16 dot.
    """
    return dtype == torch.bfloat16 and triton_interpret()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use IEEE fp32 products (torch's default matmul), not TF32."""
    return "ieee" if dtype == torch.float32 or interpreter_upcast(dtype) else "tf32"


def nm_linear_configs() -> list[dict]:
    """Tiles of :func:`nm_linear_kernel`, ``BLOCK_B`` ascending; the launcher takes the smallest covering the batch.

    * ``BLOCK_B`` 16 / 32 / 64 batch rows: ``tl.dot`` needs every dim >= 16, so a
      decode batch (<= 16 rows, the case this kernel is for) still fills one 16-row
      tile; bigger batches take 32 or 64 rows, so each program's rebuilt weight tile
      serves more rows. 64 rows still compile spill-free but use 244-246 registers
      on sm_80 (near the 255 cap; nmkern.aot, Triton 3.9), so no larger tile is listed.
    * ``BLOCK_O = 64`` by ``BLOCK_K = 32``: the weight tile rebuilt in registers each
      step, 2048 elements = 16 per thread at 4 warps, beside the fp32 accumulator.
      32 columns are two int16 words of 2:4 metadata, or one int32 index word of 2:4.
    * ``num_warps = 4``, ``num_stages = 3``: Triton's defaults, which these tiles were
      sized and spill-checked with.
    """
    return [{"BLOCK_B": block_b, "BLOCK_O": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
            for block_b in (16, 32, 64)]


def _launch(x2d, values, aux, bias, out_features, n, m, fmt):
    batch, k = x2d.shape
    y = torch.empty(batch, out_features, dtype=x2d.dtype, device=x2d.device)
    if batch == 0:
        return y
    configs = nm_linear_configs()
    has_bias = bias is not None
    launch(
        nm_linear_kernel, configs, pick_by_rows(configs, "BLOCK_B", batch),
        lambda cfg: (triton.cdiv(batch, cfg["BLOCK_B"]), triton.cdiv(out_features, cfg["BLOCK_O"])),
        x2d, values, aux, bias if has_bias else values, y,
        batch, out_features, k, x2d.stride(0), x2d.stride(1), values.stride(0), aux.stride(0), y.stride(0), y.stride(1),
        N=n, M=m, BITS=index_bits(m), PER_WORD=indices_per_word(m), FMT=fmt, HAS_BIAS=has_bias,
        PRECISION=dot_precision(x2d.dtype), UPCAST=interpreter_upcast(x2d.dtype), tune_key=("B", "O", "K"),
    )
    return y


def nm_linear_triton(x2d: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d (B, K) @ W^T + bias`` with W given by N:M-packed ``values``/``indices`` (row-contiguous)."""
    return _launch(x2d, values.contiguous(), indices.contiguous(), bias, values.shape[0], n, m, FMT_NM)


def semi24_linear_triton(x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d (B, K) @ W^T + bias`` with W in the 2:4 CUTLASS layout (``compress_24`` output)."""
    return _launch(x2d, values.contiguous(), meta.contiguous(), bias, values.shape[0], 2, 4, FMT_SEMI24)


def _aot_spec(name: str, dtype: str, aux: str, n: int, m: int, fmt: int, has_bias: bool) -> dict:
    sig = {arg: f"*{dtype}" for arg in ("x_ptr", "values_ptr", "bias_ptr", "y_ptr")}
    sig.update({"aux_ptr": f"*{aux}"}, **{arg: "i32" for arg in (
        "B", "O", "K", "stride_xb", "stride_xk", "stride_v", "stride_a", "stride_yb", "stride_yo")})
    return aot_spec(name, nm_linear_kernel, sig, pick_by_rows(nm_linear_configs(), "BLOCK_B", 1),
                    {"N": n, "M": m, "BITS": index_bits(m), "PER_WORD": indices_per_word(m), "FMT": fmt,
                     "HAS_BIAS": has_bias, "PRECISION": "tf32", "UPCAST": False})


# Representative configs for the sm_80 / sm_90 AOT compile checks (nmkern/aot.py): the tile a
# decode batch gets, in both formats in fp16, and a bf16 1:8 one.
AOT_SPECS = [
    _aot_spec("nm_linear_nm24_fp16", "fp16", "i32", 2, 4, FMT_NM, True),
    _aot_spec("nm_linear_nm18_bf16", "bf16", "i32", 1, 8, FMT_NM, False),
    _aot_spec("nm_linear_semi24_fp16", "fp16", "i16", 2, 4, FMT_SEMI24, True),
]
