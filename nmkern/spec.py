"""One vocabulary for what a layer gets: N:M, 1xN blocks, an unstructured fraction, or dense.

Every part of nmkern that takes a per-layer pattern (``sparsify``, SR-STE, GaP,
1xN block pruning, DominoSearch's :class:`~nmkern.Scheme`, the CLI) speaks it:

* :class:`NMSpec` ``(n, m)``: n kept of every m consecutive inputs; text ``"2:4"``;
* :class:`BlockSpec` ``(block, sparsity)``: blocks of ``block`` output channels x 1
  input column, the ``sparsity`` fraction of them pruned; text ``"1x4:0.5"``
  (``block`` names the 1xN block size everywhere in nmkern; ``rearrange=True``, for the
  training methods only, forms the blocks in L1-sorted filter order);
* :class:`UnstructuredSpec` ``(sparsity)``: the smallest ``sparsity`` fraction of
  |w| pruned; text ``"unstructured:0.9"``;
* :class:`DenseSpec`: the layer stays dense; text ``"dense"`` (``None`` means the same).

:func:`parse_spec` is the one parser of the text, tuple and dataclass forms, and
:class:`SpecResolver` the one name-or-glob resolver of a scheme (a single spec for
every layer, or a mapping ``{name or glob: spec}``: an exact name wins, then the
first glob in the mapping's order that matches). :func:`accepts_n_for_block` keeps the
nmkern 0.1 keyword ``n=`` for the 1xN block size working, with a DeprecationWarning.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import functools
import warnings
from collections.abc import Iterable, Mapping
from typing import ClassVar

from . import _validate as v


class Pattern(str, enum.Enum):
    """The kind of sparsity a layer carries."""

    NM = "nm"
    BLOCK = "1xn"
    UNSTRUCTURED = "unstructured"
    DENSE = "dense"
    # Spellings of nmkern 0.1 (the same members): nn.Pattern.ONE_BY_N, masking.Target.BLOCK_1XN.
    ONE_BY_N = "1xn"
    BLOCK_1XN = "1xn"

    def __str__(self) -> str:
        return self.value


def pattern_in(value, allowed: Iterable[Pattern]) -> Pattern | None:
    """The :class:`Pattern` ``value`` names (a Pattern or its case-insensitive value) when it is one of
    ``allowed``, else None (the caller says what it takes)."""
    try:
        pattern = Pattern(value.strip().lower() if isinstance(value, str) else value)
    except ValueError:
        return None
    return pattern if pattern in tuple(allowed) else None


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What one layer gets. Use the subclasses; ``str(spec)`` is the text form :func:`parse_spec` reads."""

    pattern: ClassVar[Pattern]

    @property
    def density(self) -> float:
        """Fraction of the dense weights kept."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class NMSpec(LayerSpec):
    """N:M: ``n`` kept of every ``m`` consecutive input features / channels (1 <= n < m <= 16)."""

    n: int
    m: int
    pattern: ClassVar[Pattern] = Pattern.NM

    def __post_init__(self):
        v.check_nm("NMSpec", self.n, self.m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m


def check_block(op: str, block) -> int:
    """The 1xN block size: a positive int (output channels per block)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{op}: block must be a positive int (output channels per 1xN block, e.g. 4), got {block!r}")
    return block


@dataclasses.dataclass(frozen=True)
class BlockSpec(LayerSpec):
    """1xN blocks: ``block`` consecutive output channels x 1 input column; ``sparsity`` of the blocks pruned.

    ``rearrange`` (training methods only, not part of the text form): the blocks are formed
    in L1-sorted filter order and the mask scattered back; :func:`nmkern.sparsify` rejects it.
    """

    block: int
    sparsity: float
    rearrange: bool = False
    pattern: ClassVar[Pattern] = Pattern.BLOCK

    def __post_init__(self):
        check_block("BlockSpec", self.block)
        object.__setattr__(self, "sparsity", v.check_fraction("BlockSpec", "sparsity", self.sparsity))
        if not isinstance(self.rearrange, bool):
            raise TypeError(f"BlockSpec: rearrange must be a bool, got {self.rearrange!r}")

    def __str__(self) -> str:
        return f"1x{self.block}:{self.sparsity:g}"

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity


@dataclasses.dataclass(frozen=True)
class UnstructuredSpec(LayerSpec):
    """The smallest ``sparsity`` fraction of |w| in the layer pruned."""

    sparsity: float
    pattern: ClassVar[Pattern] = Pattern.UNSTRUCTURED

    def __post_init__(self):
        object.__setattr__(self, "sparsity", v.check_fraction("UnstructuredSpec", "sparsity", self.sparsity))

    def __str__(self) -> str:
        return f"unstructured:{self.sparsity:g}"

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity


@dataclasses.dataclass(frozen=True)
class DenseSpec(LayerSpec):
    """The layer stays dense."""

    pattern: ClassVar[Pattern] = Pattern.DENSE

    def __str__(self) -> str:
        return "dense"

    @property
    def density(self) -> float:
        return 1.0


DENSE = DenseSpec()

_FORMS = {
    Pattern.NM: "'n:m' (e.g. '2:4'), (n, m)",
    Pattern.BLOCK: "'1x<block>:<sparsity>' (e.g. '1x4:0.5')",
    Pattern.UNSTRUCTURED: "'unstructured:<sparsity>'",
}


def forms(allowed: Iterable[Pattern] | None = None) -> str:
    """The accepted text / tuple forms of the ``allowed`` patterns (all by default), for messages."""
    allowed = None if allowed is None else tuple(allowed)
    return ", ".join(f for p, f in _FORMS.items() if allowed is None or p in allowed) + ", 'dense' or None"


FORMS = forms()


def _number(text: str, cast):
    try:
        return cast(text)
    except ValueError:
        return None


def _parse_text(text: str, label: str) -> LayerSpec | None:
    """The spec ``text`` spells, None when it spells none; ``label`` ("op (where)") prefixes range errors."""
    t = text.strip().lower()
    parts = [p.strip() for p in t.split(":")]
    if t == "dense":
        return DENSE
    if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
        return NMSpec(*v.check_nm(label, int(parts[0]), int(parts[1])))
    if parts[0] == "1xn" and len(parts) == 3:  # nmkern 0.1 spelling '1xN:<block>:<sparsity>'
        warnings.warn(f"pattern {text!r}: write 1xN blocks as '1x{parts[1]}:{parts[2]}' "
                      "(the '1xN:<block>:<sparsity>' spelling goes away in nmkern 0.3)", DeprecationWarning, stacklevel=4)
        parts = [f"1x{parts[1]}", parts[2]]
    if len(parts) == 2 and parts[0].startswith("1x"):
        block, sparsity = _number(parts[0][2:], int), _number(parts[1], float)
        if block is not None and sparsity is not None:
            return BlockSpec(check_block(label, block), v.check_fraction(label, "sparsity", sparsity))
    if len(parts) == 2 and parts[0] == "unstructured":
        sparsity = _number(parts[1], float)
        if sparsity is not None:
            return UnstructuredSpec(v.check_fraction(label, "sparsity", sparsity))
    return None


def parse_spec(value, *, op: str = "nmkern", where: str = "pattern",
               allowed: Iterable[Pattern] | None = None) -> LayerSpec:
    """A :class:`LayerSpec` from any accepted form (see :func:`forms`); ``None`` gives :data:`DENSE`.

    ``allowed``: the patterns the caller can apply (dense is always allowed); others
    raise ``ValueError`` naming ``op`` and ``where``. Bad values raise ``ValueError``
    (``TypeError`` for a value of the wrong type), with the accepted forms.
    """
    allowed = None if allowed is None else tuple(allowed)
    if value is None:
        spec = DENSE
    elif isinstance(value, LayerSpec):
        spec = value
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        spec = NMSpec(*v.check_nm(f"{op} ({where})", value[0], value[1]))
    elif isinstance(value, str):
        spec = _parse_text(value, f"{op} ({where})")
        if spec is None:
            raise ValueError(f"{op}: {where} = {value!r} is not a pattern; write it as {forms(allowed)}")
    else:
        raise TypeError(f"{op}: {where} must be {forms(allowed)}, got {type(value).__name__} {value!r}")
    if allowed is not None and spec.pattern is not Pattern.DENSE and spec.pattern not in allowed:
        raise ValueError(f"{op}: {where} = {str(spec)!r} is a {spec.pattern.value} pattern; {op} takes "
                         f"{forms(allowed)}")
    return spec


def accepts_n_for_block(fn):
    """Decorator: ``fn(..., n=4)``, the nmkern 0.1 keyword for the 1xN block size, still works as ``block=4``
    (with a DeprecationWarning) for one release. Positional calls are unchanged."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "n" in kwargs:
            if "block" in kwargs:
                raise TypeError(f"{fn.__name__}: got both block= and n= (its old name); pass block= only")
            warnings.warn(f"{fn.__name__}: the 1xN block size is now called block= (n= goes away in nmkern 0.3)",
                          DeprecationWarning, stacklevel=2)
            kwargs["block"] = kwargs.pop("n")
        return fn(*args, **kwargs)

    return wrapper


class SpecResolver:
    """Maps qualified layer names to their :class:`LayerSpec` under one scheme.

    ``scheme``: one spec for every layer (any :func:`parse_spec` form), or a Mapping
    ``{layer name or glob: spec}`` such as :class:`nmkern.Scheme`. Every value is
    parsed up front, so a bad entry fails before anything is changed.
    """

    def __init__(self, scheme, *, op: str = "nmkern", allowed: Iterable[Pattern] | None = None):
        self.op = op
        self.uniform: LayerSpec | None = None
        self.table: dict[str, LayerSpec] = {}
        self.used: set[str] = set()
        if isinstance(scheme, Mapping):
            for key in scheme:
                if not isinstance(key, str):
                    raise TypeError(f"{op}: scheme keys must be layer names or globs (str), got {key!r}")
                self.table[key] = parse_spec(scheme[key], op=op, where=f"scheme[{key!r}]", allowed=allowed)
        elif scheme is None or isinstance(scheme, (str, tuple, list, LayerSpec)):
            self.uniform = parse_spec(scheme, op=op, where="scheme", allowed=allowed)
        else:
            raise TypeError(f"{op}: scheme must be one pattern ({forms(allowed)}) or a Mapping "
                            f"{{name or glob: pattern}}, got {type(scheme).__name__}")

    @property
    def is_mapping(self) -> bool:
        return self.uniform is None

    def lookup(self, name: str) -> LayerSpec | None:
        """The spec for layer ``name``; None when a mapping scheme has no key for it."""
        if self.uniform is not None:
            return self.uniform
        if name in self.table:
            self.used.add(name)
            return self.table[name]
        for key, spec in self.table.items():
            if fnmatch.fnmatchcase(name, key):
                self.used.add(key)
                return spec
        return None

    def resolve(self, names: Iterable[str]) -> dict[str, LayerSpec | None]:
        """``{name: spec or None}`` for every name, in order."""
        return {name: self.lookup(name) for name in names}

    def unused_keys(self) -> list[str]:
        """Keys of a mapping scheme that matched none of the names looked up so far."""
        return [k for k in self.table if k not in self.used]


__all__ = ["DENSE", "BlockSpec", "DenseSpec", "LayerSpec", "NMSpec", "Pattern", "SpecResolver", "UnstructuredSpec",
           "accepts_n_for_block", "check_block", "forms", "parse_spec", "pattern_in"]
