"""Triton backend of fastad.ops.nn_distance: exact k-nearest / top-k-mean search.

Every answer is exact (the float32 re-rank of the reference's float64 definition).
The pipeline, per chunk of query rows:

1. Screen (``_screen_kernel``): flash-style tiles over the bank, tensor-core dots in
   float16 or bfloat16 with float32 accumulation. Each pair gets a screen value s~
   ("larger is nearer": cos, q.b, or 2 q.b - |b|^2 for L2) and every query row a
   proven bound m with |s~ - s| <= m (``_margins``: the rounding of the inputs from
   exact per-row residual norms, |q.b - q^.b^| <= |q - q^| |b| + |q^| |b - b^|, plus
   the float32 accumulation bound (C + 32) 2^-22 |q^| |b^| and the float32 epilogue).
   Keys are s~ or -s~ so that the kept rows are always the k smallest keys.
   Candidates: every bank row whose key is within 2m of an upper bound U of the
   k-th smallest exact key K*. Any j among the exact top k has key_j <= K* <= U, so
   key~_j <= U + m: the candidate set holds the whole exact top k, ties included.
   * k <= 16: one fused pass. U = (k-th smallest key seen so far) + m, the k smallest
     keys of distinct bank rows kept per row in registers (k >= 2: a tile updates them
     only with its keys below the current k-th, one at a time, rarely after the first tiles).
     The bank may be split across programs (split-M parallelism); each split keeps its
     own bound, which is valid because the exact top k restricted to a split is part
     of that split's own top k.
   * larger k (SAA+: 400 of 4,096 or 65,536): a range pass (per-row min / max key), one
     to three histogram passes (256 bins per row, refined around the k-th) give a
     threshold T with at least k keys <= T, so U = T + m; then a collecting pass.
   Candidates are appended to a buffer of ``cap`` slots per row: one atomic per row and
   tile reserves the slots, then the candidates are written one per row and step.
2. Re-rank (``_pairs_kernel``): the exact float32 metric value of every candidate
   (plain FMA loops on the original inputs; L2 as sum((q - b)^2), so near-duplicates
   are exact), then the k smallest (value, index) pairs, packed into int64 keys so that
   exact ties go to the lowest index.
3. Fallback: a row whose candidates overflow its buffer (mass ties such as zero vectors,
   dense clusters) is recomputed exactly against the whole bank (``_exact_kernel``) in
   blocks of at most 4M values, with a running top k.

Peak memory: the outputs; float16 / bfloat16 screen copies of float32 inputs (none for
float16 inputs, nor for bfloat16 inputs on a GPU); float64 per-row statistics; and per row
chunk a candidate buffer (int32 index + float32 value, at most 2^24 entries = 128 MiB) with
its int64 sort keys. Never an N x M matrix.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastad._backend import triton_interpret

__all__ = ["nn_distance_triton"]

SMALL_K = 16  # k <= SMALL_K: single fused pass with the running bound in registers
NBINS = 256  # histogram bins per row (large k)
_CHUNK_ENTRIES = 1 << 24  # candidate-buffer entries per row chunk
_FALLBACK_ENTRIES = 1 << 22  # exact values per fallback block
_FALLBACK_WIDTH = 1 << 16  # bank columns per fallback block
_INT64_MAX = torch.iinfo(torch.int64).max
_METRIC_CODE = {"cosine": 0, "l2": 1, "ip": 2}
_RUN, _FIXED, _HIST, _RANGE = 0, 1, 2, 3  # screen-kernel modes
_U = 2.0 ** -24  # float32 unit roundoff

# Fixed tiles under the interpreter (small, to keep the CPU emulation fast).
_INTERP_SCREEN = dict(BLOCK_N=32, BLOCK_M=64, BLOCK_K=32)
# The first config is the default: no register spills on sm_80 / sm_90 in any mode
# (tests/test_aot_compile.py; benchmarks/results/aot-sm80-sm90.md has them all).
_SCREEN_CONFIGS = [
    triton.Config(dict(BLOCK_N=64, BLOCK_M=256, BLOCK_K=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=128, BLOCK_M=256, BLOCK_K=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64), num_warps=8, num_stages=4),
    triton.Config(dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=64), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=64), num_warps=4, num_stages=4),
]
_SPLIT_ALIGN = 256  # bank split length: a multiple of every BLOCK_M above


# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["row0", "tune_key"])
def _screen_kernel(qs_ptr, bs_ptr, wq_ptr, wb_ptr, cb_ptr, pa_ptr, pb_ptr, qg_ptr, bg_ptr,
                   cand_ptr, cnt_ptr, out_ptr,
                   N, M, C, row0, nrows, split_len, n_splits, cap, bstride, gstride, tune_key,
                   MODE: tl.constexpr, KP: tl.constexpr, K: tl.constexpr, WANT_MAX: tl.constexpr,
                   HAS_CB: tl.constexpr, HAS_GROUPS: tl.constexpr, GROUP_OTHER: tl.constexpr,
                   NB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Screen keys of a BLOCK_N-row block against one bank split, then per MODE:
    _RUN: running bound (pa = margin) and candidate collection; _FIXED: collection below
    the threshold pa; _HIST: per-row histogram of the keys (bin = (key - pa) * pb);
    _RANGE: per-row min / max key. Rows are chunk-local: row0 + r of query batch pid_b."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = r < nrows
    qrow = pid_b.to(tl.int64) * N + row0 + r  # row of the flattened [B * N] query
    crow = pid_b.to(tl.int64) * nrows + r  # row of the chunk buffers
    q_off = qrow * C
    bbase = pid_b.to(tl.int64) * bstride  # first bank row of this batch (bstride 0: shared bank)
    wq = tl.load(wq_ptr + qrow, mask=row_ok, other=0.0)
    pa = tl.load(pa_ptr + crow, mask=row_ok, other=0.0)
    pb = tl.load(pb_ptr + crow, mask=row_ok, other=0.0)
    if HAS_GROUPS:
        qg = tl.load(qg_ptr + qrow, mask=row_ok, other=0)
    col_start = pid_s * split_len
    col_end = tl.minimum(col_start + split_len, M)
    kk = tl.arange(0, BLOCK_K)

    kidx = tl.arange(0, KP)
    # k smallest keys of distinct bank rows so far (slots >= K pinned at -inf, never replaced)
    lst = tl.where(kidx[None, :] < K, float("inf"), float("-inf")) + tl.zeros([BLOCK_N, KP], tl.float32)
    kth = tl.full([BLOCK_N], float("inf"), tl.float32)
    lo = tl.full([BLOCK_N], float("inf"), tl.float32)
    hi = tl.full([BLOCK_N], float("-inf"), tl.float32)

    for m0 in range(col_start, col_end, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < col_end
        bcol = bbase + cols
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_K):
            ck = c0 + kk
            k_ok = ck < C
            a = tl.load(qs_ptr + q_off[:, None] + ck[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(bs_ptr + (bcol * C)[:, None] + ck[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
        wb = tl.load(wb_ptr + bcol, mask=col_ok, other=0.0)
        s = acc * wq[:, None] * wb[None, :]
        if HAS_CB:
            s = s + tl.load(cb_ptr + bcol, mask=col_ok, other=0.0)[None, :]
        if WANT_MAX:
            key = -s
        else:
            key = s
        elig = row_ok[:, None] & col_ok[None, :]
        if HAS_GROUPS:
            bg = tl.load(bg_ptr + pid_b.to(tl.int64) * gstride + cols, mask=col_ok, other=0)
            if GROUP_OTHER:
                elig = elig & (qg[:, None] != bg[None, :])
            else:
                elig = elig & (qg[:, None] == bg[None, :])
        key = tl.where(elig, key, float("inf"))

        if MODE == 3:
            lo = tl.minimum(lo, tl.min(key, axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(elig, key, float("-inf")), axis=1))
        elif MODE == 2:
            x = (tl.where(elig, key, pa[:, None]) - pa[:, None]) * pb[:, None]
            x = tl.minimum(tl.maximum(x, 0.0), NB - 1.0)
            ones = tl.full([BLOCK_N, BLOCK_M], 1, tl.int32)
            # relaxed: only the final counts matter (no ordering), so a fire-and-forget reduction
            tl.atomic_add(out_ptr + crow[:, None] * NB + x.to(tl.int32), ones, mask=elig, sem="relaxed")
        else:
            if MODE == 0:
                if KP == 1:
                    kth = tl.minimum(kth, tl.min(key, axis=1))
                else:
                    # Insert the tile's keys below the current k-th into the k kept ones in
                    # (key, column) order, one bank row at a time: the kept keys stay those
                    # of distinct bank rows; late tiles rarely have any. The order is the
                    # only state (last key and column per row): no tile-sized loop state.
                    lastv = tl.full([BLOCK_N], float("-inf"), tl.float32)
                    lastc = tl.full([BLOCK_N], -1, tl.int32)
                    while tl.sum(((key < kth[:, None]) & ((key > lastv[:, None]) | (
                            (key == lastv[:, None]) & (cols[None, :] > lastc[:, None])))).to(tl.int32)) > 0:
                        rem = (key < kth[:, None]) & ((key > lastv[:, None]) | (
                            (key == lastv[:, None]) & (cols[None, :] > lastc[:, None])))
                        lastv = tl.min(tl.where(rem, key, float("inf")), axis=1)
                        lastc = tl.min(tl.where(rem & (key == lastv[:, None]), cols[None, :], 2147483647), axis=1)
                        cmax, am = tl.max(lst, axis=1, return_indices=True)
                        hit = (kidx[None, :] == am[:, None]) & (lastv < cmax)[:, None]
                        lst = tl.where(hit, lastv[:, None], lst)
                        kth = tl.max(lst, axis=1)
                thr = kth + 2.0 * pa
            else:
                thr = pa
            # ineligible keys are +inf, and thr may be +inf (fewer than k keys seen so far)
            ncol = tl.sum(((key <= thr[:, None]) & (key < float("inf"))).to(tl.int32), axis=1)
            if tl.max(ncol, axis=0) > 0:
                # Reserve ncol slots per row (the count keeps growing past cap: overflow ->
                # exact fallback), then write the candidates one per row and step in column
                # order (the last column written is the only loop state): no prefix sum,
                # no scatter of a whole tile of addresses, no tile-sized loop state.
                base = tl.atomic_add(cnt_ptr + crow, ncol, mask=ncol > 0)
                todo = tl.where(ncol > 0, tl.minimum(ncol, tl.maximum(cap - base, 0)), 0)
                dst = cand_ptr + crow * cap + base
                c = tl.full([BLOCK_N], -1, tl.int32)
                for j in range(0, tl.max(todo, axis=0)):
                    nxt = (key <= thr[:, None]) & (key < float("inf")) & (cols[None, :] > c[:, None])
                    c = tl.min(tl.where(nxt, cols[None, :], 2147483647), axis=1)
                    tl.store(dst + j, c, mask=j < todo)

    if MODE == 3:
        o = (crow * n_splits + pid_s) * 2
        tl.store(out_ptr + o, lo, mask=row_ok)
        tl.store(out_ptr + o + 1, hi, mask=row_ok)


def _screen_smem(cfg: triton.Config, mode: int) -> int:
    """Shared memory of a screen config (bytes, upper bound; checked against ptxas for
    sm_80 / sm_90 by tests/test_aot_compile.py): the pipelined 16-bit operand tiles, or,
    in histogram mode, the tile of 64-bit atomic addresses that Triton stages through
    shared memory (the two are never live together)."""
    kw = cfg.kwargs
    smem = cfg.num_stages * (kw["BLOCK_N"] + kw["BLOCK_M"]) * kw["BLOCK_K"] * 2
    if mode == _HIST:
        smem = max(smem, kw["BLOCK_N"] * kw["BLOCK_M"] * 8)
    return smem


def _prune_screen(configs, named_args, smem_limit: int | None = None, **kwargs):
    """Autotune pruning: only configs whose shared memory fits the device (opt-in limit
    per block). ``smem_limit`` replaces the device query (ahead-of-time checks)."""
    if smem_limit is None:
        dev = named_args["qs_ptr"].device
        smem_limit = torch.cuda.get_device_properties(dev).shared_memory_per_block_optin
    fit = [c for c in configs if _screen_smem(c, kwargs["MODE"]) <= smem_limit]
    return fit or [min(configs, key=lambda c: _screen_smem(c, kwargs["MODE"]))]


_screen_tuned = triton.autotune(configs=_SCREEN_CONFIGS,
                                key=["C", "tune_key", "MODE", "KP", "WANT_MAX", "HAS_CB", "HAS_GROUPS"],
                                prune_configs_by={"early_config_prune": _prune_screen},
                                reset_to_zero=["cnt_ptr", "out_ptr"])(_screen_kernel)


@triton.jit
def _pairs_kernel(q_ptr, b_ptr, iq_ptr, ib_ptr, cand_ptr, pos_ptr, vals_ptr, P, N, C, row0, nrows, cap, bstride,
                  scale, METRIC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Exact float32 metric values of candidate pairs. pos lists filled slots of the
    chunk buffers [B, nrows, cap]; the value of slot p goes to vals[p]."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    pos = tl.load(pos_ptr + p, mask=p_ok, other=0).to(tl.int64)
    bi = pos // (nrows * cap)
    qrow = bi * N + row0 + (pos // cap) % nrows
    brow = bi * bstride + tl.load(cand_ptr + pos, mask=p_ok, other=0)
    iq = tl.load(iq_ptr + qrow, mask=p_ok, other=0.0)
    ib = tl.load(ib_ptr + brow, mask=p_ok, other=0.0)
    cc = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cc
        m = p_ok[:, None] & (c < C)[None, :]
        qv = tl.load(q_ptr + (qrow * C)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + (brow * C)[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        if METRIC == 1:
            d = qv - bv
            acc += tl.sum(d * d, axis=1)
        elif METRIC == 0:  # normalised first: no float32 overflow for huge rows
            acc += tl.sum((qv * iq[:, None]) * (bv * ib[:, None]), axis=1)
        else:
            acc += tl.sum(qv * bv, axis=1)
    if METRIC == 0:
        acc = 1.0 - acc
    elif METRIC == 1:
        acc = tl.sqrt_rn(acc)
    tl.store(vals_ptr + pos, acc * scale, mask=p_ok)


@triton.jit
def _exact_kernel(q_ptr, rows_ptr, b_ptr, iq_ptr, ib_ptr, out_ptr, R, width, col0, C, scale,
                  METRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Exact float32 metric values of the query rows ``rows`` (ids into the flattened
    [B * N] query) against bank columns col0 .. col0 + width - 1: out [R, width]."""
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    ri = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = ri < R
    rid = tl.load(rows_ptr + ri, mask=r_ok, other=0)
    j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j_ok = j < width
    col = col0 + j.to(tl.int64)
    iq = tl.load(iq_ptr + rid, mask=r_ok, other=0.0)
    ib = tl.load(ib_ptr + col, mask=j_ok, other=0.0)
    cc = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cc
        c_ok = c < C
        qv = tl.load(q_ptr + (rid * C)[:, None] + c[None, :], mask=r_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + (col * C)[:, None] + c[None, :], mask=j_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        if METRIC == 1:
            d = qv[:, None, :] - bv[None, :, :]
            acc += tl.sum(d * d, axis=2)
        elif METRIC == 0:
            acc += tl.sum((qv * iq[:, None])[:, None, :] * (bv * ib[:, None])[None, :, :], axis=2)
        else:
            acc += tl.sum(qv[:, None, :] * bv[None, :, :], axis=2)
    if METRIC == 0:
        acc = 1.0 - acc
    elif METRIC == 1:
        acc = tl.sqrt_rn(acc)
    tl.store(out_ptr + (ri.to(tl.int64) * width)[:, None] + j[None, :], acc * scale,
             mask=r_ok[:, None] & j_ok[None, :])


# --------------------------------------------------------------------------- host side


def _round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the smallest float32 >= x (thresholds must never shrink)."""
    y = x.float()
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def _pick_screen_dtype(dtype: torch.dtype, requested: torch.dtype | None, interp: bool) -> torch.dtype:
    if requested is not None:
        if requested not in (torch.float16, torch.bfloat16):
            raise ValueError(f"nn_distance_triton: screen_dtype must be float16 or bfloat16, got {requested}")
        if interp and requested == torch.bfloat16:
            raise ValueError("nn_distance_triton: a bfloat16 screen needs a GPU (the interpreter's bf16 dot is wrong)")
        return requested
    if dtype == torch.bfloat16 and not interp:
        return torch.bfloat16  # the inputs themselves: no rounding, only accumulation error
    return torch.float16  # float16 inputs as they are; float32 rows scaled by powers of two


def _prep(x: torch.Tensor, sdt: torch.dtype):
    """Screen copy of x [Bx, R, C] and float64 per-row statistics: |x|, |x^|, |x - x^| and
    the power of two 2^-e with x^ = screen * 2^-e (float16 rows are scaled to a maximum in
    [2^14, 2^15) so that neither range nor subnormals cost precision)."""
    Bx, R, C = x.shape
    rows = Bx * R
    flat = x.reshape(rows, C)
    f64 = dict(dtype=torch.float64, device=x.device)
    norm = torch.empty(rows, **f64)
    step = max(1, (1 << 22) // C)  # float64 working set of 32 MiB
    if x.dtype == sdt:
        for r0 in range(0, rows, step):
            norm[r0:r0 + step] = torch.linalg.vector_norm(flat[r0:r0 + step], dim=1, dtype=torch.float64)
        return x, norm.view(Bx, R), norm.view(Bx, R), torch.zeros(Bx, R, **f64), torch.ones(Bx, R, **f64)
    xs = torch.empty((rows, C), dtype=sdt, device=x.device)
    hat, resid, unscale = torch.empty(rows, **f64), torch.empty(rows, **f64), torch.empty(rows, **f64)
    for r0 in range(0, rows, step):
        xc = flat[r0:r0 + step].double()
        norm[r0:r0 + step] = torch.linalg.vector_norm(xc, dim=1)
        if sdt == torch.float16:
            amax = xc.abs().amax(dim=1)
            ex = torch.where(amax > 0, 15 - torch.frexp(amax).exponent, 0).clamp_max(100)
            sc = torch.ldexp(torch.ones_like(amax), ex)
        else:
            sc = torch.ones(xc.shape[0], **f64)
        xsc = (xc * sc[:, None]).to(sdt)
        xs[r0:r0 + step] = xsc
        back = xsc.double() / sc[:, None]
        hat[r0:r0 + step] = torch.linalg.vector_norm(back, dim=1)
        resid[r0:r0 + step] = torch.linalg.vector_norm(xc - back, dim=1)
        unscale[r0:r0 + step] = 1.0 / sc
    return xs.view(Bx, R, C), norm.view(Bx, R), hat.view(Bx, R), resid.view(Bx, R), unscale.view(Bx, R)


def _margins(metric: str, C: int, qn, qh, qr, iq, bn, bh, br, ib, B: int):
    """Per query row m >= |s~ - s| for every bank row (float64 [B, N]); bank maxima per batch."""
    gam = (C + 32) * 2.0 ** -22  # float32 accumulation of C products (tensor cores truncate)
    Bb = bn.shape[0]

    def bmax(t):
        return t.amax(dim=1).expand(B) if Bb == 1 else t.amax(dim=1)

    if metric == "cosine":
        x1, x2, x3 = bmax(ib * bn), bmax(ib * br), bmax(ib * bh)
        a_r, a_h = iq * qr, iq * qh
        m = a_r * x1[:, None] + a_h * x2[:, None] + (gam + 6 * _U) * a_h * x3[:, None]
    else:
        x1, x2, x3 = bmax(bn), bmax(br), bmax(bh)
        m = qr * x1[:, None] + qh * x2[:, None] + gam * qh * x3[:, None]
        if metric == "ip":
            m = m + 6 * _U * qh * x3[:, None]
        else:
            x4 = bmax(bn * bn)
            m = 2 * m + 14 * _U * qh * x3[:, None] + 4 * _U * x4[:, None]
    return m * (1 + 2.0 ** -10)


def _pack(v: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys ordering (value, index) lexicographically (descending value when
    ``largest``); invalid entries get INT64_MAX."""
    bits = (v + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    if largest:
        mono = ~mono
    return (mono.long() * (1 << 32) + idx).masked_fill(~valid, _INT64_MAX)


def _unpack(packed: torch.Tensor, largest: bool):
    """Inverse of _pack: (values float32, indices int64, missing bool)."""
    missing = packed == _INT64_MAX
    hi = torch.div(packed, 1 << 32, rounding_mode="floor")
    idx = packed - hi * (1 << 32)
    mono = hi.to(torch.int32)
    if largest:
        mono = ~mono
    bits = torch.where(mono < 0, mono ^ 0x7FFFFFFF, mono)
    return bits.view(torch.float32), idx, missing


def _fill_missing(v, i, missing, largest):
    fill = -math.inf if largest else math.inf
    return v.masked_fill(missing, fill), i.masked_fill(missing, -1)


def _select(vals, cand, cnt, k: int, largest: bool):
    """k best (value, index) of each row's candidates: vals / cand [B, R, cap], cnt [B, R]."""
    B, R, cap = vals.shape
    width = max(1, min(cap, int(cnt.max())))
    v = vals[..., :width]
    ci = cand[..., :width].long()
    valid = torch.arange(width, device=vals.device) < cnt.clamp_max(cap)[..., None]
    packed = _pack(v, ci, valid, largest)
    kk = min(k, width)
    top, pos = packed.topk(kk, dim=-1, largest=False, sorted=True)
    tv, ti = _fill_missing(v.gather(-1, pos), ci.gather(-1, pos), top == _INT64_MAX, largest)
    if kk < k:
        fill = -math.inf if largest else math.inf
        tv = torch.cat([tv, tv.new_full((B, R, k - kk), fill)], -1)
        ti = torch.cat([ti, ti.new_full((B, R, k - kk), -1)], -1)
    return tv, ti


class _Search:
    """One call's state: inputs, screen copies, per-row weights and margins, launchers."""

    def __init__(self, query, bank, k, metric, scale, largest, qg, bg, group_match, screen_dtype, cap, splits,
                 small_k_max, config, stats):
        self.query, self.bank, self.k, self.metric, self.scale = query, bank, k, metric, float(scale)
        self.largest, self.qg, self.bg, self.group_other = largest, qg, bg, group_match == "other"
        self.stats = stats if stats is not None else {}
        self.B, self.N, self.C = query.shape
        self.Bb, self.M = bank.shape[0], bank.shape[1]
        self.bstride = self.M if self.Bb > 1 else 0  # bank rows between batches (0: shared bank)
        self.gstride = self.M if bg is not None and bg.shape[0] > 1 else 0  # bank groups may be shared
        self.interp = triton_interpret()
        self.want_max = (metric == "ip") == largest  # keep the largest s ("nearer") per row
        self.small = k <= small_k_max
        self.kp = triton.next_power_of_2(k) if self.small else 1
        if self.small and self.kp > 16:
            raise ValueError(f"nn_distance_triton: small_k_max must be <= 16, got k={k} on the fused path")
        self.config = dict(config) if config is not None else (dict(_INTERP_SCREEN) if self.interp else None)
        self.sdt = _pick_screen_dtype(query.dtype, screen_dtype, self.interp)
        self._prepare()
        self._plan(cap, splits)

    def _prepare(self):
        qs, qn, qh, qr, qu = _prep(self.query, self.sdt)
        bs, bn, bh, br, bu = _prep(self.bank, self.sdt)
        eps = 1e-12  # F.normalize
        iq, ib = 1.0 / qn.clamp_min(eps), 1.0 / bn.clamp_min(eps)
        if self.metric == "cosine":
            wq, wb = iq * qu, ib * bu
        elif self.metric == "ip":
            wq, wb = qu, bu
        else:
            wq, wb = 2.0 * qu, bu
        self.qs, self.bs = qs, bs
        self.wq, self.wb = wq.float().contiguous(), wb.float().contiguous()
        self.cb = (-(bn * bn)).float().contiguous() if self.metric == "l2" else None
        self.iq, self.ib = iq.float().contiguous(), ib.float().contiguous()
        self.margin = _margins(self.metric, self.C, qn, qh, qr, iq, bn, bh, br, ib, self.B)
        self.stats.update(screen_dtype=self.sdt, path="fused" if self.small else "histogram")

    def _plan(self, cap, splits):
        M = self.M
        if splits is None:
            if self.interp or self.query.device.type != "cuda":
                splits = 1
            else:
                sms = torch.cuda.get_device_properties(self.query.device).multi_processor_count
                row_blocks = triton.cdiv(self.N, 128) * self.B
                splits = max(1, min(triton.cdiv(8 * sms, row_blocks), M // (8 * _SPLIT_ALIGN)))
        align = _SPLIT_ALIGN if self.config is None else self.config["BLOCK_M"]
        self.split_len = triton.cdiv(triton.cdiv(M, max(1, splits)), align) * align
        self.S = triton.cdiv(M, self.split_len)
        if cap is None:
            cap = 32 + 8 * self.k + 16 * self.S if self.small else 2 * self.k + 512
        self.cap = min(int(cap), M)
        if self.cap < self.k:
            raise ValueError(f"nn_distance_triton: cap={cap} is smaller than k={self.k}")
        rows = max(1, _CHUNK_ENTRIES // (self.B * self.cap))
        self.R = self.N if rows >= self.N else max(1, rows // 128 * 128 or rows)
        self.stats.update(splits=self.S, cap=self.cap, row_chunk=self.R, hist_levels=0, overflow_rows=0,
                          max_candidates=0)

    # ------------------------------------------------------------------ launches

    def _screen(self, mode, row0, nr, pa, pb, cand, cnt, out):
        dummy = cnt
        args = (self.qs, self.bs, self.wq, self.wb, self.cb if self.cb is not None else self.wb, pa, pb,
                self.qg if self.qg is not None else dummy, self.bg if self.bg is not None else dummy,
                cand, cnt, out, self.N, self.M, self.C, row0, nr, self.split_len, self.S, self.cap, self.bstride,
                self.gstride, int(math.log2(max(nr, 1))) * 64 + int(math.log2(self.M)))
        meta = dict(MODE=mode, KP=self.kp, K=self.k, WANT_MAX=self.want_max, HAS_CB=self.cb is not None,
                    HAS_GROUPS=self.qg is not None, GROUP_OTHER=self.group_other, NB=NBINS)

        def grid(m):
            return (triton.cdiv(nr, m["BLOCK_N"]), self.S, self.B)

        if self.config is None:
            _screen_tuned[grid](*args, **meta)
        else:
            _screen_kernel[grid](*args, **meta, **self.config)

    def _threshold(self, row0, nr, m, cand, cnt):
        """Large k: per-row T with at least k screen keys <= T (float64 [B, nr]), or inf."""
        dev = self.query.device
        z = torch.zeros((self.B, nr), dtype=torch.float32, device=dev)
        rng = torch.empty((self.B, nr, self.S, 2), dtype=torch.float32, device=dev)
        self._screen(_RANGE, row0, nr, z, z, cand, cnt, rng)
        lo, hi = rng[..., 0].amin(-1).double(), rng[..., 1].amax(-1).double()
        empty = ~(lo <= hi)
        lo = torch.where(empty, 0.0, lo)
        w = torch.where(empty, 1.0, torch.maximum((hi - lo) / NBINS, lo.abs() * 2.0 ** -20 + 1e-30))
        best = torch.full_like(lo, math.inf)
        for level in range(3):
            lo32, inv32 = lo.float().contiguous(), (1.0 / w).float().contiguous()
            lo, w = lo32.double(), 1.0 / inv32.double()
            hist = torch.zeros((self.B, nr, NBINS), dtype=torch.int32, device=dev)
            self._screen(_HIST, row0, nr, lo32, inv32, cand, cnt, hist)
            self.stats["hist_levels"] = max(self.stats["hist_levels"], level + 1)
            cum = hist.cumsum(-1)
            i = (cum < self.k).sum(-1)  # first bin reaching k (NBINS: never)
            fin = i < NBINS - 1
            # one bin of slack covers the float32 rounding of the bin index
            best = torch.minimum(best, torch.where(fin, lo + (i + 2) * w, math.inf))
            est = cum.gather(-1, (i + 1).clamp_max(NBINS - 1)[..., None])[..., 0]
            crowded = fin & (est > self.cap // 2) & (w > m / 2)
            if not bool(crowded.any()):
                break
            lo, w = torch.where(fin, lo + (i - 1) * w, lo), torch.where(fin, 3 * w / NBINS, w)
        return best

    def run(self):
        B, N, k, dev = self.B, self.N, self.k, self.query.device
        values = torch.empty((B, N, k), dtype=torch.float32, device=dev)
        indices = torch.empty((B, N, k), dtype=torch.int64, device=dev)
        over_b, over_n = [], []
        blk = dict(BLOCK_P=64 if self.interp else 32, BLOCK_C=64 if self.interp else 128)
        for row0 in range(0, N, self.R):
            nr = min(self.R, N - row0)
            cnt = torch.zeros((B, nr), dtype=torch.int32, device=dev)
            cand = torch.empty((B, nr, self.cap), dtype=torch.int32, device=dev)
            m = self.margin[:, row0:row0 + nr]
            if self.small:
                m32 = _round_up_f32(m).contiguous()
                self._screen(_RUN, row0, nr, m32, m32, cand, cnt, cnt)
            elif self.cap >= self.M:  # the buffer holds every bank row: no threshold needed
                thr = torch.full((B, nr), math.inf, dtype=torch.float32, device=dev)
                self._screen(_FIXED, row0, nr, thr, thr, cand, cnt, cnt)
            else:
                thr = _round_up_f32(self._threshold(row0, nr, m, cand, cnt) + 2 * m).contiguous()
                self._screen(_FIXED, row0, nr, thr, thr, cand, cnt, cnt)
            vals = torch.empty((B, nr, self.cap), dtype=torch.float32, device=dev)
            filled = torch.arange(self.cap, device=dev) < cnt.clamp_max(self.cap)[..., None]
            pos = torch.nonzero(filled.flatten()).flatten()
            if B * nr * self.cap < 2 ** 31:
                pos = pos.to(torch.int32)
            if pos.numel():
                _pairs_kernel[(triton.cdiv(pos.numel(), blk["BLOCK_P"]),)](
                    self.query, self.bank, self.iq, self.ib, cand, pos, vals, pos.numel(), N, self.C, row0, nr,
                    self.cap, self.bstride, self.scale, METRIC=_METRIC_CODE[self.metric], num_warps=4, **blk)
            self.stats["max_candidates"] = max(self.stats["max_candidates"], int(cnt.max()))
            tv, ti = _select(vals, cand, cnt, k, self.largest)
            values[:, row0:row0 + nr], indices[:, row0:row0 + nr] = tv, ti
            ob, orow = torch.nonzero(cnt > self.cap, as_tuple=True)
            over_b.append(ob)
            over_n.append(orow + row0)
        ob, on = torch.cat(over_b), torch.cat(over_n)
        self.stats["overflow_rows"] = int(ob.numel())
        if ob.numel():
            fv, fi = self._fallback(ob, on)
            values[ob, on], indices[ob, on] = fv, fi
        return values, indices

    def _fallback(self, ob, on):
        """Exact top k of the given (batch, row) pairs against the whole bank."""
        k, M, dev = self.k, self.M, self.query.device
        out_v = torch.empty((ob.numel(), k), dtype=torch.float32, device=dev)
        out_i = torch.empty((ob.numel(), k), dtype=torch.int64, device=dev)
        width_max = min(M, _FALLBACK_WIDTH)
        rows_per = max(1, _FALLBACK_ENTRIES // width_max)
        qflat = self.query.reshape(-1, self.C)
        iqflat = self.iq.reshape(-1)
        qgflat = None if self.qg is None else self.qg.reshape(-1)
        for bb in range(self.Bb):
            sel = torch.nonzero(ob == bb).flatten() if self.Bb > 1 else torch.arange(ob.numel(), device=dev)
            if sel.numel() == 0:
                continue
            bank, ib = self.bank[bb], self.ib[bb]
            for f0 in range(0, sel.numel(), rows_per):
                part = sel[f0:f0 + rows_per]
                rid = (ob[part] * self.N + on[part]).contiguous()
                run = None
                for c0 in range(0, M, width_max):
                    width = min(width_max, M - c0)
                    vals = torch.empty((rid.numel(), width), dtype=torch.float32, device=dev)
                    grid = (triton.cdiv(rid.numel(), 16), triton.cdiv(width, 32))
                    _exact_kernel[grid](qflat, rid, bank, iqflat, ib, vals, rid.numel(), width, c0, self.C,
                                        self.scale, METRIC=_METRIC_CODE[self.metric], BLOCK_R=16, BLOCK_M=32,
                                        BLOCK_C=16, num_warps=4)
                    if qgflat is not None:
                        same = qgflat[rid][:, None] == self.bg[bb if self.bg.shape[0] > 1 else 0, c0:c0 + width]
                        elig = ~same if self.group_other else same
                    else:
                        elig = torch.ones_like(vals, dtype=torch.bool)
                    cols = torch.arange(c0, c0 + width, device=dev)
                    top = _pack(vals, cols, elig, self.largest).topk(min(k, width), dim=-1, largest=False).values
                    run = top if run is None else torch.cat([run, top], -1)
                    run = run.topk(min(k, run.shape[-1]), dim=-1, largest=False, sorted=True).values
                v, i, miss = _unpack(run, self.largest)
                out_v[part], out_i[part] = _fill_missing(v, i, miss, self.largest)
        return out_v, out_i


def nn_distance_triton(query: torch.Tensor, bank: torch.Tensor, k: int, metric: str, scale: float, reduce: str,
                       query_groups: torch.Tensor | None = None, bank_groups: torch.Tensor | None = None,
                       group_match: str = "other", need_indices: bool = True, *,
                       screen_dtype: torch.dtype | None = None, cap: int | None = None, splits: int | None = None,
                       small_k_max: int = SMALL_K, config: dict | None = None,
                       stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton backend of fastad.ops.nn_distance on normalised arguments: query [B, N, C],
    bank [1 or B, M, C] contiguous (float32 / float16 / bfloat16), groups int64 [B, N] /
    [1 or B, M] or None. Returns (values float32 [B, N, k] or [B, N], indices int64
    [B, N, k] or None), exactly as nn_distance_reference.

    Internal knobs (tests, tuning): ``screen_dtype`` float16 / bfloat16 for the screen
    dots; ``cap`` candidate slots per row; ``splits`` bank splits per row block;
    ``small_k_max`` largest k on the fused single-pass path (<= 16); ``config`` fixed tiles
    (BLOCK_N, BLOCK_M, BLOCK_K) instead of autotuning; ``stats`` a dict that receives the
    path taken (screen dtype, splits, cap, histogram levels, rows recomputed exactly).
    """
    B, N, _ = query.shape
    largest = metric == "ip" if reduce == "topk" else reduce == "mean_largest"
    if B * N == 0:
        values = torch.empty((B, N, k), dtype=torch.float32, device=query.device)
        indices = torch.empty((B, N, k), dtype=torch.int64, device=query.device)
    else:
        values, indices = _Search(query, bank, k, metric, scale, largest, query_groups, bank_groups, group_match,
                                  screen_dtype, cap, splits, small_k_max, config, stats).run()
    if reduce == "topk":
        return values, indices
    valid = indices >= 0
    count = valid.sum(-1)
    mean = values.double().masked_fill(~valid, 0.0).sum(-1) / count.clamp_min(1)
    mean = mean.masked_fill(count == 0, math.nan).float()
    return mean, (indices if need_indices else None)
