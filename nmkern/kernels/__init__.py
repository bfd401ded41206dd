"""Triton kernels, one op per file (shipped as ``nmkern.kernels``).

Each file holds the ``@triton.jit`` kernel, its launcher (validate, allocate,
launch) and one ``*_configs()`` function listing its block sizes / ``num_warps`` /
``num_stages``, which feeds the launcher, ``AOT_SPECS`` and the optional
``NMKERN_AUTOTUNE=1`` autotuner through :mod:`._configs`. Launchers assume the
public op in :mod:`nmkern.functional` already checked its input.
"""

from .block_1xn import block_scores_1xn_triton
from .compress_24 import compress_24_triton
from .decompress_24 import decompress_24_triton
from .nm_mask import nm_mask_triton
from .pack_nm import pack_nm_triton
from .unpack_nm import unpack_nm_triton
from .bsr_linear import bsr_linear_triton
from .nm_linear import nm_linear_triton, semi24_linear_triton
from .sparse_conv2d import nm_conv2d_triton
