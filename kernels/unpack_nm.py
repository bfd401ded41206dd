"""Dense ``(rows, K)`` from general N:M packed values and bit-packed indices.

Layout: :mod:`nmkern.reference.nm_pack`. One program rebuilds ``BLOCK_G`` whole
groups: it reads the n kept values of each group and their ``bits``-wide in-group
indices (index j of a row at word ``j // per_word``, bit ``bits * (j % per_word)``),
then every one of the m lanes takes the value whose index names it, or zero.
Values move as raw bits (integer view of the same width), so the round trip is
exact for NaN/-0.0/Inf too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nmkern.reference.nm_pack import index_bits, indices_per_word

from .pack_nm import _TRITON_INT, INT_VIEW, SHORT_NAME

_SELECT_TILE = 2048  # BLOCK_G * MP * NP elements per program
_NUM_WARPS = 4


@triton.jit
def unpack_nm_kernel(
    values_ptr,  # (rows, L) integer view
    indices_ptr,  # (rows, W) int32
    out_ptr,  # (rows, K) integer view
    num_groups,  # rows * K / M
    groups_per_row,  # K / M
    n,
    L,  # kept values per row
    W,  # index words per row
    M: tl.constexpr,
    MP: tl.constexpr,
    NP: tl.constexpr,  # next_pow2(n)
    BITS: tl.constexpr,
    PER: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < num_groups
    r = g // groups_per_row
    t = tl.arange(0, NP)[None, :]
    j = (g % groups_per_row)[:, None] * n + t  # (BLOCK_G, NP) kept-value index in the row
    t_ok = g_ok[:, None] & (t < n)
    word = tl.load(indices_ptr + r[:, None] * W + j // PER, mask=t_ok, other=0)
    # Arithmetic shift of a negative int32 still leaves the low BITS bits right: fields end at bit <= 32.
    idx = (word >> ((j % PER) * BITS).to(tl.int32)) & ((1 << BITS) - 1)
    val = tl.load(values_ptr + r[:, None] * L + j, mask=t_ok, other=0)
    lane = tl.arange(0, MP)[None, :, None]
    hit = t_ok[:, None, :] & (idx[:, None, :] == lane)  # (BLOCK_G, MP, NP)
    dense = tl.sum(tl.where(hit, val[:, None, :], 0), axis=2)  # at most one hit per lane
    out_ok = g_ok[:, None] & (tl.arange(0, MP)[None, :] < M)
    tl.store(out_ptr + g[:, None] * M + tl.arange(0, MP)[None, :], dense.to(val.dtype), mask=out_ok)


def _config(n: int, m: int) -> dict:
    mp, np2 = triton.next_power_of_2(m), triton.next_power_of_2(n)
    return {"M": m, "MP": mp, "NP": np2, "BITS": index_bits(m), "PER": indices_per_word(m),
            "BLOCK_G": max(1, _SELECT_TILE // (mp * np2))}


def unpack_nm_triton(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Dense ``(rows, K)``, ``K = values.shape[1] // n * m``, from contiguous packed tensors."""
    rows, kept = values.shape
    groups_per_row = kept // n
    k = groups_per_row * m
    int_dtype, _ = INT_VIEW[values.dtype]
    out = torch.empty(rows, k, dtype=values.dtype, device=values.device)
    cfg = _config(n, m)
    num_groups = rows * groups_per_row
    if num_groups:
        grid = (triton.cdiv(num_groups, cfg["BLOCK_G"]),)
        unpack_nm_kernel[grid](values.view(int_dtype), indices, out.view(int_dtype), num_groups, groups_per_row, n,
                               kept, indices.shape[1], num_warps=_NUM_WARPS, **cfg)
    return out


def _spec(dtype: torch.dtype, n: int, m: int) -> dict:
    ty = _TRITON_INT[INT_VIEW[dtype][0]]
    cfg = _config(n, m)
    sig = {"values_ptr": f"*{ty}", "indices_ptr": "*i32", "out_ptr": f"*{ty}", "num_groups": "i32",
           "groups_per_row": "i32", "n": "i32", "L": "i32", "W": "i32"}
    sig.update({name: "constexpr" for name in cfg})
    return {
        "name": f"unpack_nm_{SHORT_NAME[dtype]}_{n}of{m}",
        "fn": unpack_nm_kernel,
        "signature": sig,
        "constexprs": cfg,
        "num_warps": _NUM_WARPS,
    }


AOT_SPECS = [
    _spec(torch.float16, 1, 2),
    _spec(torch.bfloat16, 2, 4),
    _spec(torch.float32, 2, 5),
    _spec(torch.float64, 4, 8),
    _spec(torch.int8, 15, 16),
]
