"""Plumbing the ``nmkern`` commands share: exit codes, usage errors, common flags, atomic outputs, --scheme."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..checkpoint_io import write_json
from ..spec import BlockSpec, NMSpec, parse_spec

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2

SCHEME_PATTERNS = (NMSpec.pattern, BlockSpec.pattern)
SCHEME_HELP = "'n:m' (e.g. 2:4), '1x<block>:<sparsity>' (e.g. 1x4:0.5), or a scheme JSON file"

__all__ = ["EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "SCHEME_HELP", "UsageError", "add_data_args",
           "check_out_dir", "int_list_type", "load_data", "parse_int_list", "parse_scheme_arg", "progress",
           "set_threads", "write_json"]


class UsageError(Exception):
    """Bad user input: reported on stderr, exit code 2."""


def progress(args) -> bool:
    """Progress bars unless --no-progress."""
    return not getattr(args, "no_progress", False)


def set_threads(args) -> None:
    """--threads (default 1 for the small bundled models: under contention two OpenMP threads spin,
    measured 25x the CPU time of one per MNIST-1D epoch). main() restores the caller's count."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)


def check_out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {path}: exists and is not a directory; choose a directory path")
    return out


def parse_int_list(flag: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag} {text!r}: give positive integers separated by commas, e.g. 1,16,256")
    return vals


def int_list_type(text: str) -> list[int]:
    """argparse ``type=`` of a comma-separated list of positive integers."""
    try:
        return parse_int_list("", text)
    except UsageError:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas") from None


def _scheme_file(text: str):
    p = Path(text)
    if not p.is_file():
        raise UsageError(f"--scheme {text}: no such file (give {SCHEME_HELP})")
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--scheme {text}: not valid JSON ({e})") from None
    from ..scheme import Scheme

    if isinstance(obj, dict) and obj.get("format", "").startswith("nmkern.scheme"):
        try:
            return Scheme.from_dict(obj)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--scheme {text}: {e}") from None
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        try:
            return {k: parse_spec(v, op="sparsify", where=f"scheme[{k!r}]", allowed=SCHEME_PATTERNS)
                    for k, v in obj.items()}
        except (ValueError, TypeError) as e:
            raise UsageError(f"--scheme {text}: {e}") from None
    raise UsageError(f"--scheme {text}: expected an nmkern scheme (Scheme.save) or a JSON object "
                     "{layer name or glob: 'n:m' | [n, m] | '1x<block>:<sparsity>' | null}")


def parse_scheme_arg(text: str):
    """``--scheme`` value -> an NMSpec / BlockSpec for every layer, ``{name or glob: spec}``, or a Scheme."""
    if text.lower().endswith(".json") or Path(text).is_file():
        return _scheme_file(text)
    try:
        spec = parse_spec(text, op="nmkern", where="--scheme", allowed=SCHEME_PATTERNS)
    except (ValueError, TypeError):
        spec = None
    if not isinstance(spec, (NMSpec, BlockSpec)):
        raise UsageError(f"--scheme {text!r} is not a pattern: use 'n:m' with n < m <= 16 (e.g. 2:4, 1:8), "
                         "'1x<block>:<sparsity>' (e.g. 1x4:0.5) or a scheme JSON file")
    return spec


def add_data_args(p: argparse.ArgumentParser, resume_help: str) -> None:
    """The options of a run on a bundled dataset (search, train)."""
    p.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"], help="bundled dataset and model")
    p.add_argument("--init", default=None, help="state_dict of the bundled model to start from")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the models are small)")
    p.add_argument("--no-progress", action="store_true")


def load_data(args):
    """The bundled dataset of --dataset (a missing optional dependency is a usage error)."""
    from ..data import load_dataset

    try:
        return load_dataset(args.dataset, seed=args.seed)
    except ImportError as e:
        raise UsageError(str(e)) from None
