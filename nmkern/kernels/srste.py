"""SR-STE forward and backward, each one fused pass over the weight.

Semantics: :mod:`nmkern.reference.srste`.

forward:  out = w where w is among the n largest |w| of its group of m, else 0
backward: dw  = grad + lambda_w * (1 - mask) * w, the mask recomputed from w

The backward recomputes the mask instead of saving it: ranking m <= 16 values is a
handful of compares per element, cheaper than writing and re-reading a mask tensor
(one byte per weight, i.e. 50% extra traffic on an fp16 weight).

Ranking: element i of a group is kept when ``#{j: |w_j| > |w_i|} + #{j < i: |w_j| ==
|w_i|} < n`` - the position a stable descending sort gives it, so ties go to the lower
index exactly as in the reference. The rivals j are walked one column at a time
(static loop over m), so a program holds only (BLOCK_G, MP) values plus a rank. The rank
counts in fp32 (exact up to 2**24): an int32 sum of compare results let LLVM pack the
compares into bit vectors for popcount, built through an 8-byte stack slot (fp32 backward,
m = 6, under Triton 3.3, 3.4, 3.7 and 3.8; fp32 m = 16 also spilled on sm_90 under 3.6);
float adds are never reassociated that way.

Rounding (why the backward casts between steps): torch evaluates the reference as
three ops, ``(lambda_w * notmask)`` then ``* w`` then ``grad +``, each rounded to the
weight dtype (fp16/bf16 through fp32 arithmetic on the CPU). The kernel rounds after
each of the same three steps, so its result is bit-identical to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._configs import aot_spec, launch

# Compile options of both kernels, in the launchers and AOT_SPECS alike: no FMA contraction,
# so the backward rounds after each of torch's three ops (see the module docstring).
_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _srste_keep(w_ptr, offs_row, g_ok, ok, lane, n, M: tl.constexpr):
    """Bool (BLOCK_G, MP): which lanes of each group are among the n largest |w|."""
    w = tl.load(w_ptr + offs_row[:, None] + lane[None, :], mask=ok, other=0)
    mag = tl.abs(w)
    rank = tl.zeros(mag.shape, dtype=tl.float32)  # fp32, not int32: see the module docstring
    for j in tl.static_range(M):
        # (BLOCK_G, 1) loaded straight into the 2-D layout: no layout conversion through shared memory
        rival = tl.abs(tl.load(w_ptr + offs_row[:, None] + j, mask=g_ok[:, None], other=0))
        beats = (rival > mag) | ((rival == mag) & (j < lane[None, :]))
        rank += tl.where(beats, 1.0, 0.0)
    return w, rank < n


@triton.jit
def srste_forward_kernel(
    w_ptr,  # contiguous, num_groups * M elements
    out_ptr,  # same shape and dtype: the masked weight
    num_groups,
    n,
    M: tl.constexpr,
    MP: tl.constexpr,  # next power of two >= M
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    lane = tl.arange(0, MP)
    ok = (g[:, None] < num_groups) & (lane[None, :] < M)
    offs_row = g * M
    w, keep = _srste_keep(w_ptr, offs_row, g < num_groups, ok, lane, n, M)
    tl.store(out_ptr + offs_row[:, None] + lane[None, :], tl.where(keep, w, tl.zeros_like(w)), mask=ok)


@triton.jit
def srste_backward_kernel(
    grad_ptr,  # gradient w.r.t. the masked weight, contiguous like w
    w_ptr,
    out_ptr,  # gradient w.r.t. the dense weight
    num_groups,
    n,
    lambda_w,  # fp32 scalar
    M: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    lane = tl.arange(0, MP)
    ok = (g[:, None] < num_groups) & (lane[None, :] < M)
    offs_row = g * M
    offs = offs_row[:, None] + lane[None, :]
    w, keep = _srste_keep(w_ptr, offs_row, g < num_groups, ok, lane, n, M)
    grad = tl.load(grad_ptr + offs, mask=ok, other=0)
    # Round to the weight dtype after each step, as torch does with three separate ops.
    lam = _round_to(tl.where(keep, 0.0, lambda_w), w.dtype)
    decay = _round_to(lam * w.to(tl.float32), w.dtype)
    out = _round_to(grad.to(tl.float32) + decay, w.dtype).to(w.dtype)
    tl.store(out_ptr + offs, out, mask=ok)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (round to nearest even), returned as fp32.

    bf16 is rounded with integer ops because Triton's interpreter truncates on an
    fp32 -> bf16 cast (checked: it disagrees with torch on ~10% of random values),
    while CUDA rounds to nearest even; the integer form is exact on both.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


def srste_configs() -> list[dict]:
    """Configs of :func:`srste_forward_kernel` and :func:`srste_backward_kernel`; the launchers run the first.

    ``BLOCK_G = 128`` groups per program at ``num_warps = 4``, whatever m: the one
    tile size that compiled with no stack for every m tried (2..16, fp16/bf16/fp32)
    on sm_80 and sm_90; 512 or 1024 elements per program independent of m left
    8-16 B of stack on sm_90 for some m (e.g. fp32 m=6, fp16 m=4). With the fp32
    rank, every m in 2..16, forward and backward, fp16/bf16/fp32, is spill-free on
    sm_80 and sm_90 under Triton 3.9 (the int32 rank left 16-24 B of stack for fp16/bf16
    m = 9..15 on sm_90); AOT_SPECS' sample of them is checked under Triton 3.2-3.9.
    """
    return [{"BLOCK_G": 128, "num_warps": 4}]


def _launch(kernel, num_groups: int, *args, m: int) -> None:
    configs = srste_configs()
    launch(kernel, configs, configs[0], lambda cfg: (triton.cdiv(num_groups, cfg["BLOCK_G"]),), *args,
           M=m, MP=triton.next_power_of_2(m), **_OPTIONS)


def srste_forward_triton(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Masked copy of contiguous ``w`` grouped in runs of m along its flat layout.

    The caller (:func:`nmkern.autograd.srste_weight`) validated dtype, m | size and n.
    """
    out = torch.empty_like(w)
    num_groups = w.numel() // m
    if num_groups:
        _launch(srste_forward_kernel, num_groups, w, out, num_groups, n, m=m)
    return out


def srste_backward_triton(grad: torch.Tensor, w: torch.Tensor, n: int, m: int, lambda_w: float) -> torch.Tensor:
    """``grad + lambda_w * (1 - mask(w)) * w`` for contiguous ``grad`` and ``w`` of one shape and dtype."""
    out = torch.empty_like(w)
    num_groups = w.numel() // m
    if num_groups:
        _launch(srste_backward_kernel, num_groups, grad, w, out, num_groups, n, float(lambda_w), m=m)
    return out


def _spec(name: str, kernel, signature: dict, m: int) -> dict:
    return aot_spec(name, kernel, signature, srste_configs()[0], {"M": m, "MP": triton.next_power_of_2(m)}, **_OPTIONS)


def _spec_forward(dtype: str, n: int, m: int) -> dict:
    return _spec(f"srste_forward_{dtype}_{n}of{m}", srste_forward_kernel,
                 {"w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "num_groups": "i64", "n": "i32"}, m)


def _spec_backward(dtype: str, n: int, m: int) -> dict:
    return _spec(f"srste_backward_{dtype}_{n}of{m}", srste_backward_kernel,
                 {"grad_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "num_groups": "i64",
                  "n": "i32", "lambda_w": "fp32"}, m)


# Representative configs: 2:4 in fp16/bf16 (the tensor-core training case), the widest
# group m = 16 (DominoSearch schemes), a non-power-of-two m, and fp32 weights. fp64
# weights take the reference: lambda_w arrives as an fp32 scalar, too coarse for them.
AOT_SPECS = [
    _spec_forward("fp16", 2, 4),
    _spec_forward("bf16", 2, 4),
    _spec_forward("fp32", 4, 16),
    _spec_backward("fp16", 2, 4),
    _spec_backward("bf16", 8, 16),
    _spec_backward("fp32", 1, 16),
    _spec_backward("fp32", 2, 6),
]
