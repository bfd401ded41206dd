"""Load-time checks of a sparse layer's ``state_dict`` (extra state and packed buffers).

:func:`plan_load` reads everything a :class:`~nmkern.nn._layer._SparseLayer` is about to
take from a state (its config in ``_extra_state``, the form the tensors describe) and
checks it against the layer's geometry before the layer changes at all: a corrupted or
mismatched state is refused with one message (appended to ``load_state_dict``'s
``error_msgs``, so torch raises it) and the module stays as it was. The checks run once
per load, never per forward.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import _validate as v
from ..reference.nm_pack import index_bits, indices_per_word, pack_words, unpack_words
from ..spec import Pattern, pattern_in

EXTRA = "_extra_state"
PACKED_KEYS = {Pattern.NM: ("packed_values", "packed_indices"), Pattern.BLOCK: ("bsr_crow", "bsr_col", "bsr_values")}
_CONFIG = ("pattern", "n", "m", "block", "sparsity")


class StateError(ValueError):
    """A state the layer refuses (the message names the layer, what was found and what was expected)."""


@dataclasses.dataclass
class LoadPlan:
    """What a valid state makes of the layer: its config, its form, the packed buffers' shapes."""

    config: dict
    form: str | None  # "packed", "training" or None (the state holds none of the layer's weight tensors)
    shapes: dict = dataclasses.field(default_factory=dict)  # packed key -> (shape, dtype)
    has_extra: bool = True


def _int(op: str, name: str, val, minimum: int) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
        raise StateError(f"{op}: extra state has {name}={val!r}; expected an int >= {minimum}")
    return val


def read_config(op: str, extra, current: dict) -> dict:
    """The layer config an ``_extra_state`` dict gives (missing entries keep ``current``), checked."""
    if not isinstance(extra, dict):
        raise StateError(f"{op}: _extra_state must be the dict SparseLinear/SparseConv2d.get_extra_state() saves, "
                         f"got {type(extra).__name__}")
    cfg = {k: extra.get(k, current[k]) for k in _CONFIG}
    pattern = pattern_in(cfg["pattern"], (Pattern.NM, Pattern.BLOCK))
    if pattern is None:
        raise StateError(f"{op}: extra state has pattern={cfg['pattern']!r}; expected 'nm' or '1xn'")
    cfg["pattern"] = pattern
    n, m = _int(op, "n", cfg["n"], 1), _int(op, "m", cfg["m"], 1)
    if pattern is Pattern.NM:
        try:
            v.check_nm(op, n, m)
        except (TypeError, ValueError) as e:
            raise StateError(f"{op}: extra state has an invalid N:M pattern: {e}") from None
    _int(op, "block", cfg["block"], 1)
    try:
        cfg["sparsity"] = v.check_fraction(op, "sparsity", cfg["sparsity"])
    except (TypeError, ValueError) as e:
        raise StateError(f"{op}: extra state: {e}") from None
    packed = extra.get("packed")
    if packed is not None and not isinstance(packed, bool):
        raise StateError(f"{op}: extra state has packed={packed!r}; expected True or False")
    cfg["packed"] = packed
    return cfg


def _tensor(op: str, key: str, t, dtypes, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise StateError(f"{op}: {key} must be a tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise StateError(f"{op}: {key} has dtype {str(t.dtype).replace('torch.', '')}; expected {want}")
    if t.dim() != ndim or t.layout != torch.strided:
        raise StateError(f"{op}: {key} has shape {tuple(t.shape)} ({t.layout}); expected a dense {ndim}-D tensor")
    return t


def _shape(op: str, key: str, t: torch.Tensor, want: tuple, why: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise StateError(f"{op}: {key} has shape {tuple(t.shape)}; expected {tuple(want)} ({why})")


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_nm_packed(op: str, cfg: dict, weight_shape: torch.Size, values, indices) -> None:
    """``packed_values`` / ``packed_indices`` of an N:M layer of ``weight_shape`` (GEMM rows (O, K))."""
    n, m = cfg["n"], cfg["m"]
    o, k = weight_shape[0], math.prod(weight_shape[1:])
    if k % m:
        raise StateError(f"{op}: the layer's K={k} (weight {tuple(weight_shape)}) is not divisible by the "
                         f"state's m={m}; this state was saved from a layer of another shape or pattern")
    kept = k // m * n
    words = -(-kept // indices_per_word(m))
    geometry = f"out={o}, K={k}, {n}:{m} keeps {kept} of each row"
    _shape(op, "packed_values", _tensor(op, "packed_values", values, _FLOATS, 2), (o, kept), geometry)
    _shape(op, "packed_indices", _tensor(op, "packed_indices", indices, (torch.int32,), 2), (o, words),
           f"{kept} indices of {index_bits(m)} bits, {indices_per_word(m)} per int32 word")
    if indices.is_meta or indices.numel() == 0:
        return
    if v.nm_group_fault(indices, n, m, kept) is not None:
        raise StateError(f"{op}: packed_indices hold in-group positions that are out of range or not strictly "
                         f"increasing (each group keeps {n} distinct positions in [0, {m})); the state is corrupted")
    if not torch.equal(pack_words(unpack_words(indices, m, kept), m), indices):
        raise StateError(f"{op}: packed_indices have non-zero padding bits; the state is corrupted")


def check_bsr_packed(op: str, cfg: dict, weight_shape: torch.Size, crow, col, values) -> None:
    """``bsr_crow`` / ``bsr_col`` / ``bsr_values`` of a 1xN layer of ``weight_shape`` (GEMM (O, K))."""
    block = cfg["block"]
    o, k = weight_shape[0], math.prod(weight_shape[1:])
    if o % block:
        raise StateError(f"{op}: the layer's {o} output rows are not divisible by the state's block={block}; this "
                         "state was saved from a layer of another shape or pattern")
    ints = (torch.int32,)
    _shape(op, "bsr_crow", _tensor(op, "bsr_crow", crow, ints, 1), (o // block + 1,),
           f"one entry per block row of {block} outputs, plus one")
    nnzb = _tensor(op, "bsr_col", col, ints, 1).shape[0]
    _shape(op, "bsr_values", _tensor(op, "bsr_values", values, _FLOATS, 2), (nnzb, block),
           f"{nnzb} kept blocks (bsr_col) of {block} values")
    if crow.is_meta or col.is_meta:
        return
    if not v.bsr_buffers_ok(crow, col, nnzb, k):
        raise StateError(f"{op}: the BSR buffers are corrupted: bsr_crow must rise from 0 to {nnzb} (the number of "
                         f"kept blocks), and no bsr_col may lie outside [0, {k}) or be not strictly increasing "
                         "within a block row")


def _check_dense(op: str, state: dict, prefix: str, key: str, want, what: str) -> None:
    t = state.get(prefix + key)
    if t is None or want is None:
        return
    if not isinstance(t, torch.Tensor):
        raise StateError(f"{op}: {key} must be a tensor, got {type(t).__name__}")
    _shape(op, key, t, want, what)


def plan_load(op: str, layer, state: dict, prefix: str) -> LoadPlan:
    """Check what ``state`` gives ``layer`` (a ``_SparseLayer``); raise :class:`StateError` if anything is off."""
    current = {k: getattr(layer, k) for k in _CONFIG}
    extra = state.get(prefix + EXTRA)
    cfg = read_config(op, extra, current) if prefix + EXTRA in state else dict(current, packed=None)
    keys = PACKED_KEYS[cfg["pattern"]]
    present = [k for k in keys if prefix + k in state]
    has_weight = prefix + "weight" in state
    bias = layer.bias
    _check_dense(op, state, prefix, "bias", None if bias is None else tuple(bias.shape), "one per output")
    if present and len(present) < len(keys):
        missing = sorted(set(keys) - set(present))
        raise StateError(f"{op}: packed state is incomplete: it has {present} but not {missing}")
    if present:
        if prefix + EXTRA not in state:
            raise StateError(f"{op}: a packed state ({', '.join(keys)}) needs its '{prefix}{EXTRA}' (pattern, n, m, "
                             "block): save it from a SparseLinear/SparseConv2d state_dict, which includes it")
        if cfg["packed"] is False:
            raise StateError(f"{op}: extra state says packed=False but the state holds packed buffers {list(keys)}")
        tensors = [state[prefix + k] for k in keys]
        (check_nm_packed if cfg["pattern"] is Pattern.NM else check_bsr_packed)(op, cfg, layer.weight_shape, *tensors)
        return LoadPlan(cfg, "packed", {k: (t.shape, t.dtype) for k, t in zip(keys, tensors)})
    if has_weight:
        if cfg["packed"] is True:
            raise StateError(f"{op}: extra state says packed=True but the state holds a dense 'weight' and no "
                             f"{list(keys)}")
        if layer.is_packed and prefix + EXTRA not in state:
            raise StateError(f"{op}: this layer is packed and the state is a plain dense one (a 'weight', no "
                             f"'{prefix}{EXTRA}'); a packed layer loads only a sparse layer's state_dict. Load a plain "
                             "state before pack() (into the training form), then pack")
        _check_dense(op, state, prefix, "weight", tuple(layer.weight_shape), "the layer's dense weight shape")
        return LoadPlan(cfg, "training", has_extra=prefix + EXTRA in state)
    changed = [k for k in _CONFIG if cfg[k] != current[k]]
    if changed:
        raise StateError(f"{op}: the state's extra state changes {changed} but holds none of the layer's weight "
                         "tensors to go with it")
    return LoadPlan(cfg, None, has_extra=prefix + EXTRA in state)
