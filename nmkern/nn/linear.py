"""``SparseLinear``: ``nn.Linear`` with an N:M or 1xN sparse weight (see :mod:`nmkern.nn`)."""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._cpu_layout import bound_kernel
from ..dispatch import LayerOp
from ..reference.srste import DEFAULT_LAMBDA_W
from ._layer import _SparseLayer, fit_reason


class SparseLinear(_SparseLayer):
    """``nn.Linear`` with an N:M or 1xN sparse weight (groups along ``in_features``).

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        n, m: N:M pattern (``pattern="nm"``): n kept of every m consecutive inputs.
        pattern: ``"nm"`` or ``"1xn"`` (:class:`Pattern`).
        block, sparsity: 1xN block size (output channels per block) and pruned block fraction.
        backend: ``"auto"`` or a forced execution path for the packed form
            (:class:`nmkern.Backend` values: reference, triton, dense, cuda, cusparselt, cpu).
        srste, lambda_w: SR-STE gradient term in the training form (``srste=False``: plain STE).
    """

    _op = LayerOp.LINEAR

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, n: int = 2, m: int = 4,
                 pattern="nm", block: int = 4, sparsity: float = 0.5, backend="auto", srste: bool = True,
                 lambda_w: float = DEFAULT_LAMBDA_W, device=None, dtype=None):
        super().__init__()
        op = "SparseLinear"
        for name, val in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{op}: {name} must be a positive int, got {val!r}")
        self.in_features, self.out_features = in_features, out_features
        self._init_sparse(op, n, m, pattern, block, sparsity, backend, srste, lambda_w)
        reason = fit_reason(LayerOp.LINEAR, in_features, out_features, self.pattern, self.n, self.m, self.block)
        self._adopt_prototype(op, reason, nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
                              if not reason else None)

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, n: int = 2, m: int = 4, pattern="nm", block: int = 4,
                   sparsity: float = 0.5, **kw) -> "SparseLinear":
        """A training-form SparseLinear holding ``linear``'s weight and bias (copied; same dtype/device)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: expected an nn.Linear, got {type(linear).__name__}")
        # Built on meta (no init, no mask of a random weight), then given copies of the real tensors.
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, n=n, m=m, pattern=pattern,
                  block=block, sparsity=sparsity, device="meta", dtype=linear.weight.dtype, **kw)
        mod._adopt_dense(linear.weight, linear.bias)
        return mod

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the masked weight (and a copy of the bias)."""
        w = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def _check_input(self, x) -> None:
        op = "SparseLinear"
        self._check_device_dtype(op, x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{op}: input has shape {tuple(x.shape)} but in_features={self.in_features}; "
                             f"the last dimension must be {self.in_features}")

    def _gemm_rows(self, x: torch.Tensor) -> int:
        return x.numel() // self.in_features

    def _rows_call(self, x: torch.Tensor):
        """The call ``_decide`` bound for x's GEMM row count (``_fast_rows``; :meth:`_kernel_entry`,
        :meth:`_dense_entry`), or None: none bound for these rows, or the bound call steps aside for x. The
        caller then takes the checked path, which raises the usual messages."""
        k = self.in_features
        if x.dim() == 0 or x.shape[-1] != k:
            return None
        call = self._fast_rows.get(x.numel() // k)
        return None if call is None else call(x)

    def _kernel_entry(self, layout):
        """The bound call of nmkern's CPU kernel on ``layout`` (:func:`~nmkern._cpu_layout.bound_kernel`). Steps aside
        (None) for x not a contiguous CPU tensor of the layout's dtype, a bias that is not a contiguous CPU tensor of
        that dtype and out_features elements, autograd through the call, a layout no longer resident, or x holding a
        NaN / Inf (the kernel's own scan: the dense op's result then)."""
        run, k, out, dtype = bound_kernel(layout), self.in_features, self.out_features, layout.dtype
        layout_ref = weakref.ref(layout)  # a dropped layout is freed, not kept by this call

        def call(x: torch.Tensor):
            if x.dtype is not dtype or not x.is_cpu or not x.is_contiguous():
                return None
            held = layout_ref()
            if held is None or self._cpu_cache is not held:  # run reads the layout's memory: only while it is held
                return None
            bias = self.bias
            if bias is not None and (bias.dtype is not dtype or not bias.is_cpu or not bias.is_contiguous()
                                     or bias.numel() != out):
                return None  # the C call reads bias as out values of x's dtype (bias.data may have been swapped)
            if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
                return None
            y = run(x.view(-1, k), bias)
            return None if y is None else y.view(*x.shape[:-1], out)
        return call

    def _dense_entry(self, weight: torch.Tensor):
        """The bound dense call on the kept dense ``weight`` (steps aside for another dtype or device, or once the
        weight is no longer kept: it holds the weight weakly, so a dropped dense weight is freed)."""
        weight_ref, dtype = weakref.ref(weight), weight.dtype

        def call(x: torch.Tensor):
            held = weight_ref()
            if x.dtype is not dtype or not x.is_cpu or held is None or self._dense_cache is not held:
                return None
            return self._dense_op(x, held)
        return call

    def _dense_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)

    def _dense_partial(self, w: torch.Tensor):
        return functools.partial(F.linear, weight=w, bias=self.bias)  # a C-level call: no Python frame

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self._sparse_repr())
