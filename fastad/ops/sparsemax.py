"""Sparsemax and the DictAS dictionary lookup (sparse / soft / hard retrieval).

``sparsemax(x, dim)`` projects each slice of ``x`` onto the probability simplex
(Martins & Astudillo 2016): w = max(z - tau, 0) with the threshold tau from the
sorted values. ``dict_lookup(query, keys, values)`` is the lookup of DictAS
(section 3.3): logits z = query keys^T * scale, weights w = sparsemax(z) (or
softmax / one-hot argmax) over the dictionary, retrieved features w values.

The fast paths never build the N x M logits: a fused GEMM keeps a running top-32
of the logits per query row, the exact threshold is computed from those
candidates, and rows whose support might extend past the kept candidates are
recomputed in full (so the result is exact, never truncated).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastad import _ext
from fastad._backend import resolve_backend
from fastad._checks import FLOAT_DTYPES, check_choice, check_same, check_tensor, describe

__all__ = [
    "LookupWeights",
    "dict_lookup",
    "dict_lookup_reference",
    "sparsemax",
    "sparsemax_reference",
]

MODES = ("sparsemax", "softmax", "argmax")
# Candidates per row kept by the fused pass. The mean support on DictAS-like
# logits is 2 to 5 entries; rows with a support of 32 or more are recomputed.
TOPK = 32
_SPARSEMAX_BACKENDS = ("reference", "cpu", "triton")
_LOOKUP_BACKENDS = ("reference", "cpu", "triton")
_DTYPES = FLOAT_DTYPES + (torch.float64,)
# Rows per chunk of a dense recomputation: chunk * M logits at a time.
_DENSE_CHUNK_ELEMS = 1 << 23


class LookupWeights(NamedTuple):
    """Weights of a lookup, one row per query, strongest first.

    indices: int64 [B, N, k] (or [N, k]) key of each slot, -1 in empty slots.
    weights: [B, N, k] weight of each slot, 0 in empty slots; float32 (float64
    for float64 inputs), detached. k is the largest support over the rows
    (1 for argmax, M for softmax). Slots are ordered by weight descending,
    then key ascending.
    """

    indices: Tensor
    weights: Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# sparsemax


def _check_sparsemax_values(op: str, x: Tensor, dim: int) -> None:
    """NaN / +inf anywhere, or a slice with every entry -inf, has no sparsemax."""
    if x.numel() == 0:
        return
    if bool(torch.isnan(x).any()) or bool((x == math.inf).any()):
        raise ValueError(f"fastad.ops.{op}: `x` contains NaN or +inf ({describe(x)})")
    if bool((x.amax(dim=dim) == -math.inf).any()):
        raise ValueError(f"fastad.ops.{op}: a slice of `x` along dim {dim} is -inf everywhere "
                         f"(nothing to keep; {describe(x)})")


def sparsemax_reference(x: Tensor, dim: int = -1) -> Tensor:
    """Sparsemax by a full sort (the definition): z = x - max, sort descending,
    cumsum, k = max{j : 1 + j z_(j) > cumsum_j}, tau = (cumsum_k - 1) / k,
    w = max(z - tau, 0). Computed in float32 (float64 for float64 input);
    differentiable by autograd. -inf entries get weight 0."""
    _check_sparsemax_values("sparsemax_reference", x, dim)
    if x.numel() == 0:
        return x.clone()
    z = x.to(_compute_dtype(x.dtype))
    z = z - z.amax(dim=dim, keepdim=True)
    zs = torch.sort(z, dim=dim, descending=True).values
    cs = zs.cumsum(dim)
    shape = [1] * z.dim()
    shape[dim] = z.shape[dim]
    r = torch.arange(1, z.shape[dim] + 1, dtype=z.dtype, device=z.device).view(shape)
    k = (1 + r * zs > cs).sum(dim=dim, keepdim=True)
    tau = (cs.gather(dim, k - 1) - 1) / k
    return torch.clamp(z - tau, min=0).to(x.dtype)


def _sparsemax_rows_cpu(x2: Tensor) -> Tensor:
    """Sparsemax of each row of a contiguous 2-D CPU tensor (float32 result)."""
    y = torch.empty(x2.shape, dtype=torch.float32)
    _ext._C.sparsemax_rows(_ext.as_array(x2), _ext.dtype_code(x2), y.numpy(), _ext.num_threads())
    return y


def _sparsemax_rows(x2: Tensor, backend: str) -> Tensor:
    """Sparsemax of each row of a 2-D tensor with a resolved backend, in the compute dtype."""
    if backend == "cpu" and x2.dtype != torch.float64:
        return _sparsemax_rows_cpu(x2.contiguous())
    if backend == "triton" and x2.dtype != torch.float64:
        from fastad.kernels import sparsemax as tk

        return tk.sparsemax_rows(x2.contiguous())
    return sparsemax_reference(x2, dim=-1).to(_compute_dtype(x2.dtype))


@torch.library.custom_op("fastad::sparsemax", mutates_args=())
def _sparsemax_op(x: Tensor, dim: int, backend: Optional[str]) -> Tensor:
    name = resolve_backend("sparsemax", backend, x.device, _SPARSEMAX_BACKENDS)
    if x.dtype == torch.float64 and name != "reference":
        if backend is not None:
            raise TypeError(f"fastad.ops.sparsemax: backend {name!r} takes float32/float16/bfloat16, "
                            f"got {describe(x)}; float64 runs on backend='reference'")
        name = "reference"
    if x.numel() == 0:
        return x.clone(memory_format=torch.contiguous_format)
    if name == "reference":
        return sparsemax_reference(x, dim).contiguous()
    xt = x.movedim(dim, -1)
    shape = xt.shape
    y = _sparsemax_rows(xt.reshape(-1, shape[-1]), name)
    return y.reshape(shape).movedim(-1, dim).to(x.dtype).contiguous()


@_sparsemax_op.register_fake
def _(x: Tensor, dim: int, backend: Optional[str]) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _sparsemax_setup(ctx, inputs, output) -> None:
    ctx.dim = inputs[1]
    ctx.save_for_backward(output)


def _sparsemax_backward(ctx, grad: Tensor):
    (y,) = ctx.saved_tensors
    cdt = _compute_dtype(y.dtype)
    supp = y > 0
    g = grad.to(cdt)
    gs = torch.where(supp, g, torch.zeros((), dtype=cdt, device=g.device))
    mean = gs.sum(ctx.dim, keepdim=True) / supp.sum(ctx.dim, keepdim=True).clamp(min=1)
    gx = torch.where(supp, g - mean, torch.zeros((), dtype=cdt, device=g.device))
    return gx.to(y.dtype), None, None


_sparsemax_op.register_autograd(_sparsemax_backward, setup_context=_sparsemax_setup)


def sparsemax(x: Tensor, dim: int = -1, *, backend: Optional[str] = None) -> Tensor:
    """Exact sparsemax of ``x`` along ``dim``: the Euclidean projection of each
    slice onto the probability simplex, w = max(x - tau, 0) with sum(w) = 1.

    Args:
        x: float32 / float16 / bfloat16 / float64 tensor, any shape. -inf entries
            (masked) get weight 0. NaN, +inf or a slice that is -inf everywhere
            raise ValueError.
        dim: the dimension to normalise.
        backend: None (best available), "reference" (sort-based), "cpu" (C++:
            partial selection of the entries above max - 1, no sort of the
            slice), "triton" (one program per slice, Michelot iterations).
            float64 always runs the reference.

    Returns:
        Tensor like ``x``. Differentiable: grad_x = (w > 0) * (g - mean of g
        over the support).

    Peak memory: the output plus one float32 copy of ``x`` when it is not
    contiguous along ``dim`` or not float32; O(1) extra per slice.
    """
    check_tensor("sparsemax", "x", x, dtypes=_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"fastad.ops.sparsemax: `x` must have at least 1 dimension, got {describe(x)}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"fastad.ops.sparsemax: `dim` must be an int, got {describe(dim)}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"fastad.ops.sparsemax: `dim` {dim} is out of range for {describe(x)}")
    return _sparsemax_op(x, dim % x.dim(), backend)


# ---------------------------------------------------------------------------
# dictionary lookup: reference


def _masked_logits(q: Tensor, k: Tensor, scale: float, mask: Optional[Tensor]) -> Tensor:
    """scale * q k^T in the compute dtype, -inf at masked keys. q [B, n, C], k [1|B, M, C], mask [1|B, M]."""
    cdt = _compute_dtype(q.dtype)
    z = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    if mask is not None:
        z = z.masked_fill(~mask[:, None, :], -math.inf)
    return z


def _check_logits(op: str, z: Tensor, mask: Optional[Tensor]) -> None:
    finite = torch.isfinite(z)
    if mask is not None:
        finite = finite | ~mask[:, None, :]
    if z.numel() and not bool(finite.all()):
        raise ValueError(f"fastad.ops.{op}: a logit of an unmasked key is NaN or infinite "
                         "(check query and keys for NaN / inf)")


def _check_values_finite(op: str, v: Tensor) -> None:
    """NaN / inf values would reach every row in the dense reference (0 * NaN) but
    only the rows that select them in the sparse paths: rejected everywhere."""
    if v.numel() == 0:
        return
    if v.device.type == "cpu" and _ext._C is not None and v.dtype in _ext.DTYPE_CODES:
        ok = _ext._C.all_finite(_ext.as_array(v.contiguous()), _ext.dtype_code(v), _ext.num_threads())
    else:
        ok = bool(torch.isfinite(v).all())
    if not ok:
        raise ValueError(f"fastad.ops.{op}: `values` contains NaN or infinite entries ({describe(v)})")


def _check_mask_nonempty(op: str, mask: Optional[Tensor]) -> None:
    if mask is not None and mask.numel() and not bool(mask.any(dim=-1).all()):
        b = int((~mask.any(dim=-1)).nonzero()[0, 0])
        raise ValueError(f"fastad.ops.{op}: `key_mask` masks every key of batch item {b}; "
                         "a lookup needs at least one key")


def _dense_to_sparse(w: Tensor) -> LookupWeights:
    """Dense weights [B, N, M] -> slots sorted by weight descending (key ascending among
    equals), cut at the largest number of nonzero weights of a row."""
    pos = w > 0
    cnt = pos.sum(-1).reshape(-1)
    k = max(1, int(cnt.max())) if w.numel() else 0
    # the nonzero weights of each row in key order (nonzero is row-major), then a stable
    # sort of those few slots by weight: no sort of every key
    rows, keys = pos.reshape(cnt.numel(), w.shape[-1]).nonzero(as_tuple=True)
    slot = torch.arange(rows.numel(), device=w.device) - (cnt.cumsum(0) - cnt)[rows]
    order = torch.full((cnt.numel(), k), -1, dtype=torch.int64, device=w.device)
    ws = torch.zeros(cnt.numel(), k, dtype=w.dtype, device=w.device)
    order[rows, slot] = keys
    ws[rows, slot] = w.reshape(cnt.numel(), w.shape[-1])[rows, keys]
    ws, perm = ws.sort(dim=-1, descending=True, stable=True)
    order = order.gather(-1, perm).reshape(*w.shape[:-1], k)
    ws = ws.reshape(*w.shape[:-1], k)
    return LookupWeights(torch.where(ws > 0, order, -1), ws)


def dict_lookup_reference(query: Tensor, keys: Tensor, values: Tensor, scale: Optional[float] = None,
                          mode: str = "sparsemax", key_mask: Optional[Tensor] = None,
                          return_weights: bool = False):
    """Dense lookup as the DictAS authors compute it (the definition): the full
    logits ``scale * query keys^T`` (masked keys -inf), sort-based sparsemax /
    softmax / one-hot argmax (ties: lowest key) over the keys, then
    ``weights @ values``. Same arguments and results as :func:`dict_lookup`;
    differentiable by autograd (argmax: values only). Peak memory O(B N M)."""
    q, k, v, mask, scale, squeeze = _canonical("dict_lookup_reference", query, keys, values, scale, mode, key_mask)
    _check_mask_nonempty("dict_lookup_reference", mask)
    _check_values_finite("dict_lookup_reference", v)
    cdt = _compute_dtype(q.dtype)
    z = _masked_logits(q, k, scale, mask)
    _check_logits("dict_lookup_reference", z, mask)
    if mode == "sparsemax":
        w = sparsemax_reference(z, dim=-1)
    elif mode == "softmax":
        w = torch.softmax(z, dim=-1)
    else:
        # max then first index attaining it: lowest key among ties
        top = z.amax(dim=-1, keepdim=True)
        first = (z == top).to(torch.int8).argmax(dim=-1, keepdim=True)
        w = torch.zeros_like(z).scatter_(-1, first, 1.0).detach()
    out = torch.matmul(w, v.to(cdt)).to(query.dtype)
    if squeeze:
        out = out[0]
    if not return_weights:
        return out
    lw = _dense_to_sparse(w.detach())
    if squeeze:
        lw = LookupWeights(lw.indices[0], lw.weights[0])
    return out, lw


# ---------------------------------------------------------------------------
# dictionary lookup: validation


def _canonical(op: str, query, keys, values, scale, mode, key_mask):
    """Validate (metadata only) and bring to q [B, N, C], k [1|B, M, C], v [1|B, M, Cv], mask [1|B, M]."""
    check_tensor(op, "query", query, ndim=(2, 3), dtypes=_DTYPES)
    kd = (2,) if query.dim() == 2 else (2, 3)
    check_tensor(op, "keys", keys, ndim=kd, dtypes=_DTYPES)
    check_tensor(op, "values", values, ndim=kd, dtypes=_DTYPES)
    check_same(op, query=query, keys=keys, values=values)
    check_choice(op, "mode", mode, MODES)
    B = query.shape[0] if query.dim() == 3 else 1
    C = query.shape[-1]
    for name, t in (("keys", keys), ("values", values)):
        if t.dim() == 3 and t.shape[0] not in (1, B):
            raise ValueError(f"fastad.ops.{op}: `{name}` must have batch size {B} like `query` "
                             f"(or 1, or be 2-D: shared), got {describe(t)}")
    if keys.shape[-1] != C:
        raise ValueError(f"fastad.ops.{op}: `keys` must have C = {C} channels like `query`, "
                         f"got {describe(keys)} and query {describe(query)}")
    M = keys.shape[-2]
    if values.shape[-2] != M:
        raise ValueError(f"fastad.ops.{op}: `values` must have M = {M} entries like `keys`, "
                         f"got {describe(values)} and keys {describe(keys)}")
    if M == 0:
        raise ValueError(f"fastad.ops.{op}: `keys` has no entries (M = 0, {describe(keys)}); "
                         "a lookup over an empty dictionary is undefined")
    if key_mask is not None:
        check_tensor(op, "key_mask", key_mask, ndim=(1, 2), dtypes=(torch.bool,))
        if key_mask.device != query.device:
            raise ValueError(f"fastad.ops.{op}: `key_mask` must be on {query.device}, got {describe(key_mask)}")
        ok = key_mask.shape[-1] == M and (key_mask.dim() == 1 or key_mask.shape[0] in (1, B))
        if not ok:
            raise ValueError(f"fastad.ops.{op}: `key_mask` must have shape ({M},) or ({B}, {M}), "
                             f"got {describe(key_mask)}")
    if scale is None:
        scale = C ** -0.5 if C > 0 else 1.0
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"fastad.ops.{op}: `scale` must be a finite float or None, got {scale!r}")
    squeeze = query.dim() == 2
    q = query[None] if squeeze else query
    k = keys if keys.dim() == 3 else keys[None]
    v = values if values.dim() == 3 else values[None]
    mask = None if key_mask is None else (key_mask if key_mask.dim() == 2 else key_mask[None])
    return q, k, v, mask, float(scale), squeeze


# ---------------------------------------------------------------------------
# dictionary lookup: sparse modes (sparsemax, argmax)


def _topk_logits(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float, K: int, backend: str):
    """(vals, idx) [B, N, K]: the K largest logits per row, descending, lowest key
    first among equals; -inf / -1 in slots beyond the unmasked keys."""
    if backend == "cpu":
        B, N, _ = q.shape
        vals = torch.empty(B, N, K, dtype=torch.float32)
        idx = torch.empty(B, N, K, dtype=torch.int64)
        _ext._C.dict_topk(_ext.as_array(q.contiguous()), _ext.as_array(k.contiguous()),
                          None if mask is None else mask.contiguous().numpy(), _ext.dtype_code(q), scale, K,
                          vals.numpy(), idx.numpy(), _ext.num_threads())
        return vals, idx
    from fastad.kernels import sparsemax as tk

    return tk.topk_logits(q, k, mask, scale, K)


def _support_from_sorted(vals: Tensor):
    """Sparsemax of rows given only their largest values (sorted descending, -inf
    padded), as in the reference. Returns (weights, support size, proven): the
    support is a prefix of the sorted row, and the condition 1 + j z_(j) > cumsum_j
    fails for every j past it, so a failure among the kept values proves that
    nothing beyond them is in the support."""
    zs = vals - vals[..., :1]
    cs = zs.cumsum(-1)
    r = torch.arange(1, vals.shape[-1] + 1, dtype=vals.dtype, device=vals.device)
    cond = 1 + r * zs > cs
    k = cond.sum(-1, keepdim=True).clamp(min=1)
    tau = (cs.gather(-1, k - 1) - 1) / k
    w = torch.clamp(zs - tau, min=0)
    return w, k[..., 0], ~cond[..., -1]


def _dense_rows_sparse(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float, backend: str):
    """Exact sparsemax weights of some rows of one batch item from their full
    logits, 2^23 logits at a time. q [n, C], k [M, C], mask [M] or None ->
    (idx, w) [n, kr] in slot order, kr the largest support among these rows."""
    chunk = max(1, _DENSE_CHUNK_ELEMS // k.shape[0])
    parts = []
    for s in range(0, q.shape[0], chunk):
        z = _masked_logits(q[None, s:s + chunk], k[None], scale, None if mask is None else mask[None])
        _check_logits("dict_lookup", z, None if mask is None else mask[None])
        parts.append(_dense_to_sparse(_sparsemax_rows(z[0], backend)[None]))
    kr = max(p.indices.shape[-1] for p in parts)
    idx = torch.cat([torch.nn.functional.pad(p.indices[0], (0, kr - p.indices.shape[-1]), value=-1) for p in parts])
    w = torch.cat([torch.nn.functional.pad(p.weights[0], (0, kr - p.weights.shape[-1]), value=0.0) for p in parts])
    return idx, w


def _wide_rows_sparse(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float, vals: Tensor, backend: str):
    """Exact sparsemax weights of rows of one batch item whose support passed their
    first candidates ``vals`` [n, K] (sorted, from _topk_logits). On the CPU a row
    takes a wider top-K (8x, 64x the first; a pass costs about one logit GEMM,
    whatever K) when its support should fit: above tau the logits' tail is about
    exponential, and sum (z - tau) = 1 then puts 1 / lambda keys in the support,
    lambda the mean excess of the first candidates over the last. Rows predicted
    (or found) beyond the widest list take their full logits, so the cost grows with
    the support and never reaches past one dense pass plus the first.
    q [n, C], k [M, C], mask [M] or None -> (idx, w) [n, kr], slots as the first pass."""
    n, M = q.shape[0], k.shape[0]
    K = vals.shape[-1]
    n_valid = M if mask is None else int(mask.sum())
    idx = torch.full((n, 0), -1, dtype=torch.int64, device=q.device)
    w = torch.zeros(n, 0, dtype=torch.float32, device=q.device)
    predicted = 1.0 / (vals.mean(-1) - vals[:, -1]).double()  # inf for a run of equal logits
    pending = torch.arange(n, device=q.device)
    while backend == "cpu" and pending.numel() and 8 * K * 8 <= n_valid:
        K *= 8
        go = pending[2 * predicted[pending] <= K]
        if not go.numel():
            continue
        vk, ki = _topk_logits(q[None, go], k[None], mask if mask is None else mask[None], scale, K, backend)
        wk, ksup, proven = _support_from_sorted(vk[0])
        kr = int(ksup[proven].max()) if bool(proven.any()) else 0
        if kr > w.shape[1]:
            idx = torch.nn.functional.pad(idx, (0, kr - w.shape[1]), value=-1)
            w = torch.nn.functional.pad(w, (0, kr - w.shape[1]), value=0.0)
        rows = go[proven]
        wk = wk[proven, :w.shape[1]]
        w[rows, :wk.shape[1]] = wk.to(w.dtype)
        idx[rows, :wk.shape[1]] = torch.where(wk > 0, ki[0, proven, :wk.shape[1]], -1)
        done = torch.zeros(n, dtype=torch.bool, device=q.device)
        done[rows] = True
        pending = pending[~done[pending]]
        vu = vk[0, ~proven]  # still wider than this list: predict again from it
        predicted[go[~proven]] = 1.0 / (vu.mean(-1) - vu[:, -1]).double()
    if pending.numel():
        fi, fw = _dense_rows_sparse(q[pending], k, mask, scale, backend)
        kr = max(w.shape[1], fi.shape[1])
        idx = torch.nn.functional.pad(idx, (0, kr - idx.shape[1]), value=-1)
        w = torch.nn.functional.pad(w, (0, kr - w.shape[1]), value=0.0)
        idx[pending, :fi.shape[1]] = fi
        w[pending, :fw.shape[1]] = fw.to(w.dtype)
    return idx, w


def _sparse_weights(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float, argmax: bool,
                    backend: str) -> tuple[Tensor, Tensor]:
    """(idx, w) [B, N, kmax] of the sparse lookup with a fast backend."""
    B, N, _ = q.shape
    M = k.shape[1]
    if argmax:
        vals, idx = _topk_logits(q, k, mask, scale, 1, backend)
        return idx, torch.ones_like(vals)
    K = min(TOPK, M)
    vals, idx = _topk_logits(q, k, mask, scale, K, backend)
    w, ksup, proven = _support_from_sorted(vals)
    n_valid = torch.full((B,), M, device=q.device) if mask is None else mask.sum(-1).expand(B)
    proven = proven | (n_valid[:, None] <= K)
    kmax = int(ksup.max())
    w = w[..., :kmax].contiguous()
    idx = torch.where(w > 0, idx[..., :kmax], -1)
    if bool(proven.all()):
        return idx, w
    # Rows whose support may reach past the K candidates: full rows, exact.
    redo = (~proven).nonzero()
    fixes = []
    for b in redo[:, 0].unique().tolist():
        rows = redo[redo[:, 0] == b, 1]
        kb = k[0 if k.shape[0] == 1 else b]
        mb = None if mask is None else mask[0 if mask.shape[0] == 1 else b]
        fixes.append((b, rows, *_wide_rows_sparse(q[b, rows], kb, mb, scale, vals[b, rows], backend)))
    kmax = max(kmax, max(fi.shape[-1] for _, _, fi, _ in fixes))
    idx = torch.nn.functional.pad(idx, (0, kmax - idx.shape[-1]), value=-1)
    w = torch.nn.functional.pad(w, (0, kmax - w.shape[-1]), value=0.0)
    for b, rows, fi, fw in fixes:
        idx[b, rows] = torch.nn.functional.pad(fi, (0, kmax - fi.shape[-1]), value=-1)
        w[b, rows] = torch.nn.functional.pad(fw, (0, kmax - fw.shape[-1]), value=0.0).to(w.dtype)
    return idx, w


def _gather_dense(w: Tensor, idx: Tensor, v: Tensor) -> Tensor:
    """_gather for wide supports: rows of dense weights (2^23 at a time) times the
    values, a GEMM instead of one scattered value row per weight."""
    B, N, _ = w.shape
    M = v.shape[1]
    out = torch.empty(B, N, v.shape[2], dtype=torch.float32)
    slot = torch.where(idx < 0, M, idx)
    starts, chunk = _row_chunks(N, M + 1)
    for b in range(B):
        vb = v[0 if v.shape[0] == 1 else b].to(torch.float32)
        for s in starts:
            wd = torch.zeros(min(chunk, N - s), M + 1, dtype=torch.float32)
            wd.scatter_add_(1, slot[b, s:s + chunk], w[b, s:s + chunk].to(torch.float32))
            torch.matmul(wd[:, :M], vb, out=out[b, s:s + chunk])
    return out


def _gather(w: Tensor, idx: Tensor, v: Tensor, backend: str) -> Tensor:
    """out[b, n] = sum_s w[b, n, s] v[b, idx[b, n, s]] in float32 (cpu or triton)."""
    B, N, _ = w.shape
    if backend == "cpu" and 32 * w.shape[2] > v.shape[1]:
        return _gather_dense(w, idx, v)  # supports past M / 32: the GEMM reads less per weight
    if backend == "cpu":
        out = torch.empty(B, N, v.shape[2], dtype=torch.float32)
        _ext._C.dict_gather(w.contiguous().numpy(), idx.contiguous().numpy(), _ext.as_array(v.contiguous()),
                            _ext.dtype_code(v), out.numpy(), _ext.num_threads())
        return out
    from fastad.kernels import sparsemax as tk

    return tk.gather(w, idx, v)


def _flat_rows(idx: Tensor, n_batch: int, M: int) -> Tensor:
    """Row index into x.reshape(-1, ...) of x [n_batch, M, ...] for idx [B, N, k]
    (empty slots map to row 0; their weight is 0)."""
    safe = idx.clamp(min=0)
    if n_batch == 1:
        return safe
    return safe + torch.arange(idx.shape[0], device=idx.device)[:, None, None] * M


def _row_chunks(n_rows: int, per_row: int) -> tuple[range, int]:
    chunk = max(1, _DENSE_CHUNK_ELEMS // max(per_row, 1))
    return range(0, n_rows, chunk), chunk


def _sparse_backward_torch(q, k, v, idx, w, g, scale: float, argmax: bool):
    """Gradients of out = sum_s w_s v[idx_s] (w = sparsemax of the logits on its
    support, or one-hot) in O(B N k C): the dense N x M matrices never appear."""
    B, N, C = q.shape
    Cv = v.shape[2]
    M = k.shape[1]
    cdt = w.dtype
    supp = (w > 0) & (idx >= 0)
    fk = _flat_rows(idx, k.shape[0], M)
    fv = _flat_rows(idx, v.shape[0], M)
    gq = torch.zeros(B, N, C, dtype=cdt, device=q.device)
    gk = torch.zeros(k.shape[0] * M, C, dtype=cdt, device=q.device)
    gv = torch.zeros(v.shape[0] * M, Cv, dtype=cdt, device=q.device)
    kf, vf = k.reshape(-1, C), v.reshape(-1, Cv)
    starts, chunk = _row_chunks(N, w.shape[2] * max(C, Cv))
    for s in starts:
        sl = slice(s, s + chunk)
        gs, ws, ss = g[:, sl].to(cdt), w[:, sl], supp[:, sl]
        ws = torch.where(ss, ws, 0)
        gv.index_add_(0, fv[:, sl].reshape(-1), (ws[..., None] * gs[:, :, None, :]).reshape(-1, Cv))
        if argmax:
            continue
        gw = torch.einsum("bnc,bnkc->bnk", gs, vf[fv[:, sl]].to(cdt))
        mean = torch.where(ss, gw, 0).sum(-1, keepdim=True) / ss.sum(-1, keepdim=True).clamp(min=1)
        gz = torch.where(ss, gw - mean, 0) * scale
        gq[:, sl] = torch.einsum("bnk,bnkc->bnc", gz, kf[fk[:, sl]].to(cdt))
        gk.index_add_(0, fk[:, sl].reshape(-1), (gz[..., None] * q[:, sl, None, :].to(cdt)).reshape(-1, C))
    return gq, gk.view(k.shape[0], M, C), gv.view(v.shape[0], M, Cv)


def _sparse_backward_cpu(q, k, v, idx, w, g, scale: float, argmax: bool):
    B, N, C = q.shape
    gq = torch.empty(B, N, C, dtype=torch.float32)
    gk = torch.empty(k.shape, dtype=torch.float32)
    gv = torch.empty(v.shape, dtype=torch.float32)
    _ext._C.dict_sparse_backward(
        _ext.as_array(q.contiguous()), _ext.as_array(k.contiguous()), _ext.as_array(v.contiguous()),
        _ext.dtype_code(q), idx.contiguous().numpy(), w.contiguous().numpy(),
        g.to(torch.float32).contiguous().numpy(), scale, not argmax, gq.numpy(), gk.numpy(), gv.numpy(),
        _ext.num_threads())
    return gq, gk, gv


def _resolve_lookup_backend(q: Tensor, backend: Optional[str]) -> str:
    name = resolve_backend("dict_lookup", backend, q.device, _LOOKUP_BACKENDS)
    if q.dtype == torch.float64 and name != "reference":
        if backend is not None:
            raise TypeError(f"fastad.ops.dict_lookup: backend {name!r} takes float32/float16/bfloat16, "
                            f"got {describe(q)}; float64 runs on backend='reference'")
        name = "reference"
    return name


@torch.library.custom_op("fastad::dict_lookup_sparse", mutates_args=())
def _lookup_sparse_op(q: Tensor, k: Tensor, v: Tensor, scale: float, argmax: bool, key_mask: Optional[Tensor],
                      backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    name = _resolve_lookup_backend(q, backend)
    _check_mask_nonempty("dict_lookup", key_mask)
    _check_values_finite("dict_lookup", v)
    B, N, _ = q.shape
    cdt = _compute_dtype(q.dtype)
    if B * N == 0:
        return (torch.zeros(B, N, v.shape[2], dtype=q.dtype, device=q.device),
                torch.empty(B, N, 0, dtype=torch.int64, device=q.device),
                torch.empty(B, N, 0, dtype=cdt, device=q.device))
    if name == "reference":
        out, lw = dict_lookup_reference(q, k[0] if k.shape[0] == 1 else k, v[0] if v.shape[0] == 1 else v, scale,
                                        "argmax" if argmax else "sparsemax", key_mask, return_weights=True)
        return out, lw.indices, lw.weights
    idx, w = _sparse_weights(q, k, key_mask, scale, argmax, name)
    out = _gather(w, idx, v, name)
    return out.to(q.dtype), idx, w


@_lookup_sparse_op.register_fake
def _(q, k, v, scale, argmax, key_mask, backend):
    B, N, _ = q.shape
    kk = 1 if argmax else torch.library.get_ctx().new_dynamic_size()
    cdt = _compute_dtype(q.dtype)
    return (q.new_empty(B, N, v.shape[2]), q.new_empty(B, N, kk, dtype=torch.int64),
            q.new_empty(B, N, kk, dtype=cdt))


@torch.library.custom_op("fastad::dict_lookup_sparse_backward", mutates_args=())
def _lookup_sparse_backward_op(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, w: Tensor, g: Tensor, scale: float,
                               argmax: bool, use_cpu: bool) -> tuple[Tensor, Tensor, Tensor]:
    fn = _sparse_backward_cpu if use_cpu else _sparse_backward_torch
    gq, gk, gv = fn(q, k, v, idx, w, g, scale, argmax)
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)


@_lookup_sparse_backward_op.register_fake
def _(q, k, v, idx, w, g, scale, argmax, use_cpu):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _lookup_sparse_setup(ctx, inputs, output) -> None:
    q, k, v, scale, argmax, _, backend = inputs
    _, idx, w = output
    ctx.scale, ctx.argmax = scale, argmax
    # The forward ran the C++ kernels exactly in these cases (see _resolve_lookup_backend).
    ctx.cpu = (q.device.type == "cpu" and q.dtype != torch.float64 and backend in (None, "cpu")
               and _ext._C is not None)
    ctx.save_for_backward(q, k, v, idx, w)


def _lookup_sparse_backward(ctx, g_out, g_idx, g_w):
    q, k, v, idx, w = ctx.saved_tensors
    gq, gk, gv = _lookup_sparse_backward_op(q, k, v, idx, w, g_out.contiguous(), ctx.scale, ctx.argmax, ctx.cpu)
    return gq, gk, gv, None, None, None, None


_lookup_sparse_op.register_autograd(_lookup_sparse_backward, setup_context=_lookup_sparse_setup)


# ---------------------------------------------------------------------------
# dictionary lookup: softmax mode (online softmax, backward by recomputation)


def _softmax_dense_rows(q, k, v, mask, scale):
    """(out, lse) of the softmax lookup for one batch item's rows q [n, C] in
    chunks of rows (O(chunk * M) memory)."""
    cdt = _compute_dtype(q.dtype)
    n = q.shape[0]
    out = torch.empty(n, v.shape[1], dtype=cdt, device=q.device)
    lse = torch.empty(n, dtype=cdt, device=q.device)
    starts, chunk = _row_chunks(n, k.shape[0])
    for s in starts:
        z = _masked_logits(q[None, s:s + chunk], k[None], scale, None if mask is None else mask[None])
        _check_logits("dict_lookup", z, None if mask is None else mask[None])
        z = z[0]
        lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
        out[s:s + chunk] = torch.softmax(z, dim=-1) @ v.to(cdt)
    return out, lse


def _per_batch(q, k, v, mask):
    """(b, q_b [N, C], k_b, v_b, mask_b) for every batch item."""
    for b in range(q.shape[0]):
        yield (b, q[b], k[0 if k.shape[0] == 1 else b], v[0 if v.shape[0] == 1 else b],
               None if mask is None else mask[0 if mask.shape[0] == 1 else b])


@torch.library.custom_op("fastad::dict_lookup_softmax", mutates_args=())
def _lookup_softmax_op(q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Optional[Tensor],
                       backend: Optional[str]) -> tuple[Tensor, Tensor]:
    name = _resolve_lookup_backend(q, backend)
    _check_mask_nonempty("dict_lookup", key_mask)
    _check_values_finite("dict_lookup", v)
    B, N, _ = q.shape
    cdt = _compute_dtype(q.dtype)
    if name == "cpu" and B * N:
        out = torch.empty(B, N, v.shape[2], dtype=torch.float32)
        lse = torch.empty(B, N, dtype=torch.float32)
        _ext._C.dict_softmax_fwd(_ext.as_array(q.contiguous()), _ext.as_array(k.contiguous()),
                                 _ext.as_array(v.contiguous()),
                                 None if key_mask is None else key_mask.contiguous().numpy(), _ext.dtype_code(q),
                                 scale, out.numpy(), lse.numpy(), _ext.num_threads())
        return out.to(q.dtype), lse
    if name == "triton" and B * N:
        from fastad.kernels import sparsemax as tk

        out, lse = tk.softmax_lookup(q, k, v, key_mask, scale)
        return out.to(q.dtype), lse
    out = torch.empty(B, N, v.shape[2], dtype=cdt, device=q.device)
    lse = torch.empty(B, N, dtype=cdt, device=q.device)
    for b, qb, kb, vb, mb in _per_batch(q, k, v, key_mask):
        out[b], lse[b] = _softmax_dense_rows(qb, kb, vb, mb, scale)
    return out.to(q.dtype), lse


@_lookup_softmax_op.register_fake
def _(q, k, v, scale, key_mask, backend):
    B, N, _ = q.shape
    return q.new_empty(B, N, v.shape[2]), q.new_empty(B, N, dtype=_compute_dtype(q.dtype))


def _lookup_softmax_setup(ctx, inputs, output) -> None:
    q, k, v, scale, key_mask, _ = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, key_mask, output[1])


@torch.library.custom_op("fastad::dict_lookup_softmax_backward", mutates_args=())
def _lookup_softmax_backward_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], lse: Tensor, g: Tensor,
                                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute p = exp(z - lse) 2^23 logits at a time: dz = p * (g v^T - rowsum(p * g v^T))."""
    cdt = lse.dtype
    gq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    gk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    gv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    for b, qb, kb, vb, mb in _per_batch(q, k, v, key_mask):
        kc, vc = kb.to(cdt), vb.to(cdt)
        gkb, gvb = gk[0 if k.shape[0] == 1 else b], gv[0 if v.shape[0] == 1 else b]
        starts, chunk = _row_chunks(qb.shape[0], kb.shape[0])
        for s in starts:
            qc = qb[s:s + chunk].to(cdt)
            gc = g[b, s:s + chunk].to(cdt)
            z = qc @ kc.T * scale
            if mb is not None:
                z = z.masked_fill(~mb[None], -math.inf)
            p = torch.exp(z - lse[b, s:s + chunk, None])
            dp = gc @ vc.T
            dz = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
            gq[b, s:s + chunk] = dz @ kc
            gkb += dz.T @ qc
            gvb += p.T @ gc
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)


@_lookup_softmax_backward_op.register_fake
def _(q, k, v, key_mask, lse, g, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _lookup_softmax_backward(ctx, g_out, g_lse):
    q, k, v, mask, lse = ctx.saved_tensors
    gq, gk, gv = _lookup_softmax_backward_op(q, k, v, mask, lse, g_out.contiguous(), ctx.scale)
    return gq, gk, gv, None, None, None


_lookup_softmax_op.register_autograd(_lookup_softmax_backward, setup_context=_lookup_softmax_setup)


# ---------------------------------------------------------------------------
# public API


def dict_lookup(query: Tensor, keys: Tensor, values: Tensor, scale: Optional[float] = None,
                mode: str = "sparsemax", key_mask: Optional[Tensor] = None, return_weights: bool = False,
                backend: Optional[str] = None):
    """DictAS dictionary lookup: out = w(scale * query keys^T) values with w one of
    sparsemax (default), softmax or one-hot argmax over the keys.

    Args:
        query: [B, N, C] (or [N, C]) float32 / float16 / bfloat16 / float64.
        keys: [M, C] (or [1, M, C]) shared by the batch, or [B, M, C]; M >= 1
            (M = 0 raises).
        values: [M, Cv] or [B, M, Cv] (or [1, M, Cv]); same dtype and device as query.
        scale: logit scale; None means C ** -0.5.
        mode: "sparsemax" (exact, sparse support), "softmax", or "argmax"
            (weight 1 on the largest logit, lowest key among ties).
        key_mask: optional bool [M] or [B, M]; False keys act as -inf logits
            (weight 0). A batch item with every key masked raises ValueError.
        return_weights: also return :class:`LookupWeights` (indices and values
            of the support, detached; softmax: all M keys).
        backend: None (best available), "reference" (dense, as the DictAS
            authors), "cpu" (C++), "triton". float64 runs the reference.

    Returns:
        out [B, N, Cv] (or [N, Cv]) in the input dtype; with return_weights,
        ``(out, LookupWeights)``. NaN / infinite logits of unmasked keys raise
        ValueError, and so do NaN / infinite values (the dense definition would
        spread them to every row through 0 * NaN). Differentiable w.r.t. query,
        keys and values (argmax: values only); the sparse backward costs
        O(B N k C) with k the support size.

    Peak memory (cpu / triton, sparsemax and argmax): O(B N k) for the weights
    plus O(min(B N, 2304) C) packed queries and O(T * min(B N, 2304) * 32)
    top-K state for T threads; never the B x N x M logits. Rows whose support
    reaches 32 keys are recomputed exactly from their full logits, 2^23 logits
    at a time. Softmax: O(T * min(B N, 576) * Cv) on cpu; its backward
    recomputes the logits 2^23 at a time. The reference backend: O(B N M).
    """
    q, k, v, mask, scale, squeeze = _canonical("dict_lookup", query, keys, values, scale, mode, key_mask)
    if mode == "softmax":
        out, _ = _lookup_softmax_op(q, k, v, scale, mask, backend)
        lw = None
        if return_weights:
            with torch.no_grad():
                z = torch.cat([_masked_logits(qb[None], kb[None], scale, None if mb is None else mb[None])
                               for _, qb, kb, _, mb in _per_batch(q.detach(), k.detach(), v, mask)])
                lw = _dense_to_sparse(torch.softmax(z, dim=-1))
    else:
        out, idx, w = _lookup_sparse_op(q, k, v, scale, mode == "argmax", mask, backend)
        lw = LookupWeights(idx, w.detach()) if return_weights else None
    if squeeze:
        out = out[0]
        lw = None if lw is None else LookupWeights(lw.indices[0], lw.weights[0])
    return (out, lw) if return_weights else out
