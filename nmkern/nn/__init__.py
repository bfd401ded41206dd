"""Drop-in sparse modules: :class:`SparseLinear` and :class:`SparseConv2d`.

* ``_layer.py``: what both share - the training and packed forms, packing, the
  ``state_dict`` round trip, the caches and the one ``forward`` (a lookup in the
  table of :mod:`nmkern.dispatch`);
* ``_state.py``: the load-time checks of a ``state_dict`` (extra state, packed buffers);
* ``linear.py`` / ``conv.py``: the geometry of each (shapes, input checks, the dense op).
"""

from ..spec import Pattern
from ._layer import fit_reason, parse_pattern, spec_kwargs
from .conv import SparseConv2d
from .linear import SparseLinear

__all__ = ["Pattern", "SparseConv2d", "SparseLinear", "fit_reason", "parse_pattern", "spec_kwargs"]
