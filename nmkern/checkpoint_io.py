"""Reading and writing model files, and one-shot pruning of a loaded model (what ``nmkern prune`` runs).

* :func:`load_state_dict`: the tensors of a checkpoint (a state_dict, a dict holding
  one, a pickled module or TorchScript);
* :func:`load_model`: a module from a state_dict checkpoint and a ``module:callable``
  factory, or a TorchScript file;
* :func:`prune_module` / :func:`prune_torchscript`: the masked weights a scheme gives
  each Linear / Conv2d (model untouched) and a per-layer report; :func:`set_weights`
  writes them back;
* :func:`atomic_write` / :func:`atomic_write_all` / :func:`write_json`: outputs that are never left
  half-written, and never written over a directory or device node.

Bad input raises :class:`CheckpointError` (a ``ValueError``) saying what and how to fix.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .spec import BlockSpec, NMSpec, SpecResolver

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net")


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or does not fit the model it is meant for."""


# --------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_target(path: Path) -> Path:
    """The path a write to ``path`` lands on (a symlink's target); refuses anything but a regular file."""
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    if os.path.lexists(target) and not target.is_file():
        raise CheckpointError(f"{path} exists and is not a regular file (a directory, device or other special "
                              "file); nmkern writes only regular files: choose another path")
    return target


def atomic_write_all(writes: Sequence[tuple[Path, Callable[[Path], object]]]) -> None:
    """``write(tmp)`` for every ``(path, write)``, each into a temp file beside its path, then rename them all.

    A failure in any writer leaves no output written or half-written. An output that
    exists and is not a regular file (a directory, ``/dev/null``, a FIFO) is refused
    before anything is written, so a device node is never replaced by a file.
    """
    targets = [_write_target(path) for path, _ in writes]
    temps: list[Path] = []
    try:
        for target, (_, write) in zip(targets, writes):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
            os.close(fd)
            temps.append(Path(name))
            write(temps[-1])
            mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else 0o666 & ~_umask()
            os.chmod(temps[-1], mode)
        for target, tmp in zip(targets, temps):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            if os.path.lexists(tmp):
                tmp.unlink()


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp_path)`` then rename: a failure never leaves a half-written output (:func:`atomic_write_all`)."""
    atomic_write_all([(Path(path), write)])


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, default=str) + "\n"))


def save_model(model, path: Path, *, atomic: bool = True) -> None:
    """A TorchScript module as TorchScript, an nn.Module as its state_dict; atomically unless ``atomic=False``
    (for a writer of :func:`atomic_write_all`, which is given a temp path)."""
    if isinstance(model, torch.jit.ScriptModule):
        write = lambda p: torch.jit.save(model, str(p))  # noqa: E731
    else:
        write = lambda p: torch.save(model.state_dict(), p)  # noqa: E731
    if atomic:
        atomic_write(path, write)
    else:
        write(path)


# --------------------------------------------------------------------------- reading


def describe_load_error(e: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a few words (never torch's advice to
    retry with the unsafe loader, which would run whatever code a planted pickle holds)."""
    text = str(e)
    if "Weights only load failed" in text:
        return ("it holds Python objects other than tensors and plain containers, which nmkern does not load "
                "(unpickling them could run code), or it is damaged")
    if isinstance(e, EOFError) or not text.strip():
        return f"it is empty or truncated ({type(e).__name__})"
    first = " ".join(text.split())[:160]
    return f"{type(e).__name__}: {first}"


def load_torchscript(path: Path):
    """The TorchScript module in ``path`` (on the CPU), or None when it is not one."""
    try:
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": still the way to read TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception:
        return None


def load_state_dict(path: str, *, extra_state: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a state_dict, a dict holding one, a pickled module or TorchScript.

    ``extra_state=True`` also keeps the modules' ``<name>._extra_state`` dicts (an nmkern sparse
    layer's config rides there)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no such file: {path}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as first:
        obj = load_torchscript(p)
        if obj is None:
            raise CheckpointError(
                f"{path} is not a checkpoint torch can load safely ({describe_load_error(first)}); "
                "save a state_dict with torch.save(model.state_dict(), path) or a TorchScript file"
            ) from None
    if isinstance(obj, torch.nn.Module) or hasattr(obj, "state_dict"):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        tensors = {k: t for k, t in obj.items() if isinstance(t, torch.Tensor)}
        if tensors:
            if extra_state:
                tensors.update({k: e for k, e in obj.items() if k.endswith("._extra_state") and isinstance(e, dict)})
            return tensors
    raise CheckpointError(f"{path} holds no tensors (got {type(obj).__name__}); pass a state_dict checkpoint")


def import_factory(spec: str) -> Callable:
    """The callable named by ``module:attr`` (attr may be dotted)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise CheckpointError(f"--factory {spec!r}: write it as module:callable (e.g. nmkern.models:MNIST1DNet)")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise CheckpointError(f"--factory {spec!r}: cannot import {mod_name!r} ({e}); is it on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CheckpointError(f"--factory {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CheckpointError(f"--factory {spec!r}: {attr!r} is not callable")
    return obj


def model_from_factory(spec: str) -> torch.nn.Module:
    """The module ``module:callable()`` builds (called with no arguments)."""
    factory = import_factory(spec)
    try:
        model = factory()
    except Exception as e:
        raise CheckpointError(f"--factory {spec}: calling it with no arguments failed ({type(e).__name__}: {e})") from None
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"--factory {spec}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_from_factory(spec: str, state_dict: dict, *, sparse: bool = False) -> torch.nn.Module:
    """``module:callable()`` with ``state_dict`` loaded into it (every key must fit); ``sparse=True`` first swaps
    the layers the state saved as nmkern sparse layers (:func:`swap_saved_sparse_layers`)."""
    model = model_from_factory(spec)
    if sparse:
        swap_saved_sparse_layers(model, state_dict)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        detail = " ".join(str(e).split())[:400]
        raise CheckpointError(f"the checkpoint does not fit the model built by {spec} ({detail}); pass the factory the "
                              "checkpoint was saved from") from None
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise CheckpointError(
            f"the checkpoint does not fit the model built by {spec}: missing keys {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}"
            f"{'...' if len(unexpected) > 6 else ''}; pass the factory the checkpoint was saved from")
    return model


def swap_saved_sparse_layers(model: torch.nn.Module, state_dict: Mapping) -> list[str]:
    """Swap each ``nn.Linear`` / ``nn.Conv2d`` of ``model`` that ``state_dict`` saved as an nmkern sparse layer
    (its ``<name>._extra_state`` holds a pattern) for a :class:`~nmkern.SparseLinear` / :class:`~nmkern.SparseConv2d`
    of that pattern, so the state loads into it; returns the swapped names. Refuses before changing anything."""
    from .nn import SparseConv2d, SparseLinear

    plan = []
    for key, extra in state_dict.items():
        if not key.endswith("._extra_state") or not isinstance(extra, dict) or "pattern" not in extra:
            continue
        name = key[: -len("._extra_state")]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint holds a sparse layer {name!r} that the model has not; build the "
                                  "model the checkpoint was saved from") from None
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            continue
        if type(mod) not in (torch.nn.Linear, torch.nn.Conv2d):
            raise CheckpointError(f"the checkpoint holds a sparse layer at {name!r}, where the model has a "
                                  f"{type(mod).__name__}, not an nn.Linear / nn.Conv2d")
        kw = {k: extra[k] for k in ("pattern", "n", "m", "block", "sparsity") if k in extra}
        cls = SparseLinear if type(mod) is torch.nn.Linear else SparseConv2d
        try:
            plan.append((name, cls.from_dense(mod, **kw)))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"the checkpoint's sparse layer {name!r} does not fit the model's: {e}") from None
    for name, new in plan:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return [name for name, _ in plan]


def load_into(model: torch.nn.Module, path: str, what: str, fix: str) -> None:
    """Load the state_dict checkpoint ``path`` into ``model``; every key must fit (``what``/``fix`` word the error)."""
    sd = load_state_dict(path)
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{what} ({' '.join(str(e).split())[:300]})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{what} (missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}); "
                              f"{fix}")


def load_model(path: str, factory: str | None = None) -> tuple[torch.nn.Module, str]:
    """``(model, format)``: a state_dict checkpoint built with ``factory`` ('state_dict') or TorchScript ('torchscript')."""
    if factory:
        return build_from_factory(factory, load_state_dict(path)), "state_dict"
    script = load_torchscript(Path(path))
    if script is not None:
        return script, "torchscript"
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        loadable = True
    except Exception:
        loadable = False
    if loadable:
        raise CheckpointError(f"{path} is a state_dict checkpoint: pass --factory module:callable that builds "
                              "the model it belongs to (e.g. --factory nmkern.models:MNIST1DNet)")
    raise CheckpointError(f"{path} is neither a TorchScript file nor a state_dict torch can load safely")


# --------------------------------------------------------------------------- one-shot pruning


def _sparsified_row(name: str, detail: str, w: torch.Tensor) -> dict:
    return {"layer": name, "action": "sparsified", "detail": detail, "sparsity": round(float((w == 0).float().mean()), 6)}


def _unmatched_rows(keys) -> list[dict]:
    return [{"layer": k, "action": "unmatched", "detail": "scheme key matched no Linear/Conv2d layer"} for k in keys]


def prune_module(model: torch.nn.Module, scheme) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Masked weights by layer name (module untouched) and per-layer rows, via nmkern.sparsify on a copy."""
    from .sparsify import sparsify

    work = copy.deepcopy(model)
    report = sparsify(work, scheme)
    masked, rows = {}, []
    for name, pat in report.swapped:
        masked[name] = work.get_submodule(name).dense_weight()  # a SparseLinear / SparseConv2d sparsify put there
        rows.append(_sparsified_row(name, pat, masked[name]))
    for name, reason in report.skipped:
        rows.append({"layer": name, "action": "skipped", "detail": reason})
    return masked, rows + _unmatched_rows(report.unmatched_keys)


def _script_fit_reason(kind: str, mod, w: torch.Tensor, spec) -> str | None:
    from .dispatch import LayerOp
    from .nn import Pattern, fit_reason

    pattern = Pattern.NM if isinstance(spec, NMSpec) else Pattern.ONE_BY_N
    n, m, block = getattr(spec, "n", 2), getattr(spec, "m", 4), getattr(spec, "block", 4)
    if kind == "Linear":
        return fit_reason(LayerOp.LINEAR, w.shape[1], w.shape[0], pattern, n, m, block)
    groups = int(getattr(mod, "groups", 1))
    return fit_reason(LayerOp.CONV2D, w.shape[1] * groups, w.shape[0], pattern, n, m, block, groups)


def prune_torchscript(model, scheme) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The same on a TorchScript module: Linear/Conv2d submodules found by their original class name."""
    from .functional import block_mask_1xn, nm_mask

    resolver = SpecResolver(scheme, op="prune", allowed=(NMSpec.pattern, BlockSpec.pattern))
    masked, rows = {}, []
    for name, mod in model.named_modules():
        kind = getattr(mod, "original_name", "")
        if kind not in ("Linear", "Conv2d") or not name:
            continue
        w = mod.weight.detach()
        spec = resolver.lookup(name)
        desc = f"{kind} {tuple(w.shape)}"
        if not isinstance(spec, (NMSpec, BlockSpec)):
            why = "not in the scheme (left dense)" if spec is None else "the scheme keeps it dense (None)"
            rows.append({"layer": name, "action": "skipped", "detail": f"{desc}: {why}"})
            continue
        reason = _script_fit_reason(kind, mod, w, spec)
        if reason:
            rows.append({"layer": name, "action": "skipped", "detail": f"{desc}: {reason}"})
            continue
        if isinstance(spec, NMSpec):
            keep = nm_mask(w, spec.n, spec.m, dim=1, backend="reference")
        else:
            keep = block_mask_1xn(w, spec.block, spec.sparsity, backend="reference")
        masked[name] = w * keep
        rows.append(_sparsified_row(name, f"{desc} as {spec}", masked[name]))
    return masked, rows + _unmatched_rows(resolver.unused_keys() if resolver.is_mapping else [])


def prune(model, scheme) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """:func:`prune_torchscript` for a TorchScript module, :func:`prune_module` otherwise."""
    if isinstance(model, torch.jit.ScriptModule):
        return prune_torchscript(model, scheme)
    return prune_module(model, scheme)


def submodule(model, name: str):
    mod = model  # attribute walk: works for nn.Module and TorchScript modules alike
    for part in name.split("."):
        mod = getattr(mod, part)
    return mod


def set_weights(model, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights[name]`` into ``model.<name>.weight`` for every name."""
    with torch.no_grad():
        for name, w in weights.items():
            submodule(model, name).weight.copy_(w)


__all__ = ["CheckpointError", "atomic_write", "atomic_write_all", "build_from_factory", "describe_load_error",
           "import_factory", "load_into", "load_model", "load_state_dict", "load_torchscript", "model_from_factory", "prune",
           "prune_module",
           "prune_torchscript", "save_model", "set_weights", "submodule", "swap_saved_sparse_layers", "write_json"]
