"""``nmkern convert IN OUT``: move a sparse model between a torch state_dict, an nmkern ``.safetensors``
file and a compressed-tensors folder (docs/format.md, :mod:`nmkern.ct_format`).

The input is read into a model (built by ``--factory``, or from the input folder's transformers
``config.json``) with every check of :func:`nmkern.load` / the state_dict loader, then written in
the output's format; the output's kind follows from its path.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .. import checkpoint_io
from ._common import EXIT_OK, Kind, UsageError, check_output_files, read_model

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a sparse model: torch state_dict <-> nmkern .safetensors <-> "
                                       "compressed-tensors folder")
    p.add_argument("input", help="a torch state_dict (.pt/.pth/.bin) or an nmkern .safetensors file (both with "
                                 "--factory), or a folder: compressed-tensors (sparse-24-bitmask / sparse-bitmask) or "
                                 "one nmkern.save_pretrained wrote (the model comes from its config.json)")
    p.add_argument("output", help="X.safetensors: the nmkern format; X.pt/.pth/.bin: a torch state_dict; a folder "
                                  "(a path without suffix or ending in /): compressed-tensors sparse-24-bitmask "
                                  "(2:4 Linear layers only)")
    p.add_argument("--factory", default=None, help="module:callable building the dense model (needed unless the "
                                                   "input folder has a transformers config.json)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (never an input)")
    p.set_defaults(func=run)


def output_kind(path: str) -> Kind:
    p = Path(path)
    if p.suffix == ".safetensors":
        return Kind.NMKERN
    if p.suffix in STATE_DICT_SUFFIXES:
        return Kind.STATE_DICT
    if p.is_dir() or path.endswith(("/", "\\")) or not p.suffix:
        return Kind.COMPRESSED_TENSORS
    raise UsageError(f"output {path}: cannot tell its format from the name; use X.safetensors (nmkern), "
                     f"X.pt / .pth / .bin (torch state_dict) or a folder path (compressed-tensors)")


def _pack_all(model: nn.Module) -> list[str]:
    """Pack every sparse layer still in the training form (nmkern.save stores packed layers); their names."""
    from ..nn._layer import _SparseLayer

    packed = []
    for name, mod in model.named_modules():
        if isinstance(mod, _SparseLayer) and not mod.is_packed:
            mod.pack()
            packed.append(name)
    return packed


def run(args) -> int:
    from ..nn._layer import _SparseLayer
    from ..serialization import save

    kind = output_kind(args.output)
    out = Path(args.output)
    src = Path(args.input)
    inputs = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else [src]
    if kind is Kind.COMPRESSED_TENSORS:
        from ..pretrained import CONFIG_NAME, WEIGHTS_NAME

        outputs = [("output", out / WEIGHTS_NAME), ("output", out / CONFIG_NAME)]
    else:
        outputs = [("output", out)]
    check_output_files(outputs, inputs=inputs, force=args.force)
    model, in_kind = read_model(args)
    if kind is not Kind.STATE_DICT:  # both safetensors formats store packed layers
        _pack_all(model)
    if kind is Kind.NMKERN:
        save(model, out)
    elif kind is Kind.COMPRESSED_TENSORS:
        save(model, out, format="compressed-tensors")
    else:
        checkpoint_io.save_model(model, out)
    layers = {}
    for mod in model.modules():
        if isinstance(mod, _SparseLayer):
            layers[str(mod.spec)] = layers.get(str(mod.spec), 0) + 1
    summary = ", ".join(f"{count} x {spec}" for spec, count in sorted(layers.items())) or "no sparse layers"
    print(f"wrote {out} ({kind.value}; input: {in_kind.value}; sparse layers: {summary})")
    return EXIT_OK
