"""``SparseConv2d``: ``nn.Conv2d`` (groups=1) with N:M groups along input channels or 1xN blocks."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import LayerOp
from ..reference.linear import conv_out_size
from ..reference.srste import DEFAULT_LAMBDA_W
from ._layer import _SparseLayer, fit_reason


def _conv_padding(op: str, padding, kernel_size, stride, dilation) -> tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' needs stride 1, got stride={stride}")
            total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
            if any(t % 2 for t in total):
                raise ValueError(f"{op}: padding='same' with kernel {kernel_size} and dilation {dilation} needs "
                                 "asymmetric padding, which the sparse conv does not support; pad the input yourself")
            return (total[0] // 2, total[1] // 2)
        raise ValueError(f"{op}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    return _pair2(op, "padding", padding, minimum=0)


def _pair2(op: str, name: str, val, minimum: int) -> tuple[int, int]:
    if isinstance(val, int) and not isinstance(val, bool):
        pair = (val, val)
    else:
        pair = tuple(val) if isinstance(val, (tuple, list)) else None
    if pair is None or len(pair) != 2 or any(isinstance(e, bool) or not isinstance(e, int) or e < minimum for e in pair):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a pair of them, got {val!r}")
    return pair


class SparseConv2d(_SparseLayer):
    """``nn.Conv2d`` (groups=1, zero padding) with N:M groups along input channels (NHWC order) or 1xN blocks.

    Same sparsity keywords as :class:`SparseLinear`. Grouped / depthwise convs are
    refused (:func:`nmkern.sparsify` leaves them dense and reports why).
    """

    _op = LayerOp.CONV2D

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, n: int = 2, m: int = 4, pattern="nm", block: int = 4,
                 sparsity: float = 0.5, backend="auto", srste: bool = True, lambda_w: float = DEFAULT_LAMBDA_W,
                 padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        op = "SparseConv2d"
        for name, val in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{op}: {name} must be a positive int, got {val!r}")
        if padding_mode != "zeros":
            raise ValueError(f"{op}: padding_mode={padding_mode!r} is not supported; only 'zeros'")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair2(op, "kernel_size", kernel_size, minimum=1)
        self.stride = _pair2(op, "stride", stride, minimum=1)
        self.dilation = _pair2(op, "dilation", dilation, minimum=1)
        self.padding = _conv_padding(op, padding, self.kernel_size, self.stride, self.dilation)
        self._init_sparse(op, n, m, pattern, block, sparsity, backend, srste, lambda_w)
        reason = fit_reason(LayerOp.CONV2D, in_channels, out_channels, self.pattern, self.n, self.m, self.block, groups)
        self._adopt_prototype(op, reason, None if reason else nn.Conv2d(
            in_channels, out_channels, self.kernel_size, self.stride, self.padding, self.dilation, bias=bias,
            device=device, dtype=dtype))

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_channels, self.in_channels, *self.kernel_size))

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, n: int = 2, m: int = 4, pattern="nm", block: int = 4,
                   sparsity: float = 0.5, **kw) -> "SparseConv2d":
        """A training-form SparseConv2d holding ``conv``'s weight and bias (copied; same dtype/device)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense: expected an nn.Conv2d, got {type(conv).__name__}")
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, n=n, m=m, pattern=pattern, block=block, sparsity=sparsity,
                  padding_mode=conv.padding_mode, device="meta", dtype=conv.weight.dtype, **kw)
        mod._adopt_dense(conv.weight, conv.bias)
        return mod

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the masked weight (and a copy of the bias)."""
        w = self.dense_weight()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def _dense_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)

    def _dense_partial(self, w: torch.Tensor):
        return functools.partial(F.conv2d, weight=w, bias=self.bias, stride=self.stride, padding=self.padding,
                                 dilation=self.dilation)

    def _gemm_rows(self, x: torch.Tensor) -> int:
        oh, ow = (conv_out_size(x.shape[2 + d], self.kernel_size[d], self.stride[d], self.padding[d], self.dilation[d])
                  for d in (0, 1))
        return x.shape[0] * oh * ow

    def _check_input(self, x) -> None:
        op = "SparseConv2d"
        self._check_device_dtype(op, x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"{op}: input has shape {tuple(x.shape)}; expected (batch, {self.in_channels}, H, W) "
                             f"or ({self.in_channels}, H, W)")
        for d, name in ((0, "height"), (1, "width")):
            size = x.shape[-2 + d]
            span = self.dilation[d] * (self.kernel_size[d] - 1) + 1
            if size + 2 * self.padding[d] < span:
                raise ValueError(f"{op}: input {name} {size} (padded {size + 2 * self.padding[d]}) is smaller than the "
                                 f"dilated kernel ({span})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            self._check_input(x)
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                + self._sparse_repr())
