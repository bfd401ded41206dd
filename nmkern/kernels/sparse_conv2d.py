"""Triton: 2-D convolution as an implicit GEMM over an N:M-packed weight (groups=1).

The GEMM is ``Y[p, o] = sum_k A[p, k] * W[o, k]`` with ``p`` an output pixel
``(b, oh, ow)`` and ``k = (r * KW + s) * C + c`` running over the kernel window in
NHWC order (input channel innermost), the order the N:M groups are defined in
(``nmkern.reference.nm_pack.as_rows(w, 1)``). ``A`` is never materialised: each
``(BLOCK_P, BLOCK_K)`` tile is gathered straight from ``x`` (any strides, so NCHW
and channels_last both work) with zero padding by masked loads; the weight tile is
rebuilt in registers from the packed values/indices by
:func:`nmkern.kernels.nm_linear.nm_weight_tile`, as in the linear kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nmkern.kernels._configs import aot_spec, launch, pick_by_rows
from nmkern.kernels.nm_linear import dot_precision, interpreter_upcast, nm_weight_tile
from nmkern.reference.linear import conv_out_size
from nmkern.reference.nm_pack import index_bits, indices_per_word


@triton.jit
def nm_conv2d_kernel(x_ptr, values_ptr, idx_ptr, bias_ptr, y_ptr,
                     P, C, H, W, O, OH, OW, KW, K,
                     sxb, sxc, sxh, sxw, syb, syo, syh, syw, stride_v, stride_i,
                     STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                     N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    p_ok = offs_p < P
    o_ok = offs_o < O
    pix = OH * OW
    pb = offs_p // pix
    oh = (offs_p % pix) // OW
    ow = offs_p % OW
    base_h = (oh * STRIDE_H - PAD_H)[:, None]
    base_w = (ow * STRIDE_W - PAD_W)[:, None]
    x_row = x_ptr + pb[:, None].to(tl.int64) * sxb
    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        window = offs_k // C
        c = (offs_k % C)[None, :]
        ih = base_h + ((window // KW) * DIL_H)[None, :]
        iw = base_w + ((window % KW) * DIL_W)[None, :]
        a_ok = p_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        at = tl.load(x_row + c * sxc + ih * sxh + iw * sxw, mask=a_ok, other=0.0)
        wt = nm_weight_tile(values_ptr, idx_ptr, stride_v, stride_i, offs_o, offs_k,
                            o_ok[:, None] & k_ok[None, :], N, M, BITS, PER_WORD)
        if UPCAST:  # bf16 tl.dot is wrong under the 3.9 interpreter: see nm_linear.interpreter_upcast
            at = at.to(tl.float32)
            wt = wt.to(tl.float32)
        acc += tl.dot(at, tl.trans(wt), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = (y_ptr + pb[:, None].to(tl.int64) * syb + offs_o[None, :] * syo
              + oh[:, None] * syh + ow[:, None] * syw)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])


def nm_conv2d_configs() -> list[dict]:
    """Tiles of :func:`nm_conv2d_kernel`, ``BLOCK_P`` ascending; the launcher takes the smallest covering the pixels.

    * ``BLOCK_P`` 16 / 32 output pixels (GEMM rows): ``tl.dot`` needs >= 16, so a
      tiny output still fills one 16-row tile; 32 rows for everything larger, because
      64 rows spilled 32 B of stack on sm_80. Only the 32-row tile is in AOT_SPECS:
      the 16-row one leaves 8 B of stack on sm_80 with Triton 3.9 (spill-free on sm_90).
    * ``BLOCK_O = 64`` by ``BLOCK_K = 32``: the packed weight tile rebuilt per step,
      as in :func:`nmkern.kernels.nm_linear.nm_linear_configs`.
    * ``num_warps = 4``, ``num_stages = 3``: Triton's defaults, which these tiles were
      sized and spill-checked with.
    """
    return [{"BLOCK_P": block_p, "BLOCK_O": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
            for block_p in (16, 32)]


def nm_conv2d_triton(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, weight_shape,
                     bias: torch.Tensor | None = None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """``conv2d(x, W, bias)`` with ``x (B, C, H, W)`` and W ``(O, C, KH, KW)`` packed N:M along C (NHWC rows).

    The output is NCHW-contiguous, or channels_last when ``x`` is.
    """
    b, c, h, w = x.shape
    o, _, kh, kw = weight_shape
    oh = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and c > 1 else torch.contiguous_format
    y = torch.empty(b, o, oh, ow, dtype=x.dtype, device=x.device, memory_format=fmt)
    p = b * oh * ow
    if p == 0:
        return y
    configs = nm_conv2d_configs()
    has_bias = bias is not None
    values = values.contiguous()
    launch(
        nm_conv2d_kernel, configs, pick_by_rows(configs, "BLOCK_P", p),
        lambda cfg: (triton.cdiv(p, cfg["BLOCK_P"]), triton.cdiv(o, cfg["BLOCK_O"])),
        x, values, indices.contiguous(), bias if has_bias else values, y,
        p, c, h, w, o, oh, ow, kw, kh * kw * c,
        *x.stride(), *y.stride(), values.stride(0), indices.stride(0) if indices.dim() == 2 else 1,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        N=n, M=m, BITS=index_bits(m), PER_WORD=indices_per_word(m), HAS_BIAS=has_bias,
        PRECISION=dot_precision(x.dtype), UPCAST=interpreter_upcast(x.dtype), tune_key=("P", "O", "K"),
    )
    return y


_I32 = ("P", "C", "H", "W", "O", "OH", "OW", "KW", "K", "sxb", "sxc", "sxh", "sxw", "syb", "syo", "syh", "syw",
        "stride_v", "stride_i", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W")

# Representative config for the sm_80 / sm_90 AOT compile checks: 2:4 fp16 with the largest
# tile, the one every conv of more than 16 output pixels runs.
AOT_SPECS = [
    aot_spec("nm_conv2d_nm24_fp16", nm_conv2d_kernel,
             {"x_ptr": "*fp16", "values_ptr": "*fp16", "idx_ptr": "*i32", "bias_ptr": "*fp16", "y_ptr": "*fp16",
              **{name: "i32" for name in _I32}},
             nm_conv2d_configs()[-1],
             {"N": 2, "M": 4, "BITS": index_bits(4), "PER_WORD": indices_per_word(4), "HAS_BIAS": True,
              "PRECISION": "tf32", "UPCAST": False}),
]
