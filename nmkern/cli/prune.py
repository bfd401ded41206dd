"""``nmkern prune``: one-shot prune a model to N:M or 1xN blocks, by magnitude or from calibration inputs with
Wanda / SparseGPT (:func:`nmkern.prune_oneshot`).

The model: a saved state_dict (with --factory) or TorchScript file, calibrated from --calib (a .pt list
of input tensors); or a Hugging Face folder (--hf DIR, or a GGUF file in it), calibrated from random
windows of a text file tokenized by the model's own tokenizer (--calib-text,
:func:`nmkern.methods.calibration.model_text_windows`), its output head kept dense.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import checkpoint_io
from ..spec import BlockSpec, parse_spec
from ._common import EXIT_OK, SCHEME_HELP, UsageError, check_output_files, parse_scheme_arg, progress

CALIBRATED = ("wanda", "sparsegpt")
FILE_OUTPUTS = (".safetensors", ".pt")  # with --hf, any other -o is a Hugging Face folder
FOLDER_REPORT = "nmkern_prune.json"  # the report of a folder output, inside it (the folder is written as one unit)
# the --calib-text window options: (flag, args attribute, default, smallest value)
TEXT_OPTIONS = (("--seq-len", "seq_len", 256, 1), ("--nsamples", "nsamples", 128, 1), ("--seed", "seed", 0, 0))


def register(sub) -> None:
    p = sub.add_parser("prune", help="one-shot prune a saved model or a Hugging Face folder to N:M or 1xN blocks")
    p.add_argument("model", nargs="?", default=None,
                   help="a state_dict checkpoint (with --factory) or a TorchScript file; or give --hf DIR instead")
    p.add_argument("--hf", metavar="DIR", default=None,
                   help="a local Hugging Face folder instead of MODEL (model.save_pretrained + "
                        "tokenizer.save_pretrained output; a ...ForCausalLM config loads as a causal LM, any other "
                        "as AutoModel); its output head (lm_head) stays dense unless a scheme JSON names it exactly")
    p.add_argument("--gguf", metavar="NAME", default=None,
                   help="with --hf: read model and tokenizer from the GGUF file DIR/NAME (dequantized to float32; "
                        "needs the gguf package)")
    p.add_argument("--scheme", default=None, help=SCHEME_HELP)
    p.add_argument("--method", default="magnitude",
                   help="'magnitude' (N:M by |w|), '1xn:<block>:<sparsity>', or 'wanda' / 'sparsegpt' (from --calib "
                        "or --calib-text inputs; N:M or 1xN --scheme)")
    p.add_argument("--calib", default=None, help="wanda / sparsegpt on MODEL: a .pt file holding a list of input "
                                                  "tensors (torch.save([x1, x2, ...], path)), each one model(x) call")
    p.add_argument("--calib-text", metavar="FILE", default=None,
                   help="wanda / sparsegpt on --hf: a UTF-8 text file, tokenized once by the model's tokenizer (no "
                        "special tokens added); --nsamples random windows of --seq-len tokens are the batches")
    p.add_argument("--seq-len", type=int, default=None, help="--calib-text: tokens per window (default 256)")
    p.add_argument("--nsamples", type=int, default=None, help="--calib-text: number of windows (default 128)")
    p.add_argument("--seed", type=int, default=None, help="--calib-text: seeds the window starts (default 0)")
    p.add_argument("--permute", action="store_true",
                   help="wanda / sparsegpt: permute input channels before choosing the masks "
                        "(prune_oneshot(permute=True))")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--factory", default=None, help="module:callable building the model of a state_dict checkpoint")
    p.add_argument("-o", "--output", required=True,
                   help="pruned model: a .safetensors path writes the nmkern format (packed sparse layers, "
                        "docs/format.md; needs a state_dict + --factory or --hf input), any other path the input's "
                        "format with the pruned weights dense (for --hf: a .pt state_dict, or else a Hugging Face "
                        f"folder that from_pretrained reloads, with the report inside as {FOLDER_REPORT}); a file's "
                        "report goes beside it as .json (outputs that exist, or a non-empty folder, are refused "
                        "unless --force)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of a table")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing -o file and its .json report, or replace a non-empty -o folder "
                        "(never an input)")
    p.set_defaults(func=run)


def _check_sources(args) -> None:
    """Exactly one model source, and only the options that go with it; fills in the window defaults."""
    if (args.model is None) == (args.hf is None):
        raise UsageError("give the model to prune either as MODEL (a state_dict checkpoint with --factory, or a "
                         "TorchScript file) or as --hf DIR (a Hugging Face folder), " +
                         ("not both" if args.hf else "e.g. nmkern prune --hf ./llama --scheme 2:4 -o ./pruned"))
    window_flags = [flag for flag, dest, _, _ in TEXT_OPTIONS if getattr(args, dest) is not None]
    if args.hf is None:
        hf_only = [flag for flag, value in (("--gguf", args.gguf), ("--calib-text", args.calib_text)) if value]
        if hf_only + window_flags:
            raise UsageError(f"{(hf_only + window_flags)[0]} is for --hf DIR; MODEL takes its calibration inputs "
                             "with --calib FILE")
    else:
        for flag, value in (("--factory", args.factory), ("--calib", args.calib)):
            if value is not None:
                raise UsageError(f"{flag} is for MODEL; --hf DIR builds the model from its config and calibrates "
                                 "from --calib-text FILE")
        if args.calib_text is None and window_flags:
            raise UsageError(f"{window_flags[0]} shapes the --calib-text windows; give --calib-text FILE (or drop it)")
        for flag, dest, default, least in TEXT_OPTIONS:
            value = default if getattr(args, dest) is None else getattr(args, dest)
            if value < least:
                raise UsageError(f"{flag} {value}: must be an integer >= {least} (default {default})")
            setattr(args, dest, value)
    if args.permute and args.method.strip().lower() not in CALIBRATED:
        raise UsageError(f"--permute chooses masks with the calibration statistics: use it with --method wanda or "
                         f"sparsegpt, not {args.method}")


def _uniform_1xn(args) -> BlockSpec | None:
    """The 1xN pattern of --method 1xn:<block>:<sparsity>, or None for magnitude N:M."""
    method = args.method.strip().lower()
    calib, flag = ((args.calib_text, "--calib-text") if args.hf is not None else (args.calib, "--calib"))
    if method in CALIBRATED:
        if args.scheme is None or calib is None:
            what = "(a text file)" if args.hf is not None else "(a .pt list of input tensors)"
            raise UsageError(f"--method {method} needs --scheme (e.g. 2:4) and {flag} FILE {what}")
        return None
    if calib is not None:
        raise UsageError(f"{flag} is for --method wanda / sparsegpt; --method {args.method} does not read it")
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
                     "'1xn:<block>:<sparsity>' (e.g. 1xn:4:0.5), 'wanda' or 'sparsegpt' (need --calib or --calib-text)")


def _inputs(args) -> list[Path]:
    """Every file the command reads (none of them may be an output)."""
    paths = [args.model, args.hf, args.calib, args.calib_text]
    paths += [args.scheme] if args.scheme and Path(args.scheme).exists() else []
    return [Path(p) for p in paths if p is not None]


def _check_folder(args, out: Path) -> None:
    """A Hugging Face folder output: new or empty, or replaced with --force; never holding or above an input."""
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"-o {args.output} exists and is not a folder; with --hf a path without "
                         f"{' / '.join(FILE_OUTPUTS)} is a Hugging Face folder: choose another path")
    for src in _inputs(args):
        if Path(os.path.realpath(src)).is_relative_to(os.path.realpath(out)):
            raise UsageError(f"-o {args.output} would overwrite (or hold) the input {src}; choose another output "
                             "folder")
    if not out.is_dir():
        check_output_files([("-o", out)], force=args.force)
    elif any(out.iterdir()) and not args.force:
        raise UsageError(f"-o {args.output} is a non-empty folder; pass --force to replace it (its files are removed) "
                         "or choose another path")
    elif not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"-o {args.output}: {out.parent} is not writable; choose an output path in a writable folder")


def _check_paths(args) -> tuple[Path, Path, Path | None]:
    """(input, output, report file or None for a folder output) with every output checked before any work."""
    src, out = Path(args.model or args.hf), Path(args.output)
    if args.hf is not None and not src.is_dir():
        raise UsageError(f"--hf {args.hf}: no such folder; give a local folder written by save_pretrained "
                         "(config.json, weights, tokenizer files)")
    if args.hf is None and not src.is_file():
        raise UsageError(f"no such file: {args.model}")
    if args.calib_text is not None and not Path(args.calib_text).is_file():
        raise UsageError(f"--calib-text {args.calib_text}: no such file; give a UTF-8 text file")
    if out.suffix == ".json":
        raise UsageError(f"-o {args.output}: the pruned model is a torch or .safetensors file; the report goes beside "
                         "it as .json")
    if args.hf is not None and out.suffix not in FILE_OUTPUTS:
        _check_folder(args, out)
        return src, out, None
    if out.exists() and out.is_dir():
        raise UsageError(f"-o {args.output} is a directory; give a file path such as pruned.pt")
    report = out.with_suffix(".json")
    check_output_files([("-o", out), ("report of -o:", report)], inputs=_inputs(args), force=args.force)
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


def _text_calibration(args, model, tokenizer) -> list[dict]:
    """--nsamples windows of --seq-len tokens of --calib-text, checked against the model."""
    from ..methods.calibration import model_text_windows

    try:
        text = Path(args.calib_text).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--calib-text {args.calib_text}: not UTF-8 text ({e.reason} at byte {e.start}); give a "
                         "UTF-8 text file") from None
    try:
        return model_text_windows(model, tokenizer, text, args.seq_len, args.nsamples, args.seed)
    except ValueError as e:
        raise UsageError(f"--calib-text {args.calib_text} with --seq-len {args.seq_len}: {e}") from None


def _prune_calibrated(args, model, calib: list, scheme) -> list[dict]:
    """Wanda / SparseGPT on the loaded model (in place); the report rows."""
    from ..methods.oneshot import prune_oneshot

    report = prune_oneshot(model, calib, scheme, method=args.method.strip().lower(), permute=args.permute,
                           progress=progress(args))
    rows = [{"layer": r["name"], "action": "sparsified", "detail": f"{tuple(r['shape'])} as {r['pattern']}",
             "sparsity": round(1 - r["density"], 6)} for r in report.layers]
    rows += [{"layer": r["name"], "action": "permuted", "detail": f"input channels folded into "
              f"{', '.join(r['producers'])}; kept score x{r['kept_after'] / max(r['kept_before'], 1e-30):.4f}"}
             for r in report.permuted]
    return rows + [{"layer": n, "action": "skipped", "detail": why} for n, why in report.skipped]


def _prune_magnitude(model, scheme, what: str) -> list[dict]:
    """Magnitude N:M / 1xN on the loaded model (in place); the report rows."""
    masked, rows = checkpoint_io.prune(model, scheme)
    if not masked:
        reasons = "; ".join(f"{r['layer']}: {r['detail']}" for r in rows) or "the model has no Linear/Conv2d layer"
        raise UsageError(f"nothing to prune in {what} with this scheme - every layer was skipped ({reasons})")
    checkpoint_io.set_weights(model, masked)
    return rows


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


def _report(args, src: Path, out: Path, fmt: str, out_fmt: str, rows: list[dict]) -> dict:
    report = {"input": str(src), "output": str(out), "format": fmt, "output_format": out_fmt, "scheme": args.scheme,
              "method": args.method, "layers": rows,
              "sparsified": sum(r["action"] == "sparsified" for r in rows),
              "skipped": sum(r["action"] == "skipped" for r in rows)}
    if args.calib_text is not None:
        report["calibration"] = {"text": args.calib_text, "seq_len": args.seq_len, "nsamples": args.nsamples,
                                 "seed": args.seed}
    return report


def _show(args, report: dict, report_path: Path) -> None:
    rows = report["layers"]
    if args.json:
        print(json.dumps(report, indent=1))
        return
    width = max(len(r["layer"]) for r in rows)
    for r in rows:
        print(f"{r['action']:<10} {r['layer']:<{width}}  {r['detail']}")
    print(f"wrote {report['output']} ({report['output_format']}, {report['sparsified']} layer(s) pruned, "
          f"{report['skipped']} skipped) and {report_path}")


def _write_file(args, model, scheme, rows: list[dict], paths: tuple, fmt: str, keep_fmt: str | None = None) -> int:
    """Write the pruned model to the -o file and its .json report, together (atomic_write_all), and show them.

    ``paths``: what _check_paths gave; ``keep_fmt``: the format a non-.safetensors output is written in
    (default ``fmt``, the input's)."""
    src, out, report_path = paths
    write_model, out_fmt = _model_writer(model, keep_fmt or fmt, scheme, out)
    report = _report(args, src, out, fmt, out_fmt, rows)
    checkpoint_io.atomic_write_all([(out, write_model),
                                    (report_path, lambda p: p.write_text(json.dumps(report, indent=1) + "\n"))])
    _show(args, report, report_path)
    return EXIT_OK


def _load_hf(args):
    """(model, tokenizer) of --hf DIR [--gguf NAME]; a folder transformers cannot read is a usage error."""
    from ..pretrained import load_hf_folder

    try:
        return load_hf_folder(args.hf, gguf=args.gguf, progress=progress(args))
    except ImportError as e:
        raise UsageError(f"--hf: {e}") from None
    except ValueError as e:
        raise UsageError(f"--hf {args.hf}: {e}") from None


def _run_hf(args, paths: tuple, scheme) -> int:
    """Load the Hugging Face folder, prune it with its output head dense, write a folder or a file."""
    from ..pretrained import HEAD_KEPT_DENSE, keep_output_head_dense, write_hf_folder

    model, tokenizer = _load_hf(args)
    scheme, heads = keep_output_head_dense(model, scheme)
    if args.method.strip().lower() in CALIBRATED:
        rows = _prune_calibrated(args, model, _text_calibration(args, model, tokenizer), scheme)
    else:
        rows = _prune_magnitude(model, scheme, args.hf)
    rows = [dict(r, detail=HEAD_KEPT_DENSE) if r["layer"] in heads and r["action"] == "skipped" else r for r in rows]
    fmt = "gguf" if args.gguf else "hugging face folder"
    src, out, report_path = paths
    if report_path is None:
        report = _report(args, src, out, fmt, "hugging face folder", rows)
        write_hf_folder(model, tokenizer, out, files={FOLDER_REPORT: json.dumps(report, indent=1) + "\n"},
                        replace=args.force, progress=progress(args))
        _show(args, report, out / FOLDER_REPORT)
        return EXIT_OK
    return _write_file(args, model, scheme, rows, paths, fmt, keep_fmt="state_dict")


def run(args) -> int:
    _check_sources(args)
    uniform_1xn = _uniform_1xn(args)
    paths = _check_paths(args)
    scheme = uniform_1xn if uniform_1xn is not None else parse_scheme_arg(args.scheme)
    if args.hf is not None:
        return _run_hf(args, paths, scheme)
    model, fmt = checkpoint_io.load_model(args.model, args.factory)
    if args.method.strip().lower() in CALIBRATED:
        if fmt == "torchscript":
            raise UsageError(f"--method {args.method} needs a state_dict checkpoint with --factory (it runs the model "
                             "with hooks on its layers); TorchScript takes --method magnitude")
        rows = _prune_calibrated(args, model, _calibration(args.calib), scheme)
    else:
        rows = _prune_magnitude(model, scheme, args.model)
    return _write_file(args, model, scheme, rows, paths, fmt)
