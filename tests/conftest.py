"""Hardware markers, defined once. Nothing here queries a device at import time."""

from __future__ import annotations

import functools
import os

import pytest


@functools.lru_cache(maxsize=None)
def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda():
            item.add_marker(skip_gpu)


@pytest.fixture
def interpret():
    """Skip a Triton-on-CPU test when the interpreter is off (and no GPU is present)."""
    if not triton_interpret() and not has_cuda():
        pytest.skip("Triton kernels run on the CPU only with TRITON_INTERPRET=1")


@pytest.fixture
def device():
    """cuda when a GPU is present, else cpu (Triton then runs under the interpreter)."""
    return "cuda" if has_cuda() else "cpu"


@pytest.fixture
def model_file(tmp_path):
    """A dense MNIST1DNet state_dict saved with torch.save (seed 0): the input of the CLI's file tests."""
    import torch

    from nmkern.models import MNIST1DNet

    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(MNIST1DNet().state_dict(), path)
    return path


@pytest.fixture
def tiny_llama():
    """``build(layers=1, heads=2)``: a tiny ``LlamaForCausalLM`` from a config (no download), seed 0, eval mode."""
    transformers = pytest.importorskip("transformers")
    import torch

    def build(layers: int = 1, heads: int = 2):
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                       num_attention_heads=heads, num_key_value_heads=2, vocab_size=64)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()

    return build
