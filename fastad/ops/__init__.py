"""fastad.ops: the fused kernels. Each op module holds the PyTorch reference (the
definition), the dispatch to the C++ / Triton backends, and its autograd."""
from __future__ import annotations

from fastad.ops.nn_distance import NNResult, nn_distance

__all__ = ["NNResult", "nn_distance"]
