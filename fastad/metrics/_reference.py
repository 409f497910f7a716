"""Plain PyTorch / numpy definitions of the metrics (any device), used when the C++
kernels cannot run (no fastad._C, CUDA tensors) and as what they are tested against.

All curves are built over distinct score values: a tie group is one threshold step.
"""
from __future__ import annotations

import numpy as np
import torch


def _group_ends(sorted_desc: torch.Tensor) -> torch.Tensor:
    """Mask of the last element of every run of equal values (-0.0 == +0.0)."""
    last = torch.ones_like(sorted_desc, dtype=torch.bool)
    last[:-1] = sorted_desc[1:] != sorted_desc[:-1]
    return last


def curve_stats(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float, int, int]:
    """(AUROC, AP, F1-max, positives, negatives) of 1-D scores vs 0/1 labels.

    AUROC: trapezoid under the ROC curve over all distinct thresholds (scikit-learn's
    ``roc_auc_score``). AP: sum over thresholds of (R_k - R_{k-1}) * P_k (scikit-learn's
    ``average_precision_score``). F1-max: max over thresholds of 2 TP / (TP + FP + P).
    Undefined values are NaN.
    """
    order = torch.argsort(scores, descending=True)
    s = scores[order]
    y = labels.reshape(-1)[order].to(torch.int64)
    last = _group_ends(s)
    tps_all = torch.cumsum(y, 0)
    idx = torch.arange(1, s.numel() + 1, device=s.device, dtype=torch.int64)
    tps = tps_all[last]
    fps = idx[last] - tps
    P, N = int(tps[-1]), int(fps[-1])
    nan = float("nan")
    tps_d, fps_d = tps.double(), fps.double()
    zero = torch.zeros(1, dtype=torch.float64, device=s.device)
    if P > 0 and N > 0:
        auroc = float(torch.trapezoid(torch.cat([zero, tps_d / P]), torch.cat([zero, fps_d / N])))
    else:
        auroc = nan
    if P > 0:
        dtp = torch.diff(tps_d, prepend=zero)
        ap = float((dtp * (tps_d / (tps_d + fps_d))).sum() / P)
        f1 = float((2.0 * tps_d / (tps_d + fps_d + P)).max())
    else:
        ap = f1 = nan
    return auroc, ap, f1, P, N


def f1_max_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold t of F1-max: predictions ``scores >= t`` reach the largest
    2 TP / (TP + FP + P); among equal F1 values the largest t (fewest alarms). NaN
    without positives."""
    order = torch.argsort(scores, descending=True)
    s = scores[order]
    y = labels.reshape(-1)[order].to(torch.int64)
    last = _group_ends(s)
    tps = torch.cumsum(y, 0)[last].double()
    fps = torch.arange(1, s.numel() + 1, device=s.device, dtype=torch.float64)[last] - tps
    P = float(tps[-1])
    if P == 0:
        return float("nan")
    f1 = 2.0 * tps / (tps + fps + P)
    return float(s[last][int(torch.argmax(f1))])  # argmax: the first (highest) threshold of the maximum


def binned_bins(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index j of the grid cell thresholds[j] <= score < thresholds[j + 1]."""
    th = thresholds.to(device=scores.device, dtype=torch.float64)
    return (torch.bucketize(scores.double(), th, right=True) - 1).clamp_(min=0)


# ---------------------------------------------------------------------------
# Connected components (8-connectivity), as scipy.ndimage.label with a 3x3 structure.

def label_components(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels int32 (N, H, W) numbered 1..R_i per image, R_i (N,), areas of all regions)."""
    try:
        from scipy import ndimage
    except ImportError as exc:  # pragma: no cover - scipy is a dependency
        raise ImportError("fastad.metrics needs fastad._C or scipy for connected components") from exc
    structure = np.ones((3, 3), dtype=int)
    labels = np.zeros(masks.shape, dtype=np.int32)
    counts = np.zeros(masks.shape[0], dtype=np.int64)
    areas = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure)
        labels[i] = lab
        counts[i] = n
        if n:
            areas.append(np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64))
    areas_all = np.concatenate(areas) if areas else np.zeros(0, dtype=np.int64)
    return labels, counts, areas_all


def global_labels(labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-image labels 1..R_i -> global region ids 1..R (0 stays background)."""
    offsets = torch.cumsum(counts, 0) - counts
    lab = labels.to(torch.int64)
    return torch.where(lab > 0, lab + offsets.to(lab.device).view(-1, 1, 1), lab)


# ---------------------------------------------------------------------------
# AUPRO

def trapezoid_to(x: torch.Tensor, y: torch.Tensor, x_max: float) -> float:
    """Area under the polyline (x, y) for x <= x_max, with the segment that crosses
    x_max interpolated linearly (``trapezoid`` of the MVTec AD evaluation code)."""
    correction = 0.0
    if not bool((x == x_max).any()):
        ins = int(torch.searchsorted(x, torch.tensor([x_max], dtype=x.dtype, device=x.device), right=True))
        if 0 < ins < x.numel():
            x0, x1 = float(x[ins - 1]), float(x[ins])
            y0, y1 = float(y[ins - 1]), float(y[ins])
            y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            correction = 0.5 * (y_interp + y0) * (x_max - x0)
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float((0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])).sum()) + correction


def aupro_exact(maps: torch.Tensor, glabels: torch.Tensor, areas: torch.Tensor, fpr_limit: float) -> float:
    """PRO curve over every distinct score (global sort, as the MVTec AD evaluation
    code's ``compute_pro``), integrated up to ``fpr_limit`` and divided by it."""
    s = maps.reshape(-1)
    lab = glabels.reshape(-1)
    normal = lab == 0
    n_ok = int(normal.sum())
    R = int(areas.numel())
    weight = torch.cat([torch.zeros(1, dtype=torch.float64, device=s.device),
                        1.0 / areas.to(device=s.device, dtype=torch.float64)])
    order = torch.argsort(s, descending=True)
    s_sorted = s[order]
    fprs = torch.cumsum(normal[order].to(torch.float64), 0) / n_ok
    pros = torch.cumsum(weight[lab[order]], 0) / R
    last = _group_ends(s_sorted)
    fprs = fprs[last].clamp_(max=1.0)
    pros = pros[last].clamp_(max=1.0)
    zero = torch.zeros(1, dtype=torch.float64, device=s.device)
    one = torch.ones(1, dtype=torch.float64, device=s.device)
    x = torch.cat([zero, fprs, one])
    y = torch.cat([zero, pros, one])
    return trapezoid_to(x, y, fpr_limit) / fpr_limit


def pro_thresholds(maps: torch.Tensor, glabels: torch.Tensor, areas: torch.Tensor,
                   thresholds: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """For ascending thresholds th_k: (#normal pixels with score > th_k,
    sum over regions of the fraction of the region with score > th_k)."""
    s = maps.reshape(-1)
    lab = glabels.reshape(-1)
    T = thresholds.numel()
    th = thresholds.to(device=s.device, dtype=torch.float64)
    c = torch.searchsorted(th, s.double(), right=False)  # positive at th[0..c)
    normal = lab == 0
    fp_hist = torch.bincount(c[normal], minlength=T + 1).to(torch.int64)
    weight = 1.0 / areas.to(device=s.device, dtype=torch.float64)
    anom = ~normal
    pro_hist = torch.bincount(c[anom], weights=weight[lab[anom] - 1], minlength=T + 1)
    fp = torch.flip(torch.cumsum(torch.flip(fp_hist[1:], [0]), 0), [0])
    pro = torch.flip(torch.cumsum(torch.flip(pro_hist[1:], [0]), 0), [0])
    return fp.cpu().numpy(), pro.cpu().numpy()


# ---------------------------------------------------------------------------
# Region F1 (SAA+)

def region_f1_counts(maps: np.ndarray, labels: np.ndarray, counts: np.ndarray, thresholds_desc: np.ndarray,
                     iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: (#predicted regions that hit, #predicted regions), SAA+ rules:
    predicted regions are the 8-connected components of ``map > th``; one hits when,
    for some ground-truth region, prediction and ground truth (whole masks) cropped
    to the union of the two bounding boxes have IoU >= ``iou``."""
    from scipy import ndimage

    structure = np.ones((3, 3), dtype=int)
    T = thresholds_desc.size
    tp = np.zeros(T, dtype=np.int64)
    npred = np.zeros(T, dtype=np.int64)
    gt_boxes = [ndimage.find_objects(lab) if n else [] for lab, n in zip(labels, counts)]
    for k, th in enumerate(thresholds_desc):
        for i in range(maps.shape[0]):
            pred = maps[i] > th
            plab, n_pred = ndimage.label(pred, structure)
            npred[k] += n_pred
            if n_pred == 0 or counts[i] == 0:
                continue
            gt = labels[i] > 0
            for pbox in ndimage.find_objects(plab):
                for gbox in gt_boxes[i]:
                    r0 = min(pbox[0].start, gbox[0].start)
                    r1 = max(pbox[0].stop, gbox[0].stop)
                    c0 = min(pbox[1].start, gbox[1].start)
                    c1 = max(pbox[1].stop, gbox[1].stop)
                    p, g = pred[r0:r1, c0:c1], gt[r0:r1, c0:c1]
                    inter = int(np.logical_and(p, g).sum())
                    union = int(np.logical_or(p, g).sum())
                    if union > 0 and inter / union >= iou:
                        tp[k] += 1
                        break
    return tp, npred
