"""Plumbing the ``nmkern`` commands share: exit codes, usage errors, common flags, atomic outputs, --scheme."""

from __future__ import annotations

import argparse
import enum
import json
import os
import stat
import tempfile
from pathlib import Path

import torch

from .. import checkpoint_io
from ..checkpoint_io import write_json
from ..spec import BlockSpec, NMSpec, parse_spec

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2

SCHEME_PATTERNS = (NMSpec.pattern, BlockSpec.pattern)
SCHEME_HELP = "'n:m' (e.g. 2:4), '1x<block>:<sparsity>' (e.g. 1x4:0.5), or a scheme JSON file"

__all__ = ["EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "Kind", "SCHEME_HELP", "UsageError", "add_data_args",
           "check_out_dir", "check_output_files", "check_run_args", "int_list_type", "load_data", "parse_int_list",
           "parse_scheme_arg", "progress", "read_model", "set_threads", "write_json"]


class UsageError(Exception):
    """Bad user input: reported on stderr, exit code 2."""


def progress(args) -> bool:
    """Progress bars unless --no-progress."""
    return not getattr(args, "no_progress", False)


def set_threads(args) -> None:
    """--threads (default 1 for the small bundled models: under contention two OpenMP threads spin,
    measured 25x the CPU time of one per MNIST-1D epoch). main() restores the caller's count."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)


def _kind(path: Path) -> str:
    mode = os.stat(path).st_mode if os.path.exists(path) else 0
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "a pipe or socket"
    return "a broken symlink" if os.path.islink(path) else "not a regular file"


def _check_writable_dir(flag: str, path: Path, folder: Path | None = None) -> None:
    """``folder`` (default ``path``: a folder to write into, maybe not there yet) can be created and written;
    else UsageError naming ``flag path``."""
    folder = path if folder is None else folder
    probe = Path(os.path.abspath(folder))
    while not os.path.lexists(probe):
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is not a directory; choose an output path in a writable folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {probe} is not writable; choose an output path in a writable folder")
    try:  # create and remove a file (or, for a folder still to be made, a folder): read-only mounts, /proc, root
        if probe == Path(os.path.abspath(folder)):
            fd, name = tempfile.mkstemp(dir=probe, prefix=".nmkern-probe.")
            os.close(fd)
            os.unlink(name)
        else:
            os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".nmkern-probe."))
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {probe} ({e.strerror}); choose a writable folder") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_files(outputs, *, inputs=(), force: bool = False) -> None:
    """Refuse, before any work, an output file that cannot or must not be written.

    ``outputs``: ``(flag, path)`` pairs naming each file a command writes; ``inputs``: the files it
    reads. Refused (UsageError, exit 2): an output that exists and is not a regular file (a
    directory, ``/dev/null``, a FIFO); one that is an input (even with --force); one that exists,
    unless ``force``; one in a folder that cannot be created or written; two outputs on one path.
    """
    seen: list[Path] = []
    for flag, path in outputs:
        path = Path(path)
        if os.path.lexists(path) and not path.is_file():
            raise UsageError(f"{flag} {path} is {_kind(path)}; nmkern writes only regular files: give a file path")
        for src in inputs:
            if src is not None and os.path.lexists(src) and _same_file(path, Path(src)):
                raise UsageError(f"{flag} {path} would overwrite the input {src}; choose another output path")
        if any(_same_file(path, other) for other in seen):
            raise UsageError(f"{flag} {path}: two outputs of this command would go to the same file; "
                             "choose another output path")
        if path.exists() and not force:
            raise UsageError(f"{flag} {path} exists; pass --force to overwrite it (or choose another path)")
        _check_writable_dir(flag, path, path.parent)
        seen.append(path)


def check_out_dir(path: str, names=(), *, inputs=(), force: bool = False, resume: bool = False) -> Path:
    """The output folder ``-o path`` of a run writing ``names`` into it, checked before any work.

    Refused (UsageError): a path that is not a directory; a folder that cannot be created or
    written; an output name there that is not a regular file (a directory for ``name/``); an input
    among the outputs; and, unless ``resume`` or ``force``, an output name that already exists
    (an earlier run's file). Other files in the folder are never touched.
    """
    out = Path(path)
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"-o {path}: exists and is not a directory; choose a directory path")
    _check_writable_dir("-o", out)
    found = []
    for name in names:
        want_dir = name.endswith("/")
        target = out / name.rstrip("/")
        if os.path.lexists(target) and (target.is_dir() != want_dir or not (target.is_dir() or target.is_file())):
            raise UsageError(f"-o {path}: {target} is {_kind(target) if not want_dir else 'not a directory'}; "
                             "remove it or choose another -o")
        for src in inputs:
            if src is not None and os.path.lexists(src) and _same_file(target, Path(src)):
                raise UsageError(f"-o {path} would overwrite the input {src}; choose another -o")
        if os.path.lexists(target):
            found.append(target.name)
    if found and not (force or resume):
        raise UsageError(f"-o {path} already holds {', '.join(found)} from an earlier run; pass --resume to continue "
                         "it, --force to start over (overwriting them), or choose another -o")
    return out


def parse_int_list(flag: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag} {text!r}: give positive integers separated by commas, e.g. 1,16,256")
    return vals


def int_list_type(text: str) -> list[int]:
    """argparse ``type=`` of a comma-separated list of positive integers."""
    try:
        return parse_int_list("", text)
    except UsageError:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas") from None


def _scheme_file(text: str):
    p = Path(text)
    if not p.is_file():
        raise UsageError(f"--scheme {text}: no such file (give {SCHEME_HELP})")
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--scheme {text}: not valid JSON ({e})") from None
    from ..scheme import Scheme

    fmt = obj.get("format") if isinstance(obj, dict) else None
    if isinstance(obj, dict) and "format" in obj and not isinstance(fmt, (str, list)) and fmt is not None:
        raise UsageError(f"--scheme {text}: \"format\" is {fmt!r}; a scheme file (Scheme.save) has "
                         "\"format\": \"nmkern.scheme/1\" (or give a JSON object {layer: 'n:m'})")
    if isinstance(fmt, str) and fmt.startswith("nmkern.scheme"):
        try:
            return Scheme.from_dict(obj)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--scheme {text}: {e}") from None
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        try:
            return {k: parse_spec(v, op="sparsify", where=f"scheme[{k!r}]", allowed=SCHEME_PATTERNS)
                    for k, v in obj.items()}
        except (ValueError, TypeError) as e:
            raise UsageError(f"--scheme {text}: {e}") from None
    raise UsageError(f"--scheme {text}: expected an nmkern scheme (Scheme.save) or a JSON object "
                     "{layer name or glob: 'n:m' | [n, m] | '1x<block>:<sparsity>' | null}")


def parse_scheme_arg(text: str):
    """``--scheme`` value -> an NMSpec / BlockSpec for every layer, ``{name or glob: spec}``, or a Scheme."""
    if text.lower().endswith(".json") or Path(text).is_file():
        return _scheme_file(text)
    try:
        spec = parse_spec(text, op="nmkern", where="--scheme", allowed=SCHEME_PATTERNS)
    except (ValueError, TypeError):
        spec = None
    if not isinstance(spec, (NMSpec, BlockSpec)):
        raise UsageError(f"--scheme {text!r} is not a pattern: use 'n:m' with n < m <= 16 (e.g. 2:4, 1:8), "
                         "'1x<block>:<sparsity>' (e.g. 1x4:0.5) or a scheme JSON file")
    return spec


def add_data_args(p: argparse.ArgumentParser, resume_help: str) -> None:
    """The options of a run on a bundled dataset (search, train)."""
    p.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"], help="bundled dataset and model")
    p.add_argument("--init", default=None, help="state_dict of the bundled model to start from")
    p.add_argument("-o", "--output", required=True,
                   help="output folder; one that already holds this command's outputs is refused "
                        "unless --resume or --force (other files in it are never touched)")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--force", action="store_true",
                   help="start over in an -o folder holding an earlier run's outputs, overwriting them")
    p.add_argument("--seed", type=int, default=0, help="seeds model initialisation, data order and training (>= 0)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the models are small)")
    p.add_argument("--no-progress", action="store_true")


def check_run_args(args) -> None:
    """The options add_data_args adds, checked before any work."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be an integer >= 1 (e.g. 64)")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be an integer >= 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")


def load_data(args):
    """The bundled dataset of --dataset (a missing optional dependency is a usage error)."""
    from ..data import load_dataset

    try:
        return load_dataset(args.dataset, seed=args.seed)
    except ImportError as e:
        raise UsageError(str(e)) from None


# --------------------------------------------------------------------------- reading a sparse model


class Kind(str, enum.Enum):
    """The three forms a model converts between."""

    STATE_DICT = "torch state_dict"
    NMKERN = "nmkern safetensors"
    COMPRESSED_TENSORS = "compressed-tensors folder"


def _factory_model(args, what: str) -> torch.nn.Module:
    """The dense model ``--factory`` builds (``what``: the input, for the message when it is missing)."""
    if not args.factory:
        raise UsageError(f"{args.input} is {what}: pass --factory module:callable that builds the model it belongs to "
                         "(e.g. --factory nmkern.models:MNIST1DNet)")
    return checkpoint_io.model_from_factory(args.factory)


def _read_folder(args, src: Path) -> tuple[torch.nn.Module, Kind]:
    from ..ct_format import folder_dtype, is_compressed_tensors
    from ..pretrained import CONFIG_NAME, WEIGHTS_NAME, build_from_config, from_pretrained
    from ..serialization import load

    if (src / WEIGHTS_NAME).is_file() and not is_compressed_tensors(_json(src / CONFIG_NAME)):  # save_pretrained
        if args.factory:
            return load(src / WEIGHTS_NAME, _factory_model(args, "a folder")), Kind.NMKERN
        return from_pretrained(src), Kind.NMKERN
    op = f"nmkern {args.command}"
    if args.factory:
        model = _factory_model(args, "a folder")
    elif (src / CONFIG_NAME).is_file():
        model = build_from_config(op, src, folder_dtype(op, src))
    else:
        raise UsageError(f"{src} has no config.json: pass --factory module:callable that builds its model")
    return load(src, model), Kind.COMPRESSED_TENSORS


def _json(path: Path):
    """A JSON file's contents, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_model(args) -> tuple[torch.nn.Module, Kind]:
    """(the model, the input's kind) of ``args.input`` (and ``args.factory``): a torch state_dict or an nmkern
    ``.safetensors`` file (both built with ``--factory``), or a folder (nmkern.save_pretrained's, or
    compressed-tensors)."""
    from ..serialization import load

    src = Path(args.input)
    if src.is_dir():
        return _read_folder(args, src)
    if not src.is_file():
        raise UsageError(f"no such file or folder: {args.input}")
    if src.suffix == ".safetensors":
        return load(src, _factory_model(args, "an nmkern .safetensors file")), Kind.NMKERN
    if not args.factory:
        _factory_model(args, "a torch state_dict")
    state = checkpoint_io.load_state_dict(str(src), extra_state=True)
    return checkpoint_io.build_from_factory(args.factory, state, sparse=True), Kind.STATE_DICT
