"""compressed-tensors' plain ``sparse-bitmask`` folders (flat values, row offsets), read by nmkern.load.

The fixtures under tests/data/ct_llama_bitmask_* were written by compressed-tensors 0.14.0.1
(tests/data/make_ct_fixtures.py): fp32 with sparsity_structure "2:4" (loads as packed 2:4 layers),
bf16 unstructured (loads as dense layers). Each ``.expected.safetensors`` holds the dense weights
compressed-tensors itself decompresses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import nmkern

DATA = Path(__file__).resolve().parent / "data"
FP32_24, BF16_UNSTRUCTURED = "ct_llama_bitmask_fp32", "ct_llama_bitmask_bf16"


def _model(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.from_pretrained(DATA / name)
    torch.manual_seed(5)
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _expected(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(DATA / f"{name}.expected.safetensors")


def _dense_state(model: nn.Module) -> dict:
    """The model's state with every sparse layer's packed buffers replaced by its dense weight."""
    out = {}
    for key, t in model.state_dict().items():
        owner, _, attr = key.rpartition(".")
        mod = model.get_submodule(owner)
        if isinstance(mod, nmkern.SparseLinear):
            if attr == "packed_values":
                out[f"{owner}.weight"] = mod.dense_weight()
            if attr in ("packed_values", "packed_indices", "_extra_state"):
                continue
        out[key] = t
    return out


def test_a_2_4_sparse_bitmask_folder_loads_into_packed_2_4_layers():
    model = _model(FP32_24)
    nmkern.load(DATA / FP32_24, model)
    sparse = [m for m in model.modules() if isinstance(m, nmkern.SparseLinear)]
    assert len(sparse) == 12 and all(m.is_packed and m.spec == nmkern.NMSpec(2, 4) for m in sparse)
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[1].self_attn.o_proj) is nn.Linear  # ignored
    expected, got = _expected(FP32_24), _dense_state(model)
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key


def test_an_unstructured_sparse_bitmask_folder_loads_as_dense_layers():
    model = _model(BF16_UNSTRUCTURED)
    nmkern.load(DATA / BF16_UNSTRUCTURED, model)
    assert not any(isinstance(m, nmkern.SparseLinear) for m in model.modules())
    expected, got = _expected(BF16_UNSTRUCTURED), model.state_dict()
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], want), key
    # the fixture really is sparse (60% zeroed) and some group of 4 keeps more than 2: not 2:4
    up = got["model.layers.0.mlp.up_proj.weight"]
    assert 0.5 < float((up == 0).float().mean()) < 0.7 and bool(((up != 0).reshape(-1, 4).sum(-1) > 2).any())


def _copy(tmp_path, name=FP32_24) -> Path:
    return Path(shutil.copytree(DATA / name, tmp_path / name))


def _edit(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def _refused(folder: Path, name: str, *match: str) -> None:
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as info:
        nmkern.load(folder, model)
    for text in match:
        assert text in str(info.value), str(info.value)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_row_offsets_that_disagree_with_the_bitmask_are_refused(tmp_path):
    folder = _copy(tmp_path)
    _edit(folder, lambda t: t["model.layers.0.mlp.down_proj.row_offsets"].__setitem__(3, 5))
    _refused(folder, FP32_24, "layer 'model.layers.0.mlp.down_proj'", "row_offsets")


def test_values_fewer_than_the_set_bits_are_refused(tmp_path):
    folder = _copy(tmp_path)
    key = "model.layers.1.mlp.gate_proj.compressed"
    _edit(folder, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    _refused(folder, FP32_24, "layer 'model.layers.1.mlp.gate_proj'", "one per set bit")


def test_bits_past_the_last_column_are_refused(tmp_path):
    folder = _copy(tmp_path)
    key = "model.layers.0.self_attn.q_proj.shape"
    _edit(folder, lambda t: t.__setitem__(key, torch.tensor([32, 30])))  # 32 columns of bits, shape says 30
    _refused(folder, FP32_24, "layer 'model.layers.0.self_attn.q_proj'", "bits set past column 30")


def test_a_2_4_config_over_weights_that_are_not_2_4_loads_them_dense(tmp_path):
    """sparsity_structure says 2:4, but the unstructured fixture keeps up to 4 of 4: dense, never a wrong pack."""
    folder = _copy(tmp_path, BF16_UNSTRUCTURED)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["sparsity_config"]["sparsity_structure"] = "2:4"
    (folder / "config.json").write_text(json.dumps(cfg))
    model = _model(BF16_UNSTRUCTURED)
    nmkern.load(folder, model)
    assert not any(isinstance(m, nmkern.SparseLinear) for m in model.modules())
    expected = _expected(BF16_UNSTRUCTURED)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
