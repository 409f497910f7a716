"""The mutations ``tests/mutation/run.py`` applies, one at a time, to a scratch copy.

Each is a small realistic bug: ``old`` (which must occur exactly once in ``file``)
becomes ``new``, and running ``tests`` (pytest arguments, from the repository root)
must then fail. Add one whenever a contract gets a new test.
"""
from __future__ import annotations

from typing import NamedTuple


class Mutation(NamedTuple):
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTATIONS: list[Mutation] = [
    # ---- the five of issue 16
    Mutation("nn_cpu_tie_screen", "csrc/cpu/nn_distance_kernel.cpp",
             "    if (!(s >= bound(r))) return;", "    if (!(s > bound(r))) return;",
             ("tests/test_oracles_nn.py::test_bit_equal_ties_lowest_index",),
             "bit-equal ties go to the higher index"),
    Mutation("aupro_fpr_limit", "fastad/metrics/_api.py",
             "    keep = fprs < fpr_limit", "    keep = fprs <= fpr_limit",
             ("tests/test_oracles_metrics.py",),
             "AUPRO (cflow-ad style) keeps the points at FPR == limit"),
    Mutation("nn_mean_grad_count", "fastad/ops/nn_distance.py",
             "    return v.masked_fill(~valid, 0.0).sum(-1) / cnt.clamp_min(1)",
             "    return v.masked_fill(~valid, 0.0).sum(-1) / valid.shape[-1]",
             ("tests/test_oracles_nn.py::test_gradients_dense_float64",),
             "mean-mode gradient divided by k instead of the eligible count"),
    Mutation("mask_pool_complement", "fastad/ops/mask_pool.py",
             "    elif complement is True:\n        comp = 1", "    elif complement is True:\n        comp = 2",
             ("tests/test_oracles_mask_pool.py",),
             "complement=True pools the partition complement"),
    Mutation("sparsemax_max_shift", "fastad/ops/sparsemax.py",
             "    zs = vals - vals[..., :1]", "    zs = vals",
             ("tests/test_oracles_sparsemax.py",),
             "the top-k sparsemax threshold without the max shift"),
]
