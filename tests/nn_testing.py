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


def tolerance(query: torch.Tensor, bank: torch.Tensor, metric: str, scale: float) -> tuple[float, float]:
    """(atol, rtol) for one metric value. cosine / ip: float32 accumulation error,
    absolute (their sums cancel). l2: relative to the true distance (every backend
    reports the difference form), plus the reference's own float64 Gram-form noise,
    sqrt(8 eps64 (|q|^2 + |b|^2)) -- about 1e-8 |q|, never the norms themselves."""
    C = query.shape[-1]
    qn, bn = float(query.double().norm(dim=-1).max()), float(bank.double().norm(dim=-1).max())
    if metric == "l2":
        return scale * (8 * 2.0 ** -52 * (qn * qn + bn * bn)) ** 0.5 + 1e-30, 1e-6 * max(C, 16) ** 0.5 * 4
    mag = 1.0 if metric == "cosine" else qn * bn
    return 1e-6 * scale * max(mag, 1e-30) * max(C, 16) ** 0.5 * 4, 0.0


def _close(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float], factor: float = 1.0) -> None:
    torch.testing.assert_close(got, want, atol=factor * tol[0], rtol=factor * tol[1], equal_nan=True)


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
        _close(values.double(), ref.values.double(), tol)
        return
    idx = result.indices[None] if squeeze else result.indices
    assert idx.dtype == torch.int64 and idx.shape == ref.indices.shape
    # padding (rows with fewer eligible entries than k) must agree exactly
    assert torch.equal(idx < 0, ref.indices < 0)
    _close(values.double(), ref.values.double(), tol)
    exact = pair_values(q3, b3, idx, metric, scale)
    exact = torch.where(idx < 0, ref.values.double(), exact)  # padding was compared exactly above
    _close(exact, ref.values.double(), tol, 2.0)
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
    # ties: a slot may hold another row than the reference's only when the two exact
    # (float64) values differ, by less than the float32 error; bit-equal exact values
    # (duplicate rows) must follow the index order
    diff = idx != ref.indices
    if diff.any():
        ref_exact = pair_values(q3, b3, ref.indices, metric, scale)
        gap = (exact - ref_exact).abs()[diff]
        assert bool((gap > 0).all()), "exact ties not in index order"
        bound = 2 * (tol[0] + tol[1] * ref_exact.abs()[diff])
        assert bool((gap <= bound).all()), float((gap - bound).max())
