"""Kernel configurations as data: one list per kernel feeds its launcher, AOT_SPECS and autotuning.

Every kernel file gives its configurations in one ``*_configs()`` function (as the
Triton matmul tutorial's ``get_cuda_autotune_config()``): a list of plain dicts,
each holding the kernel's tunable constexpr meta-parameters (block sizes) plus the
launch options ``num_warps`` / ``num_stages`` - the split of a ``triton.Config``.
Parameters fixed by the problem (``M``, ``MP``, dtypes, flags) are not in it; the
launcher passes those itself. The list is the only place the numbers are written:

* the launcher picks one entry by a rule over the list (:func:`pick_by_rows`, or the
  first entry where the list holds one) and runs it through :func:`launch`;
* ``AOT_SPECS`` are built from entries of the list by :func:`aot_spec`;
* with ``NMKERN_AUTOTUNE=1`` on a CUDA GPU (never under ``TRITON_INTERPRET``),
  :func:`launch` runs ``triton.autotune`` over the whole list instead
  (:func:`autotuned`). Off by default: the default path is the launcher's rule.
"""

from __future__ import annotations

import functools
import os

import triton

from nmkern.backend import triton_interpret

AUTOTUNE_ENV = "NMKERN_AUTOTUNE"
# Config keys that are launch/compile options of a triton.Config, not kernel arguments.
LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg"})


def split(config: dict) -> tuple[dict, dict]:
    """``(meta-parameters, launch options)`` of one config."""
    meta = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
    options = {k: v for k, v in config.items() if k in LAUNCH_OPTIONS}
    return meta, options


def to_triton_config(config: dict) -> triton.Config:
    """The ``triton.Config`` of one config dict."""
    meta, options = split(config)
    return triton.Config(meta, **options)


def pick_by_rows(configs: list[dict], block: str, rows: int) -> dict:
    """The first config whose ``block`` covers ``rows``, else the last one.

    ``configs`` list ``block`` in ascending order, so this is the smallest tile
    that covers ``rows``, capped at the largest tile.
    """
    return next((c for c in configs if c[block] >= rows), configs[-1])


def aot_spec(name: str, fn, signature: dict, config: dict, constexprs: dict | None = None, **options) -> dict:
    """An :mod:`nmkern.aot` spec that compiles ``fn`` with ``config``.

    ``constexprs`` are the problem's own constexpr arguments; the config adds its
    meta-parameters to them and its launch options (``num_warps``...) to the spec,
    and ``options`` are further compile options (e.g. ``enable_fp_fusion``).
    Constexpr arguments need no ``signature`` entry (nmkern.aot marks them).
    """
    meta, launch_options = split(config)
    return {"name": name, "fn": fn, "signature": signature, "constexprs": {**(constexprs or {}), **meta},
            **launch_options, **options}


def autotune_enabled() -> bool:
    """True when ``NMKERN_AUTOTUNE`` is set (not ``0``) on a CUDA machine and the interpreter is off."""
    if os.environ.get(AUTOTUNE_ENV, "0") in ("", "0") or triton_interpret():
        return False
    import torch

    return torch.cuda.is_available()


@functools.cache
def _autotuner(kernel, configs: tuple, key: tuple):
    return triton.autotune(configs=[to_triton_config(dict(c)) for c in configs], key=list(key))(kernel)


def autotuned(kernel, configs: list[dict], key=()):
    """``kernel`` wrapped in ``triton.autotune`` over ``configs``, retuned per value of the ``key`` arguments.

    One wrapper per (kernel, configs, key), kept for the process, so tuning results
    are reused across calls.
    """
    return _autotuner(kernel, tuple(tuple(sorted(c.items())) for c in configs), tuple(key))


def launch(kernel, configs: list[dict], config: dict, grid, *args, tune_key=(), **kwargs) -> None:
    """Launch ``kernel[grid(config)](*args, **kwargs, **config)``.

    ``config`` is the launcher's pick from ``configs``; ``grid`` maps a dict of
    meta-parameters to the launch grid. With :func:`autotune_enabled`, the kernel
    runs through :func:`autotuned` over all of ``configs`` (keyed on ``tune_key``)
    and ``config`` is ignored.
    """
    if autotune_enabled():
        autotuned(kernel, configs, tune_key)[grid](*args, **kwargs)
    else:
        kernel[grid(config)](*args, **kwargs, **config)
