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

from .nn import SparseConv2d, SparseLinear  # noqa: E402
from .spec import (  # noqa: E402
    DENSE,
    BlockSpec,
    DenseSpec,
    LayerSpec,
    NMSpec,
    Pattern,
    SpecResolver,
    UnstructuredSpec,
    parse_spec,
)
from .sparsify import SparsifyReport, sparsify  # noqa: E402
from .selftest import SelftestReport, selftest  # noqa: E402
from .methods.masking import Distribution  # noqa: E402
from .methods.gap import GaPMethod, GaPResult, PGaP, SGaP, gap_train, make_partitions  # noqa: E402
from .methods.blockprune import BlockPruneResult, prune_1xn  # noqa: E402
from .methods.oneshot import OneShotMethod, OneShotReport, prune_oneshot  # noqa: E402
from .methods.owl import OutlierScheme, owl_scheme  # noqa: E402
from .memory import MemoryReport, memory_report  # noqa: E402
from .tuning import TuneReport, tune  # noqa: E402
from .autograd import srste_weight  # noqa: E402
from .scheme import Scheme  # noqa: E402
from .methods.domino import Budget, Policy, domino_search  # noqa: E402
from .flops import count_flops  # noqa: E402
from .serialization import FormatError, load, save  # noqa: E402
from .pretrained import from_pretrained, save_pretrained  # noqa: E402
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
    "DENSE",
    "BlockSpec",
    "DenseSpec",
    "LayerSpec",
    "NMSpec",
    "Pattern",
    "SpecResolver",
    "UnstructuredSpec",
    "parse_spec",
    "SparseConv2d",
    "SparseLinear",
    "SparsifyReport",
    "sparsify",
    "SelftestReport",
    "selftest",
    "Distribution",
    "GaPMethod",
    "GaPResult",
    "PGaP",
    "SGaP",
    "gap_train",
    "make_partitions",
    "BlockPruneResult",
    "prune_1xn",
    "OneShotMethod",
    "OneShotReport",
    "prune_oneshot",
    "OutlierScheme",
    "owl_scheme",
    "MemoryReport",
    "memory_report",
    "TuneReport",
    "tune",
    "srste_weight",
    "Scheme",
    "Budget",
    "Policy",
    "domino_search",
    "count_flops",
    "FormatError",
    "load",
    "save",
    "from_pretrained",
    "save_pretrained",
    "apply_srste",
    "remove_srste",
    "set_lambda_w",
]


def __getattr__(name: str):
    # nmkern 0.1 names, kept for one release: ExecPath is Backend, Target is Pattern.
    from ._moved import renamed_attribute

    return renamed_attribute(__name__, name, {"ExecPath": (Backend, "nmkern.Backend (one enum of execution paths)"),
                                              "Target": (Pattern, "nmkern.Pattern")})
