"""compressed-tensors ``sparse-24-bitmask`` folders (llm-compressor's 2:4 checkpoints), read and written by nmkern.

The format (compressed-tensors 0.14.0.1, the last release that reads and writes it), per
compressed ``nn.Linear`` ``<m>`` of weight ``(out, in)``:

* ``<m>.shape``: int64 ``(2, 1)`` = ``[[out], [in]]``;
* ``<m>.compressed``: the weight's dtype, ``(out, in/2)``: the kept values in row-major order;
* ``<m>.bitmask``: uint8 ``(out, ceil(in/8))``: ``numpy.packbits(mask, axis=-1, bitorder="little")``
  (bit j of byte k is column 8k+j; rows padded with zero bits). Every group of 4 has exactly 2 bits set
  (compressed-tensors keeps the top 2 of each group, zeros included);
* every other tensor is stored unchanged; ``config.json``'s ``quantization_config`` has
  ``quant_method: "compressed-tensors"`` and ``sparsity_config.format: "sparse-24-bitmask"``.

The plain ``sparse-bitmask`` format (any sparsity) differs in three tensors: ``<m>.shape`` is int64
``(2,)``, ``<m>.compressed`` is flat ``(nnz,)`` (the kept values, row-major) and ``<m>.row_offsets``
(int64 ``(out,)``) is where each row's values start. Its ``sparsity_config.sparsity_structure`` says
``"2:4"`` or ``"unstructured"``.

:func:`read_folder` turns such a folder into the same (state, layers) that an nmkern file gives
:func:`nmkern.load`: sparse-24-bitmask layers straight into nmkern's packed 2:4 buffers (no dense
detour); sparse-bitmask layers into packed 2:4 layers when the config says ``"2:4"`` (and every
group of 4 keeps at most 2), otherwise into dense weights.
Nothing named by the checkpoint is imported or executed: the format string is compared, never looked up.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .reference.nm_pack import pack_nm_ref, pack_words, unpack_words

FORMAT_24 = "sparse-24-bitmask"
FORMAT_BITMASK = "sparse-bitmask"
_PARTS = {FORMAT_24: ("shape", "compressed", "bitmask"), FORMAT_BITMASK: ("shape", "compressed", "bitmask", "row_offsets")}


class CTError(ValueError):
    """A compressed-tensors folder nmkern refuses."""


def is_compressed_tensors(config: dict) -> bool:
    """Whether a parsed ``config.json`` is a compressed-tensors checkpoint's."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(q, dict) and q.get("quant_method") == "compressed-tensors"


def _config(op: str, folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CTError(f"{op}: {folder / 'config.json'} is missing or not JSON ({type(e).__name__}: {e})") from None
    if not is_compressed_tensors(cfg):
        raise CTError(f"{op}: {folder} is not a compressed-tensors checkpoint (config.json has no quantization_config "
                      "with quant_method 'compressed-tensors'); an nmkern checkpoint is one .safetensors file")
    q = cfg["quantization_config"]
    sparsity = q.get("sparsity_config") or {}
    if sparsity.get("format") not in _PARTS:
        raise CTError(f"{op}: {folder}: sparsity format {sparsity.get('format')!r} is not supported; nmkern reads "
                      f"{FORMAT_24!r} (2:4) and {FORMAT_BITMASK!r} checkpoints")
    if q.get("config_groups"):
        raise CTError(f"{op}: {folder}: the checkpoint is also quantized (config_groups); nmkern reads sparse-only "
                      "2:4 checkpoints")
    return cfg


def _shards(op: str, folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CTError(f"{op}: {index} is not a safetensors index ({type(e).__name__}: {e})") from None
        if any(Path(n).name != n for n in names):
            raise CTError(f"{op}: {index} names shards outside the folder: {names}")
        return [folder / n for n in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CTError(f"{op}: {folder} holds no .safetensors files")
    return shards


def _load_tensors(op: str, folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors: dict = {}
    for shard in _shards(op, folder):
        try:
            part = load_file(shard)
        except Exception as e:  # SafetensorError is not a ValueError
            raise CTError(f"{op}: {shard} is not a valid safetensors file ({type(e).__name__}: {e}); it is "
                          "missing, truncated or corrupted") from None
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise CTError(f"{op}: {shard} repeats tensors of another shard: {dup[:4]}")
        tensors.update(part)
    return tensors


def _mask_bits(op: str, bitmask: torch.Tensor, o: int, k: int) -> torch.Tensor:
    """The ``(o, k)`` 0/1 int64 mask of a packbits(bitorder="little") ``bitmask``, checked."""
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (o, -(-k // 8)):
        raise CTError(f"{op}: bitmask is {bitmask.dtype} {tuple(bitmask.shape)}; expected uint8 ({o}, {-(-k // 8)})")
    bits = ((bitmask.to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1).reshape(o, -1)
    if bool(bits[:, k:].any()):
        raise CTError(f"{op}: bitmask has bits set past column {k}; the checkpoint is corrupted")
    return bits[:, :k]


def _positions_24(groups: torch.Tensor) -> torch.Tensor:
    """The 2 kept in-group indices (ascending) of ``(o, k/4, 4)`` 0/1 groups with at most 2 ones each:
    the set bits, then (for fewer than 2) the lowest unset ones, as nmkern's packing fills groups."""
    return torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2].sort(-1).values


def _shape(op: str, shape: torch.Tensor) -> tuple[int, int]:
    if shape.dtype != torch.int64 or shape.numel() != 2:
        raise CTError(f"{op}: shape is {shape.dtype} {tuple(shape.shape)}; expected int64 [out, in]")
    o, k = (int(d) for d in shape.flatten())
    if o < 1 or k < 1:
        raise CTError(f"{op}: shape [{o}, {k}] is not a weight shape")
    return o, k


def folder_dtype(op: str, folder) -> torch.dtype:
    """The dtype of a compressed-tensors folder's weights (its compressed values'), from the shard headers alone."""
    from safetensors import safe_open

    from .serialization import ST_DTYPES

    folder = Path(folder)
    _config(op, folder)
    found = set()
    for shard in _shards(op, folder):
        try:
            with safe_open(str(shard), framework="pt") as f:
                found |= {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".compressed")}
        except Exception as e:  # SafetensorError is not a ValueError
            raise CTError(f"{op}: {shard} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    if len(found) != 1 or next(iter(found)) not in ST_DTYPES:
        raise CTError(f"{op}: {folder}: the compressed weights have dtypes {sorted(found)}; expected one float dtype")
    return ST_DTYPES[found.pop()]


def to_packed(op: str, shape: torch.Tensor, compressed: torch.Tensor, bitmask: torch.Tensor) -> tuple:
    """(packed_values, packed_indices, [out, in]) of one sparse-24-bitmask weight, checked."""
    o, k = _shape(op, shape)
    if k < 4 or k % 4:
        raise CTError(f"{op}: shape [{o}, {k}] is not a 2:4 weight (in must be a positive multiple of 4)")
    if compressed.dim() != 2 or tuple(compressed.shape) != (o, k // 2) or not compressed.is_floating_point():
        raise CTError(f"{op}: compressed is {compressed.dtype} {tuple(compressed.shape)}; expected floats ({o}, {k // 2})")
    groups = _mask_bits(op, bitmask, o, k).reshape(o, k // 4, 4)
    if not bool((groups.sum(-1) == 2).all()):
        raise CTError(f"{op}: bitmask has a group of 4 without exactly 2 kept values; not a 2:4 weight")
    indices = pack_words(_positions_24(groups).reshape(o, k // 2), 4)
    return compressed.contiguous(), indices, [o, k]


def bitmask_dense(op: str, shape: torch.Tensor, compressed: torch.Tensor, bitmask: torch.Tensor,
                  row_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense weight, its 0/1 mask) of one plain sparse-bitmask weight, checked."""
    o, k = _shape(op, shape)
    bits = _mask_bits(op, bitmask, o, k)
    counts = bits.sum(1)
    if compressed.dim() != 1 or compressed.shape[0] != int(counts.sum()) or not compressed.is_floating_point():
        raise CTError(f"{op}: compressed is {compressed.dtype} {tuple(compressed.shape)}; expected floats "
                      f"({int(counts.sum())},), one per set bit of the bitmask")
    if row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (o,) \
            or not torch.equal(row_offsets, counts.cumsum(0) - counts):
        raise CTError(f"{op}: row_offsets ({row_offsets.dtype} {tuple(row_offsets.shape)}) do not match the bitmask's "
                      "row counts; the checkpoint is corrupted")
    dense = torch.zeros(o, k, dtype=compressed.dtype)
    dense[bits.bool()] = compressed  # row-major, as compressed-tensors wrote them
    return dense, bits


def to_bitmask(values: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """The sparse-24-bitmask ``bitmask`` of a 2:4 packed weight of ``k`` columns (uint8, zero padding bits)."""
    o = values.shape[0]
    pos = unpack_words(indices, 4, k // 2).reshape(o, k // 4, 2)
    cols = (torch.arange(k // 4).reshape(1, -1, 1) * 4 + pos).reshape(o, -1)
    mask = torch.zeros(o, -(-k // 8) * 8, dtype=torch.int64)
    mask.scatter_(1, cols, 1)
    return (mask.reshape(o, -1, 8) << torch.arange(8)).sum(-1).to(torch.uint8)


def _entry_24(values: torch.Tensor, dense_shape: list, roles: dict) -> dict:
    return {"module": "Linear", "pattern": "nm", "n": 2, "m": 4, "block": 4, "sparsity": 0.5,
            "dtype": str(values.dtype).replace("torch.", ""), "dense_shape": dense_shape, "tensors": roles}


def read_folder(op: str, folder) -> tuple[dict, dict]:
    """(state: key -> tensor, layers: name -> header entry) of a sparse-24-bitmask or sparse-bitmask folder."""
    folder = Path(folder)
    sparsity = _config(op, folder)["quantization_config"]["sparsity_config"]
    fmt, parts = sparsity["format"], _PARTS[sparsity["format"]]
    tensors = _load_tensors(op, folder)
    names = {key[: -len(".compressed")] for key in tensors if key.endswith(".compressed")}
    state = {k: t for k, t in tensors.items() if not any(k == f"{n}.{p}" for n in names for p in parts)}
    layers = {}
    for name in sorted(names):
        missing = [p for p in parts if f"{name}.{p}" not in tensors]
        if missing:
            raise CTError(f"{op}: {folder}: layer {name!r} has a compressed weight but no {missing}")
        where, stored = f"{op}: {folder}: layer {name!r}", [tensors[f"{name}.{p}"] for p in parts]
        if fmt == FORMAT_24:
            values, indices, dense_shape = to_packed(where, *stored)
        else:
            dense, bits = bitmask_dense(where, *stored)
            o, k = dense.shape
            groups = bits.reshape(o, k // 4, 4) if k % 4 == 0 else None
            if sparsity.get("sparsity_structure") != "2:4" or groups is None or bool((groups.sum(-1) > 2).any()):
                state[f"{name}.weight"] = dense  # unstructured: a dense layer
                continue
            values, indices = pack_nm_ref(dense, 2, 4)  # at most 2 non-zeros per group: exactly 2:4
            dense_shape = [o, k]
        roles = {"packed_values": f"{name}.packed_values", "packed_indices": f"{name}.packed_indices"}
        state[roles["packed_values"]], state[roles["packed_indices"]] = values, indices
        if f"{name}.bias" in tensors:
            roles["bias"] = f"{name}.bias"
        layers[name] = _entry_24(values, dense_shape, roles)
    return state, layers


def _ct_config(model, names: list[str]) -> dict:
    """config.json: the model's transformers config (if any) plus the sparse-24-bitmask quantization_config."""
    config = getattr(model, "config", None)
    out = json.loads(config.to_json_string()) if hasattr(config, "to_json_string") else {}
    if config is not None and not out.get("architectures"):
        out["architectures"] = [type(model).__name__]
    out["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": "0.14.0.1",  # the compressed-tensors release whose format this is
        "sparsity_config": {"format": FORMAT_24, "sparsity_structure": "2:4", "targets": sorted(names),
                            "ignore": [], "global_sparsity": 0.0, "registry_requires_subclass": False},
        "transform_config": {},
    }
    return out


def write_folder(op: str, model, folder, layers: dict) -> None:
    """Write ``model`` (``layers``: name -> packed 2:4 SparseLinear) as a sparse-24-bitmask folder, atomically."""
    from safetensors.torch import save_file

    from .checkpoint_io import atomic_write_all
    from .nn import SparseLinear
    from .spec import NMSpec

    for name, mod in layers.items():
        if not isinstance(mod, SparseLinear) or mod.spec != NMSpec(2, 4):
            raise CTError(f"{op}: layer {name!r} is a {type(mod).__name__} with {mod.spec}; compressed-tensors' "
                          f"{FORMAT_24} holds 2:4 Linear layers only: save with format='nmkern' instead")
    out = {}
    for key, t in model.state_dict().items():
        owner, _, attr = key.rpartition(".")
        if owner in layers and attr in ("packed_values", "packed_indices", "_extra_state"):
            continue
        if not isinstance(t, torch.Tensor):
            raise CTError(f"{op}: state entry {key!r} is a {type(t).__name__}, not a tensor; the format stores tensors")
        out[key] = t.detach().to("cpu").contiguous().clone()  # own memory: safetensors refuses shared tensors
    for name, mod in layers.items():
        o, k = mod.weight_shape
        values, indices = mod.packed_values.detach().cpu(), mod.packed_indices.detach().cpu()
        out[f"{name}.compressed"] = values.clone()
        out[f"{name}.bitmask"] = to_bitmask(values, indices, k)
        out[f"{name}.shape"] = torch.tensor([[o], [k]], dtype=torch.int64)
    config = _ct_config(model, list(layers))
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CTError(f"{op}: {folder} exists and is not a folder; format='compressed-tensors' writes a folder")
    atomic_write_all([(folder / "model.safetensors", lambda p: save_file(out, str(p), metadata={"format": "pt"})),
                      (folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))])
