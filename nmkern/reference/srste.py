"""Reference SR-STE (Zhou et al., ICLR 2021): sparse forward, refined dense backward.

forward:  w_sparse = w * mask,   mask = nm_mask(w, n, m) recomputed every step
backward: dL/dw = dL/dw_sparse + lambda_w * (1 - mask) * w
With ``lambda_w = 0`` this is the plain straight-through estimator (STE).
"""

from __future__ import annotations

import torch

from .nm_mask import nm_mask_ref

DEFAULT_LAMBDA_W = 2e-4  # the paper's and the official code's default


def srste_forward_ref(w: torch.Tensor, n: int, m: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked weight, boolean mask)."""
    mask = nm_mask_ref(w, n, m, dim)
    return w * mask, mask


def srste_backward_ref(grad: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, lambda_w: float) -> torch.Tensor:
    """Gradient for the dense weight: ``grad + lambda_w * (1 - mask) * w``."""
    return grad + lambda_w * (~mask).to(w.dtype) * w
