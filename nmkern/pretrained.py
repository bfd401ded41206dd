"""Hugging Face models in a local folder: :func:`save_pretrained` / :func:`from_pretrained`.

The folder holds ``config.json`` (the model's ``transformers`` config) and ``model.safetensors``
in the nmkern format (:func:`nmkern.save`, ``docs/format.md``). :func:`from_pretrained` rebuilds
the model from the config with ``transformers`` (installed separately; never downloads, never
runs remote code) and loads the file into it. Only classes ``transformers`` itself exports are
built: a name in ``config.json`` is looked up there, never imported.

What ``nmkern prune --hf`` reads and writes, in Hugging Face's own (dense) format:
:func:`load_hf_folder` (a ``save_pretrained`` folder, or a GGUF file, with its tokenizer),
:func:`keep_output_head_dense` (the scheme with the LM head left out) and :func:`write_hf_folder`
(the model and tokenizer written all or nothing).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from .serialization import ST_DTYPES, FormatError, load, read_header, save

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _transformers(op: str):
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{op}: needs the transformers package (pip install 'nmkern[hf]'); nmkern.save / "
                          "nmkern.load work without it on a model you build yourself") from None
    return transformers


def save_pretrained(model: nn.Module, directory) -> Path:
    """Write ``config.json`` (with ``architectures`` naming the model's class) and ``model.safetensors``."""
    op = "nmkern.save_pretrained"
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError(f"{op}: {type(model).__name__} has no transformers config (model.config); use "
                        "nmkern.save(model, path) for other models")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise FormatError(f"{op}: {directory} exists and is not a folder; give a folder path")
    d.mkdir(parents=True, exist_ok=True)
    save(model, d / WEIGHTS_NAME)
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(d)
    return d


def _model_class(op: str, transformers, config):
    """The transformers class ``config.architectures`` names (an attribute of transformers, a PreTrainedModel)."""
    names = getattr(config, "architectures", None) or []
    if not names:
        return transformers.AutoModel
    cls = getattr(transformers, str(names[0]), None) if str(names[0]).isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FormatError(f"{op}: config.json names architecture {names[0]!r}, which is not a model class of the "
                          f"installed transformers {transformers.__version__}; pass model_class=... to build it")
    return cls


def _file_dtype(index: dict, doc: dict) -> torch.dtype:
    """The dtype the model was saved in: its sparse layers', else the one float dtype of its tensors."""
    layer_dtypes = {e["dtype"] for e in doc["layers"].values()}
    if len(layer_dtypes) == 1:
        return getattr(torch, layer_dtypes.pop())
    floats = {ST_DTYPES[t["dtype"]] for t in index.values() if isinstance(t, dict) and t.get("dtype") in ST_DTYPES}
    return floats.pop() if len(floats) == 1 else torch.float32


def build_from_config(op: str, directory, dtype: torch.dtype, model_class=None) -> nn.Module:
    """A freshly built (random weights, eval mode) ``transformers`` model of ``directory/config.json``, in ``dtype``."""
    d = Path(directory)
    transformers = _transformers(op)
    try:
        json.loads((d / CONFIG_NAME).read_text())
        config = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise FormatError(f"{op}: {d / CONFIG_NAME} is not a transformers config ({type(e).__name__}: {e})") from None
    cls = model_class or _model_class(op, transformers, config)
    model = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    return model.to(dtype).eval()


def from_pretrained(directory, *, model_class=None, dtype: torch.dtype | None = None, strict: bool = True):
    """Rebuild a ``transformers`` model from ``directory/config.json`` and load ``model.safetensors`` into it.

    ``model_class``: the class to build (default: the one ``config.json``'s ``architectures`` names,
    else ``AutoModel``). ``dtype``: the dtype to build it in (default: the file's). Returns the
    model in eval mode. Refusals are those of :func:`nmkern.load` (a ``ValueError``).
    """
    op = "nmkern.from_pretrained"
    d = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            raise FormatError(f"{op}: {directory} has no {name}; write the folder with nmkern.save_pretrained")
    doc, index = read_header(d / WEIGHTS_NAME)
    model = build_from_config(op, d, dtype or _file_dtype(index, doc), model_class)
    return load(d / WEIGHTS_NAME, model, strict=strict)


# --------------------------------------------------------------------------- Hugging Face's own folders

# Files AutoTokenizer reads (tokenizers' JSON, its config, sentencepiece, WordPiece / BPE vocabularies):
# a folder with none of them has no tokenizer to calibrate with.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
# Class-name endings of causal LMs: AutoModelForCausalLM keeps their LM head (LlamaForCausalLM, GPT2LMHeadModel).
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
HEAD_KEPT_DENSE = "output head kept dense"


@contextlib.contextmanager
def _progress_bars(transformers, show: bool):
    """transformers' own progress bars (loading / writing weights) off while ``show`` is False, restored after."""
    hf_logging = transformers.utils.logging
    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()


def _check_hf_folder(op: str, d: Path, gguf: str | None) -> None:
    """Refuse, before transformers runs, a folder it would treat as a Hub repo id or fail on obscurely."""
    if not d.is_dir():
        raise FormatError(f"{op}: {d} is not a folder; give a local folder written by model.save_pretrained and "
                          "tokenizer.save_pretrained (nothing is downloaded)")
    if gguf is not None:
        if not (d / gguf).is_file():
            found = sorted(p.name for p in d.glob("*.gguf"))
            raise FormatError(f"{op}: {d} has no GGUF file {gguf!r} (GGUF files there: {found or 'none'}); "
                              "give the file's name inside the folder")
        return
    if not (d / CONFIG_NAME).is_file():
        raise FormatError(f"{op}: {d} has no {CONFIG_NAME}; write the folder with model.save_pretrained(folder) "
                          "(or name a GGUF file in it)")
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        raise FormatError(f"{op}: {d} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); write it with "
                          "tokenizer.save_pretrained(folder)")


def load_hf_folder(directory, *, gguf: str | None = None, progress: bool = True):
    """``(model, tokenizer)`` of a local Hugging Face folder, in float32 and eval mode.

    ``directory``: what ``model.save_pretrained`` + ``tokenizer.save_pretrained`` wrote
    (``config.json``, the weights, the tokenizer files); or, with ``gguf``, a folder holding that
    GGUF file (transformers reads model and tokenizer from it, dequantized; needs the ``gguf``
    package). The class is ``AutoModelForCausalLM`` when ``config.json``'s ``architectures`` names a
    causal LM (a GGUF file always holds one), so the LM head comes along; else ``AutoModel`` (an
    encoder such as BERT / MiniLM, without its task head). Local files only, never remote code.
    A folder transformers cannot read raises ``ValueError`` (:class:`FormatError`) saying what is missing.
    """
    op = "nmkern.load_hf_folder"
    d = Path(directory)
    _check_hf_folder(op, d, gguf)
    transformers = _transformers(op)
    kw = {"local_files_only": True, "trust_remote_code": False}
    if gguf is not None:
        kw["gguf_file"] = gguf
    try:
        with _progress_bars(transformers, progress):
            config = transformers.AutoConfig.from_pretrained(str(d), **kw)
            names = [str(a) for a in getattr(config, "architectures", None) or []]
            causal = gguf is not None or any(a.endswith(CAUSAL_LM_SUFFIXES) for a in names)
            auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(d), **kw)
            model = auto.from_pretrained(str(d), dtype=torch.float32, **kw)
    except ImportError as e:
        raise ImportError(f"{op}: reading {d} needs a package that is missing ({e}); for a GGUF file: "
                          "pip install gguf") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FormatError(f"{op}: transformers {transformers.__version__} cannot read {d / gguf if gguf else d} "
                          f"({type(e).__name__}: {first}); check that it holds a model and its tokenizer as "
                          "save_pretrained writes them") from None
    return model.eval(), tokenizer


def keep_output_head_dense(model: nn.Module, scheme) -> tuple[object, list[str]]:
    """``(scheme, head names)``: ``scheme`` with the model's output head (``get_output_embeddings()``, an
    LM's ``lm_head``) kept dense, and the names that head has in the model ([] when it has none).

    Why: the head maps every hidden state to the whole vocabulary, so pruning it costs the most quality per
    weight (the SparseGPT and Wanda papers leave it dense too), and it is often tied to the input embedding.
    A single pattern becomes ``{head: None, "*": pattern}`` (an exact name wins over the glob); a mapping
    gains ``head: None`` unless it names the head exactly, which then prunes it as given.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return scheme, []
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is head and n]
    if isinstance(scheme, Mapping):
        if any(n in scheme for n in names):
            return scheme, []
        return {**{n: None for n in names}, **scheme}, names
    return {**{n: None for n in names}, "*": scheme}, names


def write_hf_folder(model: nn.Module, tokenizer, directory, *, files: Mapping[str, str] | None = None,
                    replace: bool = False, progress: bool = True) -> Path:
    """``model.save_pretrained`` + ``tokenizer.save_pretrained`` + ``files`` (name -> text) into ``directory``,
    all or nothing: everything goes into a new folder beside it, renamed into place once complete, so a
    failure or Ctrl-C never leaves a half-written model. An existing non-empty ``directory`` is refused
    (``FormatError``) unless ``replace``; it is then removed only after the new folder is complete.
    """
    from .checkpoint_io import _umask

    op = "nmkern.write_hf_folder"
    d = Path(directory)
    if os.path.lexists(d) and not d.is_dir():
        raise FormatError(f"{op}: {d} exists and is not a folder; choose a folder path")
    if d.is_dir() and any(d.iterdir()) and not replace:
        raise FormatError(f"{op}: {d} is a non-empty folder; pass replace=True to replace it, or choose another path")
    transformers = _transformers(op)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}.", suffix=".tmp"))
    old = tmp.with_suffix(".old")  # unique beside tmp: the replaced folder, until the new one is in place
    try:
        with _progress_bars(transformers, progress):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0o700: give it a folder's usual mode
        if os.path.lexists(d):
            os.rename(d, old)
        try:
            os.rename(tmp, d)
        except OSError:
            if os.path.lexists(old):
                os.rename(old, d)
            raise
    finally:
        for leftover in (tmp, old):
            if os.path.lexists(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
    return d
