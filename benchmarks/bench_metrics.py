"""fastad.metrics side by side with what the papers' code and the libraries compute.

Peers:
  * anomalib 2.7 ``_AUPRO`` (exact AUPRO: one global torch sort; regions with OpenCV)
    and ``anomalib.metrics.AUROC`` (torchmetrics) where anomalib is installed;
  * scikit-learn ``roc_auc_score`` (pixel AUROC);
  * ``cal_pro_score`` below: the cflow-ad style 200-threshold AUPRO, line for line as
    DictAS ships it (xiaozhen228/DictAS, models/metric_and_visualization.py; the
    InCTRL / APRIL-GAN family's metrics.py is the same code): per threshold, every
    ground-truth mask is relabelled with skimage and every region's overlap summed;
  * ``calculate_max_f1_region`` below: SAA+'s region F1 (caoyunkang/Segment-Any-Anomaly,
    utils/metrics.py), line for line: both the masks and the binarised maps are
    relabelled with skimage at each of the 200 thresholds.
Every group first checks that fastad's value equals the peer's to 1e-4.

Data: smooth random anomaly maps (Gaussian-filtered noise plus a bump on the
anomalies) and elliptical ground-truth regions on every other image, 256 x 256.
Sizes: quick = 100 maps (pixel AUROC: 200 maps, region F1: 50 maps); full = 100 and
1,000 maps (and 50 for region F1; its SAA+ peer is skipped at 1,000 maps).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastad import metrics

SIDE = 256


def _maps(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    maps = np.empty((n, SIDE, SIDE), np.float32)
    masks = np.zeros((n, SIDE, SIDE), np.uint8)
    for i in range(n):
        if i % 2:
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.integers(0, SIDE, 2)
                ry, rx = rng.integers(3, SIDE // 8, 2)
                masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
        noise = gaussian_filter(rng.standard_normal((SIDE, SIDE)), 4)
        maps[i] = noise / noise.std() + 1.5 * gaussian_filter(masks[i].astype(np.float64), 3)
    return maps, masks


_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def data(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n not in _CACHE:
        _CACHE[n] = _maps(n)
    return _CACHE[n]


# --- peers written line for line --------------------------------------------------

def cal_pro_score(masks, amaps, max_step=200, expect_fpr=0.3):
    # cflow-ad style PRO as DictAS (models/metric_and_visualization.py) ships it
    from skimage import measure
    from sklearn.metrics import auc

    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs, ths = [], [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pro.append(tp_pixels / region.area)
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
    pro_auc = auc(fprs, pros[idxes])
    return pro_auc


def calculate_max_f1_region(labeled_imgs, score_imgs, pro_thresh=0.6, max_steps=200):
    # SAA+ (caoyunkang/Segment-Any-Anomaly, utils/metrics.py), prints removed
    from skimage import measure

    labeled_imgs = np.array(labeled_imgs)
    labeled_imgs = labeled_imgs.astype(bool)
    max_th = score_imgs.max()
    min_th = score_imgs.min()
    delta = (max_th - min_th) / max_steps
    f1_list = []
    recall_list = []
    precision_list = []
    binary_score_maps = np.zeros_like(score_imgs, dtype=bool)
    for step in range(max_steps):
        thred = max_th - step * delta
        binary_score_maps[score_imgs <= thred] = 0
        binary_score_maps[score_imgs > thred] = 1
        pro = []
        predict_region_number = 0
        gt_region_number = 0
        for i in range(len(binary_score_maps)):
            label_map = measure.label(labeled_imgs[i], connectivity=2)
            props = measure.regionprops(label_map)
            score_map = measure.label(binary_score_maps[i], connectivity=2)
            score_props = measure.regionprops(score_map)
            predict_region_number += len(score_props)
            gt_region_number += len(props)
            for score_prop in score_props:
                x_min_0, y_min_0, x_max_0, y_max_0 = score_prop.bbox
                cur_pros = [0]
                for prop in props:
                    x_min_1, y_min_1, x_max_1, y_max_1 = prop.bbox
                    x_min = min(x_min_0, x_min_1)
                    y_min = min(y_min_0, y_min_1)
                    x_max = max(x_max_0, x_max_1)
                    y_max = max(y_max_0, y_max_1)
                    cropped_pred_label = binary_score_maps[i][x_min:x_max, y_min:y_max]
                    cropped_gt_label = labeled_imgs[i][x_min:x_max, y_min:y_max]
                    intersection = np.logical_and(cropped_pred_label, cropped_gt_label).astype(np.float32).sum()
                    union = np.logical_or(cropped_pred_label, cropped_gt_label).astype(np.float32).sum()
                    cur_pros.append(intersection / union)
                pro.append(max(cur_pros))
        pro = np.array(pro)
        if gt_region_number == 0 or predict_region_number == 0:
            recall = 0
            precision = 0
            f1 = 0
        else:
            recall = np.array(pro >= pro_thresh).astype(np.float32).sum() / gt_region_number
            precision = np.array(pro >= pro_thresh).astype(np.float32).sum() / predict_region_number
            if recall == 0 or precision == 0:
                f1 = 0
            else:
                f1 = 2 * recall * precision / (recall + precision)
        f1_list.append(f1)
        recall_list.append(recall)
        precision_list.append(precision)
    f1_list = np.array(f1_list)
    return f1_list.max()


def anomalib_aupro(maps: torch.Tensor, masks: torch.Tensor) -> float:
    from anomalib.metrics.aupro import _AUPRO

    metric = _AUPRO(fpr_limit=0.3)
    metric.update(maps, masks)
    return float(metric.compute())


def anomalib_auroc(maps: torch.Tensor, masks: torch.Tensor) -> float:
    from anomalib.metrics import AUROC

    metric = AUROC(fields=["anomaly_map", "gt_mask"])
    metric.update(_Batch(maps, masks))
    return float(metric.compute())


class _Batch:
    def __init__(self, maps, masks):
        self.anomaly_map = maps
        self.gt_mask = masks


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _equal(ours: float, peer: float, what: str) -> None:
    assert abs(ours - peer) <= 1e-4, f"{what}: fastad {ours!r} != peer {peer!r}"


# --- benchmarks ---------------------------------------------------------------------
# One test per (problem, implementation); the fastad value of each problem is computed
# once and every peer must agree with it to 1e-4.

_OURS: dict[tuple, float] = {}


def ours(kind: str, n: int) -> float:
    key = (kind, n)
    if key not in _OURS:
        maps, masks = data(n)
        _OURS[key] = {
            "aupro": lambda: metrics.aupro(maps, masks),
            "aupro200": lambda: metrics.aupro(maps, masks, num_thresholds=200),
            "auroc": lambda: metrics.auroc(maps, masks),
            "region_f1": lambda: metrics.region_f1(maps, masks),
        }[kind]()
    return _OURS[key]


def _size(bench_size: str, n: int, quick: int) -> None:
    if bench_size == "quick" and n != quick:
        pytest.skip("full size only (--bench-size full)")


def _run(bench, kind: str, n: int, impl: str, fn, group: str, role: str, **kw) -> None:
    value = bench(fn, group=group, impl=impl, role=role, **kw)
    _equal(float(value), ours(kind, n), f"{group}: {impl}")


@pytest.mark.parametrize("impl", ["fastad", "anomalib"])
@pytest.mark.parametrize("n", [100, 1000])
def test_aupro_exact(bench, bench_size, n, impl):
    _size(bench_size, n, 100)
    maps, masks = data(n)
    group = f"aupro exact (fpr 0.3), {n}x{SIDE}x{SIDE}"
    if impl == "fastad":
        _run(bench, "aupro", n, "fastad cpu", lambda: metrics.aupro(maps, masks), group, "fastad")
    else:
        pytest.importorskip("anomalib")
        tm, tg = torch.from_numpy(maps), torch.from_numpy(masks)
        _run(bench, "aupro", n, "anomalib 2.7 _AUPRO", lambda: anomalib_aupro(tm, tg), group, "peer")


@pytest.mark.parametrize("impl", ["fastad", "cal_pro_score"])
@pytest.mark.parametrize("n", [100, 1000])
def test_aupro_200(bench, bench_size, n, impl):
    _size(bench_size, n, 100)
    maps, masks = data(n)
    group = f"aupro 200 thresholds (fpr 0.3), {n}x{SIDE}x{SIDE}"
    if impl == "fastad":
        _run(bench, "aupro200", n, "fastad cpu", lambda: metrics.aupro(maps, masks, num_thresholds=200), group,
             "fastad")
    else:
        pytest.importorskip("skimage")
        _run(bench, "aupro200", n, "cal_pro_score (cflow-ad / DictAS, per threshold)",
             lambda: cal_pro_score(masks, maps), group, "peer", memory=False)


@pytest.mark.parametrize("impl", ["fastad", "sklearn", "anomalib"])
@pytest.mark.parametrize("n", [200, 1000])
def test_pixel_auroc(bench, bench_size, n, impl):
    _size(bench_size, n, 200)
    maps, masks = data(n)
    group = f"pixel auroc, {n}x{SIDE}x{SIDE} ({n * SIDE * SIDE / 1e6:.1f}M pixels)"
    if impl == "fastad":
        _run(bench, "auroc", n, "fastad cpu", lambda: metrics.auroc(maps, masks), group, "fastad")
    elif impl == "sklearn":
        from sklearn.metrics import roc_auc_score

        flat_m, flat_g = maps.ravel(), masks.ravel()
        _run(bench, "auroc", n, "sklearn roc_auc_score", lambda: roc_auc_score(flat_g, flat_m), group, "peer")
    else:
        pytest.importorskip("anomalib")
        tm, tg = torch.from_numpy(maps), torch.from_numpy(masks)
        _run(bench, "auroc", n, "anomalib 2.7 AUROC", lambda: anomalib_auroc(tm, tg), group, "peer")


@pytest.mark.parametrize("impl", ["fastad", "saa"])
@pytest.mark.parametrize("n", [50, 100, 1000])
def test_region_f1(bench, bench_size, n, impl):
    _size(bench_size, n, 50)
    maps, masks = data(n)
    group = f"region f1 (SAA+, 200 thresholds), {n}x{SIDE}x{SIDE}"
    if impl == "fastad":
        _run(bench, "region_f1", n, "fastad cpu", lambda: metrics.region_f1(maps, masks), group, "fastad")
    else:
        pytest.importorskip("skimage")
        if n > 100:
            pytest.skip("the SAA+ code needs ~10 minutes at 1,000 maps")
        _run(bench, "region_f1", n, "calculate_max_f1_region (SAA+, per threshold)",
             lambda: calculate_max_f1_region(masks, maps), group, "peer", memory=False)


@pytest.mark.parametrize("n", [100, 1000])
def test_evaluate(bench, bench_size, n):
    _size(bench_size, n, 100)
    maps, masks = data(n)
    scores = maps.reshape(n, -1).max(axis=1)
    group = f"evaluate (all metrics), {n}x{SIDE}x{SIDE}"
    out = bench(lambda: metrics.evaluate(scores, maps, None, masks, progress=False), group=group,
                impl="fastad cpu", role="fastad")
    assert abs(out["aupro"] - ours("aupro", n)) <= 1e-12
