"""Independent oracles: plain float64 formulations of each contract that share no
code with fastad (only torch / numpy / scikit-image / scikit-learn), written from
the papers and the authors' evaluation code, not from fastad's references.

The metric ports follow the published evaluation code step by step (read, not
copied): the cflow-ad ``cal_pro_score`` (DictAS, InCTRL, APRIL-GAN report it) and
SAA+'s ``calculate_max_f1_region`` (caoyunkang/Segment-Any-Anomaly, utils/metrics.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch

# --------------------------------------------------------------------------- nn_distance


def dense_metric(query: torch.Tensor, bank: torch.Tensor, metric: str) -> torch.Tensor:
    """[N, M] float64 metric values, difference form for l2 (no cancellation)."""
    q, b = query.double(), bank.double()
    if metric == "l2":
        return (q[:, None, :] - b[None, :, :]).pow(2).sum(-1).sqrt()
    if metric == "cosine":
        qn = q / q.pow(2).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)
        bn = b / b.pow(2).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)
        return 1.0 - qn @ bn.T
    return q @ b.T


def dense_knn(query, bank, k, metric, scale=1.0, reduce="topk", query_groups=None, bank_groups=None,
              group_match="other"):
    """(values, indices, eligible counts) for 2-D inputs, from the dense float64 matrix.

    Selection: best first (largest for ip), ties to the lowest index; a row keeps
    min(k, eligible) entries; the mean modes average those (NaN when none). The
    values stay differentiable with respect to float64 leaf inputs."""
    d = dense_metric(query, bank, metric) * scale
    largest = metric == "ip" if reduce == "topk" else reduce == "mean_largest"
    N, M = d.shape
    eligible = torch.ones(N, M, dtype=torch.bool)
    if query_groups is not None:
        same = query_groups.reshape(-1, 1) == bank_groups.reshape(1, -1)
        eligible = same if group_match == "same" else ~same
    vals, idxs, counts = [], [], []
    for i in range(N):
        cand = [j for j in range(M) if eligible[i, j]]
        key = d[i].detach().tolist()
        cand.sort(key=lambda j: (-key[j] if largest else key[j], j))
        chosen = cand[:k]
        counts.append(len(chosen))
        idxs.append(chosen + [-1] * (k - len(chosen)))
        vals.append(d[i, chosen] if chosen else d.new_zeros(0))
    return vals, torch.tensor(idxs, dtype=torch.int64), counts


# --------------------------------------------------------------------------- mask_pool


def _bilinear_axis(src: int, dst: int, align_corners: bool):
    """(i0, i1, w1) per output index, F.interpolate's bilinear convention."""
    out = []
    for o in range(dst):
        if align_corners:
            x = o * (src - 1) / (dst - 1) if dst > 1 else 0.0
        else:
            x = max((o + 0.5) * src / dst - 0.5, 0.0)
        i0 = min(int(math.floor(x)), src - 1)
        i1 = min(i0 + 1, src - 1)
        out.append((i0, i1, x - i0))
    return out


def resize_loop(img: np.ndarray, size: tuple[int, int], mode: str, align_corners: bool = False) -> np.ndarray:
    """One 2-D float64 image resized by an explicit loop (bilinear, legacy nearest, area)."""
    H, W = img.shape
    h, w = size
    out = np.zeros((h, w))
    if (H, W) == (h, w):
        return img.astype(np.float64).copy()
    if mode == "bilinear":
        ys, xs = _bilinear_axis(H, h, align_corners), _bilinear_axis(W, w, align_corners)
        for r, (y0, y1, wy) in enumerate(ys):
            for c, (x0, x1, wx) in enumerate(xs):
                out[r, c] = ((1 - wy) * ((1 - wx) * img[y0, x0] + wx * img[y0, x1])
                             + wy * ((1 - wx) * img[y1, x0] + wx * img[y1, x1]))
    elif mode == "nearest":
        for r in range(h):
            for c in range(w):
                out[r, c] = img[min(int(math.floor(r * H / h)), H - 1), min(int(math.floor(c * W / w)), W - 1)]
    else:  # area = adaptive average pooling
        for r in range(h):
            for c in range(w):
                a, b = (r * H) // h, -((-(r + 1) * H) // h)
                e, f = (c * W) // w, -((-(c + 1) * W) // w)
                out[r, c] = img[a:b, e:f].mean()
    return out


def mask_pool_loop(features, masks, size, resize="bilinear", align_corners=False, threshold=None,
                   complement=False, eps=1e-8):
    """Pooled [B, R, C] (or [B, R, 2, C]) and counts, in float64 by plain loops.

    complement True / "overlap": the mask of 1 - m (resized, then binarised);
    "partition": 1 - the binarised mask."""
    f = features.double().numpy()
    m = masks.double().numpy()
    B, C = f.shape[:2]
    R = m.shape[1]
    two = complement is not False
    pooled = np.zeros((B, R, 2 if two else 1, C))
    counts = np.zeros((B, R, 2 if two else 1))
    for bi in range(B):
        feat = np.stack([resize_loop(f[bi, c], size, resize, align_corners) for c in range(C)])
        for r in range(R):
            w_in = resize_loop(m[bi, r], size, resize, align_corners)
            weights = [w_in if threshold is None else (w_in > threshold).astype(np.float64)]
            if two:
                if complement == "partition":
                    weights.append(1.0 - weights[0])
                else:
                    w_out = resize_loop(1.0 - m[bi, r], size, resize, align_corners)
                    weights.append(w_out if threshold is None else (w_out > threshold).astype(np.float64))
            for s, wt in enumerate(weights):
                cnt = wt.sum()
                counts[bi, r, s] = cnt
                for c in range(C):
                    pooled[bi, r, s, c] = (feat[c] * wt).sum() / (cnt + eps)
    if not two:
        pooled, counts = pooled[:, :, 0], counts[:, :, 0]
    return pooled, counts


# --------------------------------------------------------------------------- sparsemax


def sparsemax_f64(z: np.ndarray) -> np.ndarray:
    """Sparsemax of one 1-D row in float64 (Martins & Astudillo 2016, Algorithm 1),
    with the support found by the explicit condition over the sorted values."""
    z = np.asarray(z, dtype=np.float64)
    keep = np.isfinite(z)
    zf = z[keep] - z[keep].max()  # exact for float32 inputs; keeps 1 + j z visible at any offset
    s = np.sort(zf)[::-1]
    support = 0
    total = 0.0
    for j, v in enumerate(s, start=1):
        if 1.0 + j * v > total + v:
            support, total = j, total + v
        else:
            break
    tau = (s[:support].sum() - 1.0) / support
    out = np.zeros_like(z)
    out[keep] = np.maximum(zf - tau, 0.0)
    return out


# --------------------------------------------------------------------------- metrics


def cflow_pro_auc(masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """The cflow-ad style PRO score: a grid of ``max_step`` thresholds from the map
    minimum by (max - min) / max_step, predictions ``map > th``, per-region overlap of
    every 8-connected ground-truth region averaged over all regions, FPR on the
    normal pixels; the points with FPR < expect_fpr are kept, their FPR min-max
    rescaled to [0, 1] and integrated with scikit-learn's auc."""
    from skimage import measure
    from sklearn.metrics import auc

    masks = masks.astype(bool)
    regions = []  # (image, coords) of every ground-truth region
    for i, gt in enumerate(masks):
        for prop in measure.regionprops(measure.label(gt, connectivity=2)):
            regions.append((i, prop.coords))
    normal = ~masks
    lo, hi = amaps.min(), amaps.max()
    step = (hi - lo) / max_step
    fpr_list, pro_list = [], []
    for th in np.arange(lo, hi, step):
        pred = amaps > th
        overlaps = [pred[i][coords[:, 0], coords[:, 1]].mean() for i, coords in regions]
        pro_list.append(float(np.mean(overlaps)))
        fpr_list.append(np.logical_and(pred, normal).sum() / normal.sum())
    fpr_arr, pro_arr = np.asarray(fpr_list), np.asarray(pro_list)
    sel = fpr_arr < expect_fpr
    x = fpr_arr[sel]
    x = (x - x.min()) / (x.max() - x.min())
    return float(auc(x, pro_arr[sel]))


def saa_region_f1(masks: np.ndarray, amaps: np.ndarray, iou: float = 0.6, max_steps: int = 200) -> float:
    """SAA+'s region F1-max: thresholds max - s (max - min) / max_steps (s = 0..n-1),
    predicted regions the 8-connected components of ``map > th``; a predicted region
    scores the best IoU, over the ground-truth regions of its image, of the two whole
    binary masks cropped to the union of the two bounding boxes (0 without any);
    hits = regions scoring >= iou; recall = hits / #gt regions, precision = hits /
    #predicted regions, F1 = 0 when either is 0 or nothing is predicted."""
    from skimage import measure

    masks = masks.astype(bool)
    hi, lo = amaps.max(), amaps.min()
    step = (hi - lo) / max_steps
    gts = [measure.regionprops(measure.label(m, connectivity=2)) for m in masks]
    n_gt = sum(len(g) for g in gts)
    best = 0.0
    for s in range(max_steps):
        pred = amaps > hi - s * step
        n_pred, hits = 0, 0
        for i in range(len(masks)):
            props = measure.regionprops(measure.label(pred[i], connectivity=2))
            n_pred += len(props)
            for p in props:
                score = 0.0
                for g in gts[i]:
                    r0, c0 = min(p.bbox[0], g.bbox[0]), min(p.bbox[1], g.bbox[1])
                    r1, c1 = max(p.bbox[2], g.bbox[2]), max(p.bbox[3], g.bbox[3])
                    a, b = pred[i][r0:r1, c0:c1], masks[i][r0:r1, c0:c1]
                    score = max(score, np.logical_and(a, b).sum() / np.logical_or(a, b).sum())
                hits += score >= iou
        if n_gt == 0 or n_pred == 0 or hits == 0:
            continue
        recall, precision = hits / n_gt, hits / n_pred
        best = max(best, 2 * recall * precision / (recall + precision))
    return best
