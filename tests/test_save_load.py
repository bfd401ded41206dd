"""nmkern.save / nmkern.load: the safetensors checkpoint format (docs/format.md).

Round trips for every pattern and dtype (bit-identical outputs and buffers), a reader
written from docs/format.md alone, and the refusals: truncation, flipped bytes, another
version, shape mismatches, out-of-range indices (each leaves the model untouched);
loading never calls pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
import pickle
import random
import struct

import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern import serialization as ser

SCHEMES = ["2:4", "1:4", "2:8", "1x4:0.5"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class Net(nn.Module):
    """Conv + linear layers to sparsify, and dense parts with buffers (BatchNorm) and a raw Parameter."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(8, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc1 = nn.Linear(width * 16, 32)
        self.fc2 = nn.Linear(32, 8, bias=False)
        self.head = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(self.fc2(torch.relu(self.fc1(h)))) * self.scale


def _trained(scheme, dtype, seed=0, **kw) -> Net:
    torch.manual_seed(seed)
    net = Net(**kw)
    with torch.no_grad():  # BatchNorm statistics that differ from a fresh module's
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    nmkern.sparsify(net, scheme, pack=True)
    return net.to(dtype).eval()


def _fresh(dtype, seed=1, **kw) -> Net:
    torch.manual_seed(seed)
    return Net(**kw).to(dtype).eval()


def _x(dtype):
    return torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3)).to(dtype)


def _snapshot(model: nn.Module):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()})


def _assert_untouched(model, snap):
    types, state = _snapshot(model)
    assert types == snap[0]
    assert state.keys() == snap[1].keys()
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_meta:  # shapes only
            assert snap[1][k].is_meta and v.shape == snap[1][k].shape, k
            continue
        assert torch.equal(v, snap[1][k]) if isinstance(v, torch.Tensor) else v == snap[1][k], k


def _header(raw: bytes) -> tuple[int, dict, dict]:
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    return n, head, json.loads(head["__metadata__"]["nmkern"])


@pytest.fixture
def saved(tmp_path):
    net = _trained("2:4", torch.float32)
    path = tmp_path / "net.safetensors"
    nmkern.save(net, path)
    return net, path


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_is_bit_identical(tmp_path, scheme, dtype):
    net = _trained(scheme, dtype)
    path = tmp_path / "m.safetensors"
    nmkern.save(net, path)
    fresh = _fresh(dtype)
    assert not torch.equal(fresh(_x(dtype)), net(_x(dtype)))  # the load below is what makes them equal
    assert nmkern.load(path, fresh) is fresh
    assert torch.equal(fresh(_x(dtype)), net(_x(dtype)))
    for name in ("conv", "fc1", "fc2", "head"):
        a, b = getattr(net, name), getattr(fresh, name)
        assert type(a) is type(b) and b.is_packed and b.spec == a.spec and b.dtype == dtype
        assert a.state_dict().keys() == b.state_dict().keys()
        for k, t in a.state_dict().items():
            if isinstance(t, torch.Tensor):
                assert t.dtype == b.state_dict()[k].dtype and torch.equal(t, b.state_dict()[k]), (name, k)
        assert torch.equal(a.dense_weight(), b.dense_weight())
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "scale"):
        assert torch.equal(net.state_dict()[k], fresh.state_dict()[k])


def test_only_the_layers_the_file_names_are_swapped(tmp_path):
    torch.manual_seed(0)
    net = Net()
    nmkern.sparsify(net, {"fc1": "2:8", "conv": "1x4:0.25"}, pack=True)
    nmkern.save(net, tmp_path / "m.safetensors")
    fresh = _fresh(torch.float32)
    nmkern.load(tmp_path / "m.safetensors", fresh)
    assert type(fresh.fc1) is nmkern.SparseLinear and fresh.fc1.spec == nmkern.NMSpec(2, 8)
    assert type(fresh.conv) is nmkern.SparseConv2d and fresh.conv.spec == nmkern.BlockSpec(4, 0.25)
    assert type(fresh.fc2) is nn.Linear and type(fresh.head) is nn.Linear
    assert torch.equal(fresh.fc2.weight, net.fc2.weight)
    net.eval(), fresh.eval()
    assert torch.equal(fresh(_x(torch.float32)), net(_x(torch.float32)))


def test_shared_modules_and_tied_weights_are_stored_once(tmp_path):
    def build():
        torch.manual_seed(0)
        shared = nn.Linear(8, 8)
        model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 8), nn.Linear(8, 8))
        model[4].weight = model[3].weight  # tied dense weights
        return model

    net = build()
    nmkern.sparsify(net, {"0": "2:4", "2": "2:4"}, pack=True)
    nmkern.save(net, tmp_path / "m.safetensors")
    _, head, doc = _header((tmp_path / "m.safetensors").read_bytes())
    assert doc["aliases"] == {"2.packed_values": "0.packed_values", "2.packed_indices": "0.packed_indices",
                              "2.bias": "0.bias", "4.weight": "3.weight"}
    assert "2.packed_values" not in head and "4.weight" not in head
    fresh = build()
    nmkern.load(tmp_path / "m.safetensors", fresh)
    assert fresh[0] is fresh[2] and type(fresh[0]) is nmkern.SparseLinear
    assert fresh[4].weight is fresh[3].weight
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), net(x))


def test_a_reader_following_docs_format_md_rebuilds_every_weight(tmp_path):
    """Decode the file with json + struct + plain tensor ops, as docs/format.md describes (no nmkern)."""
    from safetensors.torch import load_file

    for scheme in SCHEMES:
        net = _trained(scheme, torch.float32)
        path = tmp_path / f"{scheme.replace(':', '_')}.safetensors"
        nmkern.save(net, path)
        _, head, doc = _header(path.read_bytes())
        assert head["__metadata__"]["format"] == "pt" and doc["format"] == "nmkern" and doc["format_version"] == 1
        assert doc["nmkern_version"] == nmkern.__version__
        tensors = load_file(path)
        for name, e in doc["layers"].items():
            t = {role: tensors[key] for role, key in e["tensors"].items()}
            dense = _decode(e, t)
            assert torch.equal(dense, getattr(net, name).dense_weight()), (scheme, name)


def _decode(e: dict, t: dict) -> torch.Tensor:
    shape = e["dense_shape"]
    if e["pattern"] == "nm":
        n, m = e["n"], e["m"]
        bits = max(1, (m - 1).bit_length())
        per = 32 // bits
        values = t["packed_values"]
        rows, kept = values.shape
        words = t["packed_indices"].to(torch.int64) & 0xFFFFFFFF
        idx = torch.stack([(words[:, j // per] >> (bits * (j % per))) & ((1 << bits) - 1) for j in range(kept)], dim=1)
        dense = torch.zeros(rows, kept // n * m, dtype=values.dtype)
        group = torch.arange(kept) // n
        dense[torch.arange(rows)[:, None], group * m + idx] = values
        if len(shape) == 4:  # rows are NHWC: (O, kh, kw, I) -> (O, I, kh, kw)
            o, i, kh, kw = shape
            dense = dense.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
        return dense.reshape(shape)
    block = e["block"]
    crow, col, vals = t["bsr_crow"], t["bsr_col"], t["bsr_values"]
    o = shape[0]
    k = int(torch.tensor(shape[1:]).prod())
    dense = torch.zeros(o, k, dtype=vals.dtype)
    for r in range(o // block):
        for b in range(int(crow[r]), int(crow[r + 1])):
            dense[r * block:(r + 1) * block, int(col[b])] = vals[b]
    return dense.reshape(shape)  # conv columns are (I, kh, kw) in PyTorch's own order


# --------------------------------------------------------------------------- refusals


def _load_refused(path, model, *match):
    snap = _snapshot(model)
    with pytest.raises(ValueError) as info:
        nmkern.load(path, model)
    for text in match:
        assert text in str(info.value), str(info.value)
    _assert_untouched(model, snap)
    return str(info.value)


def test_truncation_at_random_offsets_is_refused(saved, tmp_path):
    _, path = saved
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    offsets = {0, 1, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 1, len(raw) - 1}
    offsets |= set(random.Random(15).sample(range(len(raw)), 20))
    bad = tmp_path / "bad.safetensors"
    model = _fresh(torch.float32)
    for cut in sorted(offsets):
        bad.write_bytes(raw[:cut])
        msg = _load_refused(bad, model)
        assert "truncated" in msg or "corrupted" in msg, (cut, msg)


def test_every_flipped_header_byte_is_refused_or_harmless(saved, tmp_path):
    """A flipped bit anywhere in the header never loads different weights silently."""
    net, path = saved
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    bad = tmp_path / "bad.safetensors"
    want = net(_x(torch.float32))
    refused = 0
    for pos in range(0, 8 + n):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x04
        bad.write_bytes(bytes(flipped))
        model = _fresh(torch.float32)
        try:
            nmkern.load(bad, model)
        except ValueError:
            refused += 1
            continue
        assert torch.equal(model(_x(torch.float32)), want), f"byte {pos} flipped loads different weights"
    assert refused > (8 + n) * 0.8, (refused, 8 + n)


def test_flipped_tensor_bytes_are_refused(saved, tmp_path):
    _, path = saved
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    bad = tmp_path / "bad.safetensors"
    for pos in random.Random(0).sample(range(8 + n, len(raw)), 10):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x01
        bad.write_bytes(bytes(flipped))
        _load_refused(bad, _fresh(torch.float32), "data_sha256", "corrupted")


def _rewrite(path, out, doc_fn=None, tensor_fn=None):
    """Write ``out``: ``path`` with its header document and/or tensors changed (a valid data hash)."""
    from safetensors.torch import load_file

    _, _, doc = _header(path.read_bytes())
    tensors = load_file(path)
    doc_fn and doc_fn(doc)
    tensor_fn and tensor_fn(tensors)
    doc.pop("data_sha256")
    out.write_bytes(ser._serialize(tensors, doc))
    return out


def test_rewrite_helper_without_changes_loads(saved, tmp_path):
    net, path = saved
    model = _fresh(torch.float32)
    nmkern.load(_rewrite(path, tmp_path / "same.safetensors"), model)
    assert torch.equal(model(_x(torch.float32)), net(_x(torch.float32)))


@pytest.mark.parametrize("version", [0, 2, "1", None, True])
def test_unknown_format_version_is_refused(saved, tmp_path, version):
    _, path = saved
    bad = _rewrite(path, tmp_path / "v.safetensors", lambda d: d.update(format_version=version))
    _load_refused(bad, _fresh(torch.float32), f"format_version={version!r}", "reads version 1")


def test_not_an_nmkern_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(_fresh(torch.float32).state_dict(), tmp_path / "plain.safetensors")
    _load_refused(tmp_path / "plain.safetensors", _fresh(torch.float32), "no readable nmkern header")


def test_a_model_of_another_shape_is_refused_naming_layer_and_shapes(saved):
    _, path = saved
    msg = _load_refused(path, _fresh(torch.float32, width=8), "'conv'")
    assert "(8, 8, 3, 3)" in msg and "(16, 8, 3, 3)" in msg


def test_a_model_of_another_dtype_is_refused(saved):
    _, path = saved
    _load_refused(path, _fresh(torch.float16), "layer 'conv'", "torch.float16", "torch.float32")


@pytest.mark.parametrize("change, match", [
    (lambda d: d["layers"]["fc1"].update(dense_shape=[32, 128]), "(32, 128)"),
    (lambda d: d["layers"]["fc1"].update(m=8), "packed_values has shape (32, 128); expected (32, 64)"),
    (lambda d: d["layers"]["fc1"].update(pattern="1xn"), "a 1xn layer has"),
    (lambda d: d["layers"]["fc1"].update(dtype="float16"), "the header says dtype=float16"),
    (lambda d: d["layers"]["fc1"]["tensors"].update(packed_values="fc2.packed_values"), "packed_values has shape"),
    (lambda d: d["layers"]["fc1"].update(n=5), "invalid N:M pattern"),
    (lambda d: d["layers"].pop("fc1"), "missing from the file ['fc1.weight'], not in the model ['fc1.packed_indices'"),
    (lambda d: d["aliases"].update(x="nowhere"), "alias 'x' -> 'nowhere'"),
    (lambda d: d["layers"]["conv"]["conv"].update(padding=[0, 0]), "the file's conv geometry is"),
])
def test_a_header_that_disagrees_with_its_tensors_is_refused(saved, tmp_path, change, match):
    _, path = saved
    bad = _rewrite(path, tmp_path / "h.safetensors", change)
    _load_refused(bad, _fresh(torch.float32), match)


@pytest.mark.parametrize("scheme, key", [("2:4", "fc1.packed_indices"), ("2:8", "conv.packed_indices"),
                                         ("1x4:0.5", "fc1.bsr_col"), ("1x4:0.5", "conv.bsr_crow")])
def test_minus_one_indices_are_refused(tmp_path, scheme, key):
    net = _trained(scheme, torch.float32)
    nmkern.save(net, tmp_path / "m.safetensors")

    def poison(tensors):
        tensors[key][..., -1] = -1

    bad = _rewrite(tmp_path / "m.safetensors", tmp_path / "bad.safetensors", tensor_fn=poison)
    _load_refused(bad, _fresh(torch.float32), f"layer '{key.split('.')[0]}'", "corrupted")


def test_strict_refuses_keys_only_one_side_has_and_non_strict_skips_them(saved, tmp_path):
    net, path = saved

    def extra(tensors):
        tensors["extra.weight"] = torch.zeros(2)

    bad = _rewrite(path, tmp_path / "x.safetensors", tensor_fn=extra)
    _load_refused(bad, _fresh(torch.float32), "not in the model ['extra.weight']")
    model = _fresh(torch.float32)
    nmkern.load(bad, model, strict=False)
    assert torch.equal(model(_x(torch.float32)), net(_x(torch.float32)))
    bigger = _fresh(torch.float32)
    bigger.more = nn.Linear(2, 2)
    _load_refused(path, bigger, "missing from the file ['more.bias', 'more.weight']")
    nmkern.load(path, bigger, strict=False)
    assert torch.equal(bigger(_x(torch.float32)), net(_x(torch.float32)))


def test_a_layer_the_model_lacks_is_refused_when_strict(saved):
    _, path = saved
    model = _fresh(torch.float32)
    del model.fc2
    _load_refused(path, model, "sparse layer 'fc2', which the model does not have")


def test_loading_into_a_sparse_model_is_refused(saved):
    _, path = saved
    _load_refused(path, _trained("2:4", torch.float32), "the model has a SparseConv2d there")


# --------------------------------------------------------------------------- save refusals, no pickle


def test_save_refuses_a_training_form_layer(tmp_path):
    torch.manual_seed(0)
    net = Net()
    nmkern.sparsify(net, "2:4")
    with pytest.raises(ValueError, match=r"layer 'conv' \(SparseConv2d\) is in the training form.*\.pack\(\)"):
        nmkern.save(net, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_save_refuses_non_tensor_extra_state(tmp_path):
    class WithExtra(nn.Linear):
        def get_extra_state(self):
            return {"note": 1}

    model = nn.Sequential(WithExtra(4, 4))
    with pytest.raises(ValueError, match=r"'0._extra_state' is a dict, not a tensor"):
        nmkern.save(model, tmp_path / "m.safetensors")


def test_save_refuses_other_formats(tmp_path):
    with pytest.raises(ValueError, match="format='onnx' is not supported; choose 'nmkern'"):
        nmkern.save(_fresh(torch.float32), tmp_path / "m", format="onnx")


def test_loading_never_unpickles(saved, monkeypatch):
    net, path = saved

    def boom(*a, **k):
        raise AssertionError("nmkern.load called pickle")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, boom)
    with pytest.raises(AssertionError, match="called pickle"):  # the patch is live
        torch.load(path)
    model = _fresh(torch.float32)
    nmkern.load(path, model)
    assert torch.equal(model(_x(torch.float32)), net(_x(torch.float32)))
    nmkern.save(model, path.with_name("again.safetensors"))  # writing never pickles either
    again, first = path.with_name("again.safetensors").read_bytes(), path.read_bytes()
    # the same header and tensor bytes (safetensors orders the metadata keys as it likes)
    assert _header(again)[1:] == _header(first)[1:] and again[8 + _header(again)[0]:] == first[8 + _header(first)[0]:]


def test_conv_geometry_round_trips_and_must_match(tmp_path):
    def build(padding, seed=0):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(8, 8, 3, padding=padding, stride=1), nn.ReLU())

    net = build("same")
    nmkern.sparsify(net, "2:4", pack=True)
    nmkern.save(net, tmp_path / "m.safetensors")
    fresh = build("same", seed=1)
    nmkern.load(tmp_path / "m.safetensors", fresh)
    x = _x(torch.float32)
    assert fresh[0].padding == (1, 1) and torch.equal(fresh(x), net(x))
    # the same weight shape with another padding: a different layer, refused
    _load_refused(tmp_path / "m.safetensors", build(0), "layer '0'", "'padding': [1, 1]", "'padding': [0, 0]")


def test_a_1xn_layer_with_no_blocks_left_round_trips(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        net[0].weight.zero_()
    nmkern.sparsify(net, "1x4:0.5", pack=True)
    assert net[0].bsr_col.numel() == 0 and net[0].bsr_values.shape == (0, 4)
    nmkern.save(net, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    nmkern.load(tmp_path / "m.safetensors", fresh)
    assert fresh[0].bsr_values.shape == (0, 4) and fresh[0].bsr_crow.tolist() == [0, 0, 0]
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), net(x))


def test_a_meta_model_is_refused(saved):
    _, path = saved
    with torch.device("meta"):
        model = Net()
    _load_refused(path, model, "layer 'conv' is on the meta device", "to_empty")


def test_a_2_4_fp16_file_is_at_most_0_57_of_the_dense_file(tmp_path):
    """Values at half the bytes plus 2-bit indices: 0.5625 of the dense weights, plus biases and the header."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 1024)).half()
    save_file(net.state_dict(), tmp_path / "dense.safetensors")
    nmkern.sparsify(net, "2:4", pack=True)
    nmkern.save(net, tmp_path / "sparse.safetensors")
    ratio = (tmp_path / "sparse.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert 0.5625 <= ratio <= 0.57, ratio


def test_inspect_prints_the_layer_table_from_the_header_alone(saved, tmp_path, capsys, monkeypatch):
    from nmkern.cli import main

    net, path = saved
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header_only = tmp_path / "header_only.safetensors"  # the tensors cut off: inspect never reads them
    header_only.write_bytes(raw[:8 + n])
    assert main(["inspect", str(header_only), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format_version"] == 1
    rows = {r["name"]: r for r in out["layers"]}
    assert sorted(rows) == ["conv", "fc1", "fc2", "head"]
    assert rows["fc1"] == {"name": "fc1", "module": "Linear", "pattern": "2:4", "dtype": "float32",
                           "dense_shape": [32, 256], "stored_bytes": (net.fc1.packed_nbytes()), "dense_bytes": 32 * 256 * 4}
    assert main(["inspect", str(path)]) == 0
    table = capsys.readouterr().out
    assert "4 sparse layer(s)" in table and "conv" in table and "(16, 8, 3, 3)" in table
    # a damaged header is refused with exit 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[:8 + n // 2])
    assert main(["inspect", str(bad)]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err


def test_buffers_that_are_views_of_one_storage_round_trip(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 4))
        big = torch.randn(10)
        model.register_buffer("a", big[:3])  # overlapping views of one storage: safetensors refuses them
        model.register_buffer("b", big[3:].view(7, 1)[::2])  # and a non-contiguous one
        model.register_buffer("c", big[1:5])  # overlapping `a`
        return model

    net = build(0)
    nmkern.sparsify(net, "2:4", pack=True)
    nmkern.save(net, tmp_path / "m.safetensors")
    fresh = build(1)
    nmkern.load(tmp_path / "m.safetensors", fresh)
    assert torch.equal(fresh.a, net.a) and torch.equal(fresh.b, net.b) and torch.equal(fresh.c, net.c)
    x = torch.randn(2, 8)
    assert torch.equal(fresh(x), net(x))


# --------------------------------------------------------------------------- Hugging Face folders


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32)
    return transformers, transformers.BertModel(cfg)


def test_save_pretrained_and_from_pretrained_round_trip_a_tiny_bert(tmp_path):
    transformers, model = _tiny_bert()
    model = model.half().eval()
    report = nmkern.sparsify(model, {"encoder.layer.*": "2:4", "pooler.dense": "1x4:0.5"}, pack=True)
    assert len(report.swapped) == 13
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids).last_hidden_state
    nmkern.save_pretrained(model, tmp_path / "bert")
    assert json.loads((tmp_path / "bert" / "config.json").read_text())["architectures"] == ["BertModel"]
    torch.manual_seed(1)
    loaded = nmkern.from_pretrained(tmp_path / "bert")
    assert type(loaded) is transformers.BertModel and loaded.dtype == torch.float16 and not loaded.training
    assert type(loaded.pooler.dense) is nmkern.SparseLinear and loaded.pooler.dense.spec == nmkern.BlockSpec(4, 0.5)
    assert torch.equal(loaded(input_ids=ids).last_hidden_state, want)


def test_from_pretrained_keeps_tied_embeddings_of_a_causal_lm(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    nmkern.sparsify(model, {"model.layers.*.mlp.*": "2:4"}, pack=True)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids).logits
    nmkern.save_pretrained(model, tmp_path / "llama")
    loaded = nmkern.from_pretrained(tmp_path / "llama")
    assert type(loaded) is transformers.LlamaForCausalLM
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert type(loaded.model.layers[0].mlp.up_proj) is nmkern.SparseLinear
    assert torch.equal(loaded(input_ids=ids).logits, want)


@pytest.mark.parametrize("arch", ["os.system", "NotAModelClass", "PretrainedConfig"])
def test_from_pretrained_refuses_an_architecture_transformers_does_not_export(tmp_path, arch):
    _, model = _tiny_bert()
    nmkern.sparsify(model, "2:4", pack=True)
    nmkern.save_pretrained(model, tmp_path / "bert")
    cfg = json.loads((tmp_path / "bert" / "config.json").read_text())
    cfg["architectures"] = [arch]
    (tmp_path / "bert" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"names architecture '{arch}', which is not a model class"):
        nmkern.from_pretrained(tmp_path / "bert")


def test_from_pretrained_needs_both_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no model.safetensors; write the folder with nmkern.save_pretrained"):
        nmkern.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="has no transformers config"):
        nmkern.save_pretrained(_fresh(torch.float32), tmp_path / "x")


# --------------------------------------------------------------------------- compressed-tensors folders

DATA = Path(__file__).resolve().parent / "data"


def _ct_model(name):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.from_pretrained(DATA / name)
    dtype = torch.float16 if name.endswith("fp16") else torch.float32
    torch.manual_seed(5)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("name", ["ct_llama_fp32", "ct_llama_fp16"])
def test_compressed_tensors_fixtures_load_to_the_weights_compressed_tensors_decompresses(name):
    from safetensors.torch import load_file

    model = _ct_model(name)
    nmkern.load(DATA / name, model)
    expected = load_file(DATA / f"{name}.expected.safetensors")
    sparse = {n for n, m in model.named_modules() if isinstance(m, nmkern.SparseLinear)}
    assert len(sparse) == 12 and all(m.is_packed and m.spec == nmkern.NMSpec(2, 4)
                                     for m in model.modules() if isinstance(m, nmkern.SparseLinear))
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert expected.keys() == model.state_dict().keys() - {k for k in model.state_dict() if k.rpartition(".")[0] in sparse} \
        | {f"{n}.weight" for n in sparse} | {f"{n}.bias" for n in sparse if f"{n}.bias" in expected}
    for key, want in expected.items():
        owner, _, attr = key.rpartition(".")
        got = model.get_submodule(owner).dense_weight() if owner in sparse and attr == "weight" else model.state_dict()[key]
        assert got.dtype == want.dtype and torch.equal(got, want), key
    # a group of four zeros keeps the two positions compressed-tensors chose (the bitmask's), not nmkern's own
    up = model.model.layers[0].mlp.up_proj
    assert torch.equal(up.dense_weight()[0, :8], torch.zeros(8, dtype=up.dtype))


def _ct_copy(tmp_path, name="ct_llama_fp32"):
    import shutil

    return Path(shutil.copytree(DATA / name, tmp_path / name))


def test_a_compressed_tensors_bitmask_that_is_not_2_4_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _ct_copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.bitmask"
    byte = int(tensors[key][3, 0])
    free = next(j for j in range(4) if not byte >> j & 1)
    tensors[key][3, 0] = byte | 1 << free  # a third kept value in the first group of row 3
    save_file(tensors, folder / "model.safetensors")
    _load_refused(folder, _ct_model("ct_llama_fp32"), "layer 'model.layers.1.mlp.down_proj'",
                  "without exactly 2 kept values")


@pytest.mark.parametrize("fmt", ["sparse-24-bytemask", "evil_module:Compressor", None])
def test_a_compressed_tensors_format_nmkern_does_not_read_is_refused(tmp_path, fmt, monkeypatch):
    import importlib

    folder = _ct_copy(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["sparsity_config"]["format"] = fmt
    (folder / "config.json").write_text(json.dumps(cfg))
    model = _ct_model("ct_llama_fp32")

    def no_import(name, *a, **k):
        raise AssertionError(f"imported {name}")

    monkeypatch.setattr(importlib, "import_module", no_import)
    _load_refused(folder, model, f"sparsity format {fmt!r} is not supported")


def test_a_truncated_compressed_tensors_shard_is_refused(tmp_path):
    folder = _ct_copy(tmp_path, "ct_llama_fp16")
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _load_refused(folder, _ct_model("ct_llama_fp16"), "model-00002-of-00002.safetensors is not a valid safetensors")


@pytest.mark.parametrize("name", ["ct_llama_fp32", "ct_llama_fp16"])
def test_compressed_tensors_export_then_import_is_bit_identical(tmp_path, name):
    from safetensors.torch import load_file

    model = _ct_model(name)
    nmkern.load(DATA / name, model)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids).logits
    nmkern.save(model, tmp_path / "out", format="compressed-tensors")
    written = load_file(tmp_path / "out" / "model.safetensors")
    original = {}
    for shard in sorted((DATA / name).glob("*.safetensors")):
        original.update(load_file(shard))
    assert written.keys() == original.keys()
    for key, t in original.items():  # the same bytes compressed-tensors wrote: bitmask, values, shape, the rest
        assert written[key].dtype == t.dtype and torch.equal(written[key], t), key
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["sparsity_config"]["format"] == "sparse-24-bitmask"
    again = _ct_model(name)
    nmkern.load(tmp_path / "out", again)
    assert torch.equal(again(input_ids=ids).logits, want)


def test_compressed_tensors_export_refuses_patterns_it_cannot_hold(tmp_path):
    net = _trained("2:8", torch.float32)
    with pytest.raises(ValueError, match="layer 'conv' is a SparseConv2d with 2:8; compressed-tensors"):
        nmkern.save(net, tmp_path / "out", format="compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_bitmask_layout_is_numpy_packbits_little(tmp_path):
    """The writer's bitmask is numpy.packbits(mask, axis=-1, bitorder='little'), padding bits zero (K=12: 2 bytes)."""
    import numpy as np

    from nmkern.ct_format import to_bitmask, to_packed

    torch.manual_seed(0)
    layer = nmkern.SparseLinear.from_dense(nn.Linear(12, 5)).pack()
    mask = (layer.dense_weight() != 0).numpy()
    bitmask = to_bitmask(layer.packed_values, layer.packed_indices, 12)
    assert bitmask.dtype == torch.uint8 and torch.equal(bitmask, torch.from_numpy(np.packbits(mask, axis=-1,
                                                                                                bitorder="little")))
    values, indices, shape = to_packed("t", torch.tensor([[5], [12]]), layer.packed_values, bitmask)
    assert shape == [5, 12] and torch.equal(values, layer.packed_values) and torch.equal(indices, layer.packed_indices)
