"""``nmkern selftest``: every execution path here checked against torch, then timed (:func:`nmkern.selftest.selftest`)."""

from __future__ import annotations

from pathlib import Path

from ._common import EXIT_OK, UsageError, check_output_files, progress, set_threads, write_json

EXIT_MISMATCH = 1  # a path gave a wrong result (or raised on a call its table accepts)


def register(sub) -> None:
    p = sub.add_parser("selftest", help="check every execution path on this machine against torch, then time them")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes and a shorter benchmark (about 10 s on a 2-core CPU)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write every result here (an existing file is refused unless --force)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--no-bench", action="store_true", help="skip the timing table (checks only)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads time the scheduler; "
                        "the README's CPU tables use 1)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    out_path = Path(args.json) if args.json is not None else None
    if args.json is not None and not args.json.strip():
        raise UsageError("--json '': give a file path")
    if out_path is not None:
        check_output_files([("--json", out_path)], force=args.force)
    set_threads(args)
    from ..selftest import selftest

    report = selftest(quick=args.quick, bench=not args.no_bench, progress=progress(args))
    result = report.to_dict()
    result["command"] = "nmkern selftest" + "".join(
        f" {flag}" for flag, on in (("--quick", args.quick), ("--no-bench", args.no_bench)) if on)
    text = report.format()  # before writing: a failure here leaves nothing behind
    if out_path is not None:
        write_json(out_path, result)
    print(text)
    if out_path is not None:
        print(f"wrote {out_path}")
    return EXIT_OK if report.ok else EXIT_MISMATCH
