"""fastad.metrics against scikit-learn, against straightforward per-threshold loops
written here, against line-for-line ports of the papers' metric code (scipy in place
of skimage for the connected components), and hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from fastad import _ext
from fastad import metrics
from fastad.metrics import UndefinedMetricError, _reference

from conftest import compiled_isas, requires_cpu_ext, requires_cuda

TOL = 1e-6
STRUCT8 = np.ones((3, 3), dtype=int)


# --- straightforward references -------------------------------------------------------

def loop_curves(s: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """AUROC, AP, F1-max by evaluating `score >= t` at every distinct score t."""
    s, y = s.astype(np.float64).ravel(), y.astype(bool).ravel()
    P, N = y.sum(), (~y).sum()
    fpr, tpr, ap, f1 = [0.0], [0.0], 0.0, 0.0
    prev_recall = 0.0
    for t in np.unique(s)[::-1]:
        pred = s >= t
        tp, fp = (pred & y).sum(), (pred & ~y).sum()
        fpr.append(fp / N if N else math.nan)
        tpr.append(tp / P)
        if tp:
            recall, precision = tp / P, tp / (tp + fp)
            ap += (recall - prev_recall) * precision
            prev_recall = recall
            f1 = max(f1, 2 * precision * recall / (precision + recall))
    return float(np.trapezoid(tpr, fpr)) if N else math.nan, ap, f1


def mvtec_trapezoid(x, y, x_max):
    """`trapezoid` of the MVTec AD evaluation code."""
    x, y = np.asarray(x), np.asarray(y)
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    mask = x <= x_max
    x, y = x[mask], y[mask]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def loop_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """PRO curve by evaluating every distinct threshold separately."""
    regions = []
    for m in masks:
        lab, n = ndimage.label(m, STRUCT8)
        regions.append([lab == k + 1 for k in range(n)])
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, rs in enumerate(regions) for r in rs]))
    fprs.append(1.0)
    pros.append(1.0)
    return mvtec_trapezoid(fprs, pros, limit) / limit


def cal_pro_score(masks, amaps, max_step=200, expect_fpr=0.3):
    """cflow-ad style PRO as DictAS ships it, line for line (scipy labels, 8-connected
    as skimage.measure.label's default, instead of skimage regionprops)."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs, ths = [], [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            lab, n = ndimage.label(mask, STRUCT8)
            for k in range(1, n + 1):
                region = lab == k
                tp_pixels = binary_amap[region].sum()
                pro.append(tp_pixels / region.sum())
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fpr = fp_pixels / inverse_masks.sum()
        pros.append(np.array(pro).mean())
        fprs.append(fpr)
        ths.append(th)
    pros, fprs, ths = np.array(pros), np.array(fprs), np.array(ths)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return sk_auc(fprs, pros[idxes])


def saa_region_f1(labeled_imgs, score_imgs, pro_thresh=0.6, max_steps=200):
    """SAA+ calculate_max_f1_region, line for line (scipy labels and find_objects
    boxes instead of skimage regionprops)."""
    labeled_imgs = np.array(labeled_imgs).astype(bool)
    max_th = score_imgs.max()
    min_th = score_imgs.min()
    delta = (max_th - min_th) / max_steps
    f1_list = []
    binary_score_maps = np.zeros_like(score_imgs, dtype=bool)
    for step in range(max_steps):
        thred = max_th - step * delta
        binary_score_maps[score_imgs <= thred] = 0
        binary_score_maps[score_imgs > thred] = 1
        pro = []
        predict_region_number = 0
        gt_region_number = 0
        for i in range(len(binary_score_maps)):
            props = ndimage.find_objects(ndimage.label(labeled_imgs[i], STRUCT8)[0])
            score_props = ndimage.find_objects(ndimage.label(binary_score_maps[i], STRUCT8)[0])
            predict_region_number += len(score_props)
            gt_region_number += len(props)
            for sp in score_props:
                cur_pros = [0]
                for gp in props:
                    x_min, x_max = min(sp[0].start, gp[0].start), max(sp[0].stop, gp[0].stop)
                    y_min, y_max = min(sp[1].start, gp[1].start), max(sp[1].stop, gp[1].stop)
                    cropped_pred_label = binary_score_maps[i][x_min:x_max, y_min:y_max]
                    cropped_gt_label = labeled_imgs[i][x_min:x_max, y_min:y_max]
                    intersection = np.logical_and(cropped_pred_label, cropped_gt_label).astype(np.float32).sum()
                    union = np.logical_or(cropped_pred_label, cropped_gt_label).astype(np.float32).sum()
                    cur_pros.append(intersection / union)
                pro.append(max(cur_pros))
        pro = np.array(pro)
        if gt_region_number == 0 or predict_region_number == 0:
            f1 = 0
        else:
            recall = np.array(pro >= pro_thresh).astype(np.float32).sum() / gt_region_number
            precision = np.array(pro >= pro_thresh).astype(np.float32).sum() / predict_region_number
            f1 = 0 if recall == 0 or precision == 0 else 2 * recall * precision / (recall + precision)
        f1_list.append(f1)
    return float(np.array(f1_list).max())


# --- data -------------------------------------------------------------------------------

def scores_labels(n: int, seed: int, ties: bool, pos: float = 0.3):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(n).astype(np.float32)
    if ties:
        s = np.round(s * 3).astype(np.float32) / 3
    y = (rng.random(n) < pos).astype(np.uint8)
    y[0], y[-1] = 1, 0  # both classes present
    s[y == 1] += 0.7
    return s, y


def maps_masks(n: int, h: int, w: int, seed: int, smooth: float = 2.0, quantise: int | None = None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        if i % 2 == 0 and n > 1:
            continue
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            ry, rx = rng.uniform(1, max(1.5, h / 5)), rng.uniform(1, max(1.5, w / 5))
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    noise = rng.standard_normal((n, h, w))
    if smooth:
        noise = ndimage.gaussian_filter(noise, (0, smooth, smooth))
        noise /= noise.std()
    maps = (noise + 1.5 * ndimage.gaussian_filter(masks.astype(float), (0, 1.5, 1.5))).astype(np.float32)
    if quantise:
        maps = (np.round(maps * quantise) / quantise).astype(np.float32)
    if masks.sum() == 0:
        masks[0, h // 2, w // 2] = 1
    if masks.sum() == masks.size:
        masks[0, 0, 0] = 0
    return maps, masks


# the C++ kernels once per compiled ISA variant, and the PyTorch reference
BACKENDS = [f"cpu-{isa}" for isa in compiled_isas()] + ["reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "reference":
        yield "reference"
        return
    before = _ext._C.cpu_isa()
    _ext._C.set_cpu_isa(request.param[4:])
    yield "cpu"
    _ext._C.set_cpu_isa(before)


# --- AUROC / AP / F1-max -------------------------------------------------------------------

@pytest.mark.parametrize("n,ties,pos", [(2, False, 0.5), (7, False, 0.3), (7, True, 0.5), (513, False, 0.3),
                                         (513, True, 0.1), (4000, True, 0.9), (20000, False, 0.02)])
def test_curves_match_sklearn_and_loops(backend, n, ties, pos):
    s, y = scores_labels(n, n + 7 * ties, ties, pos)
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.max(np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0))
    got = (metrics.auroc(s, y, backend=backend), metrics.average_precision(s, y, backend=backend),
           metrics.f1_max(s, y, backend=backend))
    assert got == pytest.approx((roc_auc_score(y, s), average_precision_score(y, s), f1), abs=TOL)
    if n <= 513:
        assert got == pytest.approx(loop_curves(s, y), abs=TOL)
    assert all(isinstance(v, float) for v in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_curves_dtypes_and_tensor_inputs(backend, dtype):
    s, y = scores_labels(777, 3, ties=False)
    t = torch.from_numpy(s).to(dtype)
    ref = t.double().numpy()  # the scores the metric sees, exactly
    for labels in (torch.from_numpy(y).bool(), torch.from_numpy(y).float(), y.astype(np.int64), y.tolist()):
        assert metrics.auroc(t, labels, backend=backend) == pytest.approx(roc_auc_score(y, ref), abs=TOL)
        assert metrics.average_precision(t, labels, backend=backend) == pytest.approx(
            average_precision_score(y, ref), abs=TOL)


def test_curves_on_maps_are_flattened(backend):
    maps, masks = maps_masks(3, 9, 11, 0, quantise=4)
    want = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.auroc(maps, masks, backend=backend) == pytest.approx(want, abs=TOL)
    assert metrics.auroc(maps[:, None], masks, backend=backend) == pytest.approx(want, abs=TOL)


def test_negative_zero_ties_with_zero(backend):
    s = np.array([0.0, -0.0, 0.0, -0.0, 1.0, -1.0], np.float32)
    y = np.array([1, 0, 0, 1, 1, 0], np.uint8)
    assert metrics.auroc(s, y, backend=backend) == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert metrics.average_precision(s, y, backend=backend) == pytest.approx(average_precision_score(y, s), abs=TOL)


def test_extreme_values(backend):
    s = np.array([3e38, -3e38, 1e-45, -1e-45, 0.0, 5.0, 5.0, -2.0], np.float32)
    y = np.array([1, 0, 1, 0, 0, 1, 0, 1], np.uint8)
    assert metrics.auroc(s, y, backend=backend) == pytest.approx(roc_auc_score(y, s), abs=TOL)
    d = np.array([1e308, -1e308, 5e-324, 0.0, 1.0, 1.0], np.float64)
    yd = np.array([1, 0, 1, 0, 1, 0], np.uint8)
    assert metrics.auroc(d, yd, backend=backend) == pytest.approx(roc_auc_score(yd, d), abs=TOL)


@pytest.mark.parametrize("num", [2, 5, 64])
def test_binned_curves(backend, num):
    s, y = scores_labels(1001, num, ties=False)
    grid = np.linspace(s.min(), s.max(), num)
    q = grid[np.searchsorted(grid, s.astype(np.float64), side="right") - 1]  # rounded down to the grid
    want = loop_curves(q, y)
    got = (metrics.auroc(s, y, num_thresholds=num, backend=backend),
           metrics.average_precision(s, y, num_thresholds=num, backend=backend),
           metrics.f1_max(s, y, num_thresholds=num, backend=backend))
    assert got == pytest.approx(want, abs=TOL)


@requires_cpu_ext
def test_curves_large_cpu_matches_reference():
    # enough positives (> 2^22) for the shared atomic counters and several radix passes
    rng = np.random.default_rng(5)
    n = 5_000_000
    s = (rng.integers(0, 1 << 20, n) / (1 << 12)).astype(np.float32)
    y = (rng.random(n) < 0.9).astype(np.uint8)
    got = _ext._C.metrics_curve_stats(s, y, 2)
    want = _reference.curve_stats(torch.from_numpy(s), torch.from_numpy(y))
    assert got[:3] == pytest.approx(want[:3], abs=1e-9)
    assert got[3:5] == want[3:5]


def test_curve_degenerate_cases(backend):
    y = np.array([0, 1, 0, 1], np.uint8)
    const = np.full(4, 0.25, np.float32)
    assert metrics.auroc(const, y, backend=backend) == 0.5
    assert metrics.average_precision(const, y, backend=backend) == pytest.approx(0.5)
    assert metrics.f1_max(const, y, backend=backend) == pytest.approx(2 * 2 / (2 * 2 + 2))
    ones = np.ones(4, np.uint8)
    assert metrics.average_precision(np.arange(4.0), ones, backend=backend) == 1.0
    assert metrics.f1_max(np.arange(4.0), ones, backend=backend) == 1.0
    with pytest.raises(UndefinedMetricError, match="negative"):
        metrics.auroc(np.arange(4.0), ones, backend=backend)
    for fn in (metrics.auroc, metrics.average_precision, metrics.f1_max):
        with pytest.raises(UndefinedMetricError, match="positive"):
            fn(np.arange(4.0), np.zeros(4), backend=backend)
    with pytest.raises(UndefinedMetricError):
        metrics.auroc([0.5], [1], backend=backend)
    assert metrics.average_precision([0.5], [1], backend=backend) == 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_scores_raise(backend, bad):
    s, y = scores_labels(50, 1, ties=False)
    s[17] = bad
    with pytest.raises(ValueError, match="fastad.metrics.auroc: `scores` contains .*NaN or infinite"):
        metrics.auroc(s, y, backend=backend)
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.auroc(s, y, num_thresholds=10, backend=backend)


def test_invalid_inputs_raise_clear_errors():
    s, y = scores_labels(20, 2, ties=False)
    with pytest.raises(ValueError, match=r"`labels` must be binary.*int64"):
        metrics.auroc(s, y.astype(np.int64) * 2)
    with pytest.raises(ValueError, match="`labels` must be binary"):
        metrics.auroc(s, np.where(y, 0.5, 0.0))
    with pytest.raises(ValueError, match="same shape.*\\(20,\\).*\\(19,\\)"):
        metrics.auroc(s, y[:19])
    with pytest.raises(ValueError, match="empty"):
        metrics.auroc(np.zeros(0, np.float32), np.zeros(0, np.uint8))
    with pytest.raises(TypeError, match="required"):
        metrics.auroc(None, y)
    with pytest.raises(ValueError, match="num_thresholds"):
        metrics.auroc(s, y, num_thresholds=1)
    with pytest.raises(ValueError, match="unknown backend"):
        metrics.auroc(s, y, backend="gpu")


@requires_cpu_ext
def test_cpp_entry_points_check_arguments():
    C = _ext._C
    s = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="metrics_curve_stats: argument 'scores' must be float32 or float64"):
        C.metrics_curve_stats(s.astype(np.int32), np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="argument 'labels' must have shape"):
        C.metrics_curve_stats(s, np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="C-contiguous"):
        C.metrics_curve_stats(np.zeros(8, np.float32)[::2], np.zeros(4, np.uint8))
    assert C.metrics_curve_stats(s, np.full(4, 3, np.uint8))[6] == 4  # counted, Python raises
    with pytest.raises(ValueError, match="only 0 and 1"):
        C.metrics_label_components(np.full((1, 2, 2), 2, np.uint8))
    lab, cnt, areas = C.metrics_label_components(np.ones((1, 2, 2), np.uint8))
    m = np.zeros((1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="labels of image 0"):
        C.metrics_aupro_exact(m, np.full((1, 2, 2), 5, np.int32), cnt, areas, 0.3)
    with pytest.raises(ValueError, match="region_counts sum"):
        C.metrics_aupro_exact(m, lab, np.array([2]), areas, 0.3)
    with pytest.raises(ValueError, match="fpr_limit"):
        C.metrics_aupro_exact(m, lab, cnt, areas, 1.5)
    with pytest.raises(ValueError, match="ascending"):
        C.metrics_pro_thresholds(m, lab, cnt, areas, np.array([2.0, 1.0]))
    with pytest.raises(ValueError, match="float64"):
        C.metrics_region_f1(m, lab, cnt, np.array([1.0], np.float32), 0.6)


# --- connected components ---------------------------------------------------------------

@requires_cpu_ext
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 7), (2, 7, 1), (4, 13, 513), (2, 64, 64)])
def test_components_match_scipy(cpu_isa, shape):
    rng = np.random.default_rng(shape[2])
    masks = (rng.random(shape) < 0.45).astype(np.uint8)
    lab, cnt, areas = _ext._C.metrics_label_components(masks, 2)
    for i in range(shape[0]):
        want, n = ndimage.label(masks[i], STRUCT8)
        assert cnt[i] == n
        assert np.array_equal(lab[i], want)  # same numbering: raster order of first pixels
    want_areas = [np.bincount(ndimage.label(m, STRUCT8)[0].ravel())[1:] for m in masks]
    assert np.array_equal(areas, np.concatenate(want_areas))


def test_components_join_diagonal_neighbours():
    m = np.zeros((1, 9, 9), np.uint8)
    m[0, np.arange(9), np.arange(9)] = 1  # the main diagonal: one 8-connected region
    m[0, 0, 8] = m[0, 1, 7] = 1           # a second one on the anti-diagonal
    for labels, counts, areas in [_reference.label_components(m)] + (
            [_ext._C.metrics_label_components(m)] if _ext._C is not None else []):
        assert counts.tolist() == [2]
        assert areas.tolist() == [9, 2]
        assert labels[0, 0, 0] == 1 and labels[0, 0, 8] == 2


# --- AUPRO ----------------------------------------------------------------------------------

def test_aupro_two_regions_by_hand(backend):
    # 1 x 2 x 4 maps: region A = pixel 0 (area 1), region B = pixels 2..3 (area 2),
    # normal pixels 1, 4..7. Scores: A 0.9; B 0.8 and 0.1; normals 0.7, 0.6, 0.5, 0.4, 0.3.
    maps = np.array([[[0.9, 0.7, 0.8, 0.1], [0.6, 0.5, 0.4, 0.3]]], np.float32)
    masks = np.array([[[1, 0, 1, 1], [0, 0, 0, 0]]], np.uint8)
    # distinct thresholds, descending: FPR (of 5 normals) and PRO = mean(A, B) overlap
    # 0.9: (0, 0.5)  0.8: (0, 0.75)  0.7: (0.2, 0.75)  0.6: (0.4, 0.75) ... 0.1: (1, 1)
    # integrate to 0.3: 0->0: 0; 0->0.2 at 0.75: 0.15; 0.2->0.3 at 0.75: 0.075 -> 0.225
    assert metrics.aupro(maps, masks, backend=backend) == pytest.approx(0.225 / 0.3, abs=TOL)
    # to 0.5: + 0.3->0.4: 0.075, 0.4->0.5: 0.075 -> 0.375 / 0.5
    assert metrics.aupro(maps, masks, fpr_limit=0.5, backend=backend) == pytest.approx(0.75, abs=TOL)
    assert metrics.aupro(maps, masks, fpr_limit=1.0, backend=backend) == pytest.approx(
        loop_aupro(maps, masks, 1.0), abs=TOL)


@pytest.mark.parametrize("case,limit", [
    ((1, 1, 7, 0, None), 0.3), ((1, 1, 7, 0, None), 1.0), ((3, 7, 5, 2, None), 0.3), ((3, 7, 5, 2, None), 0.05),
    ((3, 7, 5, 2, None), 1.0), ((4, 16, 13, 0, 3), 0.3), ((4, 16, 13, 0, 3), 0.05), ((4, 16, 13, 0, 3), 1.0),
    ((6, 24, 40, 1, None), 0.3), ((2, 9, 513, 0, 8), 0.3)])
def test_aupro_exact_matches_loop(backend, case, limit):
    n, h, w, smooth, quantise = case
    maps, masks = maps_masks(n, h, w, seed=h * w + n, smooth=smooth, quantise=quantise)
    assert metrics.aupro(maps, masks, fpr_limit=limit, backend=backend) == pytest.approx(
        loop_aupro(maps, masks, limit), abs=TOL)


@pytest.mark.parametrize("limit", [0.3, 1.0])
def test_aupro_exact_larger_matches_mvtec_port(limit):
    # > 8192 anomalous pixels above the cut: the C++ walk runs on several threads
    maps, masks = maps_masks(64, 80, 80, seed=9, smooth=3)
    want = _reference.aupro_exact(torch.from_numpy(maps), *_global(masks), limit)
    assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(want, abs=TOL)
    assert metrics.aupro(torch.from_numpy(maps).half(), masks) == pytest.approx(
        metrics.aupro(torch.from_numpy(maps).half().float(), masks), abs=1e-12)


def _global(masks):
    lab, cnt, areas = _reference.label_components(masks)
    return _reference.global_labels(torch.from_numpy(lab), torch.from_numpy(cnt)), torch.from_numpy(areas)


@pytest.mark.parametrize("case", [(1, 12, 9, 0), (4, 20, 17, 2), (5, 33, 31, 1)])
@pytest.mark.parametrize("steps", [200, 17])
def test_aupro_thresholds_match_cflow_code(backend, case, steps):
    n, h, w, smooth = case
    maps, masks = maps_masks(n, h, w, seed=n + h, smooth=smooth)
    want = cal_pro_score(masks, maps, max_step=steps)
    assert metrics.aupro(maps, masks, num_thresholds=steps, backend=backend) == pytest.approx(want, abs=TOL)
    d = maps.astype(np.float64)
    assert metrics.aupro(d, masks, num_thresholds=steps, backend=backend) == pytest.approx(
        cal_pro_score(masks, d, max_step=steps), abs=TOL)


def test_aupro_degenerate_cases(backend):
    maps, masks = maps_masks(2, 8, 8, 0)
    with pytest.raises(UndefinedMetricError, match="anomalous"):
        metrics.aupro(maps, np.zeros_like(masks), backend=backend)
    with pytest.raises(UndefinedMetricError, match="normal"):
        metrics.aupro(maps, np.ones_like(masks), backend=backend)
    const = np.full_like(maps, 0.5)
    assert metrics.aupro(const, masks, backend=backend) == pytest.approx(0.15)  # one step (0,0)->(1,1)
    with pytest.raises(UndefinedMetricError, match="constant"):
        metrics.aupro(const, masks, num_thresholds=200, backend=backend)
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="`maps` contains .*NaN"):
        metrics.aupro(bad, masks, backend=backend)
    with pytest.raises(ValueError, match="`masks` must be binary"):
        metrics.aupro(maps, masks * 3, backend=backend)
    with pytest.raises(ValueError, match="same shape"):
        metrics.aupro(maps, masks[:, :-1], backend=backend)
    with pytest.raises(ValueError, match=r"\(H, W\), \(N, H, W\)"):
        metrics.aupro(maps.ravel(), masks.ravel(), backend=backend)
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(maps, masks, fpr_limit=0.0, backend=backend)


# --- region F1 ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [(1, 9, 11, 2), (4, 20, 17, 2), (3, 24, 40, 0), (6, 16, 16, 1)])
@pytest.mark.parametrize("iou,steps", [(0.6, 200), (0.3, 23)])
def test_region_f1_matches_saa_code(backend, case, iou, steps):
    n, h, w, smooth = case
    maps, masks = maps_masks(n, h, w, seed=n * h + w, smooth=smooth)
    want = saa_region_f1(masks, maps, pro_thresh=iou, max_steps=steps)
    assert metrics.region_f1(maps, masks, iou=iou, num_thresholds=steps, backend=backend) == pytest.approx(
        want, abs=TOL)


def test_region_f1_crops_whole_masks_as_saa_does(backend):
    # a predicted speck next to a well-predicted region: inside the union of the two
    # boxes the whole prediction overlaps the whole ground truth, so SAA+ counts it
    maps = np.zeros((1, 6, 12), np.float32)
    masks = np.zeros((1, 6, 12), np.uint8)
    masks[0, 1:5, 1:6] = 1
    maps[0, 1:5, 1:6] = 1.0
    maps[0, 0, 7] = 1.0
    # both predicted regions hit the one ground-truth region: recall 2 / 1, precision 1
    assert saa_region_f1(masks, maps, max_steps=4) == pytest.approx(4 / 3, abs=1e-6)
    assert metrics.region_f1(maps, masks, num_thresholds=4, backend=backend) == pytest.approx(
        saa_region_f1(masks, maps, max_steps=4), abs=TOL)


def test_region_f1_degenerate_cases(backend):
    maps, masks = maps_masks(2, 8, 8, 0)
    with pytest.raises(UndefinedMetricError, match="anomalous"):
        metrics.region_f1(maps, np.zeros_like(masks), backend=backend)
    assert metrics.region_f1(np.full_like(maps, 2.0), masks, backend=backend) == 0.0
    with pytest.raises(ValueError, match="iou"):
        metrics.region_f1(maps, masks, iou=0.0, backend=backend)
    with pytest.raises(ValueError, match="num_thresholds"):
        metrics.region_f1(maps, masks, num_thresholds=0, backend=backend)


# --- evaluate, fallbacks, devices ---------------------------------------------------------

def test_evaluate_returns_every_metric(backend):
    maps, masks = maps_masks(6, 20, 24, 3)
    scores = maps.reshape(6, -1).max(1)
    labels = masks.reshape(6, -1).max(1)
    out = metrics.evaluate(scores, maps, None, masks, progress=False, backend=backend)
    assert set(out) == {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
                        "aupro", "aupro_200", "region_f1"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=TOL)
    assert out["aupro"] == pytest.approx(metrics.aupro(maps, masks), abs=TOL)
    assert out["aupro_200"] == pytest.approx(metrics.aupro(maps, masks, num_thresholds=200), abs=TOL)
    assert out["region_f1"] == pytest.approx(metrics.region_f1(maps, masks), abs=TOL)
    only_image = metrics.evaluate(scores, None, labels, None, progress=False, backend=backend)
    assert set(only_image) == {"image_auroc", "image_ap", "image_f1_max"}
    some = metrics.evaluate(None, maps, None, masks, pro_thresholds=None, region_iou=None, progress=False,
                            pixel_thresholds=16, backend=backend)
    assert set(some) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"}


def test_evaluate_undefined_values(backend, capsys):
    maps, masks = maps_masks(4, 10, 10, 1)
    masks[0::2] = 0
    masks[1::2, 0, 0] = 1  # every image anomalous
    masks[0::2, 0, 0] = 1
    scores = maps.reshape(4, -1).max(1)
    with pytest.raises(UndefinedMetricError):
        metrics.evaluate(scores, maps, None, masks, progress=False, backend=backend)
    out = metrics.evaluate(scores, maps, None, masks, undefined="nan", progress=True, backend=backend)
    assert math.isnan(out["image_auroc"]) and not math.isnan(out["image_ap"])
    assert not math.isnan(out["aupro"])
    with pytest.raises(ValueError, match="NaN"):
        metrics.evaluate(scores * np.nan, maps, None, masks, undefined="nan", progress=False, backend=backend)


def test_fallback_without_extension(monkeypatch):
    maps, masks = maps_masks(4, 16, 12, 2)
    want = metrics.evaluate(maps.reshape(4, -1).max(1), maps, None, masks, progress=False)
    monkeypatch.setattr(_ext, "_C", None)
    got = metrics.evaluate(maps.reshape(4, -1).max(1), maps, None, masks, progress=False)
    assert got == pytest.approx(want, abs=TOL)
    from fastad import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="'cpu' is unavailable"):
        metrics.auroc(maps, masks, backend="cpu")


@requires_cuda
def test_cuda_inputs_use_the_reference_on_the_gpu():
    maps, masks = maps_masks(4, 32, 24, 4)
    tm, tg = torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda()
    assert metrics.auroc(tm, tg) == pytest.approx(metrics.auroc(maps, masks), abs=TOL)
    assert metrics.aupro(tm, tg) == pytest.approx(metrics.aupro(maps, masks), abs=TOL)
    assert metrics.aupro(tm, tg, num_thresholds=200) == pytest.approx(
        metrics.aupro(maps, masks, num_thresholds=200), abs=TOL)
    assert metrics.region_f1(tm, tg) == pytest.approx(metrics.region_f1(maps, masks), abs=TOL)
