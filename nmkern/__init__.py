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

from .dispatch import ExecPath  # noqa: E402
from .nn import Pattern, SparseConv2d, SparseLinear  # noqa: E402
from .sparsify import SparsifyReport, sparsify  # noqa: E402
from .methods.masking import Distribution, Target  # noqa: E402
from .methods.gap import GaPMethod, GaPResult, PGaP, SGaP, gap_train, make_partitions  # noqa: E402
from .methods.blockprune import BlockPruneResult, prune_1xn  # noqa: E402
from .autograd import srste_weight  # noqa: E402
from .scheme import Scheme  # noqa: E402
from .methods.domino import Budget, Policy, domino_search  # noqa: E402
from .flops import count_flops  # noqa: E402
from .methods.srste import apply_srste, remove_srste, set_lambda_w  # noqa: E402

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
    "ExecPath",
    "Pattern",
    "SparseConv2d",
    "SparseLinear",
    "SparsifyReport",
    "sparsify",
    "Distribution",
    "Target",
    "GaPMethod",
    "GaPResult",
    "PGaP",
    "SGaP",
    "gap_train",
    "make_partitions",
    "BlockPruneResult",
    "prune_1xn",
    "srste_weight",
    "Scheme",
    "Budget",
    "Policy",
    "domino_search",
    "count_flops",
    "apply_srste",
    "remove_srste",
    "set_lambda_w",
]
