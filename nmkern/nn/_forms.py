"""Which weight forms a packed layer keeps: one resident form (issue #14, item 6).

A packed :class:`~nmkern.nn._layer._SparseLayer` can hold its weight as the packed buffers it is saved
with (``packed_values`` / ``packed_indices``, or the BSR ``bsr_*``), as the CPU kernel's layout, and as
the decoded dense weight of the dense path. Holding all three cost 1.9x a dense model's process memory
for eight 2048x2048 2:4 fp32 layers (bench/memory_rss.py). Under measured dispatch (:mod:`nmkern.tuning`
on, the default) a packed layer on the CPU keeps one:

* **the CPU layout**, when the kernel won at the row counts this layer has met, or at some of them without
  costing more than 3% at any other (``_form_of_row_counts_met``; before any is measured: when a path it takes, or its
  compile plan names, is the CPU kernel). The N:M
  ``packed_values`` and ``packed_indices`` are then not held (the layout is built slot for slot from
  them and gives them back exactly, so ``state_dict``, ``.to()``, pickling and ``layer.packed_values``
  regenerate them on demand; the indices stay where the held words carry bits the layout does not,
  such as padding bits set in place). A 1xN linear's layout shares the ``bsr_values`` storage (a 1xN
  conv's cannot: its BSR columns run in NCHW order, the kernel's in NHWC; its values are decoded back). At row
  counts where dense measured faster, the dense path decodes the layout per call (``_decoded_dense``)
  instead of keeping a dense copy, a block of output rows at a time into one small reused buffer
  (:data:`DECODE_BLOCK_BYTES`): that costs the decode (2.6-3.7 ms for a 2048x2048 fp32 layer on a 2-core AMD
  EPYC) on those calls. ``NMKERN_DENSE_CACHE=1`` keeps the dense copy as well (faster dense calls, one
  more weight-sized form).
* **the dense weight**, when dense won at every row count it has met, or the kernel's wins are outweighed (those
  row counts then run dense too): the packed values are not held; the
  rest of the packed buffers (indices, BSR rows and columns) stay, and the values are gathered back
  from the dense weight when saved.
* **the packed buffers**, otherwise (no decision yet, paths that read the buffers: reference, Triton,
  GPU devices, or ``NMKERN_TUNE=0``, which keeps the 0.1 behaviour: forms built as paths need them).

At most two buffers are ever left out (the values, and an N:M layout's indices), named in ``_evicted``; the
module's ``_buffers`` holds ``None`` under each name while it is out, and :meth:`_ResidentForms.__getattr__`
answers reads of them.
"""

from __future__ import annotations

import math
import os
import threading
import time

import torch
import torch.nn.functional as F

from .. import _cpu_layout, tuning
from ..backend import Backend
from ..memory import release_free_memory
from ..reference.cpu_layouts import TILE_ROWS
from ..reference.linear import conv_weight_from_rows
from ..reference.nm_pack import unpack_words
from ..spec import Pattern

ENV_DENSE_CACHE = "NMKERN_DENSE_CACHE"
_scratch = threading.local()  # the decode buffer of _decoded_linear / _decoded_weight, one per thread and dtype
# A linear's dense call decodes its layout a block of output rows at a time into a buffer of at most this many bytes,
# each block's GEMM writing its output columns. Measured side by side against F.linear on a kept dense weight (2-core
# AMD EPYC, fp32, 256 rows): 4 MB blocks 1.28-1.34x for 2048x2048 and 0.95-1.03x for 11008x4096, one whole-layer
# decode 1.29x and 1.10x; 0.5-1 MB blocks 1.5-2x (a GEMM call per 64-256 rows). The whole-layer buffer held 16 MB
# and 180 MB for those layers.
DECODE_BLOCK_BYTES = 4 << 20


def keep_dense_cache() -> bool:
    """``NMKERN_DENSE_CACHE=1``: a layer running the CPU kernel at some row counts and dense at others keeps
    a dense copy of its weight for the dense calls (faster dense calls, more memory)."""
    value = os.environ.get(ENV_DENSE_CACHE, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV_DENSE_CACHE}={value!r}: use 1 (keep a dense copy beside the CPU layout) or 0 (default)")


def _scratch_buffer(dtype: torch.dtype, numel: int) -> torch.Tensor:
    buffers = _scratch.__dict__.setdefault("by_dtype", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buffers[dtype] = buf = None  # free the smaller one first
        buffers[dtype] = buf = torch.empty(numel, dtype=dtype)
    return buf


class _ResidentForms:
    """Mixed into ``_SparseLayer`` (before ``nn.Module``): the resident form rule of the module docstring."""

    def _values_name(self) -> str:
        return "packed_values" if self.pattern is Pattern.NM else "bsr_values"

    def __getattr__(self, name: str):
        if name in (self.__dict__.get("_evicted") or ()):
            return self._regenerated(name)
        return super().__getattr__(name)

    # -- the left-out buffers, given back --------------------------------------------------------
    def _regenerated(self, name: str) -> torch.Tensor:
        """The left-out buffer ``name``, rebuilt from the resident form (a new tensor, not kept)."""
        if name == "packed_indices":  # left out only beside an N:M layout (_keep_cpu_layout)
            return _cpu_layout.nm_indices_from_layout(self.__dict__["_cpu_cache"])
        return self._regenerated_values()

    def _regenerated_values(self) -> torch.Tensor:
        """The packed values, rebuilt from the resident form (a new tensor, not kept)."""
        cpu_layout, dense = self.__dict__.get("_cpu_cache"), self.__dict__.get("_dense_cache")
        if self.pattern is Pattern.NM and cpu_layout is not None:  # built slot for slot from the packed rows
            return _cpu_layout.nm_values_from_layout(cpu_layout)
        if dense is None and cpu_layout is not None:  # a 1xN conv's layout: decoded (a temporary dense weight)
            rows = _cpu_layout.decode_rows(cpu_layout, 0, cpu_layout.out_features)
            dense = conv_weight_from_rows(rows, self.weight_shape) if len(self.weight_shape) == 4 else rows
        if dense is None:
            raise RuntimeError(f"{type(self).__name__}: the packed values were left out with no resident form to "
                               "rebuild them from (an nmkern bug: please report it)")
        if self.pattern is Pattern.NM:  # N:M packed rows of a conv run in NHWC order
            rows = dense.permute(0, 2, 3, 1).reshape(dense.shape[0], -1) if dense.dim() == 4 else dense
            slots = rows.shape[1] // self.m * self.n
            cols = unpack_words(self._buffers["packed_indices"], self.m, slots)
            cols = cols + torch.arange(slots, device=cols.device) // self.n * self.m
            return rows.gather(1, cols)
        rows = dense.reshape(dense.shape[0], -1)  # BSR columns of a conv run in NCHW order
        crow, col = self._buffers["bsr_crow"], self._buffers["bsr_col"]
        counts = (crow[1:] - crow[:-1]).to(torch.int64)
        block_row = torch.repeat_interleave(torch.arange(counts.numel(), device=rows.device), counts)
        blocks = rows.reshape(-1, self.block, rows.shape[1])
        return blocks[block_row, :, col.to(torch.int64)].contiguous()

    def _restore_evicted(self) -> None:
        """Hold the left-out buffers again (before the caches they are rebuilt from go away)."""
        names = self.__dict__.get("_evicted") or ()
        for name in names:
            if name in self._buffers and self._buffers[name] is None:
                self._buffers[name] = self._regenerated(name)
        self.__dict__["_evicted"] = None

    def _evict(self, *names: str) -> None:
        """Leave out ``names`` (each held now; at most once: a settled layer evicts nothing more)."""
        if self.__dict__.get("_evicted") is None and all(self._buffers.get(name) is not None for name in names):
            for name in names:
                self._buffers[name] = None
            self.__dict__["_evicted"] = names

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        names = self.__dict__.get("_evicted") or ()
        for name in names:  # in place, so the state's key order is the usual one
            self._buffers[name] = self._regenerated(name)
        try:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            for name in names:
                self._buffers[name] = None

    def _state_buffers(self) -> dict:
        """``_buffers`` with the left-out buffers filled in (for pickling)."""
        names = self.__dict__.get("_evicted") or ()
        filled = self._buffers.copy() if names else self._buffers
        for name in names:
            filled[name] = self._regenerated(name)
        return filled

    # -- settling on one form --------------------------------------------------------------------
    def _settle_forms(self, decided: set, planned: set) -> None:
        """Keep one resident form, given the paths measured and taken so far (``decided``) and the compile plan's
        (``planned``: measured winners, and the static rules at row counts not met yet)."""
        before = self.__dict__.get("_resident")
        self._settle_forms_now(decided, planned)
        if before is not None and self.__dict__.get("_resident") is not before:
            # paths remembered under the other form were chosen with its costs (a dense call now decodes):
            # the next call of each row count asks again (nmkern.tuning's record, then _resident_path)
            self.__dict__["_path_cache"] = None
            self.__dict__["_fast_dense"] = None
            self.__dict__["_fast_rows"] = None

    def _settle_forms_now(self, decided: set, planned: set) -> None:
        self.__dict__["_decoded_dense"] = False
        self.__dict__["_resident"] = None
        if not self._packed or self.device.type != "cpu" or not tuning.enabled() or torch.compiler.is_compiling():
            return
        if not (decided | planned) <= {Backend.CPU, Backend.DENSE} or self.dtype not in _cpu_layout.cpu.KERNEL_DTYPES:
            self._restore_evicted()  # a path that reads the packed buffers
            return
        form = self._form_of_row_counts_met()
        if form is None:  # no row count measured on this layer yet: the paths taken, else the plan's
            form = (Backend.CPU if Backend.CPU in decided or (not decided and Backend.CPU in planned)
                    else Backend.DENSE if decided == {Backend.DENSE} else None)
        if form is Backend.CPU:
            self._keep_cpu_layout(dense_taken=Backend.DENSE in decided)
        elif form is Backend.DENSE:  # the plan's other rows trace dense too
            self._dense_cached()
            if self._cpu_cache is not None:
                self._restore_evicted()  # rebuilt from the CPU layout while it is still here
                self.__dict__["_cpu_cache"] = None
            self._evict(self._values_name())
            self.__dict__["_resident"] = Backend.DENSE
            release_free_memory()

    def _form_of_row_counts_met(self) -> Backend | None:
        """The form the row counts this layer has met (``_seen_medians``, both paths measured) ask for; None when
        there are none, or one lacks a median (then the paths taken and the plan decide).

        The dense weight where dense won at every one of them; the CPU layout where the kernel won at every one;
        in between, the layout only if it makes no row count met slower than dense beyond the margin (each
        (what a call costs holding the layout) / dense at most ``1 + tuning.MIN_GAIN``) and gains overall, row
        counts weighed alike (the geometric mean of those ratios below ``1 - tuning.MIN_GAIN``). Holding the
        layout, a row count where dense won runs the faster of the kernel and a decode plus dense
        (:meth:`_resident_path`).
        Why the cap: how often each row count comes is unknown here, and the mean alone let a win at one row count
        pay for a loss at another that came far more often. Once the large-batch kernel won at 32 and 64 rows,
        SmolLM2's fp32 2:4 layers that won at the 64-row prefill held the layout and lost at each of the 63
        one-row decode steps (generation 1.13x dense), and MiniLM-L6's 2:4 layers that won at 1 sentence lost
        at 8 (1.12x dense). The price is memory where a layer loses at some row count: the issue's model (eight
        2048x2048 fp32 layers at 1, 16 and 256 rows; the kernel 1.13x dense at 256) now keeps dense weights.
        MiniLM-L6's fp32 1:4 384x384 layers (0.92 at 32 rows, 1.14 at 304) kept dense weights under the mean too.

        Only this layer's own row counts count: MiniLM-L6's pooler (one row per sentence) recorded a kernel win
        for 384x384 at 1 row, and every 384x384 bf16 layer once held the layout for it and ran the kernel at 32 and
        304 rows, where dense had won (1.63x dense at 1 sentence).
        """
        seen = self.__dict__.get("_seen_medians")
        if not seen:
            return None
        pairs = [(m.get(Backend.CPU.value), m.get(Backend.DENSE.value)) for m in seen.values()]
        if any(cpu is None or dense is None or not dense > 0 for cpu, dense in pairs):
            return None
        wins = [cpu <= (1.0 - tuning.MIN_GAIN) * dense for cpu, dense in pairs]
        if not any(wins) or all(wins):
            return Backend.CPU if any(wins) else Backend.DENSE
        decode = 0.0 if keep_dense_cache() else self._decode_ms()  # NMKERN_DENSE_CACHE=1: the dense copy stays too
        ratios = [min(cpu, dense + decode) / dense for cpu, dense in pairs]
        if max(ratios) > 1.0 + tuning.MIN_GAIN:
            return Backend.DENSE
        log_ratio = sum(math.log(r) for r in ratios) / len(ratios)
        return Backend.CPU if math.exp(log_ratio) <= 1.0 - tuning.MIN_GAIN else Backend.DENSE

    def _note_medians(self, rows: int, decision) -> None:
        """Remember the medians ``decision`` was made on for ``rows`` (its row bucket), for
        :meth:`_form_of_row_counts_met`."""
        seen = self.__dict__.get("_seen_medians")
        if seen is None:
            seen = self.__dict__["_seen_medians"] = {}
        seen[tuning.row_bucket(rows)] = dict(decision.medians_ms)

    def _keep_cpu_layout(self, dense_taken: bool) -> None:
        layout = self._cpu_cached()
        if dense_taken and keep_dense_cache():
            self._dense_cached()
        elif self._dense_cache is not None:
            self.__dict__["_dense_cache"] = None
            release_free_memory()
        self.__dict__["_decoded_dense"] = self._dense_cache is None and dense_taken
        if self.pattern is Pattern.NM:
            indices = self._buffers.get("packed_indices")
            exact = indices is not None and torch.equal(_cpu_layout.nm_indices_from_layout(layout), indices)
            self._evict("packed_indices", "packed_values") if exact else self._evict("packed_values")
        elif len(self.weight_shape) == 4:  # a 1xN linear's layout shares the values
            self._evict("bsr_values")
        self.__dict__["_resident"] = Backend.CPU

    def _decode_block_rows(self) -> int:
        """Output rows per decoded block (a whole number of N:M tiles / 1xN blocks; at least one)."""
        layout = self._cpu_cached()
        align = TILE_ROWS if layout.kind is Pattern.NM else layout.block
        rows = DECODE_BLOCK_BYTES // (layout.in_features * layout.tensors["values"].element_size())
        return max(align, rows // align * align)

    def _decode_ms(self) -> float:
        """What decoding this layer's CPU layout costs (ms; the faster of two decodes after a first, measured once per
        layout), block by block as :meth:`_decoded_linear` does."""
        ms = self.__dict__.get("_decode_cost")
        if ms is None:
            layout = self._cpu_cached()
            # into a buffer of its own (the shared one is allocated only when a dense call decodes); the first
            # decode is not counted: its page faults are not part of a decode into the reused buffer (2048x2048
            # fp32 in one piece: 8 ms with them, 2.6 ms without, on a 2-core AMD EPYC)
            buf = torch.empty(min(self._decode_block_rows(), layout.out_features) * layout.in_features,
                              dtype=layout.dtype)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _block in self._decoded_blocks(buf):
                    pass
                times.append(time.perf_counter() - t0)
            ms = self.__dict__["_decode_cost"] = min(times[1:]) * 1e3
            del buf
            release_free_memory()
        return ms

    def _decoded_blocks(self, buf: torch.Tensor):
        """``(row0, row1, rows)`` for each block of :meth:`_decode_block_rows` output rows of the CPU layout, decoded
        into ``buf`` in turn (each block valid until the next)."""
        layout, block = self._cpu_cached(), self._decode_block_rows()
        for row0 in range(0, layout.out_features, block):
            row1 = min(layout.out_features, row0 + block)
            yield row0, row1, _cpu_layout.decode_rows(layout, row0, row1, out=buf, num_threads=torch.get_num_threads())

    def _resident_path(self, decision) -> Backend:
        """The path a measured decision runs given the resident form: where dense won but this layer holds only
        the CPU layout, a dense call pays the decode too, so the kernel runs instead whenever its measured median
        is below dense's plus the decode (a decode-sized batch: SmolLM2's 576x576 bf16 layers at 1 row measured
        the kernel slower than a kept dense weight, and far faster than decoding one per token)."""
        if decision.path is Backend.CPU and self.__dict__.get("_resident") is Backend.DENSE:
            return Backend.DENSE  # the kernel's wins were outweighed (_form_of_row_counts_met): this row count too
        if decision.path is not Backend.DENSE or not self.__dict__.get("_decoded_dense"):
            return decision.path
        cpu_ms, dense_ms = decision.medians_ms.get(Backend.CPU.value), decision.medians_ms.get(Backend.DENSE.value)
        if cpu_ms is None or dense_ms is None:
            return decision.path
        return Backend.CPU if cpu_ms <= dense_ms + self._decode_ms() else Backend.DENSE

    def _decoded_weight(self, keep: bool = False) -> torch.Tensor:
        """The dense weight decoded from the CPU layout: the dense path of a layer whose resident form is the CPU
        layout. Into this thread's reused buffer (valid until the next decode of this dtype on this thread), or,
        with ``keep`` (autograd saves the weight for the input's gradient), into a new tensor."""
        layout = self._cpu_cached()
        numel = layout.out_features * layout.in_features
        buf = torch.empty(numel, dtype=layout.dtype) if keep else _scratch_buffer(layout.dtype, numel)
        rows = _cpu_layout.decode_rows(layout, 0, layout.out_features, out=buf,
                                       num_threads=torch.get_num_threads())
        return conv_weight_from_rows(rows, self.weight_shape) if len(self.weight_shape) == 4 else rows

    def _decoded_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` for a linear holding only the CPU layout: decoded a block of output rows at a
        time into this thread's reused buffer (:data:`DECODE_BLOCK_BYTES`), each block's GEMM writing its output
        columns. In one piece where the layer fits one block, or where autograd needs the weight or the call."""
        bias = self.bias
        block, out_features = self._decode_block_rows(), self.weight_shape[0]
        grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if block >= out_features or grad:
            return F.linear(x, self._decoded_weight(keep=grad and x.requires_grad), bias)
        layout = self._cpu_cached()
        x2d = x.reshape(-1, x.shape[-1])
        y = torch.empty(x2d.shape[0], out_features, dtype=x2d.dtype)
        for row0, row1, w in self._decoded_blocks(_scratch_buffer(layout.dtype, block * layout.in_features)):
            if bias is None:
                torch.mm(x2d, w.t(), out=y[:, row0:row1])
            else:
                torch.addmm(bias[row0:row1], x2d, w.t(), out=y[:, row0:row1])
        return y.reshape(*x.shape[:-1], out_features)
