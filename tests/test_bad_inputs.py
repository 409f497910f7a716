"""Bad input to every public op and metric: the error class is ValueError or
TypeError and the message names the offending argument (fastad/_checks.py
conventions). A table of hand-picked cases, then property-based fuzzing of the
scalar arguments (hypothesis): any value either works or raises one of those two
errors naming the argument -- never another exception, never a crash."""
from __future__ import annotations

import math

import pytest
import torch

from fastad import metrics
from fastad.ops import dict_lookup, kcenter_greedy, mask_pool, nn_distance, sparsemax
from hypothesis_compat import given, settings, st

nan = float("nan")
Q, B = torch.randn(4, 8), torch.randn(10, 8)
X = torch.randn(20, 6)
F4, M4 = torch.randn(1, 3, 4, 4), (torch.rand(1, 2, 8, 8) > 0.5).float()
KEYS, VALS = torch.randn(10, 8), torch.randn(10, 3)
MAPS = torch.rand(2, 8, 8)
MASKS = torch.zeros(2, 8, 8, dtype=torch.uint8)
MASKS[1, 2:5, 2:5] = 1


def _with(t: torch.Tensor, idx, value) -> torch.Tensor:
    t = t.clone()
    t[idx] = value
    return t


CASES = [
    # (id, call, error class, text the message must contain)
    ("nn-query-list", lambda: nn_distance(Q.tolist(), B), TypeError, "`query`"),
    ("nn-query-1d", lambda: nn_distance(Q[0], B), ValueError, "`query`"),
    ("nn-query-int", lambda: nn_distance(Q.long(), B), TypeError, "`query`"),
    ("nn-dtype-mix", lambda: nn_distance(Q, B.half()), TypeError, "`bank`"),
    ("nn-channels", lambda: nn_distance(Q, B[:, :5]), ValueError, "channel"),
    ("nn-k-zero", lambda: nn_distance(Q, B, k=0), ValueError, "`k`"),
    ("nn-k-str", lambda: nn_distance(Q, B, k="2"), ValueError, "`k`"),
    ("nn-k-big", lambda: nn_distance(Q, B, k=11), ValueError, "`k`"),
    ("nn-metric", lambda: nn_distance(Q, B, metric="euclid"), ValueError, "`metric`"),
    ("nn-reduce", lambda: nn_distance(Q, B, reduce="max"), ValueError, "`reduce`"),
    ("nn-scale-neg", lambda: nn_distance(Q, B, scale=-1.0), ValueError, "`scale`"),
    ("nn-scale-nan", lambda: nn_distance(Q, B, scale=nan), ValueError, "`scale`"),
    ("nn-query-nan", lambda: nn_distance(_with(Q, (0, 0), nan), B), ValueError, "`query`"),
    ("nn-bank-inf", lambda: nn_distance(Q, _with(B, (1, 1), math.inf), backend="cpu"), ValueError, "`bank`"),
    ("nn-groups-one", lambda: nn_distance(Q, B, query_groups=torch.zeros(4, dtype=torch.long)), ValueError,
     "`bank_groups`"),
    ("nn-groups-shape", lambda: nn_distance(Q, B, query_groups=torch.zeros(3, dtype=torch.long),
                                            bank_groups=torch.zeros(10, dtype=torch.long)), ValueError,
     "`query_groups`"),
    ("nn-groups-float", lambda: nn_distance(Q, B, query_groups=torch.zeros(4), bank_groups=torch.zeros(10)),
     TypeError, "`query_groups`"),
    ("nn-group-match", lambda: nn_distance(Q, B, group_match="any"), ValueError, "`group_match`"),
    ("nn-backend", lambda: nn_distance(Q, B, backend="gpu"), ValueError, "backend"),
    ("kc-x-list", lambda: kcenter_greedy(X.tolist(), 3), TypeError, "`x`"),
    ("kc-x-1d", lambda: kcenter_greedy(X[0], 3), ValueError, "`x`"),
    ("kc-x-nan", lambda: kcenter_greedy(_with(X, (2, 2), nan), 3), ValueError, "`x`"),
    ("kc-k-zero", lambda: kcenter_greedy(X, 0), ValueError, "`k`"),
    ("kc-k-float", lambda: kcenter_greedy(X, 2.5), TypeError, "`k`"),
    ("kc-k-big", lambda: kcenter_greedy(X, 21), ValueError, "`k`"),
    ("kc-metric", lambda: kcenter_greedy(X, 3, metric="ip"), ValueError, "`metric`"),
    ("kc-init-range", lambda: kcenter_greedy(X, 3, init=20), ValueError, "`init`"),
    ("kc-init-str", lambda: kcenter_greedy(X, 3, init="first"), ValueError, "`init`"),
    ("kc-init-float", lambda: kcenter_greedy(X, 3, init=torch.zeros(2)), TypeError, "`init`"),
    ("kc-proj", lambda: kcenter_greedy(X, 3, projection_dim=0), ValueError, "`projection_dim`"),
    ("kc-seed", lambda: kcenter_greedy(X, 3, seed="a"), TypeError, "`seed`"),
    ("kc-cosine-zero", lambda: kcenter_greedy(_with(X, 4, 0.0), 3, metric="cosine"), ValueError, "`x`"),
    ("mp-features-3d", lambda: mask_pool(F4[0], M4), ValueError, "`features`"),
    ("mp-masks-3d", lambda: mask_pool(F4, M4[0]), ValueError, "`masks`"),
    ("mp-masks-int", lambda: mask_pool(F4, M4.long()), TypeError, "`masks`"),
    ("mp-batch", lambda: mask_pool(F4, M4.expand(2, -1, -1, -1)), ValueError, "`masks`"),
    ("mp-resize", lambda: mask_pool(F4, M4, resize="cubic"), ValueError, "`resize`"),
    ("mp-align", lambda: mask_pool(F4, M4, resize="nearest", align_corners=True), ValueError, "align_corners"),
    ("mp-threshold", lambda: mask_pool(F4, M4, threshold=nan), ValueError, "`threshold`"),
    ("mp-eps", lambda: mask_pool(F4, M4, eps=-1.0), ValueError, "`eps`"),
    ("mp-complement", lambda: mask_pool(F4, M4, complement="both"), ValueError, "`complement`"),
    ("mp-size-zero", lambda: mask_pool(F4, M4, size=0), ValueError, "`size`"),
    ("mp-size-triple", lambda: mask_pool(F4, M4, size=(1, 2, 3)), ValueError, "`size`"),
    ("mp-features-nan", lambda: mask_pool(_with(F4, (0, 0, 0, 0), nan), M4), ValueError, "`features`"),
    ("mp-masks-inf", lambda: mask_pool(F4, _with(M4, (0, 0, 0, 0), math.inf), backend="reference"), ValueError,
     "`masks`"),
    ("mp-counts", lambda: mask_pool(F4, M4, return_counts="yes"), TypeError, "`return_counts`"),
    ("sm-x-list", lambda: sparsemax([1.0, 2.0]), TypeError, "`x`"),
    ("sm-dim", lambda: sparsemax(X, dim=2), ValueError, "`dim`"),
    ("sm-nan", lambda: sparsemax(_with(X, (0, 0), nan)), ValueError, "'x'"),  # the C++ check names it
    ("sm-nan-ref", lambda: sparsemax(_with(X, (0, 0), nan), backend="reference"), ValueError, "`x`"),
    ("sm-all-neg-inf", lambda: sparsemax(_with(X, 3, -math.inf)), ValueError, "'x'"),
    ("sm-dim-none", lambda: sparsemax(X, dim=None), TypeError, "`dim`"),
    ("dl-query-1d", lambda: dict_lookup(Q[0], KEYS, VALS), ValueError, "`query`"),
    ("dl-keys-c", lambda: dict_lookup(Q, KEYS[:, :5], VALS), ValueError, "`keys`"),
    ("dl-values-m", lambda: dict_lookup(Q, KEYS, VALS[:7]), ValueError, "`values`"),
    ("dl-mode", lambda: dict_lookup(Q, KEYS, VALS, mode="hard"), ValueError, "`mode`"),
    ("dl-mask-shape", lambda: dict_lookup(Q, KEYS, VALS, key_mask=torch.ones(9, dtype=torch.bool)), ValueError,
     "`key_mask`"),
    ("dl-scale", lambda: dict_lookup(Q, KEYS, VALS, scale=math.inf), ValueError, "`scale`"),
    ("dl-values-nan", lambda: dict_lookup(Q, KEYS, _with(VALS, (0, 0), nan)), ValueError, "`values`"),
    ("auroc-ragged", lambda: metrics.auroc([[0.1, 0.2], [0.3]], [0, 1]), ValueError, "`scores`"),
    ("auroc-labels-ragged", lambda: metrics.auroc([0.1, 0.2], [[0], [1, 0]]), ValueError, "`labels`"),
    ("auroc-labels", lambda: metrics.auroc([0.1, 0.2, 0.3], [0, 1, 2]), ValueError, "`labels`"),
    ("auroc-length", lambda: metrics.auroc([0.1, 0.2, 0.3], [0, 1]), ValueError, "`scores`"),
    ("auroc-nan", lambda: metrics.auroc([0.1, nan, 0.3], [0, 1, 1]), ValueError, "`scores`"),
    ("auroc-strings", lambda: metrics.auroc(["a", "b"], [0, 1]), TypeError, "`scores`"),
    ("auroc-none", lambda: metrics.auroc(None, [0, 1]), TypeError, "`scores`"),
    ("aupro-limit", lambda: metrics.aupro(MAPS, MASKS, fpr_limit=0.0), ValueError, "`fpr_limit`"),
    ("aupro-steps", lambda: metrics.aupro(MAPS, MASKS, num_thresholds=0), ValueError, "`num_thresholds`"),
    ("aupro-shape", lambda: metrics.aupro(MAPS, MASKS[:, :7]), ValueError, "`maps`"),
    ("aupro-nan", lambda: metrics.aupro(_with(MAPS, (0, 0, 0), nan), MASKS), ValueError, "`maps`"),
    ("region-iou", lambda: metrics.region_f1(MAPS, MASKS, iou=2.0), ValueError, "`iou`"),
    ("region-masks", lambda: metrics.region_f1(MAPS, MASKS * 3), ValueError, "`masks`"),
    ("metrics-backend", lambda: metrics.auroc([0.1, 0.2], [0, 1], backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("call,exc,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value), str(info.value)


# ---------------------------------------------------------------------------- fuzzing

ANY_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=4), st.tuples(st.integers(-2, 9), st.integers(-2, 9)))
FUZZ = settings(max_examples=30, deadline=None)


def _either_ok_or_named(call, *names: str) -> None:
    try:
        call()
    except metrics.UndefinedMetricError:
        pass  # valid arguments, no value for these data (e.g. one class only)
    except (ValueError, TypeError) as exc:
        assert any(name in str(exc) for name in names), str(exc)


@FUZZ
@given(k=ANY_SCALAR, scale=ANY_SCALAR)
def test_fuzz_nn_distance_scalars(k, scale):
    _either_ok_or_named(lambda: nn_distance(Q, B, k=k), "k")
    _either_ok_or_named(lambda: nn_distance(Q, B, k=2, scale=scale), "scale")


@FUZZ
@given(k=ANY_SCALAR, init=ANY_SCALAR, projection_dim=ANY_SCALAR)
def test_fuzz_kcenter_scalars(k, init, projection_dim):
    _either_ok_or_named(lambda: kcenter_greedy(X, k), "k")
    _either_ok_or_named(lambda: kcenter_greedy(X, 3, init=init), "init")
    _either_ok_or_named(lambda: kcenter_greedy(X, 3, projection_dim=projection_dim), "projection_dim")


@FUZZ
@given(size=ANY_SCALAR, threshold=ANY_SCALAR, eps=ANY_SCALAR)
def test_fuzz_mask_pool_scalars(size, threshold, eps):
    _either_ok_or_named(lambda: mask_pool(F4, M4, size=size), "size")
    _either_ok_or_named(lambda: mask_pool(F4, M4, threshold=threshold), "threshold")
    _either_ok_or_named(lambda: mask_pool(F4, M4, eps=eps), "eps")


@FUZZ
@given(dim=ANY_SCALAR, scale=ANY_SCALAR)
def test_fuzz_sparsemax_and_lookup_scalars(dim, scale):
    _either_ok_or_named(lambda: sparsemax(X, dim=dim), "dim")
    # a finite scale so large that logits overflow is reported as an infinite logit
    _either_ok_or_named(lambda: dict_lookup(Q, KEYS, VALS, scale=scale), "scale", "logit")


@FUZZ
@given(fpr_limit=ANY_SCALAR, num_thresholds=ANY_SCALAR, iou=ANY_SCALAR)
def test_fuzz_metric_scalars(fpr_limit, num_thresholds, iou):
    _either_ok_or_named(lambda: metrics.aupro(MAPS, MASKS, fpr_limit=fpr_limit, num_thresholds=50), "fpr_limit")
    _either_ok_or_named(lambda: metrics.aupro(MAPS, MASKS, num_thresholds=num_thresholds), "num_thresholds")
    _either_ok_or_named(lambda: metrics.region_f1(MAPS, MASKS, iou=iou, num_thresholds=20), "iou")


@FUZZ
@given(data=st.lists(st.one_of(st.floats(allow_nan=True), st.lists(st.floats(0, 1), max_size=2)), min_size=1,
                     max_size=5))
def test_fuzz_metric_sequences(data):
    labels = [i % 2 for i in range(len(data))]
    _either_ok_or_named(lambda: metrics.auroc(data, labels), "scores")
