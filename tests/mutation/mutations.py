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
    Mutation("kcenter_overflow_guard", "csrc/cpu/kcenter_kernel.cpp",
             "const float S = std::min(approx_to_s<Q>(c.center, can_stop ? thr : kInf), kMaxSum);",
             "const float S = approx_to_s<Q>(c.center, can_stop ? thr : kInf);",
             ("tests/test_robustness.py", "-k", "kcenter_extreme"),
             "kcenter: an overflowed float32 sum taken as a lower bound (issue 15, rows of 1e20)"),
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
    # ---- further contracts, one or more per op
    Mutation("kcenter_zero_row_check", "fastad/ops/kcenter.py",
             "        if bool((nrm == 0).any()):", "        if False:",
             ("tests/test_bad_inputs.py", "-k", "kc"),
             "kcenter cosine accepts a zero row (NaN rows)"),
    Mutation("nn_triton_range_guard", "fastad/ops/nn_distance.py",
             "    if not rows_in_kernel_range(q, b):", "    if False:",
             ("tests/test_robustness.py", "-k", "nn_distance_extreme and triton"),
             "Triton nn_distance without the range fallback (issue 15, rows of 1e19 / 1e-25)"),
    Mutation("nn_grad_scale", "fastad/ops/nn_distance.py",
             "    v = v * scale\n", "    v = v\n",
             ("tests/test_oracles_nn.py::test_gradients_dense_float64",),
             "nn_distance gradient ignores `scale`"),
    Mutation("region_f1_grid", "fastad/metrics/_api.py",
             "    delta = (max_th - min_th) / num_thresholds\n    # SAA+",
             "    delta = (max_th - min_th) / (num_thresholds - 1)\n    # SAA+",
             ("tests/test_oracles_metrics.py", "-k", "region"),
             "region F1 threshold step off by one (SAA+ divides by max_steps)"),
    Mutation("mask_pool_nan_check", "fastad/ops/mask_pool.py",
             '    check_finite(OP, "features", features)\n', "",
             ("tests/test_bad_inputs.py", "-k", "mp"),
             "mask_pool silently pools NaN features"),
    Mutation("sparsemax_tau_count", "fastad/ops/sparsemax.py",
             "    tau = (cs.gather(-1, k - 1) - 1) / k", "    tau = (cs.gather(-1, k - 1) - 1) / (k + 1)",
             ("tests/test_oracles_sparsemax.py",),
             "sparse lookup threshold divided by the support size + 1"),
]
