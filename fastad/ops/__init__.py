"""fastad.ops: the fused kernels. Each op module holds the PyTorch reference (the
definition), the dispatch to the C++ / Triton backends, and its autograd."""
from __future__ import annotations

from fastad.ops.sparsemax import dict_lookup, sparsemax

__all__: list[str] = ["dict_lookup", "sparsemax"]
