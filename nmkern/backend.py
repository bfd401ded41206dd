"""Backend selection: one small function decides, everything else asks it.

``backend=`` arguments accept a :class:`Backend` or its string value. The
``NMKERN_BACKEND`` environment variable overrides ``"auto"`` (never an explicit
choice), which is how CI forces the Triton interpreter path on the CPU.
"""

from __future__ import annotations

import enum
import os

import torch


class Backend(str, enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"  # pure torch, every device
    TRITON = "triton"  # CUDA, or CPU under TRITON_INTERPRET=1
    CUDA = "cuda"  # csrc/cuda through CuPy
    CUSPARSELT = "cusparselt"  # torch._cslt_sparse_mm
    CPU = "cpu"  # csrc/cpu through ctypes

    def __str__(self) -> str:  # "triton", not "Backend.TRITON", in messages
        return self.value


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def parse_backend(op: str, backend) -> Backend:
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        try:
            return Backend(backend.lower())
        except ValueError:
            pass
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {[b.value for b in Backend]}")
    raise TypeError(f"{op}: backend must be a str or nmkern.Backend, got {type(backend).__name__}")


def resolve_backend(op: str, backend, tensor: torch.Tensor, supported=(Backend.REFERENCE, Backend.TRITON)) -> Backend:
    """Turn ``backend`` (maybe "auto") into a concrete backend for ``tensor``.

    auto: the ``NMKERN_BACKEND`` variable if set, else triton for CUDA tensors and
    for CPU tensors under ``TRITON_INTERPRET=1``, else reference.
    """
    b = parse_backend(op, backend)
    if b is Backend.AUTO:
        env = os.environ.get("NMKERN_BACKEND", "").strip()
        if env and env != "auto":
            b = parse_backend(f"{op} (NMKERN_BACKEND)", env)
            if b not in supported:
                return Backend.REFERENCE
        elif Backend.TRITON in supported and (tensor.is_cuda or (tensor.device.type == "cpu" and triton_interpret())):
            b = Backend.TRITON
        else:
            b = Backend.REFERENCE
    if b not in supported:
        raise ValueError(f"{op}: backend {b.value!r} is not available for this op; choose one of {[s.value for s in supported]}")
    if b is Backend.TRITON and tensor.device.type == "cpu" and not triton_interpret():
        raise ValueError(
            f"{op}: the triton backend needs a CUDA tensor (got one on cpu); "
            "set TRITON_INTERPRET=1 to run Triton on the CPU, or use backend='reference'"
        )
    return b
