"""`nmkern prune --hf DIR`: a Hugging Face folder pruned by magnitude, Wanda or SparseGPT from windows of a text
file, written as a Hugging Face folder (reloads with from_pretrained) or as nmkern safetensors; and the refusals
(exit 2, a message naming the option and the fix, nothing written). Everything is built offline in the test: a
tiny Llama / BERT from a config and a word-level tokenizer over the text's own words."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ("the quick brown fox jumps over the lazy dog while a sparse model keeps two of every four weights "
         "and the pruned layers still compute almost the same function as the dense ones did before").split()
TEXT = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(300))  # 300 tokens, one per word
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FAST = ["--seq-len", "16", "--nsamples", "4", "--no-progress"]


def _tokenizer():
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(WORDS)))}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{"llama": folder, "bert": folder, "text": file}: save_pretrained folders of a 2-layer Llama (a causal LM)
    and a 2-layer BERT (an encoder), each with the tokenizer; and the calibration text."""
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer()
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tok))).eval()
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(tok),
        max_position_embeddings=64)).eval()
    for name, model in (("llama", llama), ("bert", bert)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "calib.txt").write_text(TEXT, encoding="utf-8")
    return {"llama": root / "llama", "bert": root / "bert", "text": root / "calib.txt", "model": llama}


def _is_2_4(w: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs of every row holds at least 2 zeros."""
    return bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


def _run(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_calibrated_prune_writes_a_folder_that_reloads_2_4_with_the_head_dense(hf_dirs, tmp_path, capsys, method):
    out = tmp_path / "pruned"
    code, text = _run(capsys, ["prune", "--hf", str(hf_dirs["llama"]), "--calib-text", str(hf_dirs["text"]),
                               "--method", method, "--scheme", "2:4", "-o", str(out), *FAST])
    assert code == 0, text
    dense = hf_dirs["model"]
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for i in range(2):
        for name in DECODER_LINEARS:
            w = pruned.get_submodule(f"model.layers.{i}.{name}").weight.detach()
            assert _is_2_4(w), (i, name)
            assert not torch.equal(w, dense.get_submodule(f"model.layers.{i}.{name}").weight), (i, name)
    assert torch.equal(pruned.lm_head.weight, dense.lm_head.weight)
    assert torch.equal(pruned.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert transformers.AutoTokenizer.from_pretrained(out)("the fox")["input_ids"] == \
        _tokenizer()("the fox")["input_ids"]
    report = json.loads((out / "nmkern_prune.json").read_text())
    assert report["sparsified"] == 14 and report["skipped"] == 1 and report["method"] == method
    assert {"layer": "lm_head", "action": "skipped", "detail": "output head kept dense"} in report["layers"]
    assert report["calibration"] == {"text": str(hf_dirs["text"]), "seq_len": 16, "nsamples": 4, "seed": 0}
    assert "output head kept dense" in text


def test_safetensors_output_packs_the_pruned_layers_and_computes_the_same_function(hf_dirs, tmp_path, capsys):
    common = ["prune", "--hf", str(hf_dirs["llama"]), "--calib-text", str(hf_dirs["text"]), "--method", "wanda",
              "--scheme", "2:4", *FAST, "--seed", "3"]
    st, folder = tmp_path / "pruned.safetensors", tmp_path / "folder"
    assert _run(capsys, common + ["-o", str(st)])[0] == 0
    assert _run(capsys, common + ["-o", str(folder)])[0] == 0
    assert json.loads(st.with_suffix(".json").read_text())["output_format"] == "nmkern safetensors"
    packed = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(hf_dirs["llama"])).eval()
    nmkern.load(st, packed)
    q = packed.model.layers[0].self_attn.q_proj
    assert isinstance(q, nmkern.SparseLinear) and q.spec == nmkern.NMSpec(2, 4)
    assert type(packed.lm_head) is nn.Linear
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)


def test_magnitude_needs_no_text_and_keeps_the_largest_weights(hf_dirs, tmp_path, capsys):
    out = tmp_path / "magnitude"
    code, text = _run(capsys, ["prune", "--hf", str(hf_dirs["llama"]), "--scheme", "2:4", "-o", str(out),
                               "--no-progress"])
    assert code == 0, text
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    w = pruned.model.layers[1].mlp.down_proj.weight.detach()
    dense = hf_dirs["model"].model.layers[1].mlp.down_proj.weight.detach()
    assert _is_2_4(w) and torch.equal(w[w != 0], dense[w != 0])
    assert torch.equal(pruned.lm_head.weight, hf_dirs["model"].lm_head.weight)


def test_an_encoder_loads_as_automodel_and_is_pruned_whole(hf_dirs, tmp_path, capsys):
    out = tmp_path / "bert"
    code, text = _run(capsys, ["prune", "--hf", str(hf_dirs["bert"]), "--calib-text", str(hf_dirs["text"]),
                               "--method", "sparsegpt", "--scheme", "2:4", "-o", str(out), *FAST])
    assert code == 0, text
    pruned = transformers.AutoModel.from_pretrained(out, dtype=torch.float32)
    assert type(pruned).__name__ == "BertModel"
    assert _is_2_4(pruned.encoder.layer[0].attention.self.query.weight.detach())
    assert _is_2_4(pruned.pooler.dense.weight.detach())  # no output head: every Linear is pruned
    assert json.loads((out / "nmkern_prune.json").read_text())["skipped"] == 0


def test_refusals_name_the_option_and_write_nothing(hf_dirs, tmp_path, capsys):
    llama, calib = str(hf_dirs["llama"]), str(hf_dirs["text"])
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox")
    ckpt = tmp_path / "m.pt"
    torch.save({}, ckpt)
    base = ["--method", "sparsegpt", "--scheme", "2:4", "-o", str(out)]
    cases = [
        (["--hf", str(tmp_path / "missing"), "--calib-text", calib, *base], "--hf", "no such folder"),
        ([str(ckpt), "--hf", llama, "--calib-text", calib, *base], "or as --hf DIR", "not both"),
        (base, "give the model to prune", "--hf DIR"),
        (["--hf", llama, *base], "--method sparsegpt needs", "--calib-text FILE"),
        (["--hf", llama, "--calib-text", str(short), *base, "--seq-len", "16"], "the text is 4 tokens long",
         "give a longer text"),
        (["--hf", llama, "--calib-text", calib, *base, "--seq-len", "0"], "--seq-len 0", ">= 1"),
        (["--hf", llama, "--calib-text", calib, *base, "--nsamples", "-2"], "--nsamples -2", ">= 1"),
        (["--hf", llama, "--calib", str(ckpt), *base], "--calib is for MODEL", "--calib-text"),
        (["--hf", llama, "--factory", "nmkern.models:MNIST1DNet", "--calib-text", calib, *base], "--factory", "MODEL"),
        ([str(ckpt), "--calib-text", calib, *base], "--calib-text is for --hf", "--calib FILE"),
        (["--hf", llama, "--scheme", "2:4", "--seq-len", "8", "-o", str(out)], "--seq-len shapes the --calib-text",
         "give --calib-text FILE"),
        (["--hf", llama, "--calib-text", calib, *base, "--seq-len", "4096"], "over the model's 2048 positions",
         "seq_len <= 2048"),
        (["--hf", llama, "--scheme", "2:4", "--permute", "-o", str(out)], "--permute", "wanda or sparsegpt"),
        (["--hf", llama, "--scheme", "2:4", "-o", str(hf_dirs["llama"].parent), "--force"], "overwrite",
         "the input"),
        (["--hf", llama, "--gguf", "model.gguf", "--scheme", "2:4", "-o", str(out)], "no GGUF file 'model.gguf'",
         "inside the folder"),
    ]
    for argv, *needles in cases:
        code, text = _run(capsys, ["prune", *argv, "--no-progress"])
        assert code == 2, (argv, text)
        for needle in needles:
            assert needle in text, (argv, needle, text)
        assert not out.exists(), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "short.txt"]


def test_an_existing_output_needs_force(hf_dirs, tmp_path, capsys):
    argv = ["prune", "--hf", str(hf_dirs["llama"]), "--scheme", "2:4", "--no-progress"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, text = _run(capsys, argv + ["-o", str(folder)])
    assert code == 2 and "is a non-empty folder; pass --force" in text
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    st = tmp_path / "p.safetensors"
    st.write_bytes(b"old")
    code, text = _run(capsys, argv + ["-o", str(st)])
    assert code == 2 and "exists; pass --force" in text and st.read_bytes() == b"old"
    assert not st.with_suffix(".json").exists()
    # --force replaces the folder as a whole (its old files go), all at once
    assert _run(capsys, argv + ["-o", str(folder), "--force"])[0] == 0
    assert not (folder / "keep.txt").exists() and (folder / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(capsys, argv + ["-o", str(empty)])[0] == 0  # an empty folder is no output to protect


def test_gguf_name_reaches_both_from_pretrained_calls(hf_dirs, tmp_path, monkeypatch):
    from nmkern.pretrained import load_hf_folder

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    seen = {}

    def recorder(kind, result):
        def from_pretrained(path, **kw):
            seen[kind] = kw
            return result(path)
        return from_pretrained

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        recorder("config", lambda p: transformers.LlamaConfig(architectures=None)))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("tokenizer", lambda p: _tokenizer()))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        recorder("model", lambda p: hf_dirs["model"]))
    model, tok = load_hf_folder(tmp_path, gguf="model.gguf")
    assert model is hf_dirs["model"]  # a GGUF file holds a causal LM even when the config names no architecture
    assert seen["tokenizer"]["gguf_file"] == seen["model"]["gguf_file"] == "model.gguf"
    assert seen["model"]["dtype"] is torch.float32 and seen["model"]["local_files_only"]


def test_text_windows_are_seeded_slices_of_the_tokenized_text():
    from nmkern.methods.calibration import text_windows

    tok = _tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    windows = text_windows(tok, TEXT, 16, 8, seed=1)
    assert len(windows) == 8 and all(set(w) == {"input_ids"} for w in windows)
    for w in windows:
        x = w["input_ids"]
        assert x.shape == (1, 16) and x.dtype == torch.long
        start = next(s for s in range(len(ids) - 15) if ids[s:s + 16] == x[0].tolist())
        assert 0 <= start <= len(ids) - 16
    again = text_windows(tok, TEXT, 16, 8, seed=1)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(windows, again))
    other = text_windows(tok, TEXT, 16, 8, seed=2)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(windows, other))
    with pytest.raises(ValueError, match=r"text_windows: the text is 4 tokens long; windows of seq_len=4 tokens "
                                         r"need at least 5"):
        text_windows(tok, "the quick brown fox", 4, 2)
    with pytest.raises(ValueError, match="nsamples must be an int >= 1, got 0"):
        text_windows(tok, TEXT, 4, 0)


def test_permute_folds_channel_permutations_and_reports_them(hf_dirs, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, text = _run(capsys, ["prune", "--hf", str(hf_dirs["llama"]), "--calib-text", str(hf_dirs["text"]),
                               "--method", "sparsegpt", "--scheme", "2:4", "--permute", "-o", str(out), *FAST])
    assert code == 0, text
    report = json.loads((out / "nmkern_prune.json").read_text())
    permuted = [r for r in report["layers"] if r["action"] == "permuted"]
    assert sorted(r["layer"] for r in permuted) == [f"model.layers.{i}.{n}" for i in range(2)
                                                    for n in ("mlp.down_proj", "self_attn.o_proj")]
    assert all("kept score x" in r["detail"] and float(r["detail"].rpartition("x")[2]) >= 1 for r in permuted)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(_is_2_4(pruned.get_submodule(f"model.layers.{i}.{n}").weight.detach())
               for i in range(2) for n in DECODER_LINEARS)
