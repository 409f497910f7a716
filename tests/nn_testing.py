"""Shared checks for nn_distance backends against the float64 reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastad.ops.nn_distance import nn_distance_reference


def pair_values(query: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor, metric: str, scale: float):
    """Exact float64 metric values of (query row, bank[indices]) pairs; query [B, N, C],
    bank [1 or B, M, C], indices [B, N, k] (-1 entries give NaN)."""
    q = query.double()
    b = bank.double()
    if metric == "cosine":
        q, b = F.normalize(q, dim=-1, eps=1e-12), F.normalize(b, dim=-1, eps=1e-12)
    B, N, k = indices.shape
    b = b.expand(B, -1, -1)
    sel = torch.gather(b, 1, indices.clamp_min(0).reshape(B, -1, 1).expand(-1, -1, b.shape[-1])).reshape(B, N, k, -1)
    if metric == "ip":
        v = (q[:, :, None] * sel).sum(-1)
    elif metric == "cosine":
        v = 1.0 - (q[:, :, None] * sel).sum(-1)
    else:
        v = (q[:, :, None] - sel).pow(2).sum(-1).sqrt()
    return (v * scale).masked_fill(indices < 0, float("nan"))


def tolerance(query: torch.Tensor, bank: torch.Tensor, metric: str, scale: float) -> float:
    """Float32 accumulation error bound for one metric value (absolute)."""
    C = query.shape[-1]
    if metric == "cosine":
        mag = 1.0
    else:
        mag = float(query.double().norm(dim=-1).max() * bank.double().norm(dim=-1).max())
        if metric == "l2":  # error on d^2 is ~eps*mag; on d it is at most sqrt of that
            mag = max(mag, 1e-30) ** 0.5 * 4
    return 1e-6 * scale * max(mag, 1e-30) * max(C, 16) ** 0.5 * 4


def assert_matches_reference(result, query, bank, k=1, metric="cosine", scale=1.0, reduce="topk",
                             query_groups=None, bank_groups=None, group_match="other"):
    """A backend's result equals the exact reference up to float32 rounding; where its
    indices differ, the chosen neighbours are exact-distance ties within the tolerance."""
    squeeze = query.dim() == 2
    q3 = query[None] if squeeze else query
    b3 = bank[None] if bank.dim() == 2 else bank
    qg = bg = None
    if query_groups is not None:
        qg = (query_groups if query_groups.dim() == 2 else query_groups[None].expand(q3.shape[0], -1)).long()
        bg = (bank_groups if bank_groups.dim() == 2 else bank_groups[None]).long()
    ref = nn_distance_reference(q3, b3, k, metric, scale, reduce, qg, bg, group_match)
    values = result.values[None] if squeeze else result.values
    assert values.dtype == torch.float32
    assert values.shape == ref.values.shape, (values.shape, ref.values.shape)
    tol = tolerance(q3, b3, metric, scale)
    if reduce != "topk":
        assert result.indices is None
        torch.testing.assert_close(values.double(), ref.values.double(), atol=tol, rtol=0, equal_nan=True)
        return
    idx = result.indices[None] if squeeze else result.indices
    assert idx.dtype == torch.int64 and idx.shape == ref.indices.shape
    # padding (rows with fewer eligible entries than k) must agree exactly
    assert torch.equal(idx < 0, ref.indices < 0)
    torch.testing.assert_close(values.double(), ref.values.double(), atol=tol, rtol=0, equal_nan=True)
    exact = pair_values(q3, b3, idx, metric, scale)
    exact = torch.where(idx < 0, ref.values.double(), exact)  # padding was compared exactly above
    torch.testing.assert_close(exact, ref.values.double(), atol=2 * tol, rtol=0, equal_nan=True)
    valid = idx >= 0
    # no duplicate neighbours within a row
    srt = idx.sort(-1).values
    assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()
    if qg is not None:  # every returned neighbour is eligible
        bgx = bg.expand(q3.shape[0], -1)
        g = torch.gather(bgx, 1, idx.clamp_min(0).reshape(idx.shape[0], -1)).reshape(idx.shape)
        same = g == qg[..., None]
        ok = ~same if group_match == "other" else same
        assert bool((ok | ~valid).all())
    # ties: where distances are (bitwise) equal in the reference, order follows the index
    diff = idx != ref.indices
    if diff.any():
        gap = (exact - ref.values.double()).abs()[diff]
        assert float(gap.max()) <= 2 * tol
