"""Pure-torch semantics of every nmkern op: the single source of truth.

Functions here do no input checking (the public ops in :mod:`nmkern.functional`
validate first); tests and benchmarks import them as the reference.
"""

from .block_1xn import block_mask_1xn_ref, block_scores_1xn_ref, to_bsr_1xn_ref
from .nm_mask import apply_nm_ref, nm_mask_ref
from .nm_pack import pack_nm_ref, unpack_nm_ref
from .semi24 import compress_24_ref, decompress_24_ref

__all__ = [
    "apply_nm_ref",
    "block_mask_1xn_ref",
    "block_scores_1xn_ref",
    "compress_24_ref",
    "decompress_24_ref",
    "nm_mask_ref",
    "pack_nm_ref",
    "to_bsr_1xn_ref",
    "unpack_nm_ref",
]
