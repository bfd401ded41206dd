"""``nmkern search``: DominoSearch a layer-wise N:M scheme on a bundled dataset (:func:`nmkern.methods.recipes.run_search`)."""

from __future__ import annotations

import math
from pathlib import Path

from ..methods import recipes
from ._common import (EXIT_OK, UsageError, add_data_args, check_out_dir, check_run_args, int_list_type, load_data,
                      progress, set_threads)


def register(sub) -> None:
    p = sub.add_parser("search", help="DominoSearch a layer-wise N:M scheme on a bundled dataset")
    add_data_args(p, "reuse DIR/dense.pt and a finished DIR/scheme.json (DIR holds dense.pt, scheme.json, "
                     "per_layer_n.png, search.json)")
    p.add_argument("--budget", default="params=0.875", help="params=<sparsity> or flops=<reduction> (default params=0.875)")
    p.add_argument("--m", type=int, default=16, help="group size M: a power of two from 2 to 16")
    p.add_argument("--policy", default="fixed_m", choices=["fixed_m", "fixed_n"])
    p.add_argument("--dense-epochs", type=int, default=30, help="dense pretraining epochs when no --init")
    p.add_argument("--lr", type=float, default=0.01)
    # nmkern demo's schedule for the small bundled models (see nmkern.demo.DemoConfig)
    p.add_argument("--decay", type=float, default=0.5)
    p.add_argument("--decay-milestones", type=int_list_type,
                   default=[200, 400, 600, 800, 1000, 1200])
    p.add_argument("--check-every", type=int, default=10)
    p.add_argument("--max-iters", type=int, default=10000)
    p.set_defaults(func=run)


def _parse_budget(text: str):
    from ..methods.domino import Budget

    key, sep, val = text.partition("=")
    try:
        x = float(val)
    except ValueError:
        x = None
    if not sep or key not in ("params", "flops") or x is None:
        raise UsageError(f"--budget {text!r}: write params=<sparsity> (e.g. params=0.875) or flops=<reduction> "
                         "(e.g. flops=8)")
    try:
        return Budget(**{key: x})
    except (ValueError, TypeError) as e:
        raise UsageError(f"--budget {text}: {e}") from None


def _check_args(args, budget) -> recipes.SearchConfig:
    """Every option, checked before any work (the dense training comes first and takes minutes)."""
    check_run_args(args)
    if args.m < 2 or args.m > 16 or args.m & (args.m - 1):
        raise UsageError(f"--m {args.m}: must be a power of two from 2 to 16 (e.g. 16)")
    for flag, value in (("--max-iters", args.max_iters), ("--check-every", args.check_every)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be an integer >= 1")
    if args.dense_epochs < 1 and not args.init:
        raise UsageError(f"--dense-epochs {args.dense_epochs}: must be >= 1 (or give --init to skip dense training)")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise UsageError(f"--lr {args.lr}: must be a finite number > 0")
    if not math.isfinite(args.decay) or args.decay < 0:
        raise UsageError(f"--decay {args.decay}: must be a finite number >= 0")
    if args.init and not Path(args.init).is_file():
        raise UsageError(f"--init {args.init}: no such file")
    cfg = recipes.SearchConfig(dataset=args.dataset, init=args.init, seed=args.seed, batch_size=args.batch_size,
                               budget=budget, m=args.m, policy=args.policy, dense_epochs=args.dense_epochs, lr=args.lr,
                               decay=args.decay, decay_milestones=tuple(args.decay_milestones),
                               check_every=args.check_every, max_iters=args.max_iters)
    try:
        recipes.check_search_config(cfg)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    return cfg


def run(args) -> int:
    budget = _parse_budget(args.budget)
    cfg = _check_args(args, budget)
    outputs = [n for n in recipes.SEARCH_OUTPUTS if not (args.init and n == "dense.pt")]
    out = check_out_dir(args.output, outputs, inputs=[args.init], force=args.force, resume=args.resume)
    set_threads(args)
    scheme_path = out / "scheme.json"
    if args.resume and scheme_path.is_file():
        from ..scheme import Scheme

        print(f"--resume: {scheme_path} already holds a finished search:\n{Scheme.load(scheme_path)!r}")
        return EXIT_OK
    data = load_data(args)
    try:
        scheme, result = recipes.run_search(cfg, data, out, resume=args.resume, progress=progress(args))
    except RuntimeError as e:  # DominoSearch gave up: the budget was not met within --max-iters
        if "not met after max_iters" not in str(e):
            raise
        kept = f"; {out / 'dense.pt'} is kept: rerun with --resume" if not args.init else ""
        raise UsageError(f"{e} (CLI: raise --max-iters or --decay, or lower --check-every{kept})") from None
    print(repr(scheme))
    print(f"one-shot accuracy of the scheme (no retraining): {100 * result['oneshot_accuracy']:.1f}%")
    print(f"wrote {scheme_path}, {out / 'per_layer_n.png'}, {out / 'search.json'}; retrain it with "
          f"`nmkern train --dataset {args.dataset} --method srste --scheme {scheme_path} --init <dense.pt> -o DIR`")
    return EXIT_OK
