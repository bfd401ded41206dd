"""The ``nmkern`` command line: thin commands over nmkern's library calls.

One module per command (inspect, prune, convert, demo, search, train, bench, tune, selftest), each with
``register(subparsers)`` and ``run(args) -> exit code``; :mod:`._common` holds the
plumbing they share. Commands never import one another.

Exit codes: 0 ok, 2 bad usage or input (the message says what and how to fix, and
nothing was written), 1 internal error, 130 interrupted (Ctrl-C), 141 stdout closed
early (e.g. ``nmkern inspect --json | head``: quiet, like other unix tools).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import bench, convert, demo, inspect, prune, search, selftest, train, tune
from ._common import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, UsageError

EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # the shell's codes for SIGINT / SIGPIPE

COMMANDS = (inspect, demo, prune, convert, search, train, bench, tune, selftest)  # --help lists them in this order

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "UsageError",
           "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmkern", description="N:M and 1xN structured sparsity: inspect, prune, train, bench.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def _drop_stdout() -> None:
    """The reader of stdout went away (``| head``): send what is still buffered to /dev/null, quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file descriptor
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    threads = torch.get_num_threads()
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except (UsageError, ValueError, TypeError) as e:  # library calls raise ValueError / TypeError on bad input
        print(f"nmkern {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # pragma: no cover - reported, not hidden
        import traceback

        traceback.print_exc()
        print(f"nmkern {args.command}: internal error: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        torch.set_num_threads(threads)  # --threads is for this command, not for an embedding caller
