"""fastad.ops: the fused kernels. Each op module holds the PyTorch reference (the
definition, exported as ``<op>_reference``), the dispatch to the C++ / Triton backends,
and its autograd."""
from __future__ import annotations

from fastad.ops.kcenter import KCenterResult, kcenter_greedy, kcenter_greedy_reference
from fastad.ops.mask_pool import MaskPoolOutput, mask_pool, mask_pool_reference
from fastad.ops.nn_distance import NNResult, nn_distance, nn_distance_reference
from fastad.ops.sparsemax import LookupWeights, dict_lookup, dict_lookup_reference, sparsemax, sparsemax_reference

__all__ = [
    "KCenterResult", "kcenter_greedy", "kcenter_greedy_reference",
    "MaskPoolOutput", "mask_pool", "mask_pool_reference",
    "NNResult", "nn_distance", "nn_distance_reference",
    "LookupWeights", "dict_lookup", "dict_lookup_reference", "sparsemax", "sparsemax_reference",
]
