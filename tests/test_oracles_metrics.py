"""AUPRO (cflow-ad style) and region F1 (SAA+) against independent ports of the
authors' evaluation code (tests/oracles.py), on small random cases built so that
the edge conventions matter: FPR plateaus that hit the limit exactly, regions
touching diagonally, images without defects."""
from __future__ import annotations

import numpy as np
import pytest

from fastad import metrics
from oracles import cflow_pro_auc, saa_region_f1

BACKENDS = ("cpu", "reference")


def _case(seed: int, n: int = 3, size: int = 20, levels: int | None = 12):
    """Maps (float32, quantised to `levels` values so that many thresholds share one
    FPR) and masks with a few rectangular / diagonal blobs; image 0 is defect-free."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(1, n):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, 5, 2)
            masks[i, r:r + h, c:c + w] = 1
        d = rng.integers(0, size - 3)
        masks[i, d, d] = masks[i, d + 1, d + 1] = 1  # a region joined only diagonally
    noise = rng.random((n, size, size))
    maps = noise + 0.8 * masks + 0.3 * rng.random((n, 1, 1))
    if levels:
        maps = np.floor(maps * levels) / levels
    return maps.astype(np.float32), masks


def _attained_fprs(maps: np.ndarray, masks: np.ndarray, steps: int) -> np.ndarray:
    normal = masks == 0
    lo, hi = maps.min(), maps.max()
    fp = [np.logical_and(maps > th, normal).sum() for th in np.arange(lo, hi, (hi - lo) / steps)]
    return np.unique(np.asarray(fp) / normal.sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_thresholds_match_cflow_port(backend, seed):
    maps, masks = _case(seed)
    for limit in (0.3, 0.05):
        got = metrics.aupro(maps, masks, fpr_limit=limit, num_thresholds=200, backend=backend)
        assert got == pytest.approx(cflow_pro_auc(masks, maps, 200, limit), abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_fpr_limit_hit_exactly_is_excluded(backend, seed):
    """cflow-ad keeps the points with FPR strictly below the limit: take the limit
    equal to an FPR the grid attains (a plateau of quantised maps)."""
    maps, masks = _case(seed, levels=8)
    fprs = _attained_fprs(maps, masks, 50)
    inner = fprs[(fprs > 0.02) & (fprs < 0.9)]
    assert inner.size >= 2
    for limit in inner[1:3]:
        want = cflow_pro_auc(masks, maps, 50, float(limit))
        got = metrics.aupro(maps, masks, fpr_limit=float(limit), num_thresholds=50, backend=backend)
        assert got == pytest.approx(want, abs=1e-9), limit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,iou,steps", [(0, 0.6, 40), (1, 0.3, 40), (2, 0.6, 25), (5, 0.5, 40)])
def test_region_f1_matches_saa_port(backend, seed, iou, steps):
    maps, masks = _case(seed, n=4, size=18, levels=None)
    got = metrics.region_f1(maps, masks, iou=iou, num_thresholds=steps, backend=backend)
    assert got == pytest.approx(saa_region_f1(masks, maps, iou, steps), abs=1e-6)
