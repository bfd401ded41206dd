"""``nmkern train``: train the bundled model dense, SR-STE / STE to a scheme, GaP, or 1xN
(:func:`nmkern.methods.recipes.run_train`)."""

from __future__ import annotations

from ..methods import recipes
from ..methods.recipes import TrainMethod
from ._common import (EXIT_OK, SCHEME_HELP, UsageError, add_data_args, check_out_dir, load_data, parse_scheme_arg,
                      progress, set_threads)


def register(sub) -> None:
    p = sub.add_parser("train", help="train the bundled model: dense, SR-STE / STE to a scheme, GaP, or 1xN")
    add_data_args(p, "continue from DIR's last checkpoint")
    p.add_argument("--method", default="srste", choices=[t.value for t in TrainMethod])
    p.add_argument("--scheme", default=None, help=f"for srste/ste/gap: {SCHEME_HELP} (default 2:4)")
    p.add_argument("--block", type=int, default=4, help="1xn: block size")
    p.add_argument("--sparsity", type=float, default=0.5, help="1xn: fraction of blocks pruned")
    p.add_argument("--epochs", type=int, default=10, help="epochs (gap: per grow step and for the final fine-tune)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gap-method", default="sgap", choices=["sgap", "pgap"])
    p.add_argument("--partitions", type=int, default=2, help="gap: number of partitions")
    p.set_defaults(func=run)


def run(args) -> int:
    out = check_out_dir(args.output)
    set_threads(args)
    method = TrainMethod(args.method)
    if method.takes_scheme:
        scheme = parse_scheme_arg(args.scheme or "2:4")
    elif args.scheme:
        raise UsageError(f"--scheme is for --method srste/ste/gap; --method {method.value} "
                         + ("trains dense" if method == TrainMethod.DENSE else "uses --block/--sparsity"))
    else:
        scheme = None
    if args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs}: must be >= 1")
    if ((out / "checkpoint.pt").exists() or (out / "model.pt").exists()) and not args.resume:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it (or choose another -o)")
    data = load_data(args)
    cfg = recipes.TrainConfig(dataset=args.dataset, init=args.init, seed=args.seed, batch_size=args.batch_size,
                              method=method.value, scheme=args.scheme, block=args.block, sparsity=args.sparsity,
                              epochs=args.epochs, lr=args.lr, gap_method=args.gap_method, partitions=args.partitions)
    result = recipes.run_train(cfg, scheme, data, out, resume=args.resume, progress=progress(args))
    if result is not None:
        print(f"{method.value}: test accuracy {100 * result['test_accuracy']:.1f}%, sparsity "
              f"{100 * result['sparsity_nm_layers']:.1f}% of the N:M layers; wrote {out / 'model.pt'} "
              f"(`nmkern inspect` it) and {out / 'train.json'}")
    return EXIT_OK
