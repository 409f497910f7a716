"""sparsemax and the sparse dictionary lookup at extreme logits against a float64
sparsemax written from Martins & Astudillo's algorithm (tests/oracles.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import backend_available
from fastad.ops import dict_lookup, sparsemax
from oracles import sparsemax_f64

BACKENDS = [b for b in ("reference", "cpu", "triton") if backend_available(b)]


def _logits(offset: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(9, 37, generator=g, dtype=torch.float64) * 0.4
    z[:, 5] += 0.3  # a clear leader in most rows
    z[3, :] = 0.25  # a row of equal logits: uniform weights
    return (z + offset).float()


def _oracle(z: torch.Tensor) -> np.ndarray:
    return np.stack([sparsemax_f64(row) for row in z.double().numpy()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 8e4, -3e5, 1e7])
def test_sparsemax_extreme_logits(backend, offset):
    z = _logits(offset)
    got = sparsemax(z, dim=-1, backend=backend)
    # float32 logits near 1e7 are integers apart: the oracle sees the same values
    np.testing.assert_allclose(got.double().numpy(), _oracle(z), atol=2e-6, rtol=0)
    assert torch.allclose(got.sum(-1).double(), torch.ones(9, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 8e4, -3e5])
def test_dict_lookup_sparse_weights_extreme_logits(backend, offset):
    """Logits offset * 1 + q . k with dyadic q, k: every logit is exact in float32
    whatever the summation order, so the float64 oracle sees the same logits."""
    g = torch.Generator().manual_seed(1)
    B, N, M, C = 2, 6, 50, 8
    q = torch.randint(-8, 9, (B, N, C), generator=g).float() / 8
    keys = torch.randint(-4, 5, (B, M, C), generator=g).float() / 4
    q = torch.cat([q, torch.full((B, N, 1), offset)], -1)
    keys = torch.cat([keys, torch.ones(B, M, 1)], -1)
    values = torch.randn(B, M, 4, generator=g)
    out, lw = dict_lookup(q, keys, values, mode="sparsemax", scale=1.0, backend=backend, return_weights=True)
    logits = torch.einsum("bnc,bmc->bnm", q.double(), keys.double())
    want = np.stack([_oracle(z) for z in logits])
    dense = np.zeros_like(want)
    idx, w = lw.indices.numpy(), lw.weights.double().numpy()
    for bi, n, s in zip(*np.nonzero(idx >= 0)):
        dense[bi, n, idx[bi, n, s]] += w[bi, n, s]
    np.testing.assert_allclose(dense, want, atol=2e-6, rtol=0)
    ref = torch.einsum("bnm,bmv->bnv", torch.from_numpy(want), values.double())
    np.testing.assert_allclose(out.double().numpy(), ref.numpy(), atol=1e-5, rtol=0)
