"""Durable sparse checkpoints: :func:`save` / :func:`load` of one ``.safetensors`` file, no pickle anywhere.

The file holds the packed buffers of every packed :class:`~nmkern.SparseLinear` /
:class:`~nmkern.SparseConv2d` and the dense tensors of the rest of the model; its
safetensors metadata carries one JSON document (key ``"nmkern"``) that describes each
sparse layer (pattern, n, m, block, dtype, dense shape, the names of its tensors), so
the file can be read without nmkern. ``docs/format.md`` is the full description.

:func:`load` checks everything (file structure, a SHA-256 of the tensor bytes, the
format version, the header against the tensors and the model, index ranges through
:mod:`nmkern.nn._state`) before the model changes: a refused file raises
:class:`FormatError` (a ``ValueError``) and leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from .nn import SparseConv2d, SparseLinear
from .nn import _state
from .nn._layer import _SparseLayer

FORMAT = "nmkern"
FORMAT_VERSION = 1
META_KEY = "nmkern"
# safetensors' own "format" metadata (transformers checks it is one of pt/tf/flax/mlx)
_ST_FORMAT = "pt"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}  # safetensors' names
_MODULES = {"Linear": (nn.Linear, SparseLinear), "Conv2d": (nn.Conv2d, SparseConv2d)}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class FormatError(ValueError):
    """A file nmkern.load refuses (truncated, corrupted, another version, or not fitting the model)."""


# --------------------------------------------------------------------------- save


def _sparse_layers(op: str, model: nn.Module) -> dict[str, _SparseLayer]:
    """Every name at which a sparse layer sits (a shared layer has several); refuses unpacked ones."""
    out = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, _SparseLayer):
            continue
        if not name:
            raise FormatError(f"{op}: the model is itself a {type(mod).__name__}; wrap it (nn.Sequential(layer)) so "
                              "that load has a parent to put it in")
        if not mod.is_packed:
            raise FormatError(f"{op}: layer {name!r} ({type(mod).__name__}) is in the training form; the format "
                              "stores packed layers only: call .pack() on it (or nmkern.sparsify(..., pack=True)) "
                              "before saving")
        out[name] = mod
    return out


def _layer_entry(mod: _SparseLayer, tensors: dict[str, str]) -> dict:
    """The header's description of one packed layer (``tensors``: role -> stored tensor name)."""
    entry = {"module": "Linear" if isinstance(mod, SparseLinear) else "Conv2d", "pattern": mod.pattern.value,
             "n": mod.n, "m": mod.m, "block": mod.block, "sparsity": mod.sparsity,
             "dtype": _DTYPE_NAMES[mod.dtype], "dense_shape": list(mod.weight_shape), "tensors": tensors}
    if isinstance(mod, SparseConv2d):
        entry["conv"] = {"stride": list(mod.stride), "padding": list(mod.padding), "dilation": list(mod.dilation)}
    return entry


def _dedupe(op: str, state: dict) -> tuple[dict, dict]:
    """(stored tensors, aliases): a tensor reachable by several keys (tied / shared) is stored once."""
    stored, aliases, seen, storages = {}, {}, {}, set()
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"{op}: state entry {key!r} is a {type(t).__name__}, not a tensor; the format stores "
                              "tensors only (no pickle): drop that module's get_extra_state or save it separately")
        if t.layout != torch.strided or t.is_meta:
            raise FormatError(f"{op}: {key!r} is a {t.layout} tensor on {t.device}; only dense tensors with values "
                              "can be saved")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        c = t.detach().to("cpu").contiguous()
        ptr = c.untyped_storage().data_ptr()
        if c.numel() and ptr in storages:
            c = c.clone()  # another view of a stored storage: safetensors refuses overlapping views
        storages.add(c.untyped_storage().data_ptr())
        stored[key] = c
    return stored, aliases


def _serialize(tensors: dict, doc: dict) -> bytes:
    import safetensors.torch as st

    def encode(d):
        return st.save(tensors, metadata={"format": _ST_FORMAT, META_KEY: json.dumps(d, sort_keys=True)})

    raw = encode(dict(doc, data_sha256=""))
    # The tensor bytes do not depend on the metadata: hash them, then write the header that holds the hash.
    doc = dict(doc, data_sha256=hashlib.sha256(_data_region(raw)).hexdigest())
    return encode(doc)


def _data_region(raw: bytes) -> memoryview:
    n = int.from_bytes(raw[:8], "little")
    return memoryview(raw)[8 + n:]


def save(model: nn.Module, path, *, format: str = "nmkern") -> None:
    """Write ``model`` to one ``.safetensors`` file at ``path`` (atomically; no pickle).

    ``format="compressed-tensors"``: a folder in compressed-tensors' ``sparse-24-bitmask`` format
    instead (``config.json`` + ``model.safetensors``; every sparse layer must be 2:4 Linear).

    Every packed sparse layer is stored as its packed buffers, everything else as dense
    tensors; the metadata describes the sparse layers (``docs/format.md``). Sparse layers
    must be packed (``.pack()`` or ``nmkern.sparsify(..., pack=True)``).
    """
    from . import __version__
    from .checkpoint_io import atomic_write

    op = "nmkern.save"
    if format not in (FORMAT, "compressed-tensors"):
        raise ValueError(f"{op}: format={format!r} is not supported; choose 'nmkern' (one .safetensors file) or "
                         "'compressed-tensors' (a sparse-24-bitmask folder)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be an nn.Module, got {type(model).__name__}")
    layers = _sparse_layers(op, model)
    if format == "compressed-tensors":
        from .ct_format import write_folder

        return write_folder(op, model, path, layers)
    state = model.state_dict()
    for name in layers:  # the config rides in the header, not as a pickled extra state
        state.pop(f"{name}.{_state.EXTRA}", None)
    tensors, aliases = _dedupe(op, state)
    entries = {}
    for name, mod in layers.items():
        roles = _state.PACKED_KEYS[mod.pattern] + (("bias",) if mod.bias is not None else ())
        entries[name] = _layer_entry(mod, {r: aliases.get(f"{name}.{r}", f"{name}.{r}") for r in roles})
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "nmkern_version": __version__,
           "layers": entries, "aliases": aliases}
    raw = _serialize(tensors, doc)
    atomic_write(Path(path), lambda p: Path(p).write_bytes(raw))


# --------------------------------------------------------------------------- read and check the file


def _parse_header(op: str, path, head: bytes, size: int) -> tuple[int, dict, dict]:
    """(header length N, the checked nmkern document, the safetensors tensor index) of a file of ``size``
    bytes whose first bytes are ``head`` (at least 8 + N of them when the file is whole)."""
    n = int.from_bytes(head[:8], "little") if size >= 8 else -1
    if n < 2 or n > _HEADER_LIMIT or 8 + n > size or 8 + n > len(head):
        raise FormatError(f"{op}: {path} is not a complete safetensors file ({size} bytes, header length "
                          f"{n}); it is truncated or corrupted: write it again with nmkern.save")
    try:
        index = json.loads(head[8:8 + n])
        meta = index.pop("__metadata__", None) or {}
        doc = json.loads(meta[META_KEY])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise FormatError(f"{op}: {path} has no readable nmkern header ({type(e).__name__}: {e}); it is corrupted "
                          "or was not written by nmkern.save") from None
    _check_document(op, path, doc)
    for name, entry in doc["layers"].items():
        try:
            _entry_config(f"{op}: {path}: layer {name!r}", entry)
        except _state.StateError as e:
            raise FormatError(str(e)) from None
    return n, doc, index


def _read(op: str, path) -> tuple[dict, dict]:
    """(the nmkern header document, the stored tensors) of ``path``; refuses a damaged file."""
    import safetensors.torch as st

    p = Path(path)
    if not p.is_file():
        raise FormatError(f"{op}: no such file: {path}")
    raw = p.read_bytes()
    _, doc, _ = _parse_header(op, path, raw, len(raw))
    if hashlib.sha256(_data_region(raw)).hexdigest() != doc["data_sha256"]:
        raise FormatError(f"{op}: {path}: the tensor bytes do not match the header's data_sha256; the file is "
                          "truncated or corrupted: write it again with nmkern.save")
    try:
        tensors = st.load(raw)
    except Exception as e:  # safetensors_rust.SafetensorError is not a ValueError
        raise FormatError(f"{op}: {path} is not a valid safetensors file ({type(e).__name__}: {e}); it is "
                          "truncated or corrupted") from None
    return doc, tensors


def read_header(path) -> tuple[dict, dict]:
    """(the nmkern document, the safetensors index ``{tensor: {dtype, shape, data_offsets}}``) of ``path``.

    Reads the header alone, never the tensors (so it neither checks their bytes nor their
    values: :func:`load` does); refuses a file that is not an nmkern checkpoint.
    """
    op = "nmkern.read_header"
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"{op}: no such file: {path}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        head += f.read(min(max(n, 0), _HEADER_LIMIT))
    _, doc, index = _parse_header(op, path, head, size)
    return doc, index


def layer_table(doc: dict, index: dict) -> list[dict]:
    """One row per sparse layer of :func:`read_header`'s result: its config, and its weight's stored vs dense bytes."""
    rows = []
    for name, e in doc["layers"].items():
        stored = 0
        for role, key in e["tensors"].items():
            if role == "bias":  # weights only: comparable with dense_bytes
                continue
            begin, end = (index.get(key) or {}).get("data_offsets", (0, 0))
            stored += end - begin
        dense = math.prod(e["dense_shape"]) * DTYPES[e["dtype"]].itemsize
        pattern = f"{e['n']}:{e['m']}" if e["pattern"] == "nm" else f"1x{e['block']}"
        rows.append({"name": name, "module": e["module"], "pattern": pattern, "dtype": e["dtype"],
                     "dense_shape": e["dense_shape"], "stored_bytes": stored, "dense_bytes": dense})
    return rows


def _check_document(op: str, path, doc) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"{op}: {path}: the header's format is {doc.get('format') if isinstance(doc, dict) else doc!r}"
                          f", expected {FORMAT!r}; not an nmkern file")
    version = doc.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise FormatError(f"{op}: {path} has format_version={version!r}; this nmkern reads version {FORMAT_VERSION}"
                          " only: load it with the nmkern that wrote it (nmkern_version="
                          f"{doc.get('nmkern_version')!r}) or a newer one")
    if not isinstance(doc.get("data_sha256"), str):
        raise FormatError(f"{op}: {path}: the header has no data_sha256 string; the file is corrupted")
    layers, aliases = doc.get("layers"), doc.get("aliases")
    if not isinstance(layers, dict) or not isinstance(aliases, dict):
        raise FormatError(f"{op}: {path}: the header's 'layers' and 'aliases' must be JSON objects; it is corrupted")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise FormatError(f"{op}: {path}: 'aliases' must map tensor names to tensor names; the header is corrupted")


@dataclasses.dataclass
class _Layer:
    """One sparse layer of the file, checked: its config and its tensors by role."""

    names: list[str]
    entry: dict
    tensors: dict  # role -> tensor


def _entry_config(op: str, entry) -> dict:
    """The layer config an entry gives (the checks of nmkern.nn._state, plus the header's own fields)."""
    if not isinstance(entry, dict):
        raise FormatError(f"{op}: the header entry is a {type(entry).__name__}, expected a JSON object")
    cfg = _state.read_config(op, entry, {"pattern": None, "n": None, "m": None, "block": None, "sparsity": None})
    if entry.get("module") not in _MODULES:
        raise FormatError(f"{op}: module={entry.get('module')!r}; expected one of {sorted(_MODULES)}")
    if entry.get("dtype") not in DTYPES:
        raise FormatError(f"{op}: dtype={entry.get('dtype')!r}; expected one of {sorted(DTYPES)}")
    shape, ndim = entry.get("dense_shape"), 2 if entry["module"] == "Linear" else 4
    if (not isinstance(shape, list) or len(shape) != ndim
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise FormatError(f"{op}: dense_shape={shape!r}; expected {ndim} positive ints for a {entry['module']}")
    if not isinstance(entry.get("tensors"), dict):
        raise FormatError(f"{op}: 'tensors' must map roles to tensor names, got {entry.get('tensors')!r}")
    return cfg


def _layer_tensors(op: str, entry: dict, cfg: dict, tensors: dict) -> dict:
    """role -> tensor for one layer: exactly the roles of its pattern (+ bias), dtypes as the header says."""
    roles = dict(entry["tensors"])
    want = set(_state.PACKED_KEYS[cfg["pattern"]])
    if not want <= set(roles) or not set(roles) <= want | {"bias"}:
        raise FormatError(f"{op}: the header names tensors {sorted(roles)}; a {cfg['pattern'].value} layer has "
                          f"{sorted(want)} (+ 'bias')")
    out = {}
    for role, key in roles.items():
        if not isinstance(key, str) or key not in tensors:
            raise FormatError(f"{op}: the header's {role} tensor {key!r} is not in the file")
        out[role] = tensors[key]
    dtype = DTYPES[entry["dtype"]]
    for role in ("packed_values", "bsr_values", "bias"):
        if role in out and out[role].dtype != dtype:
            raise FormatError(f"{op}: {role} ({roles[role]!r}) is {out[role].dtype}, but the header says dtype="
                              f"{entry['dtype']}; the file is corrupted")
    return out


def _resolve(op: str, path, doc: dict, tensors: dict) -> tuple[dict, dict]:
    """(every state key -> tensor, including aliases; layer name -> its checked entry)."""
    state = dict(tensors)
    for key, target in doc["aliases"].items():
        if target not in tensors or key in tensors:
            raise FormatError(f"{op}: {path}: alias {key!r} -> {target!r} does not name a stored tensor (or shadows "
                              "one); the header is corrupted")
        state[key] = tensors[target]
    return state, _checked_layers(op, path, doc["layers"], tensors)


def _checked_layers(op: str, path, entries: dict, tensors: dict) -> dict:
    """layer name -> (entry, config, tensors by role), each entry checked against the stored tensors."""
    layers = {}
    for name, entry in entries.items():
        where = f"{op}: {path}: layer {name!r}"
        try:
            cfg = _entry_config(where, entry)
        except _state.StateError as e:
            raise FormatError(str(e)) from None
        layers[name] = (entry, cfg, _layer_tensors(where, entry, cfg, tensors))
    return layers


# --------------------------------------------------------------------------- check against the model


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def _shell(op: str, name: str, module: nn.Module, entry: dict, cfg: dict) -> _SparseLayer:
    """A shape-only (meta) sparse layer with ``module``'s geometry and the file's config, to check against."""
    dense_cls, sparse_cls = _MODULES[entry["module"]]
    if type(module) is not dense_cls:
        raise FormatError(f"{op}: the file stores layer {name!r} as a sparse {entry['module']}, but the model has a "
                          f"{type(module).__name__} there; load into a freshly built dense model of the class that "
                          "was saved")
    dtype = DTYPES[entry["dtype"]]
    if tuple(module.weight.shape) != tuple(entry["dense_shape"]) or module.weight.dtype != dtype:
        raise FormatError(f"{op}: layer {name!r}: the model's weight is {tuple(module.weight.shape)} "
                          f"{module.weight.dtype}, the file's is {tuple(entry['dense_shape'])} {dtype}; build the "
                          f"model with the saved shapes and dtype (model.to({dtype})) before nmkern.load")
    if module.weight.is_meta:
        raise FormatError(f"{op}: layer {name!r} is on the meta device; materialise the model "
                          "(model.to_empty(device=...)) before nmkern.load")
    kw = {k: cfg[k] for k in ("pattern", "n", "m", "block", "sparsity")}
    bias = module.bias is not None
    try:
        if sparse_cls is SparseLinear:
            return SparseLinear(module.in_features, module.out_features, bias, device="meta", dtype=dtype, **kw)
        shell = SparseConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, module.dilation, module.groups, bias, device="meta", dtype=dtype,
                             padding_mode=module.padding_mode, **kw)
    except ValueError as e:
        raise FormatError(f"{op}: layer {name!r} cannot take the file's pattern: {e}") from None
    have = {k: list(getattr(shell, k)) for k in ("stride", "padding", "dilation")}
    if entry.get("conv", have) != have:
        raise FormatError(f"{op}: layer {name!r}: the file's conv geometry is {entry['conv']}, the model's is "
                          f"{have}; build the model as it was saved")
    return shell


def _check_layer(op: str, name: str, model: nn.Module, entry: dict, cfg: dict, tensors: dict) -> None:
    module = model.get_submodule(name)
    shell = _shell(op, name, module, entry, cfg)
    where = f"{op}: layer {name!r}"
    if ("bias" in tensors) != (module.bias is not None):
        raise FormatError(f"{where}: the file has {'a' if 'bias' in tensors else 'no'} bias but the model's layer "
                          f"has {'one' if module.bias is not None else 'none'}; build the model as it was saved")
    state = dict(tensors, **{_state.EXTRA: _extra(cfg)})
    try:
        plan = _state.plan_load(where, shell, state, "")
    except _state.StateError as e:
        raise FormatError(str(e)) from None
    if plan.form != "packed":
        raise FormatError(f"{where}: the file holds no packed tensors for this layer; it is corrupted")


def _extra(cfg: dict) -> dict:
    return {"pattern": cfg["pattern"].value, "n": cfg["n"], "m": cfg["m"], "block": cfg["block"],
            "sparsity": cfg["sparsity"], "packed": True}


def _group_layers(op: str, model: nn.Module, layers: dict, strict: bool) -> list[_Layer]:
    """The file's sparse layers grouped by the model module they replace (a shared module: one group)."""
    by_id = _names_by_module(model)
    groups: dict[int, _Layer] = {}
    for name, (entry, cfg, tensors) in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            if strict:
                raise FormatError(f"{op}: the file stores sparse layer {name!r}, which the model does not have; "
                                  "load into the model class that was saved (or strict=False to skip it)") from None
            continue
        _check_layer(op, name, model, entry, cfg, tensors)
        group = groups.setdefault(id(module), _Layer([], entry, tensors))
        group.names.append(name)
        if group.tensors.keys() != tensors.keys() or any(group.tensors[k] is not tensors[k] for k in tensors) \
                or _extra(cfg) != _extra(_entry_config(op, group.entry)):
            raise FormatError(f"{op}: layers {group.names} are one module in the model but the file stores "
                              "different tensors or patterns for them; the model's sharing differs from the saved one")
    for module_id, group in groups.items():
        missing = sorted(set(by_id[module_id]) - set(group.names))
        if missing:
            raise FormatError(f"{op}: the model uses the module at {group.names[0]!r} also at {missing}, which the "
                              "file does not name as sparse; the model's sharing differs from the saved one")
    return list(groups.values())


def _check_dense(op: str, model: nn.Module, state: dict, sparse: list[str], strict: bool) -> dict:
    """The file's dense tensors, checked against the model's state (keys, shapes, and dtypes when strict)."""
    prefixes = tuple(f"{name}." for name in sparse)
    file_dense = {k: t for k, t in state.items() if not k.startswith(prefixes)}
    model_dense = {k: t for k, t in model.state_dict().items() if not k.startswith(prefixes)}
    if strict:
        missing = sorted(set(model_dense) - set(file_dense))
        unexpected = sorted(set(file_dense) - set(model_dense))
        if missing or unexpected:
            raise FormatError(f"{op}: the file does not fit the model: missing from the file {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, not in the model {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}; load into the model class that was saved "
                              "(or strict=False)")
    for key in sorted(set(file_dense) & set(model_dense)):
        want, got = model_dense[key], file_dense[key]
        if not isinstance(want, torch.Tensor):
            raise FormatError(f"{op}: the model's {key!r} is a {type(want).__name__}, the file's a tensor")
        if tuple(want.shape) != tuple(got.shape) or (strict and want.dtype != got.dtype):
            raise FormatError(f"{op}: {key!r}: the model expects {tuple(want.shape)} {want.dtype}, the file has "
                              f"{tuple(got.shape)} {got.dtype}; build the model with the saved shapes and dtypes")
    return {k: t for k, t in file_dense.items() if k in model_dense}


# --------------------------------------------------------------------------- load


def _build(model: nn.Module, group: _Layer) -> _SparseLayer:
    """The packed sparse module of one group, loaded off the model (the model does not change)."""
    module = model.get_submodule(group.names[0])
    cfg = _entry_config("nmkern.load", group.entry)
    kw = {k: cfg[k] for k in ("pattern", "n", "m", "block", "sparsity")}
    new = (SparseLinear if isinstance(module, nn.Linear) else SparseConv2d).from_dense(module, **kw)
    new.load_state_dict(dict(group.tensors, **{_state.EXTRA: _extra(cfg)}))
    new.train(module.training)
    return new


def load(path, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Load an :func:`save` file into ``model``, a freshly built dense model of the saved class; returns it.

    ``path`` may also be a compressed-tensors ``sparse-24-bitmask`` or ``sparse-bitmask`` folder
    (:mod:`nmkern.ct_format`): its 2:4 layers load straight into packed layers, the rest (``ignore``-d
    and unstructured layers too) as dense.

    The layers the file stores as sparse are swapped for packed :class:`~nmkern.SparseLinear` /
    :class:`~nmkern.SparseConv2d` holding the file's buffers; the rest load as dense tensors.
    Everything is checked first: a truncated or corrupted file, another format version, a
    header that disagrees with its tensors, out-of-range indices, or (``strict=True``) any
    key, shape or dtype the model does not match raises :class:`FormatError` (a
    ``ValueError``) and leaves ``model`` untouched. ``strict=False`` skips keys and layers
    only one side has and lets dense tensors cast to the model's dtypes (shapes must match).
    """
    op = "nmkern.load"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be an nn.Module, got {type(model).__name__}")
    if Path(path).is_dir():  # a compressed-tensors sparse-24-bitmask folder
        from .ct_format import read_folder

        state, entries = read_folder(op, path)
        layers = _checked_layers(op, path, entries, state)
    else:
        doc, tensors = _read(op, path)
        state, layers = _resolve(op, path, doc, tensors)
    groups = _group_layers(op, model, layers, strict)
    dense = _check_dense(op, model, state, [n for g in groups for n in g.names] + list(layers), strict)
    built = [(group, _build(model, group)) for group in groups]  # off the model: it is unchanged so far
    model.load_state_dict(dense, strict=False)
    for group, new in built:
        for name in group.names:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model

