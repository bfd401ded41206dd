"""``nmkern demo``: the whole pipeline on MNIST-1D (:func:`nmkern.demo.run_demo`), summarised."""

from __future__ import annotations

from ._common import EXIT_OK, UsageError, check_out_dir, progress


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on MNIST-1D: dense, DominoSearch, SR-STE, pack, CPU latency")
    p.add_argument("-o", "--output", default="nmkern-demo",
                   help="output folder (default: nmkern-demo); one holding an earlier demo's files is refused "
                        "unless --force (other files in it are never touched)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier demo's files in the -o folder")
    p.add_argument("--quick", action="store_true", help="small run (< 2 min on 2 cores) with the same steps")
    p.add_argument("--seed", type=int, default=0, help="seeds model initialisation, data order and training")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1: the model is small)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import OUTPUTS, run_demo

    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    out = check_out_dir(args.output, OUTPUTS, force=args.force)
    command = "nmkern demo" + (" --quick" if args.quick else "") + (f" -o {args.output}" if args.output != "nmkern-demo"
                                                                     else "")
    res = run_demo(out, quick=args.quick, seed=args.seed, progress=progress(args), command=command,
                   threads=args.threads)
    print(f"{'model':<24} {'sparsity':>9} {'accuracy':>9}")
    for r in res["accuracy"]:
        print(f"{r['name']:<24} {100 * r['sparsity']:8.1f}% {100 * r['accuracy']:8.1f}%")
    for r in res["latency"]:
        extra = f", cpu kernel {r['packed_cpu_kernel_ratio']:.2f}" if "packed_cpu_kernel_ratio" in r else ""
        print(f"batch {r['batch']:>5}: packed/dense time {r['packed_auto_ratio']:.2f} (auto){extra}")
    print(f"report: {out / 'report.md'} (results.json, scheme.json, *.png) in {res['seconds']['total']:.0f} s")
    return EXIT_OK
