"""Which N:M or 1xN pattern a weight tensor already satisfies (what ``nmkern inspect`` reports)."""

from __future__ import annotations

import torch

CANDIDATE_M = (2, 4, 8, 16)
CANDIDATE_BLOCKS = (32, 16, 8, 4, 2)


def group_dim(t: torch.Tensor) -> int:
    """Linear weights group along in_features (dim 1 == -1), conv weights along input channels (dim 1)."""
    return 1


def detect_nm(t: torch.Tensor) -> tuple[int, int] | None:
    """The sparsest N:M pattern ``t`` satisfies along its group dim (smallest m among equals), or None."""
    x = t.movedim(group_dim(t), -1)
    best = None
    for m in CANDIDATE_M:
        if x.shape[-1] % m:
            continue
        n = int((x != 0).reshape(-1, m).sum(-1).max())
        if n >= m:
            continue
        n = max(n, 1)
        if best is None or n / m < best[0] / best[1]:
            best = (n, m)
    return best


def detect_1xn(t: torch.Tensor) -> tuple[int, float] | None:
    """Largest block size N whose blocks (N out-channels x 1 in-channel x kernel) are all-zero or all-non-zero."""
    o = t.shape[0]
    nz = (t != 0).reshape(o, t.shape[1], -1)
    for n in CANDIDATE_BLOCKS:
        if o % n or n > o:
            continue
        blocks = nz.reshape(o // n, n, nz.shape[1], nz.shape[2])
        any_nz = blocks.any(dim=(1, 3))
        all_nz = blocks.all(dim=(1, 3))
        zero_blocks = ~any_nz
        if bool((zero_blocks | all_nz).all()) and bool(zero_blocks.any()):
            return n, float(zero_blocks.float().mean())
    return None


def describe_tensor(name: str, t: torch.Tensor) -> dict:
    """``{name, shape, dtype, sparsity, pattern[, block_sparsity]}``; pattern is 'n:m', '1xN', 'unstructured',
    'dense', or '-' for tensors that are not weights (biases, integer buffers, empty tensors)."""
    info = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "pattern": "dense"}
    if t.numel():
        info["sparsity"] = round(1.0 - float((t != 0).float().mean()), 6)
    if t.dim() < 2 or not t.is_floating_point() or t.numel() == 0:
        info["pattern"] = "-"
        return info
    # 1xN first: a block-sparse weight often satisfies some N:M pattern by chance, while a
    # random N:M weight practically never has uniform N x 1 blocks.
    blk = detect_1xn(t)
    if blk is not None:
        info["pattern"] = f"1x{blk[0]}"
        info["block_sparsity"] = round(blk[1], 6)
        return info
    nm = detect_nm(t)
    if nm is not None:
        info["pattern"] = f"{nm[0]}:{nm[1]}"
        return info
    if info.get("sparsity", 0) > 0:
        info["pattern"] = "unstructured"
    return info


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> list[dict]:
    """:func:`describe_tensor` of every tensor, in order."""
    return [describe_tensor(k, t) for k, t in state_dict.items()]


__all__ = ["describe_state_dict", "describe_tensor", "detect_1xn", "detect_nm", "group_dim"]
