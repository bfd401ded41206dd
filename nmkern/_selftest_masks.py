"""Exact checks of the mask and pack ops for :func:`nmkern.selftest`.

The reference ops are checked against statements of the formats written here (the ``n``
largest ``|w|`` of every ``m`` by ``torch.topk``, the packed N:M layout, torch's CUTLASS 2:4
converter, the 1xN block rule); the Triton and CUDA ones bit for bit (``!=``) against the
reference ops. Inputs are random normal (ties, possible in 16 bits, go to the lower index as documented).
"""

from __future__ import annotations

import torch

from ._selftest_checks import Check, Pat, dtype_name, run_exact


def _w(shape, dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def topk_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The ``n`` largest ``|w|`` of every ``m`` consecutive entries along the last dim, ties to the lower index."""
    groups = w.abs().double().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices  # equal |w|: index order kept
    keep.scatter_(1, order[:, :n], True)
    return keep.reshape(w.shape)


def packed_oracle(wm: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the documented N:M layout of a 2-D ``wm`` (``nmkern.NMPacked``): kept values in
    index order; in-group indices at ``ceil(log2 m)`` bits, LSB first, each row starting a new int32 word."""
    rows, k = wm.shape
    values = wm[keep].reshape(rows, k * n // m)
    pos = torch.arange(k).remainder(m).expand(rows, k)[keep].reshape(rows, -1).long()
    bits = max(1, (m - 1).bit_length())
    per_word = 32 // bits
    words = -(-pos.shape[1] // per_word)
    pos = torch.nn.functional.pad(pos, (0, words * per_word - pos.shape[1])).reshape(rows, words, per_word)
    packed = (pos << (bits * torch.arange(per_word))).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # the int32 bit pattern
    return values, packed.to(torch.int32)


def _nm_property(w: torch.Tensor, pat: Pat) -> str:
    from .functional import apply_nm, nm_mask, pack_nm, unpack_nm

    keep = topk_mask(w, pat.n, pat.m)
    mask = nm_mask(w, pat.n, pat.m, backend="reference")
    if not torch.equal(mask, keep):
        return f"nm_mask keeps other entries than the {pat.n} largest |w| of every {pat.m}"
    wm = apply_nm(w, pat.n, pat.m, backend="reference")
    if not torch.equal(wm, torch.where(keep, w, torch.zeros_like(w))):
        return "apply_nm differs from w where the mask keeps it, 0 elsewhere"
    packed = pack_nm(wm, pat.n, pat.m, backend="reference")
    values, indices = packed_oracle(wm, keep, pat.n, pat.m)
    if not (torch.equal(packed.values, values) and torch.equal(packed.indices, indices)):
        return "pack_nm values/indices differ from the documented N:M layout"
    if not torch.equal(unpack_nm(packed, backend="reference"), wm):
        return "unpack_nm(pack_nm(w)) is not w"
    return ""


def _semi24_property(w: torch.Tensor) -> str:
    from .functional import apply_nm, compress_24, decompress_24

    w24 = apply_nm(w, 2, 4, backend="reference")
    values, meta = compress_24(w24, backend="reference")
    try:  # torch's own converter (private; present since torch 2.1): the layout's independent statement
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass
    except ImportError:
        sparse_semi_structured_from_dense_cutlass = None
    if sparse_semi_structured_from_dense_cutlass is not None:
        t_values, t_meta = sparse_semi_structured_from_dense_cutlass(w24)
        if not (torch.equal(values, t_values) and torch.equal(meta, t_meta.view(torch.int16))):
            return "compress_24 differs from torch's CUTLASS converter (sparse_semi_structured_from_dense_cutlass)"
    if not torch.equal(decompress_24(values, meta, backend="reference"), w24):
        return "decompress_24(compress_24(w)) is not w"
    return ""


def _block_property(w: torch.Tensor, pat: Pat) -> str:
    from .functional import block_mask_1xn, to_bsr_1xn

    keep = block_mask_1xn(w, pat.block, pat.sparsity, backend="reference")
    out_f, in_f = w.shape[:2]
    blocks = keep.reshape(out_f // pat.block, pat.block, in_f, -1)  # a block: `block` outputs x 1 input x the kernel
    if not bool((blocks == blocks[:, :1, :, :1]).all()):
        return f"block_mask_1xn is not constant over blocks of {pat.block} output channels x 1 input channel"
    kept = blocks[:, 0, :, 0]
    dropped = kept.numel() - int(kept.sum())
    if dropped != int(pat.sparsity * kept.numel()):
        return f"block_mask_1xn dropped {dropped} of {kept.numel()} blocks, expected floor({pat.sparsity} x blocks)"
    l1 = w.abs().double().reshape(out_f // pat.block, pat.block, in_f, -1).sum((1, 3))
    if dropped and bool(kept.any()) and float(l1[~kept].max()) > float(l1[kept].min()):
        return "block_mask_1xn dropped a block with a larger L1 norm than a kept one"
    wm = w * keep
    if not torch.equal(to_bsr_1xn(wm, pat.block).to_dense().reshape(w.shape), wm):
        return "to_bsr_1xn(w).to_dense() is not w"
    return ""


def reference_mask_checks(quick: bool) -> list[Check]:
    """The reference mask / pack ops (on the CPU) against the formats' statements."""
    out = []
    nm = [Pat(2, 4), Pat(1, 8), Pat(3, 16)] if quick else [Pat(2, 4), Pat(1, 4), Pat(1, 8), Pat(3, 8), Pat(3, 16)]
    for i, pat in enumerate(nm):
        for dtype in (torch.float32, torch.bfloat16):
            w = _w((12, 48), dtype, seed=100 + i)
            out.append(run_exact("nm_mask/apply_nm/pack_nm/unpack_nm", "reference",
                                 {"w": [12, 48], "pattern": str(pat)}, dtype, lambda w=w, pat=pat: _nm_property(w, pat)))
    for dtype in (torch.float16, torch.bfloat16):
        for shape in ((32, 64), (64, 96)):
            w = _w(shape, dtype, seed=200 + shape[1])
            out.append(run_exact("compress_24/decompress_24", "reference", {"w": list(shape), "pattern": "2:4"}, dtype,
                                 lambda w=w: _semi24_property(w)))
    for shape, pat in (((16, 40), Pat(block=4, sparsity=0.5)), ((24, 8, 3, 3), Pat(block=8, sparsity=0.75))):
        w = _w(shape, torch.float32, seed=300 + shape[0])
        out.append(run_exact("block_mask_1xn/to_bsr_1xn", "reference", {"w": list(shape), "pattern": str(pat)},
                             torch.float32, lambda w=w, pat=pat: _block_property(w, pat)))
    return out


def triton_mask_checks(device: str, quick: bool) -> list[Check]:
    """The Triton mask / pack kernels bit for bit against the reference ops."""
    from . import functional as fn

    out = []

    def both(op: str, shape: dict, dtype: torch.dtype, call) -> None:
        out.append(run_exact(op, "triton", shape, dtype, lambda: (call("triton"), call("reference"))))

    nm_cases = [((12, 48), Pat(2, 4)), ((5, 40), Pat(1, 8))] + ([] if quick else [((33, 96), Pat(3, 16))])
    for (shape, pat), dtype in zip(nm_cases, (torch.float32, torch.bfloat16, torch.float16)):
        w = _w(shape, dtype, seed=400 + shape[1], device=device)
        wm = fn.apply_nm(w, pat.n, pat.m, backend="reference")
        desc = {"w": list(shape), "pattern": str(pat)}
        both("nm_mask", desc, dtype, lambda b, w=w, pat=pat: fn.nm_mask(w, pat.n, pat.m, backend=b))
        both("apply_nm", desc, dtype, lambda b, w=w, pat=pat: fn.apply_nm(w, pat.n, pat.m, backend=b))
        both("pack_nm", desc, dtype,
             lambda b, wm=wm, pat=pat: tuple(getattr(fn.pack_nm(wm, pat.n, pat.m, backend=b), a)
                                             for a in ("values", "indices")))
        packed = fn.pack_nm(wm, pat.n, pat.m, backend="reference")
        both("unpack_nm", desc, dtype, lambda b, p=packed: fn.unpack_nm(p, backend=b))
    for dtype in (torch.float16, torch.bfloat16):
        w24 = fn.apply_nm(_w((32, 96), dtype, seed=500, device=device), 2, 4, backend="reference")
        desc = {"w": [32, 96], "pattern": "2:4"}
        both("compress_24", desc, dtype, lambda b, w=w24: fn.compress_24(w, backend=b))
        values, meta = fn.compress_24(w24, backend="reference")
        both("decompress_24", desc, dtype, lambda b, v=values, mt=meta: fn.decompress_24(v, mt, backend=b))
    for shape, pat in (((16, 40), Pat(block=4, sparsity=0.5)), ((16, 4, 3, 3), Pat(block=4, sparsity=0.75))):
        w = _w(shape, torch.float32, seed=600 + len(shape), device=device)
        both("block_mask_1xn", {"w": list(shape), "pattern": str(pat)}, torch.float32,
             lambda b, w=w, pat=pat: fn.block_mask_1xn(w, pat.block, pat.sparsity, backend=b))
    return out


def cuda_mask_checks() -> list[Check]:
    """nmkern._cuda.prune_compress_24 bit for bit against compress_24(apply_nm(w, 2, 4)) (reference)."""
    from . import _cuda
    from .functional import apply_nm, compress_24

    out = []
    for dtype in (torch.float16, torch.bfloat16):
        for shape in ((32, 32), (96, 160)):
            w = _w(shape, dtype, seed=700 + shape[1])

            def compute(w=w):
                expected = compress_24(apply_nm(w, 2, 4, backend="reference"), backend="reference")
                return tuple(t.cpu() for t in _cuda.prune_compress_24(w.cuda())), expected
            out.append(run_exact("prune_compress_24", "cuda", {"w": list(shape), "pattern": "2:4"}, dtype, compute))
    return out


__all__ = ["cuda_mask_checks", "dtype_name", "packed_oracle", "reference_mask_checks", "topk_mask",
           "triton_mask_checks"]
