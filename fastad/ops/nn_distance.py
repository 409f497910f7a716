"""Fused patch nearest-neighbour distance.

``nn_distance(query, bank, k, metric, scale, reduce, groups...)`` gives, for every
query row, the k nearest bank rows (distances and indices) or the mean of the k
largest / smallest distances, without materialising the N x M distance matrix.

Semantics (the reference below is the definition):

* metric ``"cosine"``: d = 1 - cos(q, b), rows normalised as ``F.normalize``
  (eps 1e-12), so a zero vector has cosine 0 to everything (distance 1).
  ``"l2"``: Euclidean distance (not squared). ``"ip"``: the inner product q . b,
  a similarity: "nearest" means largest.
* ``scale`` (> 0) multiplies every value (InCTRL: 0.5 * (1 - cos)).
* ``reduce="topk"``: values [..., N, k] ascending distance (descending similarity
  for ``"ip"``) and their bank indices; exact ties go to the lowest index.
  ``"mean_largest"`` / ``"mean_smallest"``: the mean of the k largest / smallest
  values of each row, [..., N], indices None.
* ``query_groups`` / ``bank_groups``: integer labels; with ``group_match="other"``
  a query row is compared only with bank rows of another group (SAA+
  multi-instance saliency), with ``"same"`` only with rows of its own group.
  A row with fewer than k eligible bank rows gets the eligible ones: ``topk``
  pads with +inf (-inf for ``"ip"``) and index -1, the mean modes average the
  eligible values (NaN when there is none).

Exactness: every backend returns the exact distances rounded to float32 (up to
float32 accumulation error) and the same indices, except where two candidates'
exact distances differ by less than that error.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastad._backend import resolve_backend
from fastad._checks import (FLOAT_DTYPES, check_choice, check_finite, check_same, check_tensor, describe,
                            rows_in_kernel_range)

__all__ = ["NNResult", "nn_distance", "nn_distance_reference"]

METRICS = ("cosine", "l2", "ip")
REDUCES = ("topk", "mean_largest", "mean_smallest")
GROUP_MATCHES = ("other", "same")

# Reference working set: float64 distance block of about this many elements.
_REF_BLOCK_ELEMS = 1 << 22


class NNResult(NamedTuple):
    """``values`` [..., N, k] (topk) or [..., N] (mean modes); ``indices`` [..., N, k] int64 or None."""

    values: torch.Tensor
    indices: Optional[torch.Tensor]


def _largest_first(metric: str, reduce: str) -> bool:
    """Whether the kept values are the largest of each row."""
    if reduce == "topk":
        return metric == "ip"
    return reduce == "mean_largest"


def _distance_block(q: torch.Tensor, b: torch.Tensor, metric: str, q_sq: torch.Tensor | None,
                    b_sq: torch.Tensor | None) -> torch.Tensor:
    """Exact (float64) metric values between rows of q [n, C] and b [m, C]."""
    dots = q @ b.T
    if metric == "ip":
        return dots
    if metric == "cosine":
        return 1.0 - dots  # q, b already normalised
    return (q_sq[:, None] + b_sq[None, :] - 2.0 * dots).clamp_min_(0.0).sqrt_()


def nn_distance_reference(query: torch.Tensor, bank: torch.Tensor, k: int = 1, metric: str = "cosine",
                          scale: float = 1.0, reduce: str = "topk", query_groups: torch.Tensor | None = None,
                          bank_groups: torch.Tensor | None = None, group_match: str = "other",
                          need_indices: bool = True) -> NNResult:
    """Plain PyTorch definition on 3-D inputs: query [B, N, C], bank [1 or B, M, C],
    groups [B, N] / [1 or B, M]. Distances are computed in float64 (Gram form),
    sorted stably (ties to the lowest index) and rounded to float32 (float64
    inputs stay float64). Peak memory: a float64 block of about 4M elements
    (32 MiB) plus its sort, whatever N and M are."""
    B, N, C = query.shape
    M = bank.shape[1]
    out_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    largest = _largest_first(metric, reduce)
    fill = float("-inf") if largest else float("inf")
    values = torch.empty((B, N, k), dtype=torch.float64, device=query.device)
    indices = torch.empty((B, N, k), dtype=torch.int64, device=query.device)
    counts = torch.empty((B, N), dtype=torch.int64, device=query.device)
    rows = max(1, _REF_BLOCK_ELEMS // max(M, 1))
    for bi in range(B):
        bb = bank[bi if bank.shape[0] > 1 else 0].to(torch.float64)
        qq = query[bi].to(torch.float64)
        if metric == "cosine":
            bb, qq = F.normalize(bb, dim=-1, eps=1e-12), F.normalize(qq, dim=-1, eps=1e-12)
        b_sq = (bb * bb).sum(-1) if metric == "l2" else None
        q_sq = (qq * qq).sum(-1) if metric == "l2" else None
        bg = None if bank_groups is None else bank_groups[bi if bank_groups.shape[0] > 1 else 0]
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            d = _distance_block(qq[n0:n1], bb, metric, None if q_sq is None else q_sq[n0:n1], b_sq) * scale
            if bg is not None:
                same = query_groups[bi, n0:n1, None] == bg[None, :]
                excluded = same if group_match == "other" else ~same
                d = d.masked_fill(excluded, fill)
                counts[bi, n0:n1] = (~excluded).sum(-1)
            else:
                counts[bi, n0:n1] = M
            sv, si = torch.sort(d, dim=-1, descending=largest, stable=True)
            values[bi, n0:n1] = sv[:, :k]
            indices[bi, n0:n1] = si[:, :k]
    # slots beyond a row's eligible count (groups only) hold excluded entries
    missing = torch.arange(k, device=query.device) >= counts[..., None]
    if reduce == "topk":
        return NNResult(values.masked_fill(missing, fill).to(out_dtype), indices.masked_fill(missing, -1))
    valid = counts.clamp_max(k)
    mean = values.masked_fill(missing, 0.0).sum(-1) / valid
    mean = mean.masked_fill(valid == 0, float("nan"))
    idx = indices.masked_fill(missing, -1) if need_indices else None
    return NNResult(mean.to(out_dtype), idx)


# --------------------------------------------------------------------------- dispatch


def _reference_impl(q: torch.Tensor, b: torch.Tensor, k: int, metric: str, scale: float, reduce: str,
                    qg: torch.Tensor | None, bg: torch.Tensor | None, group_match: str,
                    need_indices: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return tuple(nn_distance_reference(q, b, k, metric, scale, reduce, qg, bg, group_match, need_indices))


def _triton_impl(q: torch.Tensor, b: torch.Tensor, k: int, metric: str, scale: float, reduce: str,
                 qg: torch.Tensor | None, bg: torch.Tensor | None, group_match: str,
                 need_indices: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    from fastad.kernels.nn_distance import nn_distance_triton  # lazy: fastad works without triton

    if not rows_in_kernel_range(q, b):  # float32 squares / sums would overflow or underflow
        return _reference_impl(q, b, k, metric, scale, reduce, qg, bg, group_match, need_indices)
    return nn_distance_triton(q, b, k, metric, scale, reduce, qg, bg, group_match, need_indices)


_CPU_CODES = {"cosine": 0, "l2": 1, "ip": 2, "topk": 0, "mean_largest": 1, "mean_smallest": 2}
_CPU_PATHS = {"auto": 0, "fp32": 1, "int8": 2, "l2_direct": 3}


def _cpu_call(q: torch.Tensor, b: torch.Tensor, k: int, metric: str, scale: float, reduce: str,
              qg: torch.Tensor | None, bg: torch.Tensor | None, group_match: str, need_indices: bool,
              path: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The C++ kernel with a chosen algorithm (``path``: auto, fp32, int8, l2_direct;
    all exact) and its statistics; status "out_of_range" means nothing was computed."""
    from fastad import _ext

    B, N, _ = q.shape
    values = torch.empty((B, N, k) if reduce == "topk" else (B, N), dtype=torch.float32)
    indices = torch.empty((B, N, k), dtype=torch.int64) if reduce == "topk" or need_indices else None
    qga = bga = None
    if qg is not None:  # the kernel only compares labels: make them dense int32
        inv = torch.unique(torch.cat([qg.reshape(-1), bg.reshape(-1)]), return_inverse=True)[1].to(torch.int32)
        qga = _ext.as_array(inv[:qg.numel()].reshape(qg.shape))
        bga = _ext.as_array(inv[qg.numel():].reshape(bg.shape))
    stats = _ext._C.nn_distance(_ext.as_array(q), _ext.as_array(b), _ext.dtype_code(q), k, _CPU_CODES[metric],
                                _CPU_CODES[reduce], float(scale), qga, bga, group_match == "same",
                                _ext.as_array(values), None if indices is None else _ext.as_array(indices),
                                _CPU_PATHS[path], _ext.num_threads())
    return values, indices, stats


def _cpu_impl(q: torch.Tensor, b: torch.Tensor, k: int, metric: str, scale: float, reduce: str,
              qg: torch.Tensor | None, bg: torch.Tensor | None, group_match: str,
              need_indices: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    values, indices, stats = _cpu_call(q, b, k, metric, scale, reduce, qg, bg, group_match, need_indices)
    if stats["status"] != "ok":  # a row norm beyond the float32 range the kernel is exact for
        return _reference_impl(q, b, k, metric, scale, reduce, qg, bg, group_match, need_indices)
    return values, indices


# Backend implementations, all with the signature of _reference_impl: q [B, N, C] and
# b [1 or B, M, C] contiguous, groups int64 [B, N] / [1 or B, M] or None; they return
# float values ([B, N, k] or [B, N]) and int64 indices [B, N, k] (None allowed for the
# mean modes when need_indices is False).
_IMPLS = {"reference": _reference_impl}
_IMPLS["triton"] = _triton_impl
_IMPLS["cpu"] = _cpu_impl
BACKENDS = tuple(_IMPLS)


def _run_backend(backend: str, q: torch.Tensor, b: torch.Tensor, k: int, metric: str, scale: float, reduce: str,
                 qg: torch.Tensor | None, bg: torch.Tensor | None, group_match: str,
                 need_indices: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_finite("nn_distance", "query", q)
    check_finite("nn_distance", "bank", b)
    return _IMPLS[backend](q, b, k, metric, scale, reduce, qg, bg, group_match, need_indices)


def _values_shape(q: torch.Tensor, k: int, reduce: str) -> tuple[int, ...]:
    return (q.shape[0], q.shape[1], k) if reduce == "topk" else (q.shape[0], q.shape[1])


@torch.library.custom_op("fastad::nn_distance", mutates_args=())
def _nn_distance_op(query: torch.Tensor, bank: torch.Tensor, k: int, metric: str, scale: float, reduce: str,
                    query_groups: Optional[torch.Tensor], bank_groups: Optional[torch.Tensor], group_match: str,
                    backend: str, need_indices: bool) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = _run_backend(backend, query, bank, k, metric, scale, reduce, query_groups, bank_groups,
                                   group_match, need_indices)
    if indices is None:
        indices = torch.empty((0,), dtype=torch.int64, device=query.device)
    out_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return values.to(out_dtype).contiguous(), indices.contiguous()


@_nn_distance_op.register_fake
def _(query, bank, k, metric, scale, reduce, query_groups, bank_groups, group_match, backend, need_indices):
    out_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    values = query.new_empty(_values_shape(query, k, reduce), dtype=out_dtype)
    if reduce == "topk" or need_indices:
        indices = query.new_empty((query.shape[0], query.shape[1], k), dtype=torch.int64)
    else:
        indices = query.new_empty((0,), dtype=torch.int64)
    return values, indices


def _differentiable_values(q: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, metric: str, scale: float,
                           reduce: str) -> torch.Tensor:
    """Metric values of the selected (query, bank) pairs, recomputed with autograd:
    O(N k C) work, used only when a gradient is needed."""
    Bq, N, C = q.shape
    valid = indices >= 0
    idx = indices.clamp_min(0)
    if b.shape[0] == 1:
        sel = b[0][idx.reshape(-1)].reshape(Bq, N, -1, C)
    else:
        sel = torch.gather(b, 1, idx.reshape(Bq, -1, 1).expand(-1, -1, C)).reshape(Bq, N, -1, C)
    qf, sel = q.float() if q.dtype != torch.float64 else q, sel.float() if sel.dtype != torch.float64 else sel
    if metric == "cosine":
        v = 1.0 - (F.normalize(qf, dim=-1, eps=1e-12)[:, :, None, :] * F.normalize(sel, dim=-1, eps=1e-12)).sum(-1)
    elif metric == "ip":
        v = (qf[:, :, None, :] * sel).sum(-1)
    else:
        v = (qf[:, :, None, :] - sel).pow(2).sum(-1).clamp_min(1e-30).sqrt()
    v = v * scale
    if reduce == "topk":
        return v.masked_fill(~valid, 0.0)
    cnt = valid.sum(-1)
    return v.masked_fill(~valid, 0.0).sum(-1) / cnt.clamp_min(1)


def _check_groups(name: str, groups: torch.Tensor | None, like: torch.Tensor, batched: bool,
                  length: int) -> torch.Tensor | None:
    if groups is None:
        return None
    check_tensor("nn_distance", name, groups, ndim=(1, 2), dtypes=(torch.int64, torch.int32, torch.int16,
                                                                   torch.int8, torch.uint8))
    if groups.device != like.device:
        raise ValueError(f"fastad.ops.nn_distance: `{name}` must be on {like.device}, got {describe(groups)}")
    want = (like.shape[0], length) if batched else (length,)
    if tuple(groups.shape) not in (want, (length,)):
        raise ValueError(f"fastad.ops.nn_distance: `{name}` must have shape {want} (or ({length},)), "
                         f"got {describe(groups)}")
    return groups


def nn_distance(query: torch.Tensor, bank: torch.Tensor, k: int = 1, metric: str = "cosine", scale: float = 1.0,
                reduce: str = "topk", query_groups: torch.Tensor | None = None,
                bank_groups: torch.Tensor | None = None, group_match: str = "other",
                backend: str | None = None) -> NNResult:
    """k nearest bank rows of every query row, or the mean of the k largest / smallest distances.

    Args:
        query: [N, C] or [B, N, C], float32 / float16 / bfloat16 (float32 accumulation).
        bank: [M, C] shared by every query image, or [B, M, C] one bank per image.
        k: neighbours kept per row (1 <= k <= M).
        metric: "cosine" (1 - cos), "l2" (Euclidean) or "ip" (inner product, a similarity).
        scale: positive factor applied to every value.
        reduce: "topk" -> (values, indices) [..., N, k]; "mean_largest" / "mean_smallest" -> (values [..., N], None).
        query_groups, bank_groups: integer group labels ([N] / [M], or batched [B, N] / [B, M]);
            both or neither.
        group_match: "other" (compare only across groups) or "same" (only within a group).
        backend: None (automatic), "reference", "cpu" or "triton".

    Returns:
        NNResult(values float32, indices int64 or None). See the module docstring for ties,
        zero vectors and rows with fewer than k eligible bank rows.

    Gradients flow to ``query`` and ``bank`` through the selected pairs (O(N k C) extra work).
    Non-contiguous inputs are copied. NaN or infinite inputs raise ValueError.

    Peak memory: the outputs plus, per backend, reference: a 32 MiB float64 block and its
    sort; cpu: per thread the query rows of its task (up to 1,026: 1 KiB each as int8 or
    5.3 KiB packed as float32, at C = 1,024), a packed bank block (up to 2 MiB) and
    k + max(k/2, 16) candidates of 8 bytes per query row (at most 1 MiB; a 4 MiB tile of
    values instead when k is a large part of M), plus 28 bytes per query and bank row,
    whatever N x M is (csrc/cpu/nn_distance_kernel.cpp); triton: tiles of the bank and k
    candidates per query row (see the kernels).
    """
    op = "nn_distance"
    check_tensor(op, "query", query, ndim=(2, 3), dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(op, "bank", bank, ndim=(2, 3), dtypes=FLOAT_DTYPES + (torch.float64,))
    check_same(op, query=query, bank=bank)
    check_choice(op, "metric", metric, METRICS)
    check_choice(op, "reduce", reduce, REDUCES)
    check_choice(op, "group_match", group_match, GROUP_MATCHES)
    if bank.dim() == 3 and query.dim() == 2:
        raise ValueError(f"fastad.ops.nn_distance: a batched `bank` [B, M, C] needs a batched `query` [B, N, C], "
                         f"got query {describe(query)} and bank {describe(bank)}")
    if bank.dim() == 3 and bank.shape[0] != query.shape[0]:
        raise ValueError(f"fastad.ops.nn_distance: `bank` batch {bank.shape[0]} must equal `query` batch "
                         f"{query.shape[0]}, got query {describe(query)} and bank {describe(bank)}")
    if query.shape[-1] != bank.shape[-1]:
        raise ValueError(f"fastad.ops.nn_distance: `query` and `bank` must have the same channel count C, "
                         f"got query {describe(query)} and bank {describe(bank)}")
    if query.shape[-1] == 0:
        raise ValueError(f"fastad.ops.nn_distance: channel count C must be >= 1, got query {describe(query)}")
    M = bank.shape[-2]
    if M == 0:
        raise ValueError(f"fastad.ops.nn_distance: `bank` is empty, got {describe(bank)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"fastad.ops.nn_distance: `k` must be an integer >= 1, got {k!r}")
    if k > M:
        raise ValueError(f"fastad.ops.nn_distance: `k`={k} is larger than the bank ({M} rows): {describe(bank)}")
    if not (isinstance(scale, (int, float)) and scale > 0 and scale != float("inf")):
        raise ValueError(f"fastad.ops.nn_distance: `scale` must be a positive finite number, got {scale!r}")
    if (query_groups is None) != (bank_groups is None):
        raise ValueError("fastad.ops.nn_distance: pass both `query_groups` and `bank_groups`, or neither")
    qg = _check_groups("query_groups", query_groups, query, query.dim() == 3, query.shape[-2])
    bg = _check_groups("bank_groups", bank_groups, bank, bank.dim() == 3, M)
    chosen = resolve_backend(op, backend, query.device, BACKENDS)
    if query.dtype == torch.float64 and chosen != "reference":
        if backend is not None:
            raise TypeError(f"fastad.ops.nn_distance: float64 inputs run only on backend='reference', "
                            f"got backend={backend!r} and {describe(query)}")
        chosen = "reference"

    squeeze = query.dim() == 2
    q3 = (query[None] if squeeze else query).contiguous()
    b3 = (bank[None] if bank.dim() == 2 else bank).contiguous()
    if qg is not None:
        qg = (qg if qg.dim() == 2 else qg[None].expand(q3.shape[0], -1)).to(torch.int64).contiguous()
        bg = (bg if bg.dim() == 2 else bg[None]).to(torch.int64).contiguous()
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or bank.requires_grad)
    values, indices = _nn_distance_op(q3.detach(), b3.detach(), k, metric, float(scale), reduce, qg, bg, group_match, chosen,
                                      needs_grad)
    if needs_grad:
        diff = _differentiable_values(q3, b3, indices, metric, float(scale), reduce)
        values = values + (diff - diff.detach())  # kernel values forward, exact gradient backward
    out_idx = indices if reduce == "topk" else None
    if squeeze:
        values = values[0]
        out_idx = None if out_idx is None else out_idx[0]
    return NNResult(values, out_idx)
