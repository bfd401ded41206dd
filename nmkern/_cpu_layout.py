"""The CPU kernels' weight layout built straight from a packed layer's buffers, and decoded back.

A packed layer that runs the CPU kernel keeps one resident weight form (issue #14, item 6): the
CPU layout. These helpers make that lossless both ways without a dense temporary:

* :func:`layout_from_nm_packed`: the N:M row-tile layout from ``packed_values`` / ``packed_indices``
  (slot for slot: the tile's slot j of row r is packed slot j of row r, so the packed values come back
  exactly, kept zeros included, by :func:`nm_values_from_layout`, and ``packed_indices`` by
  :func:`nm_indices_from_layout`);
* :func:`layout_from_bsr`: the 1xN layout sharing the layer's ``bsr_values`` and ``bsr_crow`` storage
  (only the column indices are narrowed to uint16 when K allows);
* :func:`decode_rows`: dense GEMM rows ``[row0, row1)`` of a layout, for the dense path of a layer whose
  resident form is the CPU layout (a slice at a time, into a reused buffer: no dense copy kept);
* :func:`bound_kernel`: the layout's kernel call for a packed layer's hot path.
"""

from __future__ import annotations

import torch

from . import _cpu as cpu
from .reference.cpu_layouts import INDEX_PAD_BYTES, TILE_ROWS, UINT16_MAX_K
from .reference.nm_pack import index_bits, indices_per_word
from .spec import Pattern


def layout_from_nm_packed(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, k: int) -> cpu.CpuLinear:
    """The N:M row-tile layout of the packed rows ``values (O, J)`` / ``indices`` (int32 words) of an ``(O, k)``
    weight, in the values' dtype (one of ``cpu.KERNEL_DTYPES``): csrc/cpu/nm_tiles.cpp, equal to
    :func:`nmkern.reference.cpu_layouts.nm_layout_from_packed_ref` (tests/test_cpu_nm_pack.py)."""
    op = "nmkern cpu layout_from_nm_packed"
    lib = cpu._require(op)
    values, indices = values.contiguous(), indices.contiguous()
    rows, slots = values.shape
    tiles = -(-rows // TILE_ROWS)
    tile_values = torch.empty(tiles * slots * TILE_ROWS, dtype=values.dtype)
    index = torch.empty(tiles * slots * index_bits(m) + INDEX_PAD_BYTES, dtype=torch.uint8)
    if rows == 0:  # no tile: the C side takes at least one row
        return cpu.CpuLinear(Pattern.NM, n, m, 0, rows, k, {"values": tile_values, "index": index.zero_()})
    rc = lib.nmkern_nm_tiles_from_packed(cpu._ptr(values), cpu._ptr(indices), values.element_size(), rows, k, n, m,
                                         indices.shape[1], cpu._ptr(tile_values), cpu._ptr(index),
                                         torch.get_num_threads())
    if rc == 1:
        raise ValueError(f"{op}: packed indices {tuple(indices.shape)} for values {tuple(values.shape)} are not "
                         f"{n}:{m} indices of a {rows}x{k} weight (a position >= {m}, or the wrong word count)")
    cpu._check_status(op, rc)
    return cpu.CpuLinear(Pattern.NM, n, m, 0, rows, k, {"values": tile_values, "index": index})


def nm_values_from_layout(layout: cpu.CpuLinear) -> torch.Tensor:
    """``packed_values (O, J)`` of a layout made by :func:`layout_from_nm_packed` (a new tensor)."""
    slots = layout.in_features // layout.m * layout.n
    tile_values = layout.tensors["values"].reshape(-1, slots, TILE_ROWS)
    return tile_values.transpose(1, 2).reshape(-1, slots)[:layout.out_features].contiguous()


def nm_indices_from_layout(layout: cpu.CpuLinear) -> torch.Tensor:
    """``packed_indices`` (int32 words ``(O, W)``, unused bits zero) of a layout made by :func:`layout_from_nm_packed`
    (a new tensor; csrc/cpu/nm_tiles.cpp, equal to :func:`nmkern.reference.cpu_layouts.nm_words_from_layout_ref`)."""
    op = "nmkern cpu nm_indices_from_layout"
    lib = cpu._require(op)
    slots = layout.in_features // layout.m * layout.n
    words = torch.empty(layout.out_features, -(-slots // indices_per_word(layout.m)), dtype=torch.int32)
    if words.shape[0] == 0:
        return words
    cpu._check_status(op, lib.nmkern_nm_words_from_tiles(
        cpu._ptr(layout.tensors["index"]), layout.out_features, layout.in_features, layout.n, layout.m,
        words.shape[1], cpu._ptr(words), torch.get_num_threads()))
    return words


def layout_from_bsr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, out_features: int,
                    in_features: int, block: int) -> cpu.CpuLinear:
    """The 1xN layout over a packed layer's BSR buffers: ``values`` and ``crow`` shared, not copied."""
    narrow = col.to(torch.uint16) if in_features <= UINT16_MAX_K else col
    return cpu.CpuLinear(Pattern.BLOCK, 0, 0, block, out_features, in_features,
                         {"values": values, "rowptr": crow, "col": narrow})


def _check_rows(op: str, layout: cpu.CpuLinear, row0: int, row1: int) -> None:
    align = TILE_ROWS if layout.kind is Pattern.NM else layout.block
    if not (0 <= row0 < row1 <= layout.out_features) or row0 % align or (
            layout.kind is Pattern.BLOCK and row1 % align):
        raise ValueError(f"{op}: rows [{row0}, {row1}) of a {layout.out_features}-row {layout.kind.value} layout: "
                         f"need 0 <= row0 < row1 <= {layout.out_features}, row0 a multiple of {align}"
                         + (f" and row1 too" if layout.kind is Pattern.BLOCK else ""))


def decode_rows(layout: cpu.CpuLinear, row0: int, row1: int, out: torch.Tensor | None = None,
                num_threads: int = 1) -> torch.Tensor:
    """Dense rows ``[row0, row1)`` of ``layout``'s ``(out_features, in_features)`` weight, in its dtype.

    N:M: ``row0`` a multiple of 8 (a tile); 1xN: both ends multiples of ``block``. ``out``: a contiguous
    tensor of the layout's dtype holding at least ``(row1 - row0) * in_features`` elements, reused as the
    result's storage (every element is written).
    """
    op = "nmkern cpu decode_rows"
    _check_rows(op, layout, row0, row1)
    shape = (row1 - row0, layout.in_features)
    if out is None:
        out = torch.empty(shape, dtype=layout.dtype)
    elif out.dtype != layout.dtype or not out.is_contiguous() or out.numel() < shape[0] * shape[1] or out.is_cuda:
        raise ValueError(f"{op}: out must be a contiguous CPU {layout.dtype} tensor of at least {shape[0] * shape[1]} "
                         f"elements, got {out.dtype} {tuple(out.shape)}")
    dense = out.view(-1)[:shape[0] * shape[1]].view(shape)
    lib, t = cpu._require(op), layout.tensors
    size = t["values"].element_size()
    if layout.kind is Pattern.NM:
        rc = lib.nmkern_nm_decode(cpu._ptr(t["values"]), cpu._ptr(t["index"]), size, layout.out_features,
                                  layout.in_features, layout.n, layout.m, row0, row1, cpu._ptr(dense), num_threads)
    else:
        col = t["col"]
        rc = lib.nmkern_bsr_decode(cpu._ptr(t["values"]) if t["values"].numel() else None, cpu._ptr(t["rowptr"]),
                                   cpu._ptr(col) if col.numel() else None, col.element_size(), size,
                                   layout.out_features, layout.in_features, layout.block, row0, row1, cpu._ptr(dense),
                                   num_threads)
    cpu._check_status(op, rc)
    return dense


def bound_kernel(layout: cpu.CpuLinear):
    """``run(x2d, bias)``: the kernel call of a packed layer's hot path (``SparseLinear`` binds one per layout).

    Checks nothing: x2d must be a contiguous ``(B, in_features)`` CPU tensor of the layout's dtype with B >= 1,
    bias None or a contiguous ``(out_features,)`` tensor of that dtype (the caller checks both per call, with a
    few attribute reads), and ``layout`` alive: ``run`` holds the addresses of its tensors, not the tensors (a
    layer that drops the layout must not keep its memory through a bound call). Returns ``(B, out_features)``, or
    None when x holds a NaN or an Inf (the kernel's own scan: the caller runs the dense op). Why: the checked path
    (registered op implementation, ``nm_linear``) cost ~25 us per call above the C call (384x384 fp32 at 1 row on
    a 2-core Xeon: 33 us against 8 us), which MiniLM's and SmolLM2's small layers pay on every call.
    """
    lib, t = cpu._require("nmkern cpu sparse linear"), layout.tensors
    dtype, k, out, macs = layout.dtype, layout.in_features, layout.out_features, layout.kept_macs_per_row
    if layout.kind is Pattern.NM:
        fn = cpu._entry(lib, "nm_linear", dtype)
        mid = (t["values"].data_ptr(), t["index"].data_ptr(), out, layout.n, layout.m)
    else:
        fn = cpu._entry(lib, "bsr_linear", dtype)
        mid = (*cpu._bsr_args(t["values"], t["rowptr"], t["col"]), out, layout.block)
    flags = int(cpu.Algo.AUTO) | cpu.CHECK_FINITE

    def run(x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        batch = x2d.shape[0]
        y = torch.empty(batch, out, dtype=dtype)
        rc = fn(x2d.data_ptr(), batch, k, *mid, None if bias is None else bias.data_ptr(), y.data_ptr(),
                cpu._threads(macs * batch, None), flags)
        if rc:
            if rc == cpu.NONFINITE:
                return None
            cpu._check_status("nmkern cpu sparse linear", rc)
        return y

    return run
