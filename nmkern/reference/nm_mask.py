"""Reference N:M masks: the n largest |w| of each group of m consecutive elements.

Ties go to the lower index: a stable descending sort keeps equal magnitudes in
index order, so the first n positions of the sorted group are the kept ones.
"""

from __future__ import annotations

import torch


def nm_mask_ref(w: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask, same shape as ``w``: exactly n True per group of m along ``dim``."""
    x = w.movedim(dim, -1)
    groups = x.abs().reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=w.device)
    keep.scatter_(1, order, True)
    return keep.reshape(x.shape).movedim(-1, dim)


def apply_nm_ref(w: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """``w`` with all but the n largest |w| of each group of m set to zero."""
    return torch.where(nm_mask_ref(w, n, m, dim), w, torch.zeros((), dtype=w.dtype, device=w.device))
