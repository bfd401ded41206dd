"""``nmkern prune``: one-shot prune a saved model (state_dict + factory, or TorchScript) to N:M or 1xN blocks:
by magnitude, or from calibration inputs with Wanda / SparseGPT (:func:`nmkern.prune_oneshot`)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint_io
from ..spec import BlockSpec, parse_spec
from ._common import EXIT_OK, SCHEME_HELP, UsageError, check_output_files, parse_scheme_arg, progress

CALIBRATED = ("wanda", "sparsegpt")


def register(sub) -> None:
    p = sub.add_parser("prune", help="one-shot prune a saved model to N:M (magnitude) or 1xN blocks")
    p.add_argument("model", help="a state_dict checkpoint (with --factory) or a TorchScript file")
    p.add_argument("--scheme", default=None, help=SCHEME_HELP)
    p.add_argument("--method", default="magnitude",
                   help="'magnitude' (N:M by |w|), '1xn:<block>:<sparsity>', or 'wanda' / 'sparsegpt' (from --calib "
                        "inputs; N:M or 1xN --scheme)")
    p.add_argument("--calib", default=None, help="wanda / sparsegpt: a .pt file holding a list of input tensors "
                                                  "(torch.save([x1, x2, ...], path)), each one model(x) call")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--factory", default=None, help="module:callable building the model of a state_dict checkpoint")
    p.add_argument("-o", "--output", required=True,
                   help="pruned model: a .safetensors path writes the nmkern format (packed sparse layers, "
                        "docs/format.md; needs a state_dict + --factory input), any other path the input's format "
                        "with the pruned weights dense; report beside it as .json (both refused if they exist, "
                        "unless --force)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of a table")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing -o file and its .json report (never an input file)")
    p.set_defaults(func=run)


def _uniform_1xn(args) -> BlockSpec | None:
    """The 1xN pattern of --method 1xn:<block>:<sparsity>, or None for magnitude N:M."""
    method = args.method.strip().lower()
    if method in CALIBRATED:
        if args.scheme is None or args.calib is None:
            raise UsageError(f"--method {method} needs --scheme (e.g. 2:4) and --calib FILE (a .pt list of input "
                             "tensors)")
        return None
    if args.calib is not None:
        raise UsageError(f"--calib is for --method wanda / sparsegpt; --method {args.method} does not read it")
    if method == "magnitude":
        if args.scheme is None:
            raise UsageError("--scheme is required with --method magnitude (e.g. --scheme 2:4 or --scheme scheme.json)")
        return None
    parts = method.split(":")
    if parts[0] == "1xn" and len(parts) == 3:
        try:
            spec = parse_spec(f"1x{parts[1]}:{parts[2]}", op="sparsify", where="--method", allowed=(BlockSpec.pattern,))
        except (ValueError, TypeError) as e:
            raise UsageError(f"--method {args.method}: {e}") from None
        if args.scheme is not None:
            raise UsageError(f"--method {args.method} prunes every layer to 1xN blocks; drop --scheme "
                             "(or use --method magnitude with an N:M --scheme)")
        return spec
    raise UsageError(f"--method {args.method!r}: choose 'magnitude' (N:M by |w|, needs --scheme), "
                     "'1xn:<block>:<sparsity>' (e.g. 1xn:4:0.5), 'wanda' or 'sparsegpt' (need --calib)")


def _check_paths(args) -> tuple[Path, Path, Path]:
    """(input, output, report) with every output checked before any work (see check_output_files)."""
    src, out = Path(args.model), Path(args.output)
    if not src.is_file():
        raise UsageError(f"no such file: {args.model}")
    if out.suffix == ".json":
        raise UsageError(f"-o {args.output}: the pruned model is a torch or .safetensors file; the report goes beside "
                         "it as .json")
    if out.exists() and out.is_dir():
        raise UsageError(f"-o {args.output} is a directory; give a file path such as pruned.pt")
    report = out.with_suffix(".json")
    inputs = [src] + ([Path(args.scheme)] if args.scheme and Path(args.scheme).exists() else [])
    inputs += [Path(args.calib)] if args.calib else []
    check_output_files([("-o", out), ("report of -o:", report)], inputs=inputs, force=args.force)
    return src, out, report


def _calibration(path: str) -> list:
    """The list of input tensors in ``path`` (loaded without unpickling code)."""
    if not Path(path).is_file():
        raise UsageError(f"--calib {path}: no such file")
    import torch

    try:
        calib = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--calib {path}: {checkpoint_io.describe_load_error(e)}; save it with "
                         "torch.save([x1, x2, ...], path)") from None
    if isinstance(calib, torch.Tensor):
        calib = [calib]
    if not isinstance(calib, (list, tuple)) or not calib or not all(isinstance(t, torch.Tensor) for t in calib):
        raise UsageError(f"--calib {path}: expected a non-empty list of input tensors (torch.save([x1, x2, ...], "
                         f"path)), got {type(calib).__name__}")
    return list(calib)


def _prune_calibrated(args, model, fmt: str, scheme) -> list[dict]:
    """Wanda / SparseGPT on the loaded model (in place); the report rows."""
    from ..methods.oneshot import prune_oneshot

    if fmt == "torchscript":
        raise UsageError(f"--method {args.method} needs a state_dict checkpoint with --factory (it runs the model "
                         "with hooks on its layers); TorchScript takes --method magnitude")
    report = prune_oneshot(model, _calibration(args.calib), scheme, method=args.method.strip().lower(),
                           progress=progress(args))
    rows = [{"layer": r["name"], "action": "sparsified", "detail": f"{tuple(r['shape'])} as {r['pattern']}",
             "sparsity": round(1 - r["density"], 6)} for r in report.layers]
    return rows + [{"layer": n, "action": "skipped", "detail": why} for n, why in report.skipped]


def _model_writer(model, fmt: str, scheme, out: Path):
    """(write(path), output format): ``.safetensors`` -> the pruned layers packed, in the nmkern format;
    otherwise the input's format with the pruned weights dense."""
    if out.suffix != ".safetensors":
        return (lambda p: checkpoint_io.save_model(model, p, atomic=False)), fmt
    if fmt == "torchscript":
        raise UsageError(f"-o {out}: a TorchScript model cannot be rebuilt with sparse layers; prune its state_dict "
                         "with --factory module:callable to write .safetensors, or choose a .pt output")
    from ..serialization import save
    from ..sparsify import sparsify

    # the weights already carry the masks prune chose: packing keeps exactly their non-zeros
    sparsify(model, scheme, pack=True)
    return (lambda p: save(model, p)), "nmkern safetensors"


def run(args) -> int:
    uniform_1xn = _uniform_1xn(args)
    src, out, report_path = _check_paths(args)
    scheme = uniform_1xn if uniform_1xn is not None else parse_scheme_arg(args.scheme)
    model, fmt = checkpoint_io.load_model(args.model, args.factory)
    if args.method.strip().lower() in CALIBRATED:
        rows = _prune_calibrated(args, model, fmt, scheme)
    else:
        masked, rows = checkpoint_io.prune(model, scheme)
        if not masked:
            reasons = "; ".join(f"{r['layer']}: {r['detail']}" for r in rows) or "the model has no Linear/Conv2d layer"
            raise UsageError(f"nothing to prune in {args.model} with this scheme - every layer was skipped ({reasons})")
        checkpoint_io.set_weights(model, masked)
    write_model, out_fmt = _model_writer(model, fmt, scheme, out)
    report = {"input": str(src), "output": str(out), "format": fmt, "output_format": out_fmt, "scheme": args.scheme,
              "method": args.method, "layers": rows,
              "sparsified": sum(r["action"] == "sparsified" for r in rows),
              "skipped": sum(r["action"] == "skipped" for r in rows)}
    checkpoint_io.atomic_write_all([(out, write_model),
                                    (report_path, lambda p: p.write_text(json.dumps(report, indent=1) + "\n"))])
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        width = max(len(r["layer"]) for r in rows)
        for r in rows:
            print(f"{r['action']:<10} {r['layer']:<{width}}  {r['detail']}")
        print(f"wrote {out} ({out_fmt}, {report['sparsified']} layer(s) pruned, {report['skipped']} skipped) "
              f"and {report_path}")
    return EXIT_OK
