"""Dense ``(rows, K)`` from general N:M packed values and bit-packed indices.

Layout: :mod:`nmkern.reference.nm_pack`. One program rebuilds ``BLOCK_G`` whole
groups: it reads the n kept values of each group and their ``bits``-wide in-group
indices (index j of a row at word ``j // per_word``, bit ``bits * (j % per_word)``),
then every one of the m lanes takes the value whose index names it, or zero.
Values move as raw bits (integer view of the same width), so kept values (NaN,
-0.0, Inf) come back bit for bit; dropped slots come back as +0.0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nmkern.reference.nm_pack import index_bits, indices_per_word

from ._configs import aot_spec, launch
from .pack_nm import _TRITON_INT, INT_VIEW, SHORT_NAME


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
    g0 = tl.program_id(0).to(tl.int64) * BLOCK_G
    g = g0 + tl.arange(0, BLOCK_G)
    g_ok = g < num_groups
    # Row and in-row group of each g with one 64-bit division per program, the rest in 32 bits
    # (c < groups_per_row + BLOCK_G < 2**31, the launcher checks): 64-bit division is a ptxas
    # subroutine, and one per group spilled on sm_80 under Triton 3.2-3.4.
    r0 = g0 // groups_per_row
    c = (g0 - r0 * groups_per_row).to(tl.int32) + tl.arange(0, BLOCK_G)
    dr = c // groups_per_row
    r = r0 + dr
    t = tl.arange(0, NP)[None, :]
    j = (c - dr * groups_per_row)[:, None] * n + t  # (BLOCK_G, NP) kept-value index in the row
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


def _geometry(n: int, m: int) -> dict:
    """The constexprs fixed by n and m: lanes and the index-word layout."""
    return {"M": m, "MP": triton.next_power_of_2(m), "NP": triton.next_power_of_2(n), "BITS": index_bits(m),
            "PER": indices_per_word(m)}


def unpack_nm_configs(n: int, m: int) -> list[dict]:
    """Configs of :func:`unpack_nm_kernel` for n:m; the launcher runs the first.

    Each group's m lanes test its n kept indices, a ``(BLOCK_G, MP, NP)`` tile.
    ``BLOCK_G = 2048 // (MP * NP)`` keeps it at 2048 elements whatever n:m,
    16 per thread at ``num_warps = 4`` (256 groups for 2:4, 8 for 15:16).
    """
    geo = _geometry(n, m)
    return [{"BLOCK_G": max(1, 2048 // (geo["MP"] * geo["NP"])), "num_warps": 4}]


def unpack_nm_triton(values: torch.Tensor, indices: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Dense ``(rows, K)``, ``K = values.shape[1] // n * m``, from contiguous packed tensors."""
    rows, kept = values.shape
    groups_per_row = kept // n
    k = groups_per_row * m
    int_dtype, _ = INT_VIEW[values.dtype]
    out = torch.empty(rows, k, dtype=values.dtype, device=values.device)
    num_groups = rows * groups_per_row
    if num_groups:
        configs = unpack_nm_configs(n, m)
        limit = 2**31 - 1 - max(c["BLOCK_G"] for c in configs)  # the kernel's in-row group index is int32
        if groups_per_row > limit:
            raise ValueError(f"unpack_nm: {groups_per_row} groups per row; the Triton kernel takes at most {limit}")
        launch(unpack_nm_kernel, configs, configs[0], lambda cfg: (triton.cdiv(num_groups, cfg["BLOCK_G"]),),
               values.view(int_dtype), indices, out.view(int_dtype), num_groups, groups_per_row, n,
               kept, indices.shape[1], **_geometry(n, m))
    return out


def _spec(dtype: torch.dtype, n: int, m: int) -> dict:
    ty = _TRITON_INT[INT_VIEW[dtype][0]]
    sig = {"values_ptr": f"*{ty}", "indices_ptr": "*i32", "out_ptr": f"*{ty}", "num_groups": "i32",
           "groups_per_row": "i32", "n": "i32", "L": "i32", "W": "i32"}
    return aot_spec(f"unpack_nm_{SHORT_NAME[dtype]}_{n}of{m}", unpack_nm_kernel, sig, unpack_nm_configs(n, m)[0],
                    _geometry(n, m))


AOT_SPECS = [
    _spec(torch.float16, 1, 2),
    _spec(torch.bfloat16, 2, 4),
    _spec(torch.float32, 2, 5),
    _spec(torch.float64, 4, 8),
    _spec(torch.int8, 15, 16),
]
