"""Layer-wise N:M schemes: ``{layer name: (n, m)}`` plus what they achieve.

A :class:`Scheme` is a read-only ``Mapping[str, tuple[int, int] | None]`` (``None``: the
layer stays dense), so it plugs straight into ``nmkern.sparsify(model, scheme)`` and
:func:`nmkern.methods.srste.apply_srste`. When it knows each layer's dense weight count and
weight MACs (DominoSearch records them), it also reports the parameter and FLOPs
sparsity it achieves over those layers. ``save``/``load`` round-trip it through JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

from .spec import Pattern, parse_spec

_FORMAT = "nmkern.scheme/1"
_OP = "Scheme"

# DominoSearch's fixed-M -> fixed-N mapping (same density): 8:16 -> 1:2, 4:16 -> 1:4, ...
_FIXED_N_NOTE = "n must divide m to map n:m to 1:(m/n)"


def _pair(op: str, name: str, value) -> tuple[int, int] | None:
    """``(n, m)`` or None (dense) from any N:M form :func:`nmkern.spec.parse_spec` reads."""
    spec = parse_spec(value, op=op, where=f"layer {name!r}", allowed=[Pattern.NM])
    return None if spec.pattern is Pattern.DENSE else (spec.n, spec.m)


def _counts(op: str, what: str, counts, names) -> dict[str, int] | None:
    if counts is None:
        return None
    if not isinstance(counts, Mapping):
        raise TypeError(f"{op}: {what} must be a Mapping[str, int], got {type(counts).__name__}")
    missing = [k for k in names if k not in counts]
    if missing:
        raise ValueError(f"{op}: {what} has no entry for layers {missing}")
    out = {}
    for k in names:
        c = counts[k]
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"{op}: {what}[{k!r}] = {c!r} must be an int >= 0")
        out[k] = c
    return out


class Scheme(Mapping):
    """Per-layer N:M patterns, with the parameter/FLOPs sparsity they achieve.

    Args:
        layers: ``{name: (n, m) | "n:m" | NMSpec | "dense" | None}``; ``None`` keeps the layer dense.
        layer_params: ``{name: dense weight count}`` (optional; needed for
            :attr:`param_sparsity`).
        layer_flops: ``{name: weight multiply-accumulates per sample}`` (optional; needed
            for :attr:`flops_sparsity`).
        meta: free-form JSON-serialisable information (budget, search history, ...).
    """

    def __init__(self, layers: Mapping, *, layer_params: Mapping | None = None, layer_flops: Mapping | None = None,
                 meta: Mapping | None = None):
        if not isinstance(layers, Mapping):
            raise TypeError(f"{_OP}: layers must be a Mapping[str, (n, m) | None], got {type(layers).__name__}")
        self._layers: dict[str, tuple[int, int] | None] = {}
        for name, value in layers.items():
            if not isinstance(name, str):
                raise TypeError(f"{_OP}: layer names must be str, got {name!r}")
            self._layers[name] = _pair(_OP, name, value)
        self.layer_params = _counts(_OP, "layer_params", layer_params, self._layers)
        self.layer_flops = _counts(_OP, "layer_flops", layer_flops, self._layers)
        self.meta = dict(meta or {})

    # Mapping protocol
    def __getitem__(self, name: str) -> tuple[int, int] | None:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other) -> bool:
        if isinstance(other, Scheme):
            return (self._layers == other._layers and self.layer_params == other.layer_params
                    and self.layer_flops == other.layer_flops)
        return Mapping.__eq__(self, other)

    __hash__ = None

    def __repr__(self) -> str:
        body = ", ".join(f"{k!r}: {'dense' if p is None else f'{p[0]}:{p[1]}'}" for k, p in self._layers.items())
        extra = []
        if self.param_sparsity is not None:
            extra.append(f"param_sparsity={self.param_sparsity:.4f}")
        if self.flops_sparsity is not None:
            extra.append(f"flops_sparsity={self.flops_sparsity:.4f}")
        return f"Scheme({{{body}}}{', ' if extra else ''}{', '.join(extra)})"

    # What the scheme achieves
    def density(self, name: str) -> float:
        """Fraction of the layer's weights kept: n/m, or 1.0 for a dense layer."""
        p = self._layers[name]
        return 1.0 if p is None else p[0] / p[1]

    def _sparsity(self, counts: dict[str, int] | None) -> float | None:
        if counts is None:
            return None
        total = sum(counts.values())
        if total == 0:
            return 0.0
        return 1.0 - sum(counts[k] * self.density(k) for k in self._layers) / total

    @property
    def param_sparsity(self) -> float | None:
        """Fraction of the listed layers' weights that are zero (None without ``layer_params``)."""
        return self._sparsity(self.layer_params)

    @property
    def flops_sparsity(self) -> float | None:
        """Fraction of the listed layers' weight MACs skipped (None without ``layer_flops``)."""
        return self._sparsity(self.layer_flops)

    @property
    def flops_reduction(self) -> float | None:
        """Dense MACs / sparse MACs over the listed layers, e.g. 8.0 for 8x fewer."""
        s = self.flops_sparsity
        return None if s is None else 1.0 / (1.0 - s)

    def with_layers(self, layers: Mapping) -> "Scheme":
        return Scheme(layers, layer_params=self.layer_params, layer_flops=self.layer_flops, meta=self.meta)

    def fixed_n(self) -> "Scheme":
        """The same densities as 1:k patterns (the paper's fixed-N mapping).

        8:16 -> 1:2, 4:16 -> 1:4, 2:16 -> 1:8, 1:16 -> 1:16; dense layers stay dense.
        """
        out = {}
        for name, p in self._layers.items():
            if p is None:
                out[name] = None
                continue
            n, m = p
            if m % n:
                raise ValueError(f"Scheme.fixed_n: layer {name!r} is {n}:{m}; {_FIXED_N_NOTE}")
            out[name] = (1, m // n)
        return self.with_layers(out)

    # Persistence
    def to_dict(self) -> dict:
        d = {
            "format": _FORMAT,
            "layers": {k: (None if p is None else list(p)) for k, p in self._layers.items()},
            "param_sparsity": self.param_sparsity,
            "flops_sparsity": self.flops_sparsity,
        }
        if self.layer_params is not None:
            d["layer_params"] = dict(self.layer_params)
        if self.layer_flops is not None:
            d["layer_flops"] = dict(self.layer_flops)
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Scheme":
        if not isinstance(d, Mapping) or d.get("format") != _FORMAT or "layers" not in d:
            raise ValueError(f"Scheme.load: not an nmkern scheme (expected a JSON object with format={_FORMAT!r} and 'layers')")
        if not isinstance(d["layers"], Mapping):
            raise ValueError(f"Scheme.load: 'layers' must be an object {{layer name: [n, m] | null}}, "
                             f"got {type(d['layers']).__name__}")
        for key in ("layer_params", "layer_flops", "meta"):
            if d.get(key) is not None and not isinstance(d[key], Mapping):
                raise ValueError(f"Scheme.load: {key!r} must be an object, got {type(d[key]).__name__}")
        layers = {k: (tuple(p) if isinstance(p, list) else p) for k, p in d["layers"].items()}
        return cls(layers, layer_params=d.get("layer_params"), layer_flops=d.get("layer_flops"), meta=d.get("meta"))

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON atomically (a temp file beside ``path``, then renamed)."""
        from .checkpoint_io import atomic_write

        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(path, lambda p: p.write_text(text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Scheme":
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"Scheme.load: {os.fspath(path)!r} is not valid JSON ({e})") from None
        return cls.from_dict(d)

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> None:
        """Bar chart of the kept weights per group (n, or m for dense) for every layer, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self._layers)
        full = max((p[1] for p in self._layers.values() if p is not None), default=16)  # a dense layer keeps all m
        kept = [full if self._layers[k] is None else self._layers[k][0] for k in names]
        labels = ["dense" if self._layers[k] is None else f"{self._layers[k][0]}:{self._layers[k][1]}" for k in names]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.5))
        bars = ax.bar(range(len(names)), kept, color="tab:blue")
        for bar, label in zip(bars, labels):
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("N (kept per group)")
        ax.set_yscale("log", base=2)
        parts = []
        if self.param_sparsity is not None:
            parts.append(f"param sparsity {self.param_sparsity:.3f}")
        if self.flops_reduction is not None:
            parts.append(f"FLOPs {self.flops_reduction:.2f}x fewer")
        ax.set_title(title or ("chosen N per layer" + (" - " + ", ".join(parts) if parts else "")), fontsize=9)
        fig.tight_layout()
        from .checkpoint_io import atomic_write

        try:
            atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
        finally:
            plt.close(fig)
