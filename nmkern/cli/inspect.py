"""``nmkern inspect``: per tensor of a checkpoint, shape, dtype, sparsity and the N:M / 1xN pattern it satisfies.

An nmkern ``.safetensors`` file (:func:`nmkern.save`) gets its per-layer table from the header alone,
without reading the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint_io import load_state_dict
from ..inspect_tensors import describe_state_dict
from ..serialization import layer_table, read_header
from ._common import EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("inspect", help="per weight of a checkpoint: shape and which N:M or 1xN pattern it satisfies")
    p.add_argument("file", help="a state_dict checkpoint (torch.save), a TorchScript file, or an nmkern .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    if Path(args.file).suffix == ".safetensors":
        return _run_nmkern_file(args)
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


def _run_nmkern_file(args) -> int:
    """The sparse layers an nmkern.save file describes, from its header (the tensors are not read)."""
    doc, index = read_header(args.file)
    rows = layer_table(doc, index)
    if args.json:
        print(json.dumps({"format_version": doc["format_version"], "nmkern_version": doc["nmkern_version"],
                          "layers": rows}, indent=2))
        return EXIT_OK
    print(f"{args.file}: nmkern format {doc['format_version']} (written by nmkern {doc['nmkern_version']}), "
          f"{len(rows)} sparse layer(s)")
    width = max([len(r["name"]) for r in rows] + [5])
    print(f"{'layer':<{width}}  {'module':<7} {'pattern':<8} {'dtype':<9} {'dense shape':<20} {'stored/dense':>12}")
    for r in rows:
        ratio = f"{r['stored_bytes'] / r['dense_bytes']:.4f}"
        print(f"{r['name']:<{width}}  {r['module']:<7} {r['pattern']:<8} {r['dtype']:<9} "
              f"{str(tuple(r['dense_shape'])):<20} {ratio:>12}")
    return EXIT_OK
