"""Autograd Functions behind the training forms of the sparse modules.

SR-STE (Zhou et al., ICLR 2021): the forward uses the N:M-masked weight, the mask
recomputed from the current dense weight every call; the backward passes the dense
gradient plus ``lambda_w * (1 - mask) * w``. Because the mask is a pure function of
the weight, replicas that hold the same weights (DistributedDataParallel) compute the
same mask with no communication.

Backends: ``reference`` (pure torch; saves the boolean mask for the backward),
``cpu`` (the reference with the native CPU mask, csrc/cpu/nm_mask.cpp) and
``triton`` (one fused pass each way; the backward recomputes the mask from the saved
weight, see :mod:`nmkern.kernels.srste`).
"""

from __future__ import annotations

import math

import torch

from . import _validate as v
from .backend import Backend, parse_backend
from ._cpu_nm_pack import nm_mask_rows, resolve_path
from .dispatch import TRITON_DTYPES
from .reference.srste import DEFAULT_LAMBDA_W, srste_backward_ref, srste_forward_ref

_OP = "srste_weight"


def _kernels():
    try:
        from .kernels import srste as kernel
    except ImportError as e:  # pragma: no cover - triton missing
        raise ImportError(f"nmkern: the triton backend needs the 'triton' package ({e}); use backend='reference'") from e
    return kernel


class SRSTEFunction(torch.autograd.Function):
    """Forward: N:M-masked weight. Backward: dense gradient + ``lambda_w * (1 - mask) * w``.

    ``apply(w, n, m, dim, lambda_w, backend)`` with ``backend`` a concrete
    :class:`~nmkern.Backend` (REFERENCE, CPU or TRITON); :func:`srste_weight` is the
    validated entry point.
    """

    @staticmethod
    def forward(ctx, w, n: int, m: int, dim: int, lambda_w: float, backend: Backend = Backend.REFERENCE):
        ctx.n, ctx.m, ctx.dim, ctx.lambda_w, ctx.backend = n, m, dim, lambda_w, backend
        if backend is Backend.TRITON:
            w_last = w.movedim(dim, -1).contiguous()
            ctx.save_for_backward(w_last)
            masked = _kernels().srste_forward_triton(w_last, n, m)
            return masked.movedim(-1, dim).contiguous()
        if backend is Backend.CPU:  # the native mask; the rest is the reference's
            x = w.movedim(dim, -1)
            mask = nm_mask_rows(x.detach().reshape(-1, x.shape[-1]), n, m).reshape(x.shape).movedim(-1, dim)
            masked = w * mask
        else:
            masked, mask = srste_forward_ref(w, n, m, dim)
        ctx.save_for_backward(w, mask)
        return masked

    @staticmethod
    def backward(ctx, grad):
        if ctx.backend is Backend.TRITON:
            (w_last,) = ctx.saved_tensors
            grad_last = grad.movedim(ctx.dim, -1).contiguous()
            grad_w = _kernels().srste_backward_triton(grad_last, w_last, ctx.n, ctx.m, ctx.lambda_w)
            grad_w = grad_w.movedim(-1, ctx.dim).contiguous()
        else:
            w, mask = ctx.saved_tensors
            grad_w = srste_backward_ref(grad, w, mask, ctx.lambda_w)
        return grad_w, None, None, None, None, None


def check_lambda_w(op: str, lambda_w) -> float:
    if isinstance(lambda_w, bool) or not isinstance(lambda_w, (int, float)):
        raise TypeError(f"{op}: lambda_w must be a float >= 0, got {type(lambda_w).__name__}")
    lambda_w = float(lambda_w)
    if not math.isfinite(lambda_w) or lambda_w < 0:
        raise ValueError(
            f"{op}: lambda_w={lambda_w} must be a finite float >= 0 "
            f"(SR-STE's default is {DEFAULT_LAMBDA_W}; 0 gives the plain straight-through estimator)"
        )
    return lambda_w


def srste_weight(
    w: torch.Tensor, n: int, m: int, dim: int = -1, lambda_w: float = DEFAULT_LAMBDA_W, *, backend="auto"
) -> torch.Tensor:
    """The N:M-sparse weight to use in forward, with SR-STE gradients for ``w``.

    Keeps the n largest |w| of every m consecutive elements along ``dim`` (ties to the
    lower index; Linear weights group along ``in_features``, ``dim=-1``; conv weights
    along input channels, ``dim=1``). The gradient reaching ``w`` is the dense gradient
    of the masked weight plus ``lambda_w * (1 - mask) * w``; ``lambda_w=0`` gives the
    plain straight-through estimator.

    ``backend``: ``"auto"`` (Triton on CUDA and under ``TRITON_INTERPRET=1``, else the native
    CPU mask for fp32 / bf16 / fp16 CPU weights, else the torch reference), ``"reference"``,
    ``"cpu"`` or ``"triton"``. Weights are not checked for
    NaN/Inf here (that would cost a device sync every step); a NaN weight gives an
    unspecified mask in its group.
    """
    v.check_tensor(_OP, "w", w, v.FLOAT_DTYPES)
    n, m = v.check_nm(_OP, n, m)
    dim = v.check_group_dim(_OP, w, dim, m)
    lambda_w = check_lambda_w(_OP, lambda_w)
    b = resolve_path(_OP, backend, w)
    if b is Backend.TRITON and w.dtype not in TRITON_DTYPES:
        if parse_backend(_OP, backend) is Backend.TRITON:
            raise TypeError(
                f"{_OP}: the triton backend takes fp16, bf16 or fp32 weights, got {str(w.dtype).replace('torch.', '')}; "
                "use backend='reference' (or 'auto') for fp64"
            )
        b = Backend.REFERENCE  # auto: fp64 goes to the reference (lambda_w reaches the kernel as fp32)
    return SRSTEFunction.apply(w, n, m, dim, lambda_w, b)
