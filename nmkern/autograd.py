"""Autograd Functions behind the training forms of the sparse modules."""

from __future__ import annotations

import torch

from .reference.srste import DEFAULT_LAMBDA_W, srste_backward_ref, srste_forward_ref


class SRSTEFunction(torch.autograd.Function):
    """Forward: N:M-masked weight. Backward: dense gradient + ``lambda_w * (1 - mask) * w``."""

    @staticmethod
    def forward(ctx, w, n: int, m: int, dim: int, lambda_w: float):
        masked, mask = srste_forward_ref(w, n, m, dim)
        ctx.save_for_backward(w, mask)
        ctx.lambda_w = lambda_w
        return masked

    @staticmethod
    def backward(ctx, grad):
        w, mask = ctx.saved_tensors
        return srste_backward_ref(grad, w, mask, ctx.lambda_w), None, None, None, None


def srste_weight(w: torch.Tensor, n: int, m: int, dim: int = -1, lambda_w: float = DEFAULT_LAMBDA_W) -> torch.Tensor:
    """The N:M-sparse weight to use in forward, with SR-STE gradients for ``w``.

    ``lambda_w=0`` gives the plain straight-through estimator.
    """
    return SRSTEFunction.apply(w, n, m, dim % w.dim(), float(lambda_w))
