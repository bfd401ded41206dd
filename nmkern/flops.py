"""Weight FLOPs of Linear / Conv layers, counted from a real forward pass.

What is counted: multiply-accumulates (MACs) between a layer's weight and its input,
per sample - the part N:M sparsity removes (an n:m layer does n/m of them). Bias adds,
activations and pooling are left out: sparsity does not change them.

- Linear ``(out, in)``: ``in * out`` per output row; a (B, T, in) input has T rows per
  sample.
- ConvNd: ``(in / groups) * prod(kernel)`` per output element, ``out_channels *
  prod(output spatial size)`` output elements per sample - so stride, padding and
  dilation are accounted for by the observed output shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    batch = output.shape[0]
    if isinstance(module, nn.Linear):
        rows = output.numel() // (batch * module.out_features)
        return rows * module.in_features * module.out_features
    if isinstance(module, _CONV_TYPES):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return (output.numel() // batch) * per_output
    raise TypeError(f"count_flops: cannot count {type(module).__name__}; only Linear and Conv1d/2d/3d")


def count_flops(model: nn.Module, sample_input, layers: Mapping[str, nn.Module] | None = None) -> dict[str, int]:
    """``{layer name: weight MACs per sample}`` for ``layers`` (default: every Linear/Conv).

    Runs one forward of ``sample_input`` (a tensor, or a tuple of positional inputs)
    under ``torch.no_grad`` with forward hooks; the batch dimension is the first
    dimension of each layer's output. The model's train/eval mode is restored.
    """
    if layers is None:
        layers = {k: mod for k, mod in model.named_modules() if isinstance(mod, (nn.Linear,) + _CONV_TYPES)}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(name):
        def hook(module, inputs, output):
            counts[name] = counts.get(name, 0) + _layer_macs(module, output)

        return hook

    for name, mod in layers.items():
        hooks.append(mod.register_forward_hook(make_hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(sample_input, tuple):
                model(*sample_input)
            else:
                model(sample_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [k for k in layers if k not in counts]
    if missing:
        raise ValueError(f"count_flops: layers {missing} were not called by the forward pass, so their FLOPs are unknown; "
                         "leave them out of the search (layers=[...]) or pass an input that reaches them")
    return counts
