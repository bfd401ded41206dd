"""What each layer of a model holds in memory, and in which forms: :func:`memory_report`.

A packed sparse layer can hold several forms of one weight: the packed buffers it is saved with,
the dense weight its dense path decodes once and keeps (``dense_cache``), and the layouts its
native kernels read (``cpu_layout``, the CUDA ``semi24`` tensors, the ``cusparselt`` weight).
Each comes into being when a path first needs it (``pack()`` builds the native layouts of the
paths the layer may take; the first dense call builds the dense cache), and under measured dispatch a
layer then keeps one of them (:mod:`nmkern.nn._forms`). The report lists the bytes of each form per
layer, so a model that holds more than it needs shows where. Storage shared by
two forms or two layers (a tied weight, a cache that is a view of a buffer) is counted once, at its
first appearance.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import sys

import torch
import torch.nn as nn

_PACKED = ("packed_values", "packed_indices", "bsr_crow", "bsr_col", "bsr_values")


@dataclasses.dataclass
class MemoryReport:
    """Per layer (``rows``: name, type, {form: bytes}, bytes) and for the whole model, in bytes."""

    rows: list[dict]
    other_bytes: int  # parameters and buffers outside Linear / Conv2d / sparse layers (embeddings, norms)

    @property
    def total_bytes(self) -> int:
        return sum(r["bytes"] for r in self.rows) + self.other_bytes

    def by_form(self) -> dict[str, int]:
        """Bytes per form over all layers."""
        out: dict[str, int] = {}
        for r in self.rows:
            for form, n in r["forms"].items():
                out[form] = out.get(form, 0) + n
        return out

    def __str__(self) -> str:
        width = max([len(r["name"]) for r in self.rows] + [5])
        lines = [f"{'layer':<{width}}  {'MB':>9}  forms"]
        for r in self.rows:
            forms = ", ".join(f"{k} {v / 2**20:.3f}" for k, v in r["forms"].items())
            lines.append(f"{r['name']:<{width}}  {r['bytes'] / 2**20:>9.3f}  {forms}")
        lines.append(f"{'other':<{width}}  {self.other_bytes / 2**20:>9.3f}  (parameters and buffers of other modules)")
        lines.append(f"{'total':<{width}}  {self.total_bytes / 2**20:>9.3f}")
        return "\n".join(lines)


def _tensors(obj) -> list[torch.Tensor]:
    """The plain tensors inside a cache entry: a tensor, a tuple of them, a CpuLinear, a semi-structured tensor."""
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, nn.Parameter):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(getattr(obj, "tensors", None), dict):  # nmkern._cpu.CpuLinear
        return [t for t in obj.tensors.values() if isinstance(t, torch.Tensor)]
    # torch.sparse.SparseSemiStructuredTensor (cuSPARSELt): its packed data and metadata
    return [t for name in ("packed", "meta", "packed_t", "meta_t")
            if isinstance(t := getattr(obj, name, None), torch.Tensor)]


class _Counter:
    """Bytes of tensors, each storage counted once."""

    def __init__(self):
        self.seen: set[tuple] = set()

    def bytes(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (t.device.type, t.device.index, storage.data_ptr())
            if key in self.seen or storage.data_ptr() == 0:
                continue
            self.seen.add(key)
            total += storage.nbytes()
        return total


def _layer_forms(module: nn.Module, count: _Counter) -> dict[str, int]:
    from .nn._layer import _SparseLayer  # that module imports this one (release_free_memory)

    forms: dict[str, int] = {}

    def add(form: str, tensors) -> None:
        n = count.bytes(tensors)
        if n:
            forms[form] = forms.get(form, 0) + n

    if isinstance(module, _SparseLayer):
        add("packed", [module._buffers.get(k) for k in _PACKED])
        add("weight", [module._parameters.get("weight")])
        add("weight_mask", [module._buffers.get("weight_mask")])
        add("dense_cache", _tensors(module.__dict__.get("_dense_cache")))
        add("cpu_layout", _tensors(module.__dict__.get("_cpu_cache")))
        add("semi24", _tensors(module.__dict__.get("_semi24_cache")))
        add("cusparselt", _tensors(module.__dict__.get("_cslt_cache")))
    else:
        add("weight", [module._parameters.get("weight")])
    add("bias", [module._parameters.get("bias")])
    return forms


def memory_report(model: nn.Module) -> MemoryReport:
    """The bytes each Linear / Conv2d / nmkern sparse layer of ``model`` holds, per form (see the module docs).

    Forms: ``weight`` (a dense or training-form weight), ``weight_mask`` (a 1xN training mask),
    ``packed`` (the packed N:M or BSR buffers), ``dense_cache`` (the decoded weight the dense path
    keeps), ``cpu_layout`` / ``semi24`` / ``cusparselt`` (native kernel layouts), ``bias``.
    Nothing is computed or moved: only what the model holds now is counted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memory_report: model must be an nn.Module, got {type(model).__name__}")
    from .nn._layer import _SparseLayer

    count = _Counter()
    rows, layer_ids = [], set()
    for name, module in model.named_modules():
        if isinstance(module, (_SparseLayer, nn.Linear, nn.Conv2d)) and id(module) not in layer_ids:
            layer_ids.add(id(module))
            forms = _layer_forms(module, count)
            rows.append({"name": name or "(model)", "type": type(module).__name__, "forms": forms,
                         "bytes": sum(forms.values())})
    other = count.bytes([t for m in model.modules() if id(m) not in layer_ids
                         for t in list(m._parameters.values()) + list(m._buffers.values())])
    return MemoryReport(rows, other)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: macOS, Windows, musl without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; nothing elsewhere).

    Packing frees a dense-sized temporary or two per layer (the masked weight, the decoded rows the
    native layouts are built from), but glibc keeps freed blocks of that size in its heap: eight
    2048x2048 fp32 layers held 325 MB of process memory after ``sparsify(pack=True)`` for 136 MB of
    packed buffers and CPU layouts, 150 MB after trimming (measured, bench/memory_rss.py).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
