"""Write the compressed-tensors sparse-24-bitmask fixture folders under tests/data/ct_* (run it by hand).

compressed-tensors 0.14.0.1 is the last release that writes the format, and it needs
transformers<5: run this in its own virtual environment, not nmkern's:

    python -m venv /tmp/ctvenv && . /tmp/ctvenv/bin/activate
    pip install torch 'compressed-tensors==0.14.0.1' 'transformers<5' psutil
    python tests/data/make_ct_fixtures.py

ct_llama_bitmask_* are the plain ``sparse-bitmask`` format (flat ``compressed`` values, a 1-D
``shape`` and ``row_offsets``; its bitmask marks the non-zeros): ct_llama_bitmask_fp32 labelled
sparsity_structure "2:4", from weights pruned to 2:4 first (the 2 largest |w| of every 4, as a
2:4 pruning run leaves them), ct_llama_bitmask_bf16 unstructured, from weights with 60% zeroed at random.

Each folder is what llm-compressor writes for a 2:4 model: config.json with the
quantization_config, and the compressed state dict (ct_llama_fp16 in two shards with an
index). expected.safetensors beside it holds, for every compressed layer, the dense weight
compressed-tensors itself decompresses (the truth the tests compare nmkern against), and
every other tensor of the model unchanged.

    python tests/data/make_ct_fixtures.py --check FOLDER EXPECTED.safetensors

reads FOLDER (e.g. one nmkern.save(model, FOLDER, format="compressed-tensors") wrote) with
compressed-tensors' own decompress and checks every tensor equals EXPECTED's: the check that
compressed-tensors reads nmkern's export back to exactly the same dense weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import sparse24_bitmask_decompress
from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import bitmask_decompress
from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent


def build(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # groups of 4 zeros and of 1 non-zero: compressed-tensors keeps zeros there
        model.model.layers[0].mlp.up_proj.weight[0, :8] = 0
        model.model.layers[0].mlp.up_proj.weight[1, 4:7] = 0
    return model


def write(name: str, dtype: torch.dtype, shards: int, config=None, zero_fraction: float = 0.0,
          prune_24: bool = False) -> None:
    out = HERE / name
    out.mkdir(exist_ok=True)
    model = build(dtype)
    if prune_24:  # what a 2:4 pruning run leaves: the 2 smallest |w| of every group of 4 zeroed
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear):
                    groups = mod.weight.view(-1, 4)
                    groups.scatter_(1, groups.abs().topk(2, dim=1, largest=False).indices, 0)
    if zero_fraction:  # unstructured sparsity for the plain bitmask format: zero a random fraction
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight[torch.rand(mod.weight.shape, generator=gen) < zero_fraction] = 0
    config = config or Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head", "re:.*self_attn.o_proj"])
    compressor = ModelCompressor(sparsity_config=config)
    compressed = {k: v.contiguous() for k, v in compressor.compress(model).items()}
    keys = sorted(compressed)
    if shards == 1:
        save_file(compressed, out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = keys[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: compressed[k] for k in part}, out / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=1, sort_keys=True))
    model.config.save_pretrained(out)
    compressor.update_config(str(out))
    expected = {}
    for key in keys:
        if key.endswith(".compressed"):
            layer = key[: -len(".compressed")]
            shape = compressed[f"{layer}.shape"].flatten().tolist()
            decompress = bitmask_decompress if f"{layer}.row_offsets" in compressed else sparse24_bitmask_decompress
            expected[f"{layer}.weight"] = decompress(compressed[key], compressed[f"{layer}.bitmask"], shape)
        elif not key.endswith((".shape", ".bitmask", ".row_offsets")):
            expected[key] = compressed[key]
    save_file(expected, HERE / f"{name}.expected.safetensors")
    print(f"{out}: {sum(k.endswith('.compressed') for k in keys)} compressed layers, {len(keys)} tensors")


def check(folder: str, expected_path: str) -> int:
    from safetensors.torch import load_file

    config = LlamaConfig.from_pretrained(folder)
    model = LlamaForCausalLM(config).eval()
    expected = load_file(expected_path)
    model.to(next(iter(expected.values())).dtype)
    compressor = ModelCompressor.from_compression_config(config.quantization_config)
    compressor.decompress(folder, model)
    state = model.state_dict()
    bad = [k for k, v in expected.items() if not torch.equal(state[k], v)]
    print(f"{folder}: {len(expected)} tensors compared, {len(bad)} differ {bad[:4]}")
    return 1 if bad else 0


def main() -> int:
    if sys.argv[1:2] == ["--check"]:
        return check(sys.argv[2], sys.argv[3])
    write("ct_llama_fp32", torch.float32, shards=1)
    write("ct_llama_fp16", torch.float16, shards=2)
    ignore = ["lm_head", "re:.*self_attn.o_proj"]
    write("ct_llama_bitmask_fp32", torch.float32, shards=1, prune_24=True,
          config=BitmaskConfig(targets=["Linear"], ignore=ignore, sparsity_structure="2:4"))
    write("ct_llama_bitmask_bf16", torch.bfloat16, shards=1, zero_fraction=0.6,
          config=BitmaskConfig(targets=["Linear"], ignore=ignore, sparsity_structure="unstructured"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
