"""mask_pool against a plain float64 loop (tests/oracles.py) that shares no code
with fastad: its own bilinear / nearest / area resize, binarisation and complements.
Resize factors are powers of two and masks binary, so every resized weight is exact
in float32 too and the binarised pixel sets cannot differ by rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import backend_available
from fastad.ops import mask_pool
from oracles import mask_pool_loop

BACKENDS = [b for b in ("reference", "cpu", "triton") if backend_available(b)]


def _inputs(seed: int, soft: bool = False):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 3, 4, 6, generator=g)
    masks = (torch.rand(2, 3, 8, 12, generator=g) > 0.6).float()
    masks[0, 0] = 0  # an empty mask
    masks[1, 2] = 1  # a full one
    if soft:
        masks = masks * torch.rand(2, 3, 8, 12, generator=g)
    return feats, masks


CASES = [
    # size, resize, threshold, complement
    ((8, 12), "bilinear", 0.0, True),
    ((8, 12), "bilinear", 0.0, "partition"),
    ((8, 12), "bilinear", 0.5, "overlap"),
    ((8, 12), "bilinear", None, True),
    ((4, 6), "bilinear", 0.0, True),
    ((16, 24), "nearest", 0.0, True),
    ((4, 6), "area", 0.25, "partition"),
    ((4, 6), "area", 0.25, True),
    ((8, 12), "bilinear", None, False),
]


# the interpreted Triton kernels are slow on a CPU: a representative subset there
PARAMS = [pytest.param(b, *c, id=f"{b}-{i}") for b in BACKENDS for i, c in enumerate(CASES)
          if b != "triton" or i in (0, 1, 6)]


@pytest.mark.parametrize("backend,size,resize,threshold,complement", PARAMS)
def test_mask_pool_matches_float64_loop(backend, size, resize, threshold, complement):
    feats, masks = _inputs(0, soft=threshold is None)
    out = mask_pool(feats, masks, size=size, resize=resize, threshold=threshold, complement=complement,
                    backend=backend, return_counts=True)
    want, counts = mask_pool_loop(feats, masks, size, resize, threshold=threshold, complement=complement)
    np.testing.assert_allclose(out.counts.double().numpy(), counts, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.pooled.double().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_overlap_complement_shares_boundary_pixels(backend):
    """complement=True (SINE's MaskPooling on 1 - M) at threshold 0 counts the
    boundary pixels in both the mask and its complement; "partition" does not."""
    feats, masks = _inputs(1)
    for complement, overlap in ((True, True), ("partition", False)):
        counts = mask_pool(feats, masks, size=(16, 24), threshold=0.0, complement=complement, backend=backend,
                           return_counts=True).counts
        total = counts.sum(-1)
        if overlap:
            assert bool((total[masks.amax((-2, -1)) > masks.amin((-2, -1))] > 16 * 24).all())
        else:
            assert bool((total == 16 * 24).all())
