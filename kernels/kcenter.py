"""Triton kernels of fastad.ops.kcenter_greedy.

Both paths evaluate the canonical distance of fastad/ops/kcenter.py bit for bit:
float32 differences, exact float64 squares, the recursive-halves pairwise sum over
the row zero-padded to P = 2^LOG2P (chunks of BLOCK_C columns are subtrees, their
sums the leaves of the top of the tree), correctly rounded sqrt, round to float32.
A row is skipped when the triangle inequality proves it cannot get closer to the
new center s: D(a, s) >= 2 mind(x) (1 + 1e-5) for its nearest center a. Those rows
are never loaded (masked loads), which is where the speed comes from on data with
structure; the skip has a margin far above the float32 rounding of D, so the mins
(and picks) equal the plain loop's.

* many small problems (iCAS: B images x 1,369 patches; N <= 2,048, or B >= a quarter
  of the GPU's SMs): one program per problem runs all steps on chip
  (``_persistent_kernel``), in chunks of steps when a progress bar is shown;
* otherwise (coresets, a single large problem): per step, center distances, a fused
  update + block argmax over the rows on the whole grid, and a tiny per-problem
  reduction. The picked index stays on the device (no host sync); each step is three
  launches.

Selected points hold mind = -inf (never re-picked); radius = max mind at the end.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastad._backend import triton_interpret

_KAPPA2 = 1e-5  # triangle-test margin (see csrc/cpu/kcenter_kernel.cpp)
_PERSISTENT_MAX_N = 16384
_PERSISTENT_SMALL_N = 2048  # rows of a problem that one program handles at least as fast as a grid


@triton.jit
def _pairwise(t, BN: tl.constexpr, W: tl.constexpr, LOG2W: tl.constexpr):
    """Recursive-halves sum of each row of t [BN, W] (W = 2^LOG2W): t[i] = t[2i] + t[2i+1]."""
    for i in tl.static_range(LOG2W):
        a, b = tl.split(tl.reshape(t, [BN, W >> (i + 1), 2]))
        t = a + b
    return tl.reshape(t, [BN])


@triton.jit
def _canon_dist(xb_ptr, rows, rmask, s_ptr, C,
                BN: tl.constexpr, BLOCK_C: tl.constexpr, LOG2BC: tl.constexpr,
                NCH: tl.constexpr, LOG2NCH: tl.constexpr):
    """Canonical D(x_r, s) for the rows `rows` [BN] of one problem (xb_ptr: its [N, C])."""
    cols = tl.arange(0, BLOCK_C)
    chs = tl.arange(0, NCH)
    roff = rows.to(tl.int64) * C
    acc = tl.zeros([BN, NCH], dtype=tl.float64)
    for j in range(NCH):
        cc = j * BLOCK_C + cols
        cm = cc < C
        xv = tl.load(xb_ptr + roff[:, None] + cc[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        sv = tl.load(s_ptr + cc, mask=cm, other=0.0)
        d = (xv.to(tl.float32) - sv.to(tl.float32)[None, :]).to(tl.float64)
        sub = _pairwise(d * d, BN, BLOCK_C, LOG2BC)
        acc = tl.where(chs[None, :] == j, sub[:, None], acc)
    tot = _pairwise(acc, BN, NCH, LOG2NCH)
    # float64 sqrt lowers to the correctly rounded sqrt.rn.f64 (only float32 has an approximate one)
    return tl.sqrt(tot).to(tl.float32)


@triton.jit
def _center_block(xb_ptr, cidx_b, dcs_b, s_ptr, j0, tau, C,
                  BT: tl.constexpr, BLOCK_C: tl.constexpr, LOG2BC: tl.constexpr,
                  NCH: tl.constexpr, LOG2NCH: tl.constexpr):
    """dcs[j] = D(center j, s) for centers j0 .. j0 + BT - 1 (< tau)."""
    js = j0 + tl.arange(0, BT)
    jm = js < tau
    cj = tl.load(cidx_b + js, mask=jm, other=0)
    d = _canon_dist(xb_ptr, cj, jm, s_ptr, C, BT, BLOCK_C, LOG2BC, NCH, LOG2NCH)
    tl.store(dcs_b + js, d, mask=jm)


@triton.jit
def _row_block(xb_ptr, mind_b, assign_b, dcs_b, s_ptr, s, tau, r0, N, C, KAPPA2,
               BN: tl.constexpr, BLOCK_C: tl.constexpr, LOG2BC: tl.constexpr,
               NCH: tl.constexpr, LOG2NCH: tl.constexpr):
    """Adds center s (ordinal tau) to rows r0 .. r0 + BN - 1; returns their
    (max mind, lowest index attaining it) after the update."""
    rows = r0 + tl.arange(0, BN)
    valid = rows < N
    m = tl.load(mind_b + rows, mask=valid, other=float("-inf"))
    a = tl.load(assign_b + rows, mask=valid, other=-1)
    dc = tl.load(dcs_b + a, mask=valid & (a >= 0), other=0.0)
    # Rows with no center yet have m = +inf and never skip; selected rows (-inf) always do.
    need = valid & ~(dc >= 2.0 * m * (1.0 + KAPPA2))
    d = _canon_dist(xb_ptr, rows, need, s_ptr, C, BN, BLOCK_C, LOG2BC, NCH, LOG2NCH)
    closer = need & (d < m)
    m = tl.where(closer, d, m)
    m = tl.where(rows == s, float("-inf"), m)
    tl.store(mind_b + rows, m, mask=valid)
    tl.store(assign_b + rows, tl.where(closer, tau, a), mask=valid & closer)
    best = tl.max(m, axis=0)
    bidx = tl.min(tl.where(valid & (m == best), rows, 2147483647), axis=0)
    return best, bidx


@triton.jit
def _persistent_kernel(x_ptr, forced_ptr, out_ptr, mind_ptr, assign_ptr, cidx_ptr, dcs_ptr, nxt_ptr, radius_ptr,
                       N, C, M, PICKS, T, step0, nsteps, KAPPA2,
                       BN: tl.constexpr, BT: tl.constexpr, BLOCK_C: tl.constexpr, LOG2BC: tl.constexpr,
                       NCH: tl.constexpr, LOG2NCH: tl.constexpr):
    """One program per problem: steps step0 .. step0 + nsteps - 1 (forced centers first)."""
    b = tl.program_id(0).to(tl.int64)
    xb_ptr = x_ptr + b * N * C
    mind_b = mind_ptr + b * N
    assign_b = assign_ptr + b * N
    cidx_b = cidx_ptr + b * T
    dcs_b = dcs_ptr + b * T
    for tau in range(step0, step0 + nsteps):
        if tau < M:
            s = tl.load(forced_ptr + b * M + tau).to(tl.int32)
        else:
            s = tl.load(nxt_ptr + b)
            tl.store(out_ptr + b * PICKS + (tau - M), s.to(tl.int64))
        tl.store(cidx_b + tau, s)
        s_ptr = xb_ptr + s.to(tl.int64) * C
        for j0 in range(0, tau, BT):
            _center_block(xb_ptr, cidx_b, dcs_b, s_ptr, j0, tau, C, BT, BLOCK_C, LOG2BC, NCH, LOG2NCH)
        tl.debug_barrier()
        best = float("-inf")
        bidx = 0
        for r0 in range(0, N, BN):
            bv, bi = _row_block(xb_ptr, mind_b, assign_b, dcs_b, s_ptr, s, tau, r0, N, C, KAPPA2,
                                BN, BLOCK_C, LOG2BC, NCH, LOG2NCH)
            take = bv > best  # blocks run in index order: ties keep the earlier one
            bidx = tl.where(take, bi, bidx)
            best = tl.where(take, bv, best)
        tl.store(nxt_ptr + b, bidx)
        tl.store(radius_ptr + b, tl.maximum(best, 0.0))
        tl.debug_barrier()


@triton.jit
def _centers_kernel(x_ptr, forced_ptr, nxt_ptr, cidx_ptr, dcs_ptr, N, C, M, T, tau,
                    BT: tl.constexpr, BLOCK_C: tl.constexpr, LOG2BC: tl.constexpr,
                    NCH: tl.constexpr, LOG2NCH: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    if tau < M:
        s = tl.load(forced_ptr + b * M + tau).to(tl.int32)
    else:
        s = tl.load(nxt_ptr + b)
    xb_ptr = x_ptr + b * N * C
    _center_block(xb_ptr, cidx_ptr + b * T, dcs_ptr + b * T, xb_ptr + s.to(tl.int64) * C,
                  tl.program_id(0) * BT, tau, C, BT, BLOCK_C, LOG2BC, NCH, LOG2NCH)


@triton.jit
def _rows_kernel(x_ptr, forced_ptr, nxt_ptr, mind_ptr, assign_ptr, dcs_ptr, pval_ptr, pidx_ptr,
                 N, C, M, T, tau, NB, KAPPA2,
                 BN: tl.constexpr, BLOCK_C: tl.constexpr, LOG2BC: tl.constexpr,
                 NCH: tl.constexpr, LOG2NCH: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if tau < M:
        s = tl.load(forced_ptr + b * M + tau).to(tl.int32)
    else:
        s = tl.load(nxt_ptr + b)
    xb_ptr = x_ptr + b * N * C
    bv, bi = _row_block(xb_ptr, mind_ptr + b * N, assign_ptr + b * N, dcs_ptr + b * T,
                        xb_ptr + s.to(tl.int64) * C, s, tau, blk * BN, N, C, KAPPA2,
                        BN, BLOCK_C, LOG2BC, NCH, LOG2NCH)
    tl.store(pval_ptr + b * NB + blk, bv)
    tl.store(pidx_ptr + b * NB + blk, bi)


@triton.jit
def _reduce_kernel(forced_ptr, nxt_ptr, out_ptr, cidx_ptr, pval_ptr, pidx_ptr, radius_ptr,
                   M, PICKS, T, tau, NB, BR: tl.constexpr):
    """Records the step's center, then the next pick: argmax over the blocks' partials."""
    b = tl.program_id(0).to(tl.int64)
    if tau < M:
        s = tl.load(forced_ptr + b * M + tau).to(tl.int32)
    else:
        s = tl.load(nxt_ptr + b)
        tl.store(out_ptr + b * PICKS + (tau - M), s.to(tl.int64))
    tl.store(cidx_ptr + b * T + tau, s)
    best = float("-inf")
    bidx = 0
    for k0 in range(0, NB, BR):
        ks = k0 + tl.arange(0, BR)
        km = ks < NB
        v = tl.load(pval_ptr + b * NB + ks, mask=km, other=float("-inf"))
        i = tl.load(pidx_ptr + b * NB + ks, mask=km, other=2147483647)
        cv = tl.max(v, axis=0)
        ci = tl.min(tl.where(km & (v == cv), i, 2147483647), axis=0)
        take = cv > best
        bidx = tl.where(take, ci, bidx)
        best = tl.where(take, cv, best)
    tl.store(nxt_ptr + b, bidx)
    tl.store(radius_ptr + b, tl.maximum(best, 0.0))


def _blocks(C: int) -> dict:
    p = 1 << max(0, (C - 1).bit_length())
    bc = min(p, 64)
    nch = p // bc
    return dict(BLOCK_C=bc, LOG2BC=bc.bit_length() - 1, NCH=nch, LOG2NCH=nch.bit_length() - 1)


def _use_persistent(B: int, N: int, dev: torch.device, interp: bool) -> bool:
    """One program per problem pays off when the problems fill the GPU (or are tiny);
    a few large problems (a PatchCore coreset) take the multi-block path instead, where
    every step spreads the rows over the whole GPU and reduces the pick on the device."""
    if N > _PERSISTENT_MAX_N:
        return False
    if interp or dev.type != "cuda" or N <= _PERSISTENT_SMALL_N:
        return True
    return B >= torch.cuda.get_device_properties(dev).multi_processor_count // 4


def kcenter_select(xb: torch.Tensor, forced: torch.Tensor, picks: int, progress: bool = False,
                   persistent: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """xb [B, N, C] contiguous (float32/16, bfloat16), forced [B, M] int64 on xb's device.
    Adds the forced centers, then `picks` argmax picks. Returns (indices [B, picks]
    int64, radius [B] float32, the L2 coverage radius)."""
    from fastad.ops.kcenter import _progress_bar

    B, N, C = xb.shape
    dev = xb.device
    M = forced.shape[1]
    T = M + picks
    forced = forced.to(device=dev, dtype=torch.int64).contiguous()
    mind = torch.full((B, N), math.inf, dtype=torch.float32, device=dev)
    assign = torch.full((B, N), -1, dtype=torch.int32, device=dev)
    cidx = torch.zeros((B, max(T, 1)), dtype=torch.int32, device=dev)
    dcs = torch.zeros((B, max(T, 1)), dtype=torch.float32, device=dev)
    nxt = torch.zeros(B, dtype=torch.int32, device=dev)  # all-inf argmax -> index 0
    out = torch.zeros((B, picks), dtype=torch.int64, device=dev)
    radius = torch.zeros(B, dtype=torch.float32, device=dev)
    blk = _blocks(C)
    interp = triton_interpret()
    if persistent is None:
        persistent = _use_persistent(B, N, dev, interp)
    with _progress_bar(picks, progress) as bar:
        if persistent:
            bn = 16 if interp else 32
            chunk = T if not progress else max(1, T // 100)
            for step0 in range(0, T, chunk):
                n = min(chunk, T - step0)
                _persistent_kernel[(B,)](xb, forced, out, mind, assign, cidx, dcs, nxt, radius,
                                         N, C, M, picks, max(T, 1), step0, n, _KAPPA2,
                                         BN=bn, BT=bn, num_warps=4, **blk)
                bar.update(max(0, step0 + n - max(step0, M)))
        else:
            bn = 16 if interp else 64
            nb = triton.cdiv(N, bn)
            pval = torch.empty((B, nb), dtype=torch.float32, device=dev)
            pidx = torch.empty((B, nb), dtype=torch.int32, device=dev)
            for tau in range(T):
                if tau:
                    _centers_kernel[(triton.cdiv(tau, bn), B)](xb, forced, nxt, cidx, dcs, N, C, M, max(T, 1), tau,
                                                               BT=bn, num_warps=4, **blk)
                _rows_kernel[(nb, B)](xb, forced, nxt, mind, assign, dcs, pval, pidx, N, C, M, max(T, 1), tau,
                                      nb, _KAPPA2, BN=bn, num_warps=4, **blk)
                _reduce_kernel[(B,)](forced, nxt, out, cidx, pval, pidx, radius, M, picks, max(T, 1), tau, nb,
                                     BR=256 if not interp else 64, num_warps=4)
                if tau >= M:
                    bar.update(1)
    return out, radius
