"""Small reference models for the bundled datasets (:mod:`nmkern.data`).

Both are plain ``nn.Conv2d`` / ``nn.Linear`` stacks, so ``nmkern.sparsify`` and the
training methods apply unchanged. The first conv of each sees 1 input channel, which
no N:M group divides: it stays dense (and the tools say so).

- :class:`MNIST1DNet`: a 1-D CNN for MNIST-1D written with ``(1, k)`` ``Conv2d``
  kernels on ``(N, 1, 1, 40)`` inputs (N:M groups run along input channels exactly
  as for a Conv1d, and the layers swap for :class:`nmkern.SparseConv2d`).
  5 prunable layers of input width 32..256, all divisible by 16.
- :class:`DigitsNet`: a 2-D CNN for the 28x28 digits, 4 prunable layers.
"""

from __future__ import annotations

import enum

import torch
import torch.nn as nn


class ModelName(str, enum.Enum):
    MNIST1D = "mnist1d"
    DIGITS = "digits"

    def __str__(self) -> str:
        return self.value


class MNIST1DNet(nn.Module):
    """conv(1->c) -> conv(c->c, /2) -> conv(c->2c, /2) -> conv(2c->2c, /2) -> fc(2c*5->hidden) -> fc(hidden->10)."""

    def __init__(self, channels: int = 32, hidden: int = 128, num_classes: int = 10, length: int = 40):
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(1, c, (1, 5), padding=(0, 2))
        self.conv2 = nn.Conv2d(c, c, (1, 3), stride=(1, 2), padding=(0, 1))
        self.conv3 = nn.Conv2d(c, 2 * c, (1, 3), stride=(1, 2), padding=(0, 1))
        self.conv4 = nn.Conv2d(2 * c, 2 * c, (1, 3), stride=(1, 2), padding=(0, 1))
        out_len = length
        for _ in range(3):
            out_len = (out_len - 1) // 2 + 1
        self.fc1 = nn.Linear(2 * c * out_len, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (N, 40) signals as they come from mnist1d
            x = x[:, None, None, :]
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.act(self.conv3(x))
        x = self.act(self.conv4(x))
        x = self.act(self.fc1(x.flatten(1)))
        return self.fc2(x)


class DigitsNet(nn.Module):
    """conv(1->c) -> pool -> conv(c->2c) -> pool -> conv(2c->2c) -> fc(2c*7*7->hidden) -> fc(hidden->10)."""

    def __init__(self, channels: int = 16, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.fc1 = nn.Linear(2 * c * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.reshape(-1, 1, 28, 28)
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = self.act(self.conv3(x))
        x = self.act(self.fc1(x.flatten(1)))
        return self.fc2(x)


def make_model(name: ModelName | str, **kw) -> nn.Module:
    """The bundled model for a bundled dataset (``"mnist1d"`` or ``"digits"``)."""
    try:
        which = ModelName(str(name).lower())
    except ValueError:
        raise ValueError(f"make_model: unknown model {name!r}; choose one of {[m.value for m in ModelName]}") from None
    return MNIST1DNet(**kw) if which is ModelName.MNIST1D else DigitsNet(**kw)


class LlamaShapedLayer(nn.Module):
    """One LLaMA-7B-shaped decoder layer, for timing: RMSNorm, causal multi-head self-attention (q/k/v/o
    ``hidden x hidden``), RMSNorm and the SiLU-gated MLP (gate/up ``intermediate x hidden``, down
    ``hidden x intermediate``), with residuals; random weights, no rotary embedding and no KV cache
    (a decode-sized call is ``(batch, 1, hidden)``). The defaults are LLaMA-7B's: 202M weights per layer,
    808 MB in fp32, beyond any CPU's last-level cache.
    """

    def __init__(self, hidden: int = 4096, intermediate: int = 11008, heads: int = 32):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"LlamaShapedLayer: hidden={hidden} is not divisible by heads={heads}")
        self.heads = heads
        self.input_norm, self.post_norm = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.input_norm(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.post_norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
