"""How a packed :class:`~nmkern.nn._layer._SparseLayer` runs: its cached weight forms, the path decision
(remembered per input row count, measured by :mod:`nmkern.tuning`), the compile plan and the bound dense op.

A mixin of ``_SparseLayer`` (it reads the layer's buffers and geometry); split from ``_layer.py`` so each
file holds one concern.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch

from .. import _cpu_layout, dispatch, tuning
from ..backend import Backend
from ..dispatch import Call, LayerOp
from ..functional import compress_24
from ..memory import release_free_memory
from ..reference.graph_decode import bsr_dense_graph, nm_dense_rows_graph
from ..reference.linear import conv_weight_from_rows, nm_dense_rows_ref
from ..spec import Pattern

# Decisions remembered per module (distinct input row counts seen); the memo keeps
# the per-call dispatch cost to a dict lookup (building LayerInfo and deciding cost
# ~100 us per call on this machine, more than a small dense GEMM).
_PATH_MEMO_SIZE = 256
# Read on every call of a dense-bound layer: the function itself, not torch.compiler's attribute (a lookup less).
_is_compiling = torch.compiler.is_compiling
# GEMM row counts the compile plan asks the table about (see _SparseLayer._build_compile_plan).
_PLAN_ROWS = tuple(2 ** i for i in range(17))


def _onnx_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """A packed layer under ``torch.onnx.export(dynamo=True)`` (a trace, so never on the eager path)."""
    return layer._dense_op(x, layer._graph_weight())


class _PackedExecution:
    """The packed form's execution (see the module docstring); mixed into ``_SparseLayer`` before ``nn.Module``."""

    def _dense_cached(self) -> torch.Tensor:
        if self._dense_cache is None:
            self.__dict__["_dense_cache"] = self.dense_weight()
            if not torch.compiler.is_compiling():
                release_free_memory()  # the decode's temporaries (as after pack())
        return self._dense_cache

    def _gemm_rows_weight(self) -> torch.Tensor:
        """The masked weight as the GEMM's ``(out, K)`` rows: a conv's in NHWC order (input channels
        innermost), the order N:M groups run along and :func:`~nmkern.reference.linear.unfold_nhwc` gives.

        A source for the native layouts: it does not fill the dense cache (only the dense path keeps it).
        """
        if self.pattern is Pattern.NM:  # the packed rows are already in GEMM order (NHWC for a conv)
            return nm_dense_rows_ref(self.packed_values, self.packed_indices, self.n, self.m)
        dense = self._dense_cache if self._dense_cache is not None else self.dense_weight()
        return dense.permute(0, 2, 3, 1).reshape(dense.shape[0], -1) if dense.dim() == 4 else dense

    def _semi24_cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._semi24_cache is None:
            self.__dict__["_semi24_cache"] = compress_24(self._gemm_rows_weight().contiguous())
        return self._semi24_cache

    def _cslt_cached(self):
        if self._cslt_cache is None:
            rows = self._gemm_rows_weight().contiguous()
            self.__dict__["_cslt_cache"] = torch.sparse.to_sparse_semi_structured(rows)
        return self._cslt_cache

    def _cpu_cached(self):
        """The weight in the native CPU kernels' layout (``nmkern._cpu.CpuLinear`` over the GEMM rows): built
        from the packed buffers slot for slot (N:M) or sharing them (1xN linear), so it can stand in for them
        (:mod:`nmkern.nn._forms`); 1xN convs and fp64 layers (rounded to fp32) from the dense GEMM rows."""
        if self._cpu_cache is None:
            native = self.dtype in _cpu_layout.cpu.KERNEL_DTYPES
            if native and self.pattern is Pattern.NM:  # the packed rows are GEMM rows (NHWC for a conv)
                layout = _cpu_layout.layout_from_nm_packed(self.packed_values, self.packed_indices, self.n, self.m,
                                                           self._gemm_k())
            elif native and len(self.weight_shape) == 2:  # a conv's BSR columns run in NCHW order, not NHWC
                layout = _cpu_layout.layout_from_bsr(self.bsr_crow, self.bsr_col, self.bsr_values,
                                                     self.weight_shape[0], self._gemm_k(), self.block)
            else:
                layout = dispatch.cpu_kernels().prepare_cpu_linear(self._gemm_rows_weight(), self.pattern.value,
                                                                   self.n, self.m, self.block)
            self.__dict__["_cpu_cache"] = layout
        return self._cpu_cache

    def _decide(self, x: torch.Tensor, rows: int) -> tuple[Backend, object]:
        """(path, the table's callable for it), remembered per (backend, device, GEMM rows).

        A memo miss asks :func:`nmkern.tuning.decide`: a forced backend, ``NMKERN_BACKEND``, the winner
        recorded for this shape and row bucket, the static rules, or, while the shape is being measured, a
        candidate path whose call is timed (not remembered: the next call asks again).
        """
        if torch.compiler.is_compiling():  # decided once at trace time, from the plan made in eager mode
            if torch.onnx.is_in_onnx_export():  # ONNX has no nmkern ops: the dense op on the weight decoded in-graph
                return Backend.DENSE, _onnx_forward
            path = self._traced_path(x, rows)
            return path, dispatch.callable_for(path, self._op)
        # Environment variables (NMKERN_BACKEND, TRITON_INTERPRET) are read on a memo miss only:
        # os.environ lookups cost more than the rest of this function.
        key = (self.backend, x.device, rows)
        memo = self._path_cache
        if memo is None:
            memo = self.__dict__["_path_cache"] = {}
        hit = memo.get(key)
        if hit is None:
            call = Call(self._layer_info(), x.device.type, rows)
            decision = tuning.decide(self, call)
            if isinstance(decision, tuning.Trial):  # measuring: this call takes a candidate, timed; nothing remembered
                path = decision.next_path()
                return path, functools.partial(decision.run, path, dispatch.measured_callable(path, self._op))
            path = decision.path
            if len(memo) >= _PATH_MEMO_SIZE:
                memo.clear()
            memo[key] = (path, None)
            if decision.source in (tuning.Source.MEASURED, tuning.Source.CACHE):
                self._note_medians(rows, decision)
                self._build_compile_plan()  # the plan (traces, the dense binding) now holds the measured winner
                self._drop_unused_forms(x.device.type)  # one resident form (may forget the other remembered paths)
                path = self._resident_path(decision)
                if path is not decision.path:
                    decision = dataclasses.replace(decision, path=path)
            tuning.record(self, call, decision)
            hit = (path, dispatch.callable_for(path, self._op))
            if self._path_cache is None:  # forgotten by a change of resident form
                self.__dict__["_path_cache"] = {}
            self._path_cache[key] = hit
            if path is Backend.DENSE:
                self._bind_fast_dense(x)
            if self._fast_dense is None:  # bound for every row count already otherwise
                self._bind_rows(x, rows, path)
        return hit

    def _paths_taken(self, device: str) -> tuple[set, set]:
        """(paths taken or measured: the remembered decisions and the winners recorded for this layer's shape at
        any row count, the compile plan's paths) for ``device``."""
        plan = self._plan_cache
        current = plan is not None and plan[0] == (self.backend, device)
        decided = {p for p, _ in (self._path_cache or {}).values()} | (set(plan[2]) if current else set())
        return decided, ({p for _, p in plan[1]} if current else set())

    def _drop_unused_forms(self, device: str) -> None:
        """After a measurement: drop the weight forms built for timing that no path taken so far reads (one
        resident form per path taken; a dropped form is rebuilt if a later call takes its path). The native
        layouts the compile plan names stay too: a trace cannot build them (see ``_prepare_native``)."""
        decided, planned = self._paths_taken(device)
        forms = {Backend.DENSE: "_dense_cache", Backend.CPU: "_cpu_cache", Backend.CUDA: "_semi24_cache",
                 Backend.CUSPARSELT: "_cslt_cache"}
        keep = decided | (planned - {Backend.DENSE})
        dropped = [name for path, name in forms.items() if path not in keep and self.__dict__.get(name) is not None]
        if dropped:
            self._restore_evicted()  # the values may be rebuilt from a form that goes now (nmkern.nn._forms)
        for name in dropped:
            self.__dict__[name] = None
        if dropped and device == "cpu":
            release_free_memory()
        self._settle_forms(decided, planned)

    def _build_compile_plan(self) -> None:
        """What :func:`nmkern.dispatch.choose` picks at 1, 2, 4, ... GEMM rows, as row ranges.

        Built in eager mode (``pack()``, ``.to()``, ``load_state_dict``, setting ``backend``) so a
        ``torch.compile`` trace neither calls into the table (the native library's lock is a graph
        break) nor guards on the exact row count: a forced path has one range (no guard on the
        batch size at all), ``auto`` a range per path it switches between (one guard per switch).
        """
        call = Call(self._layer_info(), self.device.type, 1)
        ranges: list[tuple[int, Backend]] = []
        measured = set()  # the winners recorded for this shape (the rest of the plan is the static rules)
        try:
            for rows in _PLAN_ROWS:
                row_call = dataclasses.replace(call, rows=rows)
                path = dispatch.choose(self.backend, row_call)
                if self.backend == Backend.AUTO.value and tuning.lookup(row_call) is path:
                    measured.add(path)
                if ranges and ranges[-1][1] is path:
                    ranges[-1] = (rows, path)
                else:
                    ranges.append((rows, path))
        except ValueError:  # a forced path that cannot run here: the trace asks the table, which says why
            ranges = []
        self.__dict__["_plan_cache"] = ((self.backend, self.device.type), tuple(ranges), frozenset(measured))

    def _traced_path(self, x: torch.Tensor, rows) -> Backend:
        """The path under torch.compile: the eager plan's range holding ``rows`` (a SymInt when dynamic)."""
        plan = self._plan_cache
        if plan is None or plan[0] != (self.backend, x.device.type) or not plan[1]:
            return dispatch.choose(self.backend, Call(self._layer_info(), x.device.type, rows))
        ranges = plan[1]
        path = next((p for max_rows, p in ranges[:-1] if rows <= max_rows), ranges[-1][1])
        # Traces run the resident form's path (nmkern.nn._forms): a layer holding only the CPU layout decodes it
        # for dense calls through ctypes, which a trace cannot hold, so it runs the CPU kernel there (same
        # result); a layer holding only the dense weight runs dense where the static rules would try the kernel.
        resident = self.__dict__.get("_resident")
        if path is Backend.DENSE and self.__dict__.get("_decoded_dense"):
            return Backend.CPU
        return Backend.DENSE if path is Backend.CPU and resident is Backend.DENSE else path

    def _choose(self, x: torch.Tensor, rows: int) -> Backend:
        """The path this call takes (:func:`nmkern.dispatch.choose`, remembered)."""
        return self._decide(x, rows)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same lookup for Linear and Conv2d: training form -> the dense op on the masked weight;
        packed form -> the path :func:`nmkern.dispatch.choose` picks, run by its table entry.

        A packed layer the plan keeps dense at every row count calls ``_fast_dense`` (bound by :meth:`_decide`):
        no per-call validation or lookup; an input the op refuses is checked then, for this module's message.
        """
        fast = self._fast_dense
        if fast is not None and not _is_compiling():
            try:
                return fast(x)
            except (RuntimeError, TypeError):
                self._check_input(x)  # raises the message naming the layer, shapes and dtypes
                raise
        if self._fast_rows is not None and not _is_compiling():
            try:
                y = self._rows_call(x)
            except (RuntimeError, TypeError):
                self._check_input(x)  # as for _fast_dense
                raise
            if y is not None:
                return y
        self._check_input(x)
        if not self._packed:
            return self._dense_op(x, self._train_weight())
        return self._decide(x, self._gemm_rows(x))[1](self, x)

    def _bind_fast_dense(self, x: torch.Tensor) -> None:
        """Bind the dense op on the cached weight when the plan is dense at every GEMM row count (1 ... 2**16 and
        beyond) for this backend and device: a 128x128 layer's per-call overhead then is nn.Linear's."""
        plan = self._plan_cache
        if plan is not None and plan[0] == (self.backend, x.device.type) and [p for _, p in plan[1]] == [Backend.DENSE]:
            self.__dict__["_fast_dense"] = self._dense_partial(self._dense_cached())

    def _bind_rows(self, x: torch.Tensor, rows: int, path: Backend) -> None:
        """Bind the call of ``path`` for ``rows`` GEMM rows of a linear on the CPU (``SparseLinear._rows_call``): the
        CPU kernel on its layout, or dense on a kept dense weight. Those calls then skip the input checks, the
        path lookup and the checked op: ~25 us per kernel call on small layers (384x384 fp32 at 1 row, 2-core
        Xeon: 33 -> 15 us, the C call alone 8 us), ~3 us per dense call."""
        if self._op is not LayerOp.LINEAR or rows < 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return
        if path is Backend.CPU:
            call = self._kernel_entry_cached()
            if call is None:
                return
        elif path is Backend.DENSE and not self.__dict__.get("_decoded_dense"):
            call = self._dense_entry(self._dense_cached())
        else:
            return
        if self._fast_rows is None:
            self.__dict__["_fast_rows"] = {}
        self._fast_rows[rows] = call

    def _kernel_entry_cached(self):
        """``SparseLinear._kernel_entry`` of the current CPU layout, made once per layout (None for a stand-in layout
        that is not a ``CpuLinear``: tests)."""
        layout = self._cpu_cached()
        if not isinstance(layout, _cpu_layout.cpu.CpuLinear):
            return None
        made = self._entry_cache
        if made is None or made[0]() is not layout:  # held weakly: a dropped layout is freed
            made = self.__dict__["_entry_cache"] = (weakref.ref(layout), self._kernel_entry(layout))
        return made[1]

    def __setattr__(self, name: str, value) -> None:
        if name == "bias":
            self._forget_decisions()  # the bound op holds the old bias
        super().__setattr__(name, value)

    def _forget_decisions(self) -> None:
        """Drop the bound dense op and the remembered paths (the next call decides, and binds, afresh)."""
        self.__dict__["_fast_dense"] = None
        self.__dict__["_fast_rows"] = None
        self.__dict__["_path_cache"] = None

    def _graph_weight(self) -> torch.Tensor:
        """The dense weight decoded from the packed buffers in ops ONNX translates (reference.graph_decode)."""
        if self.pattern is Pattern.NM:
            rows = nm_dense_rows_graph(self.packed_values, self.packed_indices, self.n, self.m)
            return conv_weight_from_rows(rows, self.weight_shape) if len(self.weight_shape) == 4 else rows
        dense = bsr_dense_graph(self.bsr_crow, self.bsr_col, self.bsr_values, self.weight_shape[0], self._gemm_k())
        return dense.reshape(self.weight_shape)

