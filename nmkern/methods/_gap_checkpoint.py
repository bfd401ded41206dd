"""GaP phase checkpoints (``<checkpoint_dir>/phase_NNNN.pt``): written atomically, read without running code.

A phase checkpoint holds only tensors and plain containers::

    {"fingerprint": str, "next": int,
     "model": {state_dict key: Tensor}, "masks": {layer: bool Tensor or None},
     "history": [{str: str | float | int | list[float]}],
     "pending": {partition: {"state": {key: Tensor}, "masks": {layer: Tensor or None}, "loss": float}}}

No RNG state is stored: every phase reseeds from (seed, phase index), so nothing else is
needed to resume bit for bit. Files are read with ``torch.load(weights_only=True)``: a
planted or corrupted file (a pickle whose ``__reduce__`` would run a command, a truncated
zip) is refused with a :class:`~nmkern.checkpoint_io.CheckpointError` that names the file
and says to delete it, never unpickled into arbitrary objects.
"""

from __future__ import annotations

import glob
import os

import torch

from ..checkpoint_io import CheckpointError

CHECKPOINT_VERSION = 1  # part of the run fingerprint; the format is unchanged since version 1
PATTERN = "phase_*.pt"


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The checkpoint of the last phase written in ``ckpt_dir``, or None."""
    files = sorted(glob.glob(os.path.join(ckpt_dir, PATTERN)))
    return files[-1] if files else None


def write_checkpoint(ckpt_dir: str, index: int, payload: dict) -> str:
    """``payload`` as ``phase_{index:04d}.pt``; atomic, so a kill mid-write leaves the previous one as the latest."""
    check_payload(f"phase {index} (being written)", payload)
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, f"phase_{index:04d}.pt")
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def fix_hint(path: str) -> str:
    return (f"delete {path} to recompute that phase (the run then resumes from the previous phase_*.pt), "
            f"or pass resume=False / another checkpoint_dir to start over")


def read_checkpoint(path: str) -> dict:
    """The payload in ``path``, loaded with ``weights_only=True`` and checked; :class:`CheckpointError` otherwise."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (planted objects), RuntimeError/EOFError (truncated), OSError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(
            f"GaP checkpoint {path} cannot be read safely ({type(e).__name__}: {reason}); it is corrupted, truncated "
            f"or holds objects other than tensors and plain containers and was not loaded; {fix_hint(path)}"
        ) from e
    check_payload(path, ck)
    return ck


def _masks_ok(masks) -> bool:
    return isinstance(masks, dict) and all(
        isinstance(k, str) and (v is None or isinstance(v, torch.Tensor)) for k, v in masks.items())


def _state_ok(state) -> bool:
    return isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


def _plain(x) -> bool:
    if x is None or isinstance(x, (bool, int, float, str)):
        return True
    if isinstance(x, (list, tuple)):
        return all(_plain(v) for v in x)
    return isinstance(x, dict) and all(isinstance(k, str) and _plain(v) for k, v in x.items())


def _problem(ck) -> str | None:
    """What is wrong with a checkpoint payload, or None."""
    if not isinstance(ck, dict):
        return f"a {type(ck).__name__}, not a dict"
    want = {"fingerprint", "next", "model", "masks", "history", "pending"}
    if set(ck) != want:
        return f"keys {sorted(map(str, ck))}, expected {sorted(want)}"
    if not isinstance(ck["fingerprint"], str):
        return "fingerprint is not a string"
    if isinstance(ck["next"], bool) or not isinstance(ck["next"], int) or ck["next"] < 1:
        return f"next phase {ck['next']!r} is not an int >= 1"
    if not _state_ok(ck["model"]):
        return "model is not a dict of tensors"
    if not _masks_ok(ck["masks"]):
        return "masks is not a dict of tensors / None"
    if not isinstance(ck["history"], list) or not all(isinstance(h, dict) and _plain(h) for h in ck["history"]):
        return "history is not a list of plain dicts"
    pending = ck["pending"]
    if not isinstance(pending, dict):
        return "pending is not a dict"
    for p, job in pending.items():
        if isinstance(p, bool) or not isinstance(p, int) or not isinstance(job, dict):
            return f"pending entry {p!r} is not partition int -> dict"
        if set(job) != {"state", "masks", "loss"} or not _state_ok(job["state"]) or not _masks_ok(job["masks"]) \
                or not isinstance(job["loss"], float):
            return f"pending worker job {p} is not {{state, masks, loss}}"
    return None


def check_payload(path: str, ck) -> None:
    problem = _problem(ck)
    if problem is not None:
        raise CheckpointError(f"GaP checkpoint {path} is not a GaP phase checkpoint ({problem}); {fix_hint(path)}")
