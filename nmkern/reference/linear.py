"""Reference sparse linear and conv over packed weights: decompress, then the dense op.

These are the semantics the Triton kernels (``nmkern/kernels/nm_linear.py``,
``nmkern/kernels/bsr_linear.py``, ``nmkern/kernels/sparse_conv2d.py``) must reproduce; tests and
benchmarks import them. No input checks (the public ops validate first).

Weight layouts:

* N:M (:class:`nmkern.NMPacked` tensors): ``values (out, K*n/m)`` and ``indices``
  of the dense weight viewed 2-D with the grouped dim innermost. For a Linear
  weight ``(out, in)`` that is the weight itself; for a conv weight
  ``(O, I, kh, kw)`` grouped along ``I`` it is ``(O, kh*kw*I)`` in NHWC order.
* 2:4 CUTLASS: ``values (out, in/2)`` and ``meta (out, in/16)`` int16
  (:func:`nmkern.compress_24`).
* 1xN BSR, blocksize ``(block, 1)``: ``crow (out/block + 1,)``, ``col (nnzb,)``,
  ``values (nnzb, block)`` of the weight viewed ``(out, K)`` (conv: PyTorch's own
  ``(O, I*kh*kw)`` flattening).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .nm_pack import from_rows, unpack_nm_ref
from .semi24 import decompress_24_ref


def nm_dense_rows_ref(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The dense ``(rows, K)`` matrix of packed N:M values/indices."""
    return unpack_nm_ref(values, indices, n, m)


def bsr_dense_ref(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
                  in_features: int) -> torch.Tensor:
    """The dense ``(out, K)`` matrix of 1xN BSR buffers (blocksize ``(block, 1)``)."""
    nnzb, block = values.shape
    # The block row of each stored block: static shapes (searchsorted, not repeat_interleave),
    # so the dense form also builds inside a torch.compile graph.
    block_row = torch.searchsorted(crow[1:].contiguous(), torch.arange(nnzb, device=crow.device, dtype=crow.dtype),
                                   right=True)
    dense = torch.zeros(out_features // block, in_features, block, dtype=values.dtype, device=values.device)
    dense[block_row, col.long()] = values
    return dense.permute(0, 2, 1).reshape(out_features, in_features)


def nm_linear_ref(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + b`` with W the unpacked ``(out, in)`` N:M weight."""
    return F.linear(x, nm_dense_rows_ref(values, indices, n, m), bias)


def semi24_linear_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + b`` with W the decompressed CUTLASS 2:4 weight."""
    return F.linear(x, decompress_24_ref(values, meta), bias)


def bsr_linear_ref(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                   out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + b`` with W the dense form of 1xN BSR buffers."""
    return F.linear(x, bsr_dense_ref(crow, col, values, out_features, x.shape[-1]), bias)


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one spatial dim (torch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_weight_from_rows(w_rows: torch.Tensor, weight_shape) -> torch.Tensor:
    """``(O, kh*kw*I)`` NHWC rows -> the ``(O, I, kh, kw)`` conv weight, with canonical strides.

    ``.contiguous()`` is not enough: it keeps the odd strides of size-1 dims (a
    (1, 2, 1, 1) weight comes back with strides (2, 1, 2, 2)), and torch 2.13's CPU
    ``F.conv2d`` segfaults on those with stride (1, 2), padding 1, dilation 2.
    """
    return from_rows(w_rows, torch.Size(weight_shape), 1).clone(memory_format=torch.contiguous_format)


def conv2d_dense(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                 dilation) -> torch.Tensor:
    """``F.conv2d``, except that bf16 / fp16 on the CPU is computed in fp32 and rounded once.

    Why: torch 2.13's CPU conv (oneDNN) on a CPU with AMX returned garbage (1e34, NaN) for small bf16 inputs with
    stride (1, 2), on every call (x 2x4x8x5, weight 3x4x2x3, dilation 2: 10 of 10 calls wrong against fp64;
    right with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` or oneDNN off), and the reference ops must be right.
    """
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        b32 = None if bias is None else bias.float()
        return F.conv2d(x.float(), w.float(), b32, tuple(stride), tuple(padding), tuple(dilation)).to(x.dtype)
    return F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation))


def nm_conv2d_ref(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, weight_shape,
                  bias: torch.Tensor | None = None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """``conv2d(x, W, b)`` with W unpacked from N:M groups along input channels (NHWC rows)."""
    w = conv_weight_from_rows(nm_dense_rows_ref(values, indices, n, m), weight_shape)
    return conv2d_dense(x, w, bias, stride, padding, dilation)


def bsr_conv2d_ref(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, weight_shape,
                   bias: torch.Tensor | None = None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """``conv2d(x, W, b)`` with W the dense form of 1xN BSR buffers over ``(O, I*kh*kw)``."""
    o = weight_shape[0]
    k = int(torch.Size(weight_shape).numel()) // o
    w = bsr_dense_ref(crow, col, values, o, k).reshape(weight_shape)
    return conv2d_dense(x, w, bias, stride, padding, dilation)


def unfold_nhwc(x: torch.Tensor, kernel_size, stride, padding, dilation) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """im2col of NCHW ``x`` with each patch in NHWC order: ``((B*OH*OW, kh*kw*I), (B, OH, OW))``.

    A conv whose weight rows are ``(O, kh*kw*I)`` (input channels innermost, the order
    N:M groups run along) is then ``cols @ rows.T``; :func:`fold_rows_nchw` undoes the layout.
    """
    batch, channels, h, w = x.shape
    kh, kw = kernel_size
    oh = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    cols = F.unfold(x, (kh, kw), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    cols = cols.view(batch, channels, kh * kw, oh * ow).permute(0, 3, 2, 1)  # (B, L, kh*kw, I)
    return cols.reshape(batch * oh * ow, kh * kw * channels), (batch, oh, ow)  # no -1: batch may be 0


def fold_rows_nchw(y_rows: torch.Tensor, batch: int, oh: int, ow: int) -> torch.Tensor:
    """``(B*OH*OW, O)`` GEMM output -> contiguous NCHW ``(B, O, OH, OW)``."""
    return y_rows.view(batch, oh, ow, y_rows.shape[-1]).permute(0, 3, 1, 2).contiguous()
