"""nmkern: N:M and 1xN fine-grained structured sparsity - kernels first.

The public surface is what this module exports; everything else is internal.
"""

from .backend import Backend
from .formats import NMPacked
from .functional import (
    BlockCriterion,
    apply_nm,
    block_mask_1xn,
    block_scores_1xn,
    compress_24,
    decompress_24,
    nm_mask,
    pack_nm,
    to_bsr_1xn,
    unpack_nm,
)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BlockCriterion",
    "NMPacked",
    "apply_nm",
    "block_mask_1xn",
    "block_scores_1xn",
    "compress_24",
    "decompress_24",
    "nm_mask",
    "pack_nm",
    "to_bsr_1xn",
    "unpack_nm",
]
