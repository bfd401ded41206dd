"""The ``nmkern`` command line.

Exit codes: 0 ok, 2 bad usage or input (the message says what and how to fix),
1 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2

CANDIDATE_M = (2, 4, 8, 16)
CANDIDATE_BLOCKS = (32, 16, 8, 4, 2)


class UsageError(Exception):
    """Bad user input: reported on stderr, exit code 2."""


# --------------------------------------------------------------------------- inspect


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a state_dict, a dict holding one, a pickled module or TorchScript."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as first:
        try:
            import warnings

            with warnings.catch_warnings():  # "torch.jit.load is deprecated": still the way to read TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = torch.jit.load(str(p), map_location="cpu")
        except Exception:
            raise UsageError(
                f"{path} is not a checkpoint torch can load safely ({type(first).__name__}: {first}); "
                "save a state_dict with torch.save(model.state_dict(), path) or a TorchScript file"
            ) from None
    if isinstance(obj, torch.nn.Module) or hasattr(obj, "state_dict"):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        tensors = {k: t for k, t in obj.items() if isinstance(t, torch.Tensor)}
        if tensors:
            return tensors
    raise UsageError(f"{path} holds no tensors (got {type(obj).__name__}); pass a state_dict checkpoint")


def group_dim(t: torch.Tensor) -> int:
    """Linear weights group along in_features (dim 1 == -1), conv weights along input channels (dim 1)."""
    return 1


def detect_nm(t: torch.Tensor) -> tuple[int, int] | None:
    """The sparsest N:M pattern ``t`` satisfies along its group dim (smallest m among equals), or None."""
    x = t.movedim(group_dim(t), -1)
    best = None
    for m in CANDIDATE_M:
        if x.shape[-1] % m:
            continue
        n = int((x != 0).reshape(-1, m).sum(-1).max())
        if n >= m:
            continue
        n = max(n, 1)
        if best is None or n / m < best[0] / best[1]:
            best = (n, m)
    return best


def detect_1xn(t: torch.Tensor) -> tuple[int, float] | None:
    """Largest block size N whose blocks (N out-channels x 1 in-channel x kernel) are all-zero or all-non-zero."""
    o = t.shape[0]
    nz = (t != 0).reshape(o, t.shape[1], -1)
    for n in CANDIDATE_BLOCKS:
        if o % n or n > o:
            continue
        blocks = nz.reshape(o // n, n, nz.shape[1], nz.shape[2])
        any_nz = blocks.any(dim=(1, 3))
        all_nz = blocks.all(dim=(1, 3))
        zero_blocks = ~any_nz
        if bool((zero_blocks | all_nz).all()) and bool(zero_blocks.any()):
            return n, float(zero_blocks.float().mean())
    return None


def describe_tensor(name: str, t: torch.Tensor) -> dict:
    info = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "pattern": "dense"}
    if t.numel():
        info["sparsity"] = round(1.0 - float((t != 0).float().mean()), 6)
    if t.dim() < 2 or not t.is_floating_point() or t.numel() == 0:
        info["pattern"] = "-"
        return info
    # 1xN first: a block-sparse weight often satisfies some N:M pattern by chance, while a
    # random N:M weight practically never has uniform N x 1 blocks.
    blk = detect_1xn(t)
    if blk is not None:
        info["pattern"] = f"1x{blk[0]}"
        info["block_sparsity"] = round(blk[1], 6)
        return info
    nm = detect_nm(t)
    if nm is not None:
        info["pattern"] = f"{nm[0]}:{nm[1]}"
        return info
    if info.get("sparsity", 0) > 0:
        info["pattern"] = "unstructured"
    return info


def cmd_inspect(args) -> int:
    sd = load_state_dict(args.file)
    rows = [describe_tensor(k, t) for k, t in sd.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    print(f"{'tensor':<{width}}  {'shape':<20} {'dtype':<9} {'sparsity':>8}  pattern")
    for r in rows:
        sp = f"{r['sparsity']:.3f}" if "sparsity" in r else "-"
        pat = r["pattern"] + (f" ({r['block_sparsity']:.0%} blocks zero)" if "block_sparsity" in r else "")
        print(f"{r['name']:<{width}}  {str(tuple(r['shape'])):<20} {r['dtype']:<9} {sp:>8}  {pat}")
    return EXIT_OK


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmkern", description="N:M and 1xN structured sparsity: inspect, prune, train, bench.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="per weight of a checkpoint: shape and which N:M or 1xN pattern it satisfies")
    p.add_argument("file", help="a state_dict checkpoint (torch.save) or TorchScript file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as e:
        print(f"nmkern {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError) as e:
        print(f"nmkern {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # pragma: no cover - reported, not hidden
        import traceback

        traceback.print_exc()
        print(f"nmkern {args.command}: internal error: {e}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
