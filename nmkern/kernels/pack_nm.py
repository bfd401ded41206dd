"""General N:M packing: kept values plus bit-packed in-group indices, in one pass.

Layout: :mod:`nmkern.reference.nm_pack` (``values (rows, L)``, ``L = K*n/m``;
``indices (rows, W)`` int32, ``W = ceil(L / per_word)``, index j of a row at word
``j // per_word``, bit ``bits * (j % per_word)``). Kept slots of a group, as in
:func:`~nmkern.reference.nm_pack.kept_positions_ref`: its non-zeros, then its
lowest-index zeros while fewer than n, in ascending index order.

One program builds ``BLOCK_W`` whole index words, so no word is shared between
programs. Slot s of word w is kept value ``j = w*per_word + s`` of its row: the
t = j % n -th kept element of group j // n. Each slot re-reads its group (a group
is read n times; the data sits in L1 and packing runs once per weight) and picks
its element from the group's kept-slot prefix count.

Values move as raw bits (an integer view of the same width), so kept values (NaN
payloads, -0.0, Inf) round-trip bit for bit; dropped slots come back as +0.0, and
"non-zero" ignores the sign bit of floats.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nmkern.reference.nm_pack import index_bits, indices_per_word

from ._configs import aot_spec, launch

# Same-width integer view of each packable dtype, and the bits that make an element
# non-zero: everything but the sign bit for floats (-0.0 == 0), every bit for int8.
INT_VIEW = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
    torch.int8: (torch.int8, -1),
}
_TRITON_INT = {torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
SHORT_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
              torch.int8: "int8"}

_NO_BAD = 2**62


@triton.jit
def pack_nm_kernel(
    w_ptr,  # (rows, K) integer view of the weight
    values_ptr,  # (rows, L) same integer view
    indices_ptr,  # (rows, W) int32
    first_bad_ptr,  # (1,) int64: min flat group index (row * K/M + group) with > n non-zeros
    rows,
    K,
    n,
    L,  # kept values per row = K / M * n
    W,  # index words per row
    NONZERO_BITS: tl.constexpr,
    M: tl.constexpr,
    MP: tl.constexpr,  # next_pow2(M)
    BITS: tl.constexpr,  # index_bits(M)
    PER: tl.constexpr,  # indices_per_word(M)
    PER_P2: tl.constexpr,  # next_pow2(PER)
    BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    f = pid * BLOCK_W + tl.arange(0, BLOCK_W)  # flat word id = row * W + word
    f_ok = f < rows * W
    r = f // W
    word_in_row = f % W
    s = tl.arange(0, PER_P2)
    j = word_in_row[:, None] * PER + s[None, :]  # (BLOCK_W, PER_P2) kept-value index in the row
    slot_ok = f_ok[:, None] & (s[None, :] < PER) & (j < L)
    grp = j // n
    t = j % n
    base = r[:, None] * K + grp * M  # first element of the slot's group
    lane = tl.arange(0, MP)[None, None, :]
    lane_ok = lane < M
    ok3 = slot_ok[:, :, None] & lane_ok
    x = tl.load(w_ptr + base[:, :, None] + lane, mask=ok3, other=0)
    nz = (((x & NONZERO_BITS) != 0) & ok3).to(tl.int32)
    count = tl.sum(nz, axis=2)
    nz_before = tl.cumsum(nz, axis=2) - nz
    zeros_before = lane - nz_before
    # The group keeps all its non-zeros and its first max(n - count, 0) zeros, so a
    # lane's position among the kept slots is nz_before + min(zeros_before, zeros_kept).
    zeros_kept = tl.maximum(n - count, 0)[:, :, None]
    keep = lane_ok & ((nz != 0) | (zeros_before < zeros_kept))
    out_pos = nz_before + tl.minimum(zeros_before, zeros_kept)
    pick = keep & (out_pos == t[:, :, None])
    idx = tl.sum(tl.where(pick, lane, 0), axis=2)  # (BLOCK_W, PER_P2) in-group index
    val = tl.load(w_ptr + base + idx, mask=slot_ok)
    tl.store(values_ptr + r[:, None] * L + j, val, mask=slot_ok)
    shifted = tl.where(slot_ok, idx.to(tl.int64) << (s[None, :] * BITS).to(tl.int64), 0)
    word = tl.sum(shifted, axis=1)  # disjoint bit fields: sum == or, < 2**32
    tl.store(indices_ptr + f, word.to(tl.int32), mask=f_ok)  # wraps into int32 two's complement
    bad = slot_ok & (count > n)
    first = tl.min(tl.min(tl.where(bad, r[:, None] * (K // M) + grp, 2**62), axis=1), axis=0)
    if first < 2**62:
        tl.atomic_min(first_bad_ptr, first)


def _geometry(m: int) -> dict:
    """The constexprs fixed by m: group lanes and the index-word layout."""
    per = indices_per_word(m)
    return {"M": m, "MP": triton.next_power_of_2(m), "BITS": index_bits(m), "PER": per,
            "PER_P2": triton.next_power_of_2(per)}


def pack_nm_configs(m: int) -> list[dict]:
    """Configs of :func:`pack_nm_kernel` for groups of ``m``; the launcher runs the first.

    A program holds a ``(BLOCK_W, PER_P2, MP)`` tile: every slot of its index words
    re-reads its whole group. ``BLOCK_W = 1024 // (PER_P2 * MP)`` keeps that tile at
    1024 elements whatever m, 8 per thread at ``num_warps = 4`` (e.g. 16 words for
    m = 4: 16 slots x 4 lanes each).
    """
    geo = _geometry(m)
    return [{"BLOCK_W": max(1, 1024 // (geo["PER_P2"] * geo["MP"])), "num_warps": 4}]


def pack_nm_triton(w2: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(values, indices, first_bad)`` of contiguous ``(rows, K)`` ``w2``; identical bytes to pack_nm_ref.

    ``first_bad`` is the flat index ``row * (K // m) + group`` of the first group
    with more than n non-zeros, or -1 (values/indices are meaningless then).
    """
    rows, k = w2.shape
    geo = _geometry(m)
    kept = k // m * n
    words = triton.cdiv(kept, geo["PER"])
    int_dtype, nonzero_bits = INT_VIEW[w2.dtype]
    values = torch.empty(rows, kept, dtype=w2.dtype, device=w2.device)
    indices = torch.empty(rows, words, dtype=torch.int32, device=w2.device)
    first_bad = torch.full((1,), _NO_BAD, dtype=torch.int64, device=w2.device)
    if rows * words:
        configs = pack_nm_configs(m)
        launch(pack_nm_kernel, configs, configs[0], lambda cfg: (triton.cdiv(rows * words, cfg["BLOCK_W"]),),
               w2.view(int_dtype), values.view(int_dtype), indices, first_bad, rows, k, n, kept, words,
               NONZERO_BITS=nonzero_bits, **geo)
    bad = int(first_bad.item())
    return values, indices, (-1 if bad == _NO_BAD else bad)


def _spec(dtype: torch.dtype, n: int, m: int) -> dict:
    int_dtype, nonzero_bits = INT_VIEW[dtype]
    ty = _TRITON_INT[int_dtype]
    sig = {"w_ptr": f"*{ty}", "values_ptr": f"*{ty}", "indices_ptr": "*i32", "first_bad_ptr": "*i64",
           "rows": "i32", "K": "i32", "n": "i32", "L": "i32", "W": "i32"}
    return aot_spec(f"pack_nm_{SHORT_NAME[dtype]}_{n}of{m}", pack_nm_kernel, sig, pack_nm_configs(m)[0],
                    {"NONZERO_BITS": nonzero_bits, **_geometry(m)})


# Every index width (1, 2, 3, 4 bits) and every value width (8..64 bits).
AOT_SPECS = [
    _spec(torch.float16, 1, 2),
    _spec(torch.bfloat16, 2, 4),
    _spec(torch.float32, 2, 5),
    _spec(torch.float64, 4, 8),
    _spec(torch.int8, 8, 16),
]
