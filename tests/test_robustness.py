"""Every op on every backend (reference, cpu, Triton under the interpreter) at
extreme magnitudes (1e+-20, 1e-22, 1e-25, near-duplicates of tiny rows), with
float16 / bfloat16 inputs and non-contiguous views, against float64 oracles
(tests/oracles.py) or, where the op defines its own rounding (kcenter), against
its reference bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import backend_available
from fastad.ops import dict_lookup, kcenter_greedy, mask_pool, nn_distance, sparsemax
from oracles import dense_metric, mask_pool_loop, sparsemax_f64

BACKENDS = [b for b in ("reference", "cpu", "triton") if backend_available(b)]
FAST = [b for b in BACKENDS if b != "reference"]
SCALES = [1e20, 1e19, 1e-20, 1e-22, 1e-25]


def _rows(n, c, scale, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)


# --------------------------------------------------------------------------- nn_distance

def _check_nn(r, q, b, k, metric):
    exact = dense_metric(q, b, metric)
    order = torch.sort(exact, dim=1, descending=metric == "ip", stable=True)
    assert torch.equal(r.indices, order.indices[:, :k])
    want = order.values[:, :k].float().double()  # the exact values rounded to float32 (inf past its range)
    torch.testing.assert_close(r.values.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
def test_nn_distance_extreme_magnitudes(backend, scale):
    q, b = _rows(5, 6, scale, 1), _rows(33, 6, scale, 2)
    for metric in ("l2", "cosine", "ip"):
        r = nn_distance(q, b, k=3, metric=metric, backend=backend)
        if metric == "ip" and scale > 1:
            continue  # q . b ~ 1e40 is past float32: values are inf, their order undefined
        _check_nn(r, q, b, 3, metric)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nn_distance_mixed_row_magnitudes(backend):
    """One huge and one tiny bank row among ordinary ones: the out-of-range rows
    send the call to the exact path, the ordinary neighbours stay right."""
    q, b = _rows(4, 8, 1.0, 3), _rows(40, 8, 1.0, 4)
    b[7] *= 1e20
    b[9] *= 1e-30
    for metric in ("l2", "cosine"):
        _check_nn(nn_distance(q, b, k=4, metric=metric, backend=backend), q, b, 4, metric)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nn_distance_half_precision_and_views(backend, dtype):
    base = _rows(24, 16, 1.0, 5, dtype)
    q = base[::3, ::2]  # non-contiguous rows and columns
    b = _rows(50, 16, 1.0, 6, dtype).t().contiguous().t()[:, ::2]  # column-major, strided
    assert not q.is_contiguous() and not b.is_contiguous()
    for metric in ("l2", "cosine", "ip"):
        _check_nn(nn_distance(q, b, k=3, metric=metric, backend=backend), q, b, 3, metric)
    with pytest.raises(TypeError, match="`bank` and `query`"):
        nn_distance(q.float(), b, backend=backend)


# --------------------------------------------------------------------------- kcenter

def _kcenter_all(x, k, backends=FAST, **kw):
    ref = kcenter_greedy(x, k, backend="reference", **kw)
    for backend in backends:
        r = kcenter_greedy(x, k, backend=backend, **kw)
        assert torch.equal(r.indices, ref.indices), (backend, r.indices, ref.indices)
        assert torch.equal(r.radius, ref.radius), (backend, float(r.radius), float(ref.radius))
    return ref


@pytest.mark.parametrize("scale", SCALES + [1.0])
def test_kcenter_extreme_magnitudes(scale):
    """Issue 15: the cpu kernel squared in float32 without a guard (1e20, 1e-25)."""
    x = _rows(200, 16, scale, 7)
    _kcenter_all(x[:40], 8)  # every backend, small for the interpreter
    ref = _kcenter_all(x, 30, backends=[b for b in FAST if b == "cpu"])
    # the radius is the largest distance to the nearest pick (float64 check)
    d = dense_metric(x, x[ref.indices], "l2").min(1).values.max()
    assert float(ref.radius) == pytest.approx(float(d), rel=1e-6)


@pytest.mark.parametrize("scale", [2e-15, 1e-15, 1e-10])
def test_kcenter_tiny_near_duplicates(scale):
    """Rows of ordinary-for-float32 size whose distances (~1e-22) square below the
    normal float32 range: the approximate tests must not prove anything there."""
    g = torch.Generator().manual_seed(3)
    for seed in range(3):
        x = (torch.randn(1, 8, generator=g) + 1e-7 * torch.randn(150, 8, generator=g)) * scale
        for k in (40, 150):
            _kcenter_all(x, k, backends=[b for b in FAST if b == "cpu"])  # the interpreter is slow
    _kcenter_all(x[:40], 12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kcenter_half_precision_and_views(dtype):
    x = _rows(50, 24, 1.0, 8, dtype)[:, ::2]
    assert not x.is_contiguous()
    _kcenter_all(x, 8)
    _kcenter_all(x, 5, metric="cosine")


# --------------------------------------------------------------------------- mask_pool

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_mask_pool_extreme_features(backend, scale):
    g = torch.Generator().manual_seed(9)
    feats = (torch.randn(1, 3, 4, 6, generator=g, dtype=torch.float64) * scale).float()
    masks = (torch.rand(1, 2, 8, 12, generator=g) > 0.5).float()
    out = mask_pool(feats, masks, size=(8, 12), threshold=0.0, complement=True, backend=backend)
    want, _ = mask_pool_loop(feats, masks, (8, 12), threshold=0.0, complement=True)
    np.testing.assert_allclose(out.double().numpy(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fdtype,mdtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                           (torch.float16, torch.bool), (torch.bfloat16, torch.uint8)])
def test_mask_pool_half_precision_mixes_and_views(backend, fdtype, mdtype):
    g = torch.Generator().manual_seed(10)
    feats = torch.randn(2, 6, 4, 6, generator=g).to(fdtype)[:, ::2]  # non-contiguous channels
    masks = (torch.rand(2, 2, 8, 12, generator=g) > 0.5).to(mdtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    out = mask_pool(feats, masks, size=(8, 12), threshold=0.5, complement="partition", backend=backend)
    want, _ = mask_pool_loop(feats, masks, (8, 12), threshold=0.5, complement="partition")
    assert out.dtype == fdtype
    np.testing.assert_allclose(out.double().numpy(), want, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- sparsemax / dict_lookup

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e20, 1e-20, 1e-25])
def test_sparsemax_extreme_scales(backend, scale):
    z = _rows(6, 11, scale, 11)
    got = sparsemax(z, backend=backend)
    want = np.stack([sparsemax_f64(r) for r in z.double().numpy()])
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparsemax_half_precision_and_views(backend, dtype):
    z = _rows(12, 9, 2.0, 12, dtype).t()  # sparsemax over dim 0 of a transposed view
    got = sparsemax(z, dim=0, backend=backend)
    want = np.stack([sparsemax_f64(r) for r in z.t().double().numpy()]).T
    assert got.dtype == dtype
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-2, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dict_lookup_extreme_queries_and_views(backend):
    g = torch.Generator().manual_seed(13)
    keys = torch.randn(30, 8, generator=g)
    values = torch.randn(8, 30, generator=g).t()  # non-contiguous
    for scale in (1e20, 1e-25):
        q = (torch.randn(5, 8, generator=g, dtype=torch.float64) * scale).float()
        out, lw = dict_lookup(q, keys, values, scale=1.0, backend=backend, return_weights=True)
        logits = (q.double() @ keys.double().T).float().double().numpy()
        want = np.stack([sparsemax_f64(r) for r in logits])
        dense = np.zeros_like(want)
        idx, w = lw.indices.numpy(), lw.weights.double().numpy()
        for n, s in zip(*np.nonzero(idx >= 0)):
            dense[n, idx[n, s]] += w[n, s]
        np.testing.assert_allclose(dense, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.double().numpy(), want @ values.double().numpy(), atol=1e-4, rtol=0)
