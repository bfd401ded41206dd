"""``nmkern tune MODEL``: measure, ahead of time, which path each packed layer runs (:func:`nmkern.tune`).

The winners go to the dispatch cache (``$NMKERN_CACHE_DIR`` or ``~/.cache/nmkern``), so every later
process on this machine starts with them; the table printed shows what was decided and from which medians.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._common import (EXIT_OK, UsageError, check_output_files, parse_int_list, read_model, set_threads,
                      write_json)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(sub) -> None:
    p = sub.add_parser("tune", help="measure which path (dense or a sparse kernel) each packed layer runs, and "
                                    "remember it for this machine")
    p.add_argument("input", help="the model: an nmkern .safetensors file or a torch state_dict (both with --factory), "
                                 "or a folder nmkern.save_pretrained / `nmkern prune --hf` wrote")
    p.add_argument("--factory", default=None, help="module:callable building the dense model (files need it)")
    p.add_argument("--input-shape", default=None,
                   help="shape of one example without the batch dimension, e.g. 1x1x40 (random float inputs)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="token count per example for a transformers model (random token ids below its vocab size)")
    p.add_argument("--batch", default="1,16,256", help="batch sizes to tune for (default 1,16,256)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast the model first (default: as stored)")
    p.add_argument("--remeasure", action="store_true", help="measure again even where a winner is recorded")
    p.add_argument("--json", default=None, help="also write the table as JSON here (refused if it exists unless "
                                                "--force)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--threads", type=int, default=None, help="torch threads (the winners are recorded per count)")
    p.set_defaults(func=run)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"--input-shape {text!r}: write positive sizes joined by x, without the batch, e.g. 1x1x40")
    return dims


def _inputs(args, model, batches: list[int]) -> list:
    """One example input per batch size: random token ids (--seq-len) or random floats (--input-shape)."""
    if (args.input_shape is None) == (args.seq_len is None):
        raise UsageError("give --input-shape (float inputs, e.g. 1x1x40) or --seq-len (token ids for a transformers "
                         "model), one of the two")
    if args.seq_len is not None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int) or args.seq_len < 1:
            raise UsageError(f"--seq-len {args.seq_len}: needs a transformers model (a config with vocab_size) and a "
                             "length >= 1; for other models give --input-shape")
        gen = torch.Generator().manual_seed(0)
        return [{"input_ids": torch.randint(0, vocab, (b, args.seq_len), generator=gen)} for b in batches]
    shape = _shape(args.input_shape)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    gen = torch.Generator().manual_seed(0)
    return [torch.randn((b, *shape), generator=gen).to(dtype) for b in batches]


def run(args) -> int:
    from ..nn._layer import _SparseLayer
    from ..timing import machine_info
    from ..tuning import tune

    batches = parse_int_list("--batch", args.batch)
    set_threads(args)
    if args.json:
        check_output_files([("--json", Path(args.json))], inputs=[Path(args.input)], force=args.force)
    model, _ = read_model(args)
    for mod in model.modules():  # tune times packed layers: pack the ones saved in the training form
        if isinstance(mod, _SparseLayer) and not mod.is_packed:
            mod.pack()
    if args.dtype:
        model = model.to(_DTYPES[args.dtype])
    inputs = _inputs(args, model.eval(), batches)
    print(f"tuning at batch {', '.join(map(str, batches))} on {torch.get_num_threads()} thread(s) ...", flush=True)
    try:
        report = tune(model, inputs, force=args.remeasure)
    except RuntimeError as e:  # the model refused the example input (a wrong --input-shape)
        raise UsageError(f"the model does not run on the example inputs ({' '.join(str(e).split())[:300]}); check "
                         "--input-shape / --seq-len") from None
    print(report.table())
    print(f"winners recorded in {report.cache_file or 'memory only (NMKERN_CACHE_DIR is empty)'}")
    if args.json:
        write_json(Path(args.json), {**report.to_dict(), "meta": machine_info()})
        print(f"wrote {args.json}")
    return EXIT_OK
