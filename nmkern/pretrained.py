"""Hugging Face models in a local folder: :func:`save_pretrained` / :func:`from_pretrained`.

The folder holds ``config.json`` (the model's ``transformers`` config) and ``model.safetensors``
in the nmkern format (:func:`nmkern.save`, ``docs/format.md``). :func:`from_pretrained` rebuilds
the model from the config with ``transformers`` (installed separately; never downloads, never
runs remote code) and loads the file into it. Only classes ``transformers`` itself exports are
built: a name in ``config.json`` is looked up there, never imported.
"""

from __future__ import annotations

import copy
import json
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
        raise ImportError(f"{op}: needs the transformers package (pip install transformers); nmkern.save / "
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
