"""Hardware markers, defined once. Nothing here queries a device at import time."""

from __future__ import annotations

import functools
import os

import pytest

# Layers under backend="auto" measure which path wins on their first call (nmkern.tuning) and remember it in
# ~/.cache/nmkern: outcomes that depend on this machine's load. The suite asserts the static rules instead;
# tests/test_tuning.py turns measuring on (a fake timer, and one real measurement) with its own cache folder.
os.environ.setdefault("NMKERN_TUNE", "0")


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


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """Measuring on (nmkern.tuning), a fresh cache folder, warm-cache state, and a fake timer: every timed call
    of a path counts as the seconds set for it (``tuned.set(dense=1.0, cpu=0.5)``); ``tuned.samples`` lists the
    paths of the samples taken. The calls themselves really run."""
    from nmkern import tuning
    from nmkern.backend import Backend

    monkeypatch.setenv("NMKERN_TUNE", "1")
    monkeypatch.setenv("NMKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NMKERN_BACKEND", raising=False)
    monkeypatch.setitem(tuning._llc, "cpu", 1 << 60)  # nothing counts as cold unless a test says so
    monkeypatch.setattr(tuning, "_trials", {})
    tuning.forget()

    class Fake:
        def __init__(self):
            self.seconds = {Backend.DENSE: 1.0, Backend.CPU: 0.5}
            self.samples = []

        def set(self, **seconds):
            self.seconds = {Backend(k): v for k, v in seconds.items()}

        def __call__(self, path, measured):
            self.samples.append(path.value)
            return self.seconds[path]

    fake = Fake()
    monkeypatch.setattr(tuning, "_observe", fake)
    yield fake
    tuning.forget()
