"""fastad.ops: the fused kernels. Each op module holds the PyTorch reference (the
definition), the dispatch to the C++ / Triton backends, and its autograd."""
from __future__ import annotations

from fastad.ops.kcenter import KCenterResult, kcenter_greedy, kcenter_greedy_reference

__all__: list[str] = ["KCenterResult", "kcenter_greedy", "kcenter_greedy_reference"]
