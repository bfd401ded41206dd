"""The one enum of execution paths, and the one reader of ``NMKERN_BACKEND``.

``backend=`` arguments everywhere (ops, modules, ``sparsify``) accept a
:class:`Backend` or its string value. What each path can run, and how ``"auto"``
chooses, is the table in :mod:`nmkern.dispatch`.

``NMKERN_BACKEND`` (read by :func:`env_backend`, nowhere else) is a preference for
``"auto"``, one rule for ops and layers alike: a call that can run the named path
takes it; any other call decides as if the variable were unset. An explicit
``backend=`` always wins over the variable.
"""

from __future__ import annotations

import enum
import os


class Backend(str, enum.Enum):
    """How a call runs (``AUTO``: let :mod:`nmkern.dispatch` decide)."""

    AUTO = "auto"
    REFERENCE = "reference"  # pure torch, every device: decompress, then the dense op (every call)
    TRITON = "triton"  # nmkern.kernels (CUDA, or CPU under TRITON_INTERPRET=1)
    DENSE = "dense"  # layers: the dense op on the cached decompressed masked weight
    CUDA = "cuda"  # csrc/cuda 2:4 tensor-core GEMM through CuPy
    CUSPARSELT = "cusparselt"  # torch's cuSPARSELt 2:4 GEMM
    CPU = "cpu"  # csrc/cpu native kernels through ctypes

    def __str__(self) -> str:  # "triton", not "Backend.TRITON", in messages
        return self.value


ENV_BACKEND = "NMKERN_BACKEND"


def triton_interpret() -> bool:
    """True when Triton runs its interpreter (``TRITON_INTERPRET`` set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def parse_backend(op: str, backend) -> Backend:
    """A :class:`Backend` from a Backend or its (case-insensitive) string value."""
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        try:
            return Backend(backend.strip().lower())
        except ValueError:
            pass
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {[b.value for b in Backend]}")
    raise TypeError(f"{op}: backend must be a str or nmkern.Backend, got {type(backend).__name__}")


def env_backend(op: str) -> Backend | None:
    """The path ``NMKERN_BACKEND`` asks for, or None when it is unset, empty or "auto"."""
    text = os.environ.get(ENV_BACKEND, "").strip()
    if not text:
        return None
    b = parse_backend(f"{op} ({ENV_BACKEND})", text)
    return None if b is Backend.AUTO else b


def __getattr__(name: str):
    from ._moved import renamed_attribute

    renames = {}
    if name == "resolve_backend":  # nmkern 0.1 home of the op-level decision (dispatch imports this module)
        from .dispatch import resolve_backend

        renames[name] = (resolve_backend, "nmkern.dispatch.resolve_backend")
    return renamed_attribute(__name__, name, renames)
