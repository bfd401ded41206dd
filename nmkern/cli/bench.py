"""``nmkern bench``: sparse-vs-dense linear time ratio table on this machine (:func:`nmkern.benchmark.bench_linear`)."""

from __future__ import annotations

import math
from pathlib import Path

from ._common import EXIT_OK, UsageError, check_output_files, parse_int_list, progress, set_threads, write_json

_PATTERN_FORMS = "n:m with 1 <= n < m <= 16 (e.g. 2:4) or 1x<block>:<sparsity> (e.g. 1x4:0.75)"


def register(sub) -> None:
    p = sub.add_parser("bench", help="sparse-vs-dense linear time ratio table on this machine")
    p.add_argument("--shape", default="4096x4096", help="OUTxIN of the weight (default 4096x4096)")
    p.add_argument("--batch", default="1,16,256", help="batch sizes (default 1,16,256)")
    p.add_argument("--pattern", default="2:4,1:4,1x4:0.75", help="n:m and 1x<block>:<sparsity> patterns")
    p.add_argument("--seconds", type=float, default=2.0, help="timing budget per point (warm, and again cold)")
    p.add_argument("--no-cold", action="store_true",
                   help="skip the cold-cache figures (a stack of layers > 4x the last-level cache)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="nmkern-bench.json",
                   help="where the JSON results go (an existing file is refused unless --force)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _parse_args(args):
    """(out, in, batches, patterns) from --shape / --batch / --pattern / --seconds."""
    from ..benchmark import parse_pattern

    try:
        o, i = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        raise UsageError(f"--shape {args.shape!r}: write OUTxIN, e.g. 4096x4096") from None
    if o < 1 or i < 1:
        raise UsageError(f"--shape {args.shape!r}: sizes must be positive")
    batches = parse_int_list("--batch", args.batch)
    patterns = []
    for text in (t for t in args.pattern.split(",") if t.strip()):
        try:
            patterns.append(parse_pattern(text))
        except ValueError:
            raise UsageError(f"--pattern {text!r}: write {_PATTERN_FORMS}") from None
        try:
            patterns[-1].check_shape(o, i)
        except ValueError as e:
            raise UsageError(f"--{e}") from None
    if not patterns:
        raise UsageError(f"--pattern {args.pattern!r}: give at least one pattern, {_PATTERN_FORMS}")
    if not math.isfinite(args.seconds) or args.seconds <= 0:
        raise UsageError(f"--seconds {args.seconds}: must be a finite number of seconds > 0 (e.g. 2)")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    check_output_files([("--json", Path(args.json))], force=args.force)
    return o, i, batches, patterns


def run(args) -> int:
    from ..benchmark import bench_linear, format_bench_table

    o, i, batches, patterns = _parse_args(args)
    set_threads(args)
    out_path = Path(args.json)
    result = bench_linear(o, i, batches, patterns, seconds=args.seconds, cold=not args.no_cold,
                          progress=progress(args))
    result["meta"]["command"] = (f"nmkern bench --shape {args.shape} --batch {args.batch} --pattern {args.pattern}"
                                 + (" --no-cold" if args.no_cold else ""))
    table = format_bench_table(result)  # before writing: a failure here leaves nothing behind
    write_json(out_path, result)
    print(table)
    print(f"wrote {out_path}")
    return EXIT_OK
