"""``nmkern train``: train the bundled model dense, SR-STE / STE to a scheme, GaP, or 1xN
(:func:`nmkern.methods.recipes.run_train`)."""

from __future__ import annotations

import math
from pathlib import Path

from ..methods import recipes
from ..methods.recipes import TrainMethod
from ._common import (EXIT_OK, SCHEME_HELP, UsageError, add_data_args, check_out_dir, check_run_args, load_data,
                      parse_scheme_arg, progress, set_threads)


def register(sub) -> None:
    p = sub.add_parser("train", help="train the bundled model: dense, SR-STE / STE to a scheme, GaP, or 1xN")
    add_data_args(p, "continue from the -o folder's last checkpoint, read as tensors and plain values only "
                     "(torch.load weights_only=True); the folder holds checkpoint.pt, model.pt, model_packed.pt, "
                     "train.json, gap/")
    p.add_argument("--method", default="srste", choices=[t.value for t in TrainMethod])
    p.add_argument("--scheme", default=None, help=f"for srste/ste/gap: {SCHEME_HELP} (default 2:4)")
    p.add_argument("--block", type=int, default=4, help="1xn: block size")
    p.add_argument("--sparsity", type=float, default=0.5, help="1xn: fraction of blocks pruned")
    p.add_argument("--epochs", type=int, default=10, help="epochs (gap: per grow step and for the final fine-tune)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gap-method", default="sgap", choices=["sgap", "pgap"])
    p.add_argument("--partitions", type=int, default=2, help="gap: number of partitions")
    p.set_defaults(func=run)


def _check_args(args, method: TrainMethod) -> None:
    """Every option, checked before any work."""
    check_run_args(args)
    if args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs}: must be >= 1")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise UsageError(f"--lr {args.lr}: must be a finite number > 0 (e.g. 1e-3)")
    if method == TrainMethod.ONE_BY_N:
        if args.block < 1:
            raise UsageError(f"--block {args.block}: must be an integer >= 1 (e.g. 4)")
        if not 0 < args.sparsity < 1:
            raise UsageError(f"--sparsity {args.sparsity}: must lie strictly between 0 and 1 (e.g. 0.5)")
    if method == TrainMethod.GAP and args.partitions < 1:
        raise UsageError(f"--partitions {args.partitions}: must be an integer >= 1")
    if args.init and not Path(args.init).is_file():
        raise UsageError(f"--init {args.init}: no such file")


def run(args) -> int:
    method = TrainMethod(args.method)
    if method.takes_scheme:
        scheme = parse_scheme_arg(args.scheme or "2:4")
    elif args.scheme:
        raise UsageError(f"--scheme is for --method srste/ste/gap; --method {method.value} "
                         + ("trains dense" if method == TrainMethod.DENSE else "uses --block/--sparsity"))
    else:
        scheme = None
    _check_args(args, method)
    inputs = [args.init] + ([args.scheme] if args.scheme and Path(args.scheme).is_file() else [])
    out = check_out_dir(args.output, recipes.TRAIN_OUTPUTS, inputs=inputs, force=args.force, resume=args.resume)
    set_threads(args)
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
