"""`nmkern prune -o X.safetensors` and `nmkern convert IN OUT`: a model moves between a torch state_dict, the
nmkern safetensors format and a compressed-tensors folder, and computes the same function in each (issue #15)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern.cli import main
from nmkern.models import MNIST1DNet

FACTORY = "nmkern.models:MNIST1DNet"
NM_LAYERS = ("conv2", "conv3", "conv4", "fc1", "fc2")  # conv1 has 1 input channel: never N:M
DATA = Path(__file__).resolve().parent / "data"
X = torch.randn(5, 1, 1, 40, generator=torch.Generator().manual_seed(3))


def _loaded(path) -> nn.Module:
    model = MNIST1DNet().eval()
    nmkern.load(path, model)
    return model


def _weights(model: nn.Module) -> dict:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nmkern.SparseLinear, nmkern.SparseConv2d)):
            out[name] = mod.dense_weight()
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            out[name] = mod.weight.detach()
    return out


@pytest.mark.parametrize("how", [["--scheme", "2:4"], ["--method", "1xn:4:0.5"]])
def test_prune_to_safetensors_writes_packed_layers_with_the_pruned_weights(model_file, tmp_path, capsys, how):
    pt, st = tmp_path / "pruned_torch.pt", tmp_path / "pruned.safetensors"
    for out in (pt, st):
        assert main(["prune", str(model_file), "--factory", FACTORY, *how, "-o", str(out)]) == 0
    assert "nmkern safetensors" in capsys.readouterr().out
    assert json.loads(st.with_suffix(".json").read_text())["output_format"] == "nmkern safetensors"
    model = _loaded(st)
    sparse = {n for n, m in model.named_modules() if isinstance(m, (nmkern.SparseLinear, nmkern.SparseConv2d))}
    assert sparse == (set(NM_LAYERS) if how[0] == "--scheme" else sparse) and sparse
    assert all(model.get_submodule(n).is_packed for n in sparse)
    reference = MNIST1DNet()
    reference.load_state_dict(torch.load(pt, weights_only=True))
    want = _weights(reference)
    for name, w in _weights(model).items():  # exactly the weights the .pt output holds
        assert torch.equal(w, want[name]), name
    assert main(["inspect", str(st), "--json"]) == 0


def test_prune_of_torchscript_to_safetensors_is_refused_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(MNIST1DNet()), str(src))
    out = tmp_path / "pruned.safetensors"
    assert main(["prune", str(src), "--scheme", "2:4", "-o", str(out)]) == 2
    assert "TorchScript model cannot be rebuilt with sparse layers" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".json").exists()


def _packed_state_dict(tmp_path, pack=True) -> tuple[Path, nn.Module]:
    torch.manual_seed(1)
    model = MNIST1DNet().eval()
    nmkern.sparsify(model, {"conv*": "2:4", "fc1": "1x4:0.5", "fc2": "1:4"}, pack=pack)
    path = tmp_path / "sparse.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_state_dict_to_safetensors_to_state_dict_keeps_the_function(tmp_path, capsys):
    src, model = _packed_state_dict(tmp_path)
    with torch.no_grad():
        want = model(X)
    st, back = tmp_path / "model.safetensors", tmp_path / "back.pt"
    assert main(["convert", str(src), str(st), "--factory", FACTORY]) == 0
    assert "nmkern safetensors; input: torch state_dict" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(_loaded(st)(X), want)
    assert main(["convert", str(st), str(back), "--factory", FACTORY]) == 0
    again = MNIST1DNet().eval()
    nmkern.checkpoint_io.swap_saved_sparse_layers(again, torch.load(back, weights_only=True))
    again.load_state_dict(torch.load(back, weights_only=True))
    with torch.no_grad():
        assert torch.equal(again(X), want)


def test_a_training_form_state_dict_is_packed_on_the_way(tmp_path):
    src, model = _packed_state_dict(tmp_path, pack=False)
    st = tmp_path / "model.safetensors"
    assert main(["convert", str(src), str(st), "--factory", FACTORY]) == 0
    loaded = _loaded(st)
    want = _weights(model)
    for name, w in _weights(loaded).items():
        assert torch.equal(w, want[name]), name


def test_compressed_tensors_folder_converts_to_nmkern_and_back_to_the_same_bytes(tmp_path, capsys):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    src = Path(shutil.copytree(DATA / "ct_llama_fp16", tmp_path / "ct"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]  # as llm-compressor's save_pretrained writes it (the fixture has none)
    (src / "config.json").write_text(json.dumps(cfg))
    st, back = tmp_path / "model.safetensors", tmp_path / "back"
    assert main(["convert", str(src), str(st)]) == 0  # the model comes from the folder's config.json
    assert main(["convert", str(src), str(back)]) == 0
    assert "compressed-tensors folder; input: compressed-tensors folder; sparse layers: 12 x 2:4" in \
        capsys.readouterr().out
    original = {}
    for shard in sorted(src.glob("*.safetensors")):
        original.update(load_file(shard))
    written = load_file(back / "model.safetensors")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], t) and written[k].dtype == t.dtype for k, t in original.items())
    doc, _ = nmkern.serialization.read_header(st)
    assert len(doc["layers"]) == 12 and {e["dtype"] for e in doc["layers"].values()} == {"float16"}


def test_a_save_pretrained_folder_converts_to_compressed_tensors(tmp_path, capsys, tiny_llama):
    model = tiny_llama()
    nmkern.sparsify(model, {"model.layers.*": "2:4"}, pack=True)
    nmkern.save_pretrained(model, tmp_path / "sp")
    assert main(["convert", str(tmp_path / "sp"), str(tmp_path / "ct")]) == 0
    assert "input: nmkern safetensors; sparse layers: 7 x 2:4" in capsys.readouterr().out
    again = tiny_llama()
    nmkern.load(tmp_path / "ct", again)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("argv,needle", [
    (["convert", "{src}", "{tmp}/out.xyz", "--factory", FACTORY], "cannot tell its format"),
    (["convert", "{st}", "{tmp}/out.pt"], "pass --factory"),
    (["convert", "{src}", "{tmp}/out.safetensors"], "pass --factory"),
    (["convert", "{src}", "{src}", "--factory", FACTORY], "overwrite the input"),
    (["convert", "{tmp}/missing.pt", "{tmp}/out.safetensors", "--factory", FACTORY], "no such file"),
    (["convert", "{src}", "{tmp}/ct", "--factory", FACTORY], "compressed-tensors' sparse-24-bitmask holds 2:4 Linear"),
    (["convert", "{src}", "{tmp}/out.safetensors", "--factory", "nmkern.models:DigitsNet"],
     "build the model the checkpoint was saved from"),
])
def test_convert_errors_say_how_to_fix_and_write_nothing(tmp_path, capsys, argv, needle):
    src, model = _packed_state_dict(tmp_path)
    st = tmp_path / "model.safetensors"
    nmkern.save(model, st)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(src=src, st=st, tmp=tmp_path) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_existing_output_needs_force(tmp_path, capsys):
    src, _ = _packed_state_dict(tmp_path)
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert", str(src), str(out), "--factory", FACTORY]) == 2
    assert "pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["convert", str(src), str(out), "--factory", FACTORY, "--force"]) == 0
    assert len(_loaded(out).state_dict()) > 0
