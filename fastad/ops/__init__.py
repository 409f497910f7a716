"""fastad.ops: the fused kernels. Each op module holds the PyTorch reference (the
definition), the dispatch to the C++ / Triton backends, and its autograd."""
from __future__ import annotations

from fastad.ops.mask_pool import MaskPoolOutput, mask_pool, mask_pool_reference

__all__: list[str] = ["mask_pool", "mask_pool_reference", "MaskPoolOutput"]
