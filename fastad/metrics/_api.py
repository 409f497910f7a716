"""Public metric functions: validation, dispatch to the C++ kernels (CPU inputs,
fastad._C built) or to the PyTorch reference (CUDA inputs, or no fastad._C)."""
from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from fastad import _ext
from fastad.metrics import _reference as ref
from fastad.metrics._inputs import (
    UndefinedMetricError,
    binary_tensor,
    check_finite,
    maps_and_masks,
    nonfinite_error,
    numpy_view,
    same_layout,
    scores_tensor,
    use_cpp,
)

ArrayLike = Any  # torch.Tensor, numpy.ndarray or a nested sequence of numbers


# ---------------------------------------------------------------------------
# AUROC / AP / F1-max

def _curve(op: str, scores: ArrayLike, labels: ArrayLike, num_thresholds: int | None, backend: str | None,
           names: tuple[str, str] = ("scores", "labels")) -> tuple[float, float, float, int, int]:
    """(AUROC, AP, F1-max, positives, negatives); undefined values are NaN."""
    sname, yname = names
    s0 = scores_tensor(op, sname, scores)
    y = binary_tensor(op, yname, labels)
    same_layout(op, sname, s0, yname, y)
    s = s0.reshape(-1)
    y = y.reshape(-1)
    if y.device != s.device:
        y = y.to(s.device)
    thresholds = None
    if num_thresholds is not None:
        if not isinstance(num_thresholds, int) or num_thresholds < 2:
            raise ValueError(f"fastad.metrics.{op}: `num_thresholds` must be None (exact) or an int >= 2, "
                             f"got {num_thresholds!r}")
        check_finite(op, sname, s)
        lo, hi = torch.aminmax(s)
        thresholds = np.linspace(float(lo), float(hi), num_thresholds)
    if use_cpp(op, backend, s.device):
        if thresholds is None:
            out = _ext._C.metrics_curve_stats(numpy_view(s), numpy_view(y), _ext.num_threads())
        else:
            out = _ext._C.metrics_curve_stats_binned(numpy_view(s), numpy_view(y), thresholds, _ext.num_threads())
        auroc, ap, f1, P, N, nonfinite, bad = out
        if nonfinite:
            raise nonfinite_error(op, sname, s0, nonfinite)
        if bad:
            raise ValueError(f"fastad.metrics.{op}: `{yname}` must be binary (only 0 and 1)")
        return auroc, ap, f1, P, N
    check_finite(op, sname, s0)
    if thresholds is not None:
        s = ref.binned_bins(s, torch.from_numpy(thresholds))
    return ref.curve_stats(s, y)


def _need(op: str, P: int, N: int, *, neg: bool = True) -> None:
    """Raise UndefinedMetricError without positives (or, when ``neg``, negatives)."""
    if P == 0:
        raise UndefinedMetricError(f"fastad.metrics.{op}: undefined without positive (anomalous) samples")
    if neg and N == 0:
        raise UndefinedMetricError(f"fastad.metrics.{op}: undefined without negative (normal) samples")


_CURVE_DOC = """
    ``scores`` are image scores or whole anomaly maps, ``labels`` the matching 0/1
    labels or masks (bool, integer or float holding only 0 and 1), flattened together;
    torch tensors (CPU or CUDA) or numpy arrays. Exact: every distinct score is a
    threshold and a group of tied scores is one step, as in scikit-learn. With
    ``num_thresholds=n`` the scores are first rounded down to the grid
    ``linspace(min, max, n)`` (binned curve with predictions ``score >= threshold``).

    Raises ValueError on NaN / infinite scores or non-binary labels, and
    UndefinedMetricError (a ValueError) when {undefined}.
    Constant scores are one threshold step: {constant}.

    Backends: C++ for CPU inputs: negatives and positives become order-preserving
    integer keys, radix-sorted apart by parallel streaming passes, and the curve is
    walked over the distinct positive scores (a galloping search counts the negatives
    between them). Peak memory about 8 bytes per score for float32 scores (16 for
    float64); binned mode: O(num_thresholds). The PyTorch reference (torch.sort,
    ~30 bytes per score) runs CUDA inputs and builds without fastad._C.
"""


def auroc(scores: ArrayLike, labels: ArrayLike, *, num_thresholds: int | None = None,
          backend: str | None = None) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``; ties count one half).
    """
    auroc_, _, _, P, N = _curve("auroc", scores, labels, num_thresholds, backend)
    _need("auroc", P, N)
    return float(auroc_)


def average_precision(scores: ArrayLike, labels: ArrayLike, *, num_thresholds: int | None = None,
                      backend: str | None = None) -> float:
    """Average precision, sum over thresholds of (R_k - R_{k-1}) * P_k (scikit-learn's
    ``average_precision_score``, no interpolation).
    """
    _, ap, _, P, N = _curve("average_precision", scores, labels, num_thresholds, backend)
    _need("average_precision", P, N, neg=False)
    return float(ap)


def f1_max(scores: ArrayLike, labels: ArrayLike, *, num_thresholds: int | None = None,
           backend: str | None = None, return_threshold: bool = False) -> float | tuple[float, float]:
    """Largest F1 over all thresholds, 2 TP / (2 TP + FP + FN) (from scikit-learn's
    ``precision_recall_curve`` without the epsilon the papers' code adds: they differ
    by < 1e-8). With ``return_threshold=True`` returns ``(f1, threshold)``: predicting
    ``scores >= threshold`` as anomalous reaches the F1-max (the highest such threshold
    on ties; with ``num_thresholds`` a value of the grid).
    """
    _, _, f1, P, N = _curve("f1_max", scores, labels, num_thresholds, backend)
    _need("f1_max", P, N, neg=False)
    if not return_threshold:
        return float(f1)
    s = scores_tensor("f1_max", "scores", scores).reshape(-1)
    y = binary_tensor("f1_max", "labels", labels).reshape(-1).to(s.device)
    if num_thresholds is None:
        return float(f1), ref.f1_max_threshold(s, y)
    lo, hi = torch.aminmax(s)
    grid = torch.from_numpy(np.linspace(float(lo), float(hi), num_thresholds))
    bins = ref.binned_bins(s, grid)
    return float(f1), float(grid[int(round(ref.f1_max_threshold(bins.double(), y)))])


def _add_doc(fn, **kw: str) -> None:
    if fn.__doc__ is not None:  # None under python -OO
        fn.__doc__ += _CURVE_DOC.format(**kw)


_add_doc(auroc, undefined="there is no positive or no negative sample", constant="AUROC 0.5")
_add_doc(average_precision, undefined="there is no positive sample", constant="AP = fraction of positives")
_add_doc(f1_max, undefined="there is no positive sample", constant="F1 = 2 P / (2 P + N)")


# ---------------------------------------------------------------------------
# Regions of the ground truth

class _Regions:
    """8-connected regions of (N, H, W) masks, computed once on the CPU."""

    def __init__(self, op: str, masks: torch.Tensor, cpp: bool):
        m = numpy_view(masks.cpu())
        if cpp:
            labels, counts, areas = _ext._C.metrics_label_components(m, _ext.num_threads())
        else:
            labels, counts, areas = ref.label_components(m)
        self.labels = labels          # int32 (N, H, W), 1..R_i per image
        self.counts = counts          # int64 (N,)
        self.areas = areas            # int64 (R,)
        self.n_regions = int(areas.size)
        self.n_normal = int(m.size - int(areas.sum()))

    def global_labels(self, device: torch.device) -> torch.Tensor:
        return ref.global_labels(torch.from_numpy(self.labels).to(device), torch.from_numpy(self.counts))


def _cpp_components(backend: str | None) -> bool:
    """Connected components always run on the CPU: in C++ unless the reference is asked for."""
    return use_cpp("components", None if backend == "cpu" else backend, torch.device("cpu"))


def _need_regions(op: str, regions: _Regions) -> None:
    if regions.n_regions == 0:
        raise UndefinedMetricError(f"fastad.metrics.{op}: undefined without anomalous pixels in `masks`")
    if regions.n_normal == 0:
        raise UndefinedMetricError(f"fastad.metrics.{op}: undefined without normal pixels in `masks`")


def _aupro_exact(op: str, maps: torch.Tensor, regions: _Regions, fpr_limit: float, cpp: bool) -> float:
    _need_regions(op, regions)
    if cpp:
        value, nonfinite = _ext._C.metrics_aupro_exact(numpy_view(maps), regions.labels, regions.counts,
                                                       regions.areas, float(fpr_limit), _ext.num_threads())
        if nonfinite:
            raise nonfinite_error(op, "maps", maps, nonfinite)
        return float(value)
    check_finite(op, "maps", maps)
    areas = torch.from_numpy(regions.areas)
    return ref.aupro_exact(maps, regions.global_labels(maps.device), areas, float(fpr_limit))


def _np_scalar(maps: torch.Tensor, value: float) -> np.generic:
    """A map value (exactly representable) as a numpy scalar of the maps' dtype."""
    return np.dtype(str(maps.dtype).replace("torch.", "")).type(value)


def _sklearn_auc(x: np.ndarray, y: np.ndarray) -> float:
    """scikit-learn's ``metrics.auc``: trapezoid over monotonic x."""
    dx = np.diff(x)
    direction = 1.0
    if np.any(dx < 0):
        if np.all(dx <= 0):
            direction = -1.0
        else:
            raise UndefinedMetricError("x is neither increasing nor decreasing")
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    return float(direction * trapezoid(y, x))


def _aupro_thresholds(op: str, maps: torch.Tensor, regions: _Regions, fpr_limit: float, num_thresholds: int,
                      cpp: bool) -> float:
    _need_regions(op, regions)
    check_finite(op, "maps", maps)
    lo, hi = torch.aminmax(maps)
    min_th, max_th = _np_scalar(maps, float(lo)), _np_scalar(maps, float(hi))
    if min_th == max_th:
        raise UndefinedMetricError(f"fastad.metrics.{op}: undefined for constant maps with num_thresholds set "
                                   "(the threshold grid is empty)")
    delta = (max_th - min_th) / num_thresholds
    # the grid the cflow-ad style code walks; numpy makes it float64 even for float32 maps,
    # so the comparisons `map > th` are made in float64
    thresholds = np.arange(min_th, max_th, delta)
    if cpp:
        fp, pro, nonfinite = _ext._C.metrics_pro_thresholds(numpy_view(maps), regions.labels, regions.counts,
                                                            regions.areas, thresholds, _ext.num_threads())
    else:
        fp, pro = ref.pro_thresholds(maps, regions.global_labels(maps.device), torch.from_numpy(regions.areas),
                                     torch.from_numpy(thresholds))
    fprs = fp / regions.n_normal
    pros = pro / regions.n_regions
    keep = fprs < fpr_limit
    fprs, pros = fprs[keep], pros[keep]
    if fprs.size < 2 or fprs.max() == fprs.min():
        raise UndefinedMetricError(f"fastad.metrics.{op}: undefined: fewer than two distinct FPR values below "
                                   f"fpr_limit={fpr_limit} on the {thresholds.size}-threshold grid")
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return _sklearn_auc(fprs, pros)


def _check_limit(op: str, fpr_limit: float) -> None:
    if not isinstance(fpr_limit, (int, float)) or not 0.0 < float(fpr_limit) <= 1.0:
        raise ValueError(f"fastad.metrics.{op}: `fpr_limit` must be in (0, 1], got {fpr_limit!r}")


def _check_steps(op: str, name: str, n: Any) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"fastad.metrics.{op}: `{name}` must be a positive int, got {n!r}")


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3, num_thresholds: int | None = None, *,
          backend: str | None = None) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, divided by it.

    Regions are the 8-connected components of each ground-truth mask (as the MVTec AD
    evaluation code labels them); PRO at a threshold is the mean over all regions of
    the fraction of the region scored above it, plotted against the false-positive
    rate on the normal pixels.

    ``num_thresholds=None`` (exact) reproduces the MVTec AD evaluation scripts
    (``compute_pro`` + ``trapezoid`` of ``generic_util.py``; anomalib's ``AUPRO`` computes
    the same): the curve over every distinct score of one global sort, trapezoid up to
    ``fpr_limit`` with linear interpolation at the limit, divided by ``fpr_limit``.

    ``num_thresholds=n`` reproduces the cflow-ad style ``cal_pro_score(masks, amaps,
    max_step=n, expect_fpr=fpr_limit)`` that DictAS (``models/metric_and_visualization.py``)
    and the InCTRL / APRIL-GAN family report with n = 200: thresholds
    ``np.arange(min, max, (max - min) / n)`` in the maps' dtype, predictions
    ``map > th``, the points with FPR < ``fpr_limit`` kept, their FPR min-max rescaled
    to [0, 1] and integrated with scikit-learn's ``auc`` (so it is *not* divided by
    ``fpr_limit``).

    ``maps``: (H, W), (N, H, W) or (N, 1, H, W) float scores; ``masks``: the same
    shape, binary. Torch tensors (CPU or CUDA: regions are labelled on the CPU) or
    numpy arrays. Raises ValueError on NaN / infinite maps or non-binary masks and
    UndefinedMetricError when the masks have no anomalous or no normal pixel (and, for
    the threshold variant, when the grid yields fewer than two distinct FPR values
    below the limit, e.g. constant maps). Exact AUPRO of constant maps is defined:
    one step from (0, 0) to (1, 1), 0.15 at fpr_limit 0.3.

    Peak memory (C++): 4 bytes per pixel (region labels) plus, for the exact variant,
    8 bytes per normal pixel and 16 per anomalous pixel scoring near or above the FPR
    limit (only those are radix-sorted: a histogram of the top key bits finds the
    cut first), or O(num_thresholds) for the threshold variant.
    """
    op = "aupro"
    _check_limit(op, fpr_limit)
    if num_thresholds is not None:
        _check_steps(op, "num_thresholds", num_thresholds)
    m, g = maps_and_masks(op, maps, masks)
    cpp = use_cpp(op, backend, m.device)
    regions = _Regions(op, g, _cpp_components(backend))
    if num_thresholds is None:
        return _aupro_exact(op, m, regions, fpr_limit, cpp)
    return _aupro_thresholds(op, m, regions, fpr_limit, int(num_thresholds), cpp)


# ---------------------------------------------------------------------------
# Region F1 (SAA+)

def _region_f1(op: str, maps: torch.Tensor, regions: _Regions, iou: float, num_thresholds: int, cpp: bool) -> float:
    if regions.n_regions == 0:
        raise UndefinedMetricError(f"fastad.metrics.{op}: undefined without anomalous pixels in `masks`")
    check_finite(op, "maps", maps)
    m = numpy_view(maps.cpu())
    lo, hi = torch.aminmax(maps)
    min_th, max_th = _np_scalar(maps, float(lo)), _np_scalar(maps, float(hi))
    delta = (max_th - min_th) / num_thresholds
    # SAA+: thred = max_th - step * delta for step in range(max_steps), in the maps' dtype
    thresholds = max_th - np.arange(num_thresholds).astype(m.dtype) * delta
    if cpp:
        tp, npred, _ = _ext._C.metrics_region_f1(m, regions.labels, regions.counts,
                                                 np.ascontiguousarray(thresholds[::-1], dtype=np.float64), float(iou),
                                                 _ext.num_threads())
    else:
        tp, npred = ref.region_f1_counts(m, regions.labels, regions.counts, thresholds, float(iou))
    n_gt = regions.n_regions
    best = 0.0
    for hits, pred in zip(tp.tolist(), npred.tolist()):
        if pred == 0 or hits == 0:
            continue  # SAA+ scores such a threshold F1 = 0
        recall, precision = hits / n_gt, hits / pred
        best = max(best, 2 * recall * precision / (recall + precision))
    return best


def region_f1(maps: ArrayLike, masks: ArrayLike, iou: float = 0.6, num_thresholds: int = 200, *,
              backend: str | None = None) -> float:
    """Region-level F1-max as SAA+ defines it (``calculate_max_f1_region`` of
    caoyunkang/Segment-Any-Anomaly ``utils/metrics.py``).

    At each of ``num_thresholds`` thresholds ``max - k * (max - min) / num_thresholds``
    (k = 0..n-1, in the maps' dtype) the predicted regions are the 8-connected
    components of ``map > th``. A predicted region is a hit when, for some ground-truth
    region, the IoU of the *whole* binary prediction and the *whole* ground truth
    inside the union of the two bounding boxes is >= ``iou`` (SAA+ crops both full
    masks to that box, so nearby regions count too). recall = hits / #ground-truth
    regions, precision = hits / #predicted regions (a threshold with no hit or no
    prediction scores 0); the result is the largest F1 over the thresholds. As in
    SAA+, several predicted regions can hit one ground-truth region, so recall (and
    F1) can exceed 1.

    The ground-truth regions are labelled once and the predicted regions are grown
    with one union-find per image as the threshold falls (C++), instead of relabelling
    every map at every threshold. CUDA inputs are copied to the CPU. Peak memory
    (C++): about 4 bytes per pixel plus ~40 bytes per pixel of one map per thread.

    Raises ValueError on NaN / infinite maps or non-binary masks and
    UndefinedMetricError when the masks have no anomalous pixel. Constant maps
    predict nothing at any threshold: 0.0.
    """
    op = "region_f1"
    if not isinstance(iou, (int, float)) or not 0.0 < float(iou) <= 1.0:
        raise ValueError(f"fastad.metrics.{op}: `iou` must be in (0, 1], got {iou!r}")
    _check_steps(op, "num_thresholds", num_thresholds)
    m, g = maps_and_masks(op, maps, masks)
    cpp = use_cpp(op, backend, torch.device("cpu"))
    regions = _Regions(op, g, cpp)
    return _region_f1(op, m, regions, iou, int(num_thresholds), cpp)


# ---------------------------------------------------------------------------
# evaluate

def evaluate(scores: ArrayLike | None, maps: ArrayLike | None, labels: ArrayLike | None,
             masks: ArrayLike | None, *, fpr_limit: float = 0.3, pro_thresholds: int | None = 200,
             region_iou: float | None = 0.6, region_thresholds: int = 200, pixel_thresholds: int | None = None,
             undefined: Literal["raise", "nan"] = "raise", progress: bool = True,
             backend: str | None = None) -> dict[str, float]:
    """Every metric of the four papers in one call; returns a dict of Python floats.

    Image level (``scores`` (N,) vs ``labels`` (N,); ``labels=None`` takes "mask has
    an anomalous pixel"): ``image_auroc``, ``image_ap``, ``image_f1_max``.
    Pixel level (``maps`` vs ``masks``, as for :func:`aupro`): ``pixel_auroc``,
    ``pixel_ap``, ``pixel_f1_max`` (one sort for the three; binned with
    ``pixel_thresholds``), ``aupro`` (exact, MVTec AD), ``aupro_{n}`` for
    ``pro_thresholds=n`` (cflow-ad style, skipped when None) and ``region_f1``
    (SAA+, skipped when ``region_iou`` is None). The masks' regions are labelled once.
    ``scores`` or ``maps`` may be None to skip that level.

    ``undefined="nan"`` stores NaN for a metric these inputs leave undefined (e.g.
    no normal image) instead of raising UndefinedMetricError; invalid input (NaN
    scores, non-binary labels, shape mismatches) always raises. ``progress`` shows
    a tqdm bar over the metric groups.
    """
    from tqdm.auto import tqdm

    op = "evaluate"
    if undefined not in ("raise", "nan"):
        raise ValueError(f"fastad.metrics.{op}: `undefined` must be 'raise' or 'nan', got {undefined!r}")
    if scores is None and maps is None:
        raise ValueError(f"fastad.metrics.{op}: give `scores` (image level), `maps` (pixel level) or both")
    _check_limit(op, fpr_limit)
    if pro_thresholds is not None:
        _check_steps(op, "pro_thresholds", pro_thresholds)
    _check_steps(op, "region_thresholds", region_thresholds)

    results: dict[str, float] = {}

    def guarded(keys: tuple[str, ...], fn) -> None:
        try:
            values = fn()
        except UndefinedMetricError:
            if undefined == "raise":
                raise
            values = (math.nan,) * len(keys)
        results.update(zip(keys, (float(v) for v in values)))

    m = g = None
    if maps is not None:
        if masks is None:
            raise ValueError(f"fastad.metrics.{op}: `masks` is required with `maps`")
        m, g = maps_and_masks(op, maps, masks)
    if scores is not None and labels is None:
        if g is None:
            raise ValueError(f"fastad.metrics.{op}: `labels` is required without `masks`")
        labels = g.reshape(g.shape[0], -1).amax(dim=1)

    steps: list[tuple[str, Any]] = []

    def curve_level(prefix: str, s: Any, y: Any, n_thresholds: int | None, names: tuple[str, str]) -> None:
        a, ap, f1, P, N = _curve(op, s, y, n_thresholds, backend, names)

        def roc():
            _need(f"{op} ({prefix}_auroc)", P, N)
            return (a,)

        def pr():
            _need(f"{op} ({prefix}_ap)", P, N, neg=False)
            return ap, f1

        guarded((f"{prefix}_auroc",), roc)
        guarded((f"{prefix}_ap", f"{prefix}_f1_max"), pr)

    if scores is not None:
        steps.append(("image metrics", lambda: curve_level("image", scores, labels, None, ("scores", "labels"))))
    if m is not None:
        cpp = use_cpp(op, backend, m.device)
        state: dict[str, _Regions] = {}

        def components():
            state["regions"] = _Regions(op, g, _cpp_components(backend))

        steps += [("pixel metrics", lambda: curve_level("pixel", m, g, pixel_thresholds, ("maps", "masks"))),
                  ("connected components", components),
                  ("aupro", lambda: guarded(("aupro",), lambda: (_aupro_exact(op, m, state["regions"], fpr_limit,
                                                                               cpp),)))]
        if pro_thresholds is not None:
            key = f"aupro_{int(pro_thresholds)}"
            steps.append((key, lambda: guarded((key,), lambda: (_aupro_thresholds(
                op, m, state["regions"], fpr_limit, int(pro_thresholds), cpp),))))
        if region_iou is not None:
            if not isinstance(region_iou, (int, float)) or not 0.0 < float(region_iou) <= 1.0:
                raise ValueError(f"fastad.metrics.{op}: `region_iou` must be in (0, 1], got {region_iou!r}")
            cpp_cpu = use_cpp(op, backend, torch.device("cpu"))
            steps.append(("region_f1", lambda: guarded(("region_f1",), lambda: (_region_f1(
                op, m, state["regions"], float(region_iou), int(region_thresholds), cpp_cpu),))))

    # mininterval=0: a few slow steps, each shown as it starts and ends
    bar = tqdm(steps, desc="fastad.metrics.evaluate", disable=not progress, leave=False, mininterval=0)
    for name, fn in bar:
        bar.set_postfix_str(name)
        fn()
    return results
