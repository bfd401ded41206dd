"""``nmkern inspect``: per tensor of a checkpoint, shape, dtype, sparsity and the N:M / 1xN pattern it satisfies."""

from __future__ import annotations

import json

from ..checkpoint_io import load_state_dict
from ..inspect_tensors import describe_state_dict
from ._common import EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("inspect", help="per weight of a checkpoint: shape and which N:M or 1xN pattern it satisfies")
    p.add_argument("file", help="a state_dict checkpoint (torch.save) or TorchScript file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    rows = describe_state_dict(load_state_dict(args.file))
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
