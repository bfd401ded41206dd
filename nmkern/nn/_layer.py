"""What :class:`SparseLinear` and :class:`SparseConv2d` share.

Each module has two forms.

* Training form (after construction / ``from_dense``): keeps the dense ``weight``
  Parameter. N:M: forward uses :func:`nmkern.autograd.srste_weight` (mask
  recomputed every step; SR-STE gradient with ``lambda_w``, plain STE when
  ``srste=False``). 1xN: a fixed block keep-mask buffer ``weight_mask`` (from
  :func:`nmkern.block_mask_1xn` at creation, replaceable with :meth:`set_mask`).
* Packed form (:meth:`pack`): buffers only, no dense weight. N:M: ``packed_values``
  and ``packed_indices`` (:class:`nmkern.NMPacked` tensors of the weight's rows;
  conv rows are NHWC ``(O, kh*kw*I)``). 1xN: BSR ``bsr_crow``, ``bsr_col``,
  ``bsr_values (nnzb, block)`` over ``(O, K)``. 2:4 fp16/bf16 weights that fit the
  CUTLASS layout also get the ``compress_24`` form in memory when the CUDA kernel
  runs (never in the ``state_dict``). ``forward`` is the same lookup for both
  modules: :func:`nmkern.dispatch.choose` picks a :class:`nmkern.Backend` and
  :func:`nmkern.dispatch.run` calls that path's entry of the table; where no sparse
  kernel wins, the dense op runs on a cached decompressed weight (never slower than dense).
Each layer remembers its decision per (backend, device, GEMM rows); ``NMKERN_BACKEND``
is read when a layer first meets an input size (``.to()``, ``pack()`` and
``load_state_dict`` forget the decisions). The native kernels' weight layouts are built
eagerly at ``pack()`` / ``.to()`` / ``load_state_dict`` where that path can run, so a
``torch.compile`` trace never has to build them; the same places record what the table picks
at 1, 2, 4, ... GEMM rows (the compile plan), so a trace reads that plan instead of calling into
the table, and guards on the batch size only where the path changes (a forced path: never).
Under measured dispatch a packed CPU layer then keeps one resident weight form (:mod:`nmkern.nn._forms`):
the CPU layout or the dense weight; the packed values it leaves out come back on demand (``state_dict``,
pickling, ``.to()``, attribute reads).

``state_dict`` round trips for both forms into a fresh module: the config rides in
the extra state, and loading a packed state into a training-form module (or the
reverse) switches the module's form first. Every state is checked before the module
changes (:mod:`nmkern.nn._state`: shapes, dtypes, index ranges, config); a refused one
leaves the module as it was. A training-form module also loads a plain ``nn.Linear`` /
``nn.Conv2d`` state (weight and bias, no extra state; a 1xN mask then comes from the weight).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import _cpu_nm_pack
from .. import _validate as v
from .. import dispatch, ops, tuning  # noqa: F401  (ops registers torch.ops.nmkern.*)
from ..autograd import srste_weight
from ..backend import Backend, parse_backend
from ..dispatch import LayerInfo, LayerOp
from ..formats import NMPacked
from ..memory import release_free_memory
from ..functional import block_mask_1xn, nm_mask, pack_nm, to_bsr_1xn, unpack_nm
from ..reference.linear import bsr_dense_ref
from ..reference.semi24 import COL_ALIGN, ROW_ALIGN
from ..spec import BlockSpec, LayerSpec, NMSpec, Pattern, pattern_in
from . import _state
from ._exec import _PackedExecution
from ._forms import _ResidentForms


def parse_pattern(op: str, pattern) -> Pattern:
    """The pattern of a sparse module: N:M (``"nm"``) or 1xN blocks (``"1xn"``)."""
    p = pattern_in(pattern, (Pattern.NM, Pattern.BLOCK))
    if p is None:
        raise ValueError(f"{op}: unknown pattern {pattern!r}; choose 'nm' (N:M) or '1xn' (1xN blocks)")
    return p


def spec_kwargs(spec: LayerSpec, op: str = "nmkern") -> dict:
    """Module keywords (pattern, n, m, block, sparsity) for an N:M or (not rearranged) 1xN spec."""
    if isinstance(spec, NMSpec):
        return {"pattern": Pattern.NM, "n": spec.n, "m": spec.m}
    if isinstance(spec, BlockSpec) and spec.rearrange:
        raise ValueError(f"{op}: {spec} with rearrange=True has no sparse module form; prune it with "
                         "nmkern.prune_1xn (its export wraps rearranged layers) or use rearrange=False")
    if isinstance(spec, BlockSpec):
        return {"pattern": Pattern.BLOCK, "block": spec.block, "sparsity": spec.sparsity}
    raise ValueError(f"{op}: sparse modules take N:M or 1xN specs, got {spec!s}")


def _mask_backend(t: torch.Tensor) -> str:
    # Masks are computed once per layer (or per training step on small CPU models):
    # the Triton interpreter, which "auto" picks under TRITON_INTERPRET=1, costs
    # seconds per call on the CPU; CUDA tensors get the kernels.
    return "auto" if t.is_cuda else "reference"


def _nm_backend(t: torch.Tensor) -> str:
    """:func:`_mask_backend` for the N:M mask and pack ops, which have native CPU kernels (csrc/cpu/nm_mask.cpp,
    nm_pack.cpp; README, "Packing")."""
    return "cpu" if _cpu_nm_pack.runs(t) else _mask_backend(t)


def fit_reason(op: LayerOp, in_channels: int, out_channels: int, pattern: Pattern, n: int, m: int, block: int,
               groups: int = 1) -> str | None:
    """Why a layer of this shape cannot take this pattern, or None when it can."""
    if groups != 1:
        kind = "depthwise" if groups == in_channels else "grouped"
        return (f"{kind} conv (groups={groups}) is left dense: N:M and 1xN groups run along all input channels, "
                "which needs groups=1")
    if pattern is Pattern.NM and in_channels % m:
        what = "in_features" if op is LayerOp.LINEAR else "in_channels"
        return f"{what}={in_channels} is not divisible by m={m}"
    if pattern is Pattern.BLOCK and out_channels % block:
        what = "out_features" if op is LayerOp.LINEAR else "out_channels"
        return f"{what}={out_channels} is not divisible by the 1xN block size {block}"
    return None


# Per-module caches, rebuilt on demand; cleared by pack/load/.to()/.half() and never saved.
_CACHES = ("_dense_cache", "_semi24_cache", "_cslt_cache", "_cpu_cache", "_info_cache", "_path_cache",
           "_plan_cache", "_fast_dense", "_decoded_dense", "_resident", "_decode_cost",
           "_seen_medians", "_fast_rows", "_entry_cache")


class _SparseLayer(_PackedExecution, _ResidentForms, nn.Module):
    """Shared machinery of SparseLinear / SparseConv2d (weight geometry is the subclass's)."""

    _op: LayerOp

    def _init_sparse(self, op_name: str, n, m, pattern, block, sparsity, backend, srste, lambda_w) -> None:
        self.pattern = parse_pattern(op_name, pattern)
        if self.pattern is Pattern.NM:
            v.check_nm(op_name, n, m)
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"{op_name}: block must be a positive int, got {block!r}")
        self.sparsity = v.check_fraction(op_name, "sparsity", sparsity)
        if isinstance(lambda_w, bool) or not isinstance(lambda_w, (int, float)) or not lambda_w >= 0:
            raise ValueError(f"{op_name}: lambda_w must be a float >= 0, got {lambda_w!r}")
        self.n, self.m, self.block = int(n), int(m), int(block)
        self._packed = False
        self._clear_caches()
        self.backend = backend
        self.srste = bool(srste)
        self.lambda_w = float(lambda_w)

    def _adopt_prototype(self, op_name: str, reason: str | None, proto: nn.Module) -> None:
        """Refuse a shape the pattern cannot take, else take ``proto``'s weight and bias (torch's own init)."""
        if reason:
            raise ValueError(f"{op_name}: {reason}")
        self.weight = proto.weight
        self.bias = proto.bias
        if self.pattern is Pattern.BLOCK:
            self.register_buffer("weight_mask", self._initial_block_mask())

    @property
    def backend(self):
        """``"auto"`` or a forced :class:`nmkern.Backend` for the packed form (checked when set)."""
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, value) -> None:
        parse_backend(type(self).__name__, value)
        self.__dict__["_backend"] = value
        self._forget_decisions()  # bound / remembered for the old backend's plan
        self._prepare_native()  # a newly forced native path gets its weight layout now, not inside a trace

    # -- geometry (subclasses) -------------------------------------------------
    @property
    def weight_shape(self) -> torch.Size:
        raise NotImplementedError

    def _gemm_k(self) -> int:
        return int(math.prod(self.weight_shape[1:]))

    # -- state -------------------------------------------------------------------
    @property
    def is_packed(self) -> bool:
        return self._packed

    def _clear_caches(self) -> None:
        self._restore_evicted()  # the values are rebuilt from a cache: before the caches go
        for name in _CACHES:
            self.__dict__[name] = None

    def __getstate__(self):
        # pickle / deepcopy: caches may hold native handles (ctypes) and are rebuilt on demand
        state = self.__dict__.copy()
        state["_buffers"], state["_evicted"] = self._state_buffers(), None
        for name in _CACHES:
            state[name] = None
        return state

    def __setstate__(self, state):
        for name in _CACHES:  # a module pickled by an nmkern without some of today's caches
            state.setdefault(name, None)
        super().__setstate__(state)
        self._prepare_native()  # unpickled / deep-copied: the layouts and the compile plan, in eager mode

    def _apply(self, fn, recurse=True):
        self._clear_caches()  # .to(), .half(), .cuda(): the native layouts follow the buffers
        out = super()._apply(fn, recurse)
        self._prepare_native()
        return out

    def _prepare_native(self) -> None:
        """Build the native kernels' weight layouts now, in eager mode, where they can run.

        torch.compile cannot build them inside a trace (the 1xN CPU layout has a
        data-dependent size, the cuSPARSELt weight is a tensor subclass), and building
        them on first use at a decode-sized batch would stall that call. Only the paths this
        layer may take are built (:func:`nmkern.dispatch.native_paths`: a small layer that
        ``auto`` keeps dense gets none). The dense cache stays lazy: it is the biggest, and a
        traced call may build it.
        """
        if not self._packed or self.device.type == "meta":
            return
        builders = {Backend.CPU: self._cpu_cached, Backend.CUDA: self._semi24_cached,
                    Backend.CUSPARSELT: self._cslt_cached}
        tuning.note_packed(self)
        for path in dispatch.native_paths(self.backend, self._layer_info(), self.device.type):
            builders[path]()
        self._build_compile_plan()
        self._settle_forms(*self._paths_taken(self.device.type))

    def _weight_tensor(self) -> torch.Tensor:
        """The tensor that carries the weight's dtype and device in the current form."""
        for name in ("packed_values", "bsr_values"):
            t = self._buffers.get(name)
            if t is not None:
                return t
            if name in (self.__dict__.get("_evicted") or ()):  # left out (nmkern.nn._forms): the resident form's tensor
                cpu_layout = self.__dict__.get("_cpu_cache")
                return cpu_layout.tensors["values"] if cpu_layout is not None else self._dense_cache
        return self._parameters["weight"]

    @property
    def dtype(self) -> torch.dtype:
        return self._weight_tensor().dtype

    @property
    def device(self) -> torch.device:
        return self._weight_tensor().device

    def _layer_info(self) -> LayerInfo:
        info = self._info_cache
        if info is None:
            info = LayerInfo(op=self._op, pattern=self.pattern, n=self.n, m=self.m, block=self.block,
                             sparsity=self.sparsity, in_features=self._gemm_k(), out_features=self.weight_shape[0],
                             dtype=self.dtype, semi24_fits=self._semi24_fits(), geometry=self._geometry())
            self.__dict__["_info_cache"] = info
        return info

    def _geometry(self) -> tuple:
        """What besides the GEMM shape sets the cost of a call (a conv's kernel, stride, padding, dilation)."""
        return tuple(getattr(self, a) for a in ("kernel_size", "stride", "padding", "dilation") if hasattr(self, a))

    def _semi24_fits(self) -> bool:
        """2:4 fp16/bf16 whose GEMM (out rows, K = in_features or kh*kw*in_channels) fits the CUTLASS layout."""
        o, k = self.weight_shape[0], self._gemm_k()
        return (self.pattern is Pattern.NM and (self.n, self.m) == (2, 4) and self.dtype in v.HALF_DTYPES
                and o % ROW_ALIGN == 0 and k % COL_ALIGN == 0)

    # -- masks and weights --------------------------------------------------------
    def mask(self) -> torch.Tensor:
        """The current boolean keep-mask, shaped like the dense weight."""
        if not self._packed:
            if self.pattern is Pattern.NM:
                w = self.weight.detach()
                return nm_mask(w, self.n, self.m, dim=1, backend=_nm_backend(w))
            return self.weight_mask.clone()
        if self.pattern is Pattern.NM:
            ones = torch.ones_like(self.packed_values)
            kept = unpack_nm(self._nm_packed(values=ones), backend="reference")
            return kept != 0
        ones = torch.ones_like(self.bsr_values)
        kept = bsr_dense_ref(self.bsr_crow, self.bsr_col, ones, self.weight_shape[0], self._gemm_k())
        return (kept != 0).reshape(self.weight_shape)

    def set_mask(self, mask: torch.Tensor) -> "_SparseLayer":
        """Replace the fixed 1xN keep-mask (training form, pattern='1xn' only)."""
        op = f"{type(self).__name__}.set_mask"
        if self.pattern is not Pattern.BLOCK:
            raise ValueError(f"{op}: N:M masks are recomputed from the weight every step; set_mask is for pattern='1xn'")
        if self._packed:
            raise ValueError(f"{op}: the module is packed; masks are fixed in its BSR buffers")
        v.check_tensor(op, "mask", mask, (torch.bool,))
        if mask.shape != self.weight_shape:
            raise ValueError(f"{op}: mask has shape {tuple(mask.shape)}, expected the weight's {tuple(self.weight_shape)}")
        o = self.weight_shape[0]
        rows = mask.reshape(o // self.block, self.block, -1)
        if not bool((rows == rows[:, :1]).all()):
            raise ValueError(f"{op}: mask is not a 1x{self.block} block mask: the {self.block} output channels of a "
                             "block must share keep/prune for every input column (use nmkern.block_mask_1xn)")
        self.weight_mask.copy_(mask.to(self.weight_mask.device))
        return self

    def _initial_block_mask(self) -> torch.Tensor:
        w = self.weight.detach()
        if w.is_meta:  # shape-only module (from_dense builds on meta, then adopts the real weight)
            return torch.ones(w.shape, dtype=torch.bool, device=w.device)
        return block_mask_1xn(w, self.block, self.sparsity, backend=_mask_backend(w))

    def _adopt_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Take copies of a dense layer's weight and bias (from_dense), then set the 1xN mask from them."""
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        if self.pattern is Pattern.BLOCK:
            self.weight_mask = self._initial_block_mask()
        self._clear_caches()

    def _nm_packed(self, values=None) -> NMPacked:
        return NMPacked(values=self.packed_values if values is None else values, indices=self.packed_indices,
                        n=self.n, m=self.m, shape=self.weight_shape, dim=1)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The masked dense weight (a new tensor, no grad), from either form."""
        if not self._packed:
            return self.weight.detach() * self.mask()
        if self.pattern is Pattern.NM:  # conv rows are NHWC: make the (O, I, kh, kw) weight contiguous
            # canonical strides, not .contiguous(): see reference.linear.conv_weight_from_rows (a conv segfault)
            return unpack_nm(self._nm_packed(), backend="reference").clone(memory_format=torch.contiguous_format)
        dense = bsr_dense_ref(self.bsr_crow, self.bsr_col, self.bsr_values, self.weight_shape[0], self._gemm_k())
        return dense.reshape(self.weight_shape)

    def _train_weight(self) -> torch.Tensor:
        if self.pattern is Pattern.NM:
            lam = self.lambda_w if self.srste else 0.0
            return srste_weight(self.weight, self.n, self.m, 1, lam, backend=_nm_backend(self.weight))
        return self.weight * self.weight_mask

    # -- packing ------------------------------------------------------------------
    def _drop_weight(self) -> None:
        del self._parameters["weight"]
        self.register_parameter("weight", None)
        if "weight_mask" in self._buffers:
            del self._buffers["weight_mask"]

    def _set_buffer(self, name: str, t: torch.Tensor) -> None:
        self._restore_evicted()
        if name in self._buffers:
            del self._buffers[name]
        self.register_buffer(name, t)

    @torch.no_grad()
    def pack(self) -> "_SparseLayer":
        """Switch in place to the compressed inference form (buffers only); returns self.

        The packed form is a frozen sparse base: it is differentiable with respect to its
        input (exact on every path) and its bias, not its weight; train the weight before
        ``pack()`` (or put an adapter beside it).
        """
        if self._packed:
            return self
        if self.device.type == "meta":
            raise ValueError(f"{type(self).__name__}.pack: the weight is on the meta device (shapes only, no values), "
                             "so there is nothing to pack; materialise it first (module.to_empty(device=...) and "
                             "load_state_dict), then pack(), or sparsify without pack=True")
        self._pack_buffers()
        self._drop_weight()
        self._packed = True
        self._clear_caches()
        self._prepare_native()
        release_free_memory()  # the freed dense temporaries would otherwise stay in the process (glibc's heap)
        return self

    def _pack_buffers(self) -> None:
        """The packed buffers from the masked weight (its temporaries are freed when this returns)."""
        w = self.dense_weight()
        if self.pattern is Pattern.NM:
            packed = pack_nm(w, self.n, self.m, dim=1, backend=_nm_backend(w))
            self._set_buffer("packed_values", packed.values.contiguous())
            self._set_buffer("packed_indices", packed.indices.contiguous())
        else:
            bsr = to_bsr_1xn(w.reshape(w.shape[0], -1), self.block)
            # clone(): views of the BSR tensor would keep it alive as their base (and Dynamo cannot fake it)
            self._set_buffer("bsr_crow", bsr.crow_indices().to(torch.int32).clone())
            self._set_buffer("bsr_col", bsr.col_indices().to(torch.int32).clone())
            self._set_buffer("bsr_values", bsr.values().reshape(-1, self.block).clone())

    def _packed_shell(self, shapes: dict) -> None:
        """Become a packed module whose buffers have the given shapes (for loading)."""
        dev = self.weight.device
        for name, (shape, dt) in shapes.items():
            self._set_buffer(name, torch.empty(shape, dtype=dt, device=dev))
        self._drop_weight()
        self._packed = True
        self._clear_caches()

    def _training_shell(self) -> None:
        """Become a training-form module with an uninitialised weight (for loading)."""
        dev, dtype = self.device, self.dtype
        self._restore_evicted()
        for name in ("packed_values", "packed_indices", "bsr_crow", "bsr_col", "bsr_values"):
            self._buffers.pop(name, None)
        del self._parameters["weight"]
        self.weight = nn.Parameter(torch.empty(self.weight_shape, device=dev, dtype=dtype))
        if self.pattern is Pattern.BLOCK:
            self.register_buffer("weight_mask", torch.ones(self.weight_shape, dtype=torch.bool, device=dev))
        self._packed = False
        self._clear_caches()

    def get_extra_state(self):
        return {"pattern": self.pattern.value, "n": self.n, "m": self.m, "block": self.block,
                "sparsity": self.sparsity, "packed": self._packed}

    def set_extra_state(self, state) -> None:
        pass  # adopted in _load_from_state_dict, before the tensors are copied

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Everything the state gives is checked first (nmkern.nn._state): a refused state leaves
        # the module as it was and its message reaches torch's "Error(s) in loading state_dict".
        op = type(self).__name__ + (f" {prefix[:-1]!r}" if prefix else "")
        self._restore_evicted()  # torch loads into the held buffers only
        try:
            plan = _state.plan_load(op, self, state_dict, prefix)
        except _state.StateError as e:
            error_msgs.append(str(e))
            return
        cfg = plan.config
        self.pattern, self.n, self.m = cfg["pattern"], cfg["n"], cfg["m"]
        self.block, self.sparsity = cfg["block"], cfg["sparsity"]
        if plan.form == "packed":
            # Take the state's shapes (1xN nnzb varies) and dtypes (values may be fp16 in an fp32 module).
            if not self._packed or any(getattr(self, k, None) is None or getattr(self, k).shape != s[0]
                                       or getattr(self, k).dtype != s[1] for k, s in plan.shapes.items()):
                if self._packed:
                    self._training_shell()
                self._packed_shell(plan.shapes)
        elif plan.form == "training" and self._packed:
            self._training_shell()
        elif plan.form == "training" and self.pattern is Pattern.BLOCK:
            if self._buffers.get("weight_mask") is None:  # an N:M module taking a 1xN training state
                self.register_buffer("weight_mask", torch.ones(self.weight_shape, dtype=torch.bool, device=self.device))
        elif plan.form == "training":
            self._buffers.pop("weight_mask", None)  # a 1xN module taking an N:M training state
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if plan.form == "training" and not plan.has_extra:  # a plain nn.Linear / nn.Conv2d state: weight (+ bias)
            self._adopt_plain_state(state_dict, prefix, missing_keys)
        self._clear_caches()
        self._prepare_native()

    @torch.no_grad()
    def _adopt_plain_state(self, state_dict, prefix: str, missing_keys: list) -> None:
        """After loading a dense layer's state: no extra state is missing, and a 1xN mask comes from the weight."""
        for key in (_state.EXTRA, "weight_mask"):
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
        if self.pattern is Pattern.BLOCK and prefix + "weight_mask" not in state_dict:
            self.weight_mask.copy_(self._initial_block_mask())  # as from_dense does

    def packed_nbytes(self) -> int:
        """Bytes of the tensors the packed form stores (weight part; bias excluded)."""
        if not self._packed:
            raise ValueError(f"{type(self).__name__}.packed_nbytes: the module is not packed; call .pack() first")
        names = (("packed_values", "packed_indices") if self.pattern is Pattern.NM
                 else ("bsr_crow", "bsr_col", "bsr_values"))
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in names)

    def _check_device_dtype(self, op: str, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: input must be a torch.Tensor, got {type(x).__name__}")
        w = self._weight_tensor()
        if x.dtype != w.dtype:
            raise TypeError(f"{op}: input has dtype {x.dtype} but the layer's weight is {w.dtype}; "
                            f"cast the input with .to({w.dtype}) or the layer with .to(dtype)")
        if x.device != w.device:
            raise ValueError(f"{op}: input is on {x.device} but the layer is on {w.device}; "
                             "move one of them with .to(device)")

    @property
    def spec(self) -> LayerSpec:
        """What this layer carries, as a :class:`~nmkern.spec.LayerSpec`."""
        return NMSpec(self.n, self.m) if self.pattern is Pattern.NM else BlockSpec(self.block, self.sparsity)

    def _sparse_repr(self) -> str:
        pat = f"{self.n}:{self.m}" if self.pattern is Pattern.NM else f"1x{self.block}, sparsity={self.sparsity}"
        return f"pattern={pat}, packed={self._packed}, backend={self.backend}"
