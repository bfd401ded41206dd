"""How a packed :class:`~nmkern.nn._layer._SparseLayer` runs: its cached weight forms, the path decision
(remembered per input row count, measured by :mod:`nmkern.tuning`), the compile plan and the bound dense op.

A mixin of ``_SparseLayer`` (it reads the layer's buffers and geometry); split from ``_layer.py`` so each
file holds one concern.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .. import dispatch, tuning
from ..backend import Backend
from ..dispatch import Call
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
        """The weight in the native CPU kernels' layout (``nmkern._cpu.CpuLinear`` over the GEMM rows)."""
        if self._cpu_cache is None:
            self.__dict__["_cpu_cache"] = dispatch.cpu_kernels().prepare_cpu_linear(
                self._gemm_rows_weight(), self.pattern.value, self.n, self.m, self.block)
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
                return path, functools.partial(decision.run, path, dispatch.callable_for(path, self._op))
            tuning.record(self, call, decision)
            path = decision.path
            hit = (path, dispatch.callable_for(path, self._op))
            if len(memo) >= _PATH_MEMO_SIZE:
                memo.clear()
            memo[key] = hit
            if decision.source in (tuning.Source.MEASURED, tuning.Source.CACHE):
                self._build_compile_plan()  # the plan (traces, the dense binding) now holds the measured winner
                self._drop_unused_forms(x.device.type)
            if path is Backend.DENSE:
                self._bind_fast_dense(x)
        return hit

    def _drop_unused_forms(self, device: str) -> None:
        """After a measurement: drop the weight forms built for timing that no path taken so far reads (one
        resident form per path taken; a dropped form is rebuilt if a later call takes its path). The native
        layouts the compile plan names stay too: a trace cannot build them (see ``_prepare_native``)."""
        plan = self._plan_cache
        decided = {p for p, _ in (self._path_cache or {}).values()}
        planned = {p for _, p in plan[1]} if plan is not None and plan[0] == (self.backend, device) else set()
        forms = {Backend.DENSE: "_dense_cache", Backend.CPU: "_cpu_cache", Backend.CUDA: "_semi24_cache",
                 Backend.CUSPARSELT: "_cslt_cache"}
        keep = decided | (planned - {Backend.DENSE})
        dropped = [name for path, name in forms.items() if path not in keep and self.__dict__.get(name) is not None]
        for name in dropped:
            self.__dict__[name] = None
        if dropped and device == "cpu":
            release_free_memory()

    def _build_compile_plan(self) -> None:
        """What :func:`nmkern.dispatch.choose` picks at 1, 2, 4, ... GEMM rows, as row ranges.

        Built in eager mode (``pack()``, ``.to()``, ``load_state_dict``, setting ``backend``) so a
        ``torch.compile`` trace neither calls into the table (the native library's lock is a graph
        break) nor guards on the exact row count: a forced path has one range (no guard on the
        batch size at all), ``auto`` a range per path it switches between (one guard per switch).
        """
        call = Call(self._layer_info(), self.device.type, 1)
        ranges: list[tuple[int, Backend]] = []
        try:
            for rows in _PLAN_ROWS:
                path = dispatch.choose(self.backend, dataclasses.replace(call, rows=rows))
                if ranges and ranges[-1][1] is path:
                    ranges[-1] = (rows, path)
                else:
                    ranges.append((rows, path))
        except ValueError:  # a forced path that cannot run here: the trace asks the table, which says why
            ranges = []
        self.__dict__["_plan_cache"] = ((self.backend, self.device.type), tuple(ranges))

    def _traced_path(self, x: torch.Tensor, rows) -> Backend:
        """The path under torch.compile: the eager plan's range holding ``rows`` (a SymInt when dynamic)."""
        plan = self._plan_cache
        if plan is None or plan[0] != (self.backend, x.device.type) or not plan[1]:
            return dispatch.choose(self.backend, Call(self._layer_info(), x.device.type, rows))
        ranges = plan[1]
        for max_rows, path in ranges[:-1]:
            if rows <= max_rows:
                return path
        return ranges[-1][1]

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

    def __setattr__(self, name: str, value) -> None:
        if name == "bias":
            self._forget_decisions()  # the bound op holds the old bias
        super().__setattr__(name, value)

    def _forget_decisions(self) -> None:
        """Drop the bound dense op and the remembered paths (the next call decides, and binds, afresh)."""
        self.__dict__["_fast_dense"] = None
        self.__dict__["_path_cache"] = None

    def _graph_weight(self) -> torch.Tensor:
        """The dense weight decoded from the packed buffers in ops ONNX translates (reference.graph_decode)."""
        if self.pattern is Pattern.NM:
            rows = nm_dense_rows_graph(self.packed_values, self.packed_indices, self.n, self.m)
            return conv_weight_from_rows(rows, self.weight_shape) if len(self.weight_shape) == 4 else rows
        dense = bsr_dense_graph(self.bsr_crow, self.bsr_col, self.bsr_values, self.weight_shape[0], self._gemm_k())
        return dense.reshape(self.weight_shape)

