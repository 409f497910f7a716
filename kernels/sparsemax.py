"""Triton kernels of fastad.ops.sparsemax / fastad.ops.dict_lookup.

- ``topk_logits``: streaming tiles of keys against a block of query rows
  (tl.dot over C in chunks), with a running top-K of the logits per row held
  in registers; the N x M logits never reach memory. Keys are split between
  programs for parallelism and the per-split top-Ks are merged on the host.
- ``gather``: the weighted sum of the few supported value rows.
- ``softmax_lookup``: online softmax (flash style) over key tiles, one block
  of value channels per program; returns the output and the log-sum-exp.
- ``sparsemax_rows``: exact sparsemax of long rows, one program per row
  (Michelot's increasing fixed point from the lower bound max - 1).

fp32 inputs use IEEE fp32 dot products (no TF32) so that the result is the
fp32 sparsemax of the same logits as the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastad._backend import triton_interpret

EMPTY_KEY = 1 << 29  # key index of an empty top-K slot (+ slot number: unique per row)
_EMPTY = tl.constexpr(EMPTY_KEY)
_NO_KEY = tl.constexpr(2 * EMPTY_KEY)  # above every key and empty slot


@triton.jit
def _logits_tile(q_ptr, k_ptr, rows, keys, row_ok, key_ok, C, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """scale * q[rows] . k[keys] as a [BLOCK_M, BLOCK_N] fp32 tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        cs = c0 + tl.arange(0, BLOCK_K)
        cm = cs < C
        a = tl.load(q_ptr + rows[:, None] * C + cs[None, :], mask=row_ok[:, None] & cm[None, :], other=0.0)
        b = tl.load(k_ptr + keys[:, None] * C + cs[None, :], mask=key_ok[:, None] & cm[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc * scale


@triton.jit
def _topk_kernel(q_ptr, k_ptr, mask_ptr, vals_ptr, idx_ptr, flag_ptr, N, M, C, keys_per_split, scale,
                 k_batch_stride, mask_batch_stride,
                 HAS_MASK: tl.constexpr, IEEE: tl.constexpr, K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nsplit = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    q_base = q_ptr + b * N * C
    k_base = k_ptr + b * k_batch_stride
    slot = tl.arange(0, K)
    top_v = tl.full((BLOCK_M, K), float("-inf"), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_M, K), dtype=tl.int32) + _EMPTY + slot[None, :]
    thr = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    lo = pid_s * keys_per_split
    hi = tl.minimum(M, lo + keys_per_split)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        if HAS_MASK:
            key_ok = key_ok & (tl.load(mask_ptr + b * mask_batch_stride + keys, mask=key_ok, other=0) != 0)
        z = _logits_tile(q_base, k_base, rows, keys, row_ok, key_ok, C, scale, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        ok = row_ok[:, None] & key_ok[None, :]
        bad = tl.maximum(bad, tl.max((ok & ~(tl.abs(z) < float("inf"))).to(tl.int32), axis=1))
        z = tl.where(ok, z, float("-inf"))
        # Insert the candidates above each row's K-th best one at a time (the
        # best first, lowest key among equals); late tiles have none or few.
        zc = tl.where(z > thr[:, None], z, float("-inf"))
        todo = tl.sum(tl.sum((zc > float("-inf")).to(tl.int32), axis=1), axis=0)
        while todo > 0:
            best = tl.max(zc, axis=1)
            bkey = tl.min(tl.where(zc == best[:, None], keys[None, :], _NO_KEY), axis=1)
            has = best > float("-inf")
            wv = tl.min(top_v, axis=1)
            wk = tl.max(tl.where(top_v == wv[:, None], top_i, -1), axis=1)
            ev = has[:, None] & (top_v == wv[:, None]) & (top_i == wk[:, None])
            top_v = tl.where(ev, best[:, None], top_v)
            top_i = tl.where(ev, bkey[:, None], top_i)
            thr = tl.min(top_v, axis=1)
            zc = tl.where((keys[None, :] == bkey[:, None]) | (zc <= thr[:, None]), float("-inf"), zc)
            todo = tl.sum(tl.sum((zc > float("-inf")).to(tl.int32), axis=1), axis=0)
    out = ((b * nsplit + pid_s) * N + rows[:, None]) * K + slot[None, :]
    tl.store(vals_ptr + out, top_v, mask=row_ok[:, None])
    tl.store(idx_ptr + out, top_i, mask=row_ok[:, None])
    if tl.max(bad, axis=0) > 0:
        tl.store(flag_ptr, 1)


def _dot_config(dtype: torch.dtype) -> dict:
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4)
    # 8 warps: the running top-K (64 x 32 values and keys) and the 64 x 64 logit
    # tile fit in registers without spills on sm_80 and sm_90 (tests/test_aot_compile.py):
    # float32 (FMA dots) with 16-wide operand chunks; a register cap of 192, without
    # which ptxas picks 80 (16-bit, sm_80) or 128 (float32) registers and spills.
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, maxnreg=192)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, maxnreg=192)


def _nonfinite_error() -> ValueError:
    return ValueError("fastad.ops.dict_lookup: a logit of an unmasked key is NaN or infinite "
                      "(check query and keys for NaN / inf)")


def topk_logits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, K: int):
    """(vals, idx) [B, N, K]: the K largest logits scale * q . k per row, descending
    (lowest key first among equals), -inf / -1 in slots beyond the unmasked keys.
    q [B, N, C], k [1|B, M, C], mask [1|B, M] bool or None."""
    B, N, C = q.shape
    M = k.shape[1]
    if M >= EMPTY_KEY:
        raise ValueError(f"fastad.ops.dict_lookup: triton backend takes fewer than {EMPTY_KEY} keys, got {M}")
    q = q.contiguous()
    k = k.contiguous()
    cfg = _dot_config(q.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    KP = triton.next_power_of_2(K)
    row_blocks = triton.cdiv(N, bm)
    if triton_interpret():
        want = 2
    else:
        want = triton.cdiv(2 * torch.cuda.get_device_properties(q.device).multi_processor_count, B * row_blocks)
    splits = max(1, min(want, triton.cdiv(M, bn)))
    per = triton.cdiv(triton.cdiv(M, splits), bn) * bn
    splits = triton.cdiv(M, per)
    vals = torch.empty(B, splits, N, KP, dtype=torch.float32, device=q.device)
    idx = torch.empty(B, splits, N, KP, dtype=torch.int32, device=q.device)
    flag = torch.zeros(1, dtype=torch.int32, device=q.device)
    m8 = None if mask is None else mask.to(torch.int8).contiguous()
    _topk_kernel[(row_blocks, splits, B)](
        q, k, q if m8 is None else m8, vals, idx, flag, N, M, C, per, float(scale),
        0 if k.shape[0] == 1 else M * C, 0 if m8 is None or m8.shape[0] == 1 else M,
        HAS_MASK=m8 is not None, IEEE=q.dtype == torch.float32, K=KP, **cfg)
    if int(flag.item()):
        raise _nonfinite_error()
    v = vals.permute(0, 2, 1, 3).reshape(B, N, splits * KP)
    i = idx.permute(0, 2, 1, 3).reshape(B, N, splits * KP).to(torch.int64)
    # (value descending, key ascending): sort by key, then stably by value
    i, o = torch.sort(i, dim=-1, stable=True)
    v = v.gather(-1, o)
    v, o = torch.sort(v, dim=-1, descending=True, stable=True)
    i = i.gather(-1, o)
    v, i = v[..., :K].contiguous(), i[..., :K]
    return v, torch.where(v == float("-inf"), -1, i).contiguous()


@triton.jit
def _gather_kernel(w_ptr, idx_ptr, v_ptr, out_ptr, N, KK, Cv, v_batch_stride, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = ds < Cv
    v_base = v_ptr + (r // N) * v_batch_stride
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s in range(0, KK):
        j = tl.load(idx_ptr + r * KK + s)
        ws = tl.load(w_ptr + r * KK + s)
        x = tl.load(v_base + tl.maximum(j, 0) * Cv + ds, mask=dm & (j >= 0), other=0.0)
        acc += ws * x.to(tl.float32)
    tl.store(out_ptr + r * Cv + ds, acc, mask=dm)


def gather(w: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out[b, n] = sum_s w[b, n, s] v[b, idx[b, n, s]] (float32); idx -1 = empty slot."""
    B, N, kk = w.shape
    Cv = v.shape[2]
    out = torch.empty(B, N, Cv, dtype=torch.float32, device=w.device)
    if B * N == 0 or Cv == 0:
        return out
    block_d = min(triton.next_power_of_2(Cv), 128 if triton_interpret() else 1024)
    v = v.contiguous()
    _gather_kernel[(B * N, triton.cdiv(Cv, block_d))](
        w.to(torch.float32).contiguous(), idx.contiguous(), v, out, N, kk, Cv,
        0 if v.shape[0] == 1 else v.shape[1] * Cv, BLOCK_D=block_d)
    return out


@triton.jit
def _softmax_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr, flag_ptr, N, M, C, Cv, scale,
                    k_batch_stride, v_batch_stride, mask_batch_stride,
                    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = ds < Cv
    q_base = q_ptr + b * N * C
    k_base = k_ptr + b * k_batch_stride
    v_base = v_ptr + b * v_batch_stride
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(0, M, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < M
        if HAS_MASK:
            key_ok = key_ok & (tl.load(mask_ptr + b * mask_batch_stride + keys, mask=key_ok, other=0) != 0)
        z = _logits_tile(q_base, k_base, rows, keys, row_ok, key_ok, C, scale, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        ok = row_ok[:, None] & key_ok[None, :]
        bad = tl.maximum(bad, tl.max((ok & ~(tl.abs(z) < float("inf"))).to(tl.int32), axis=1))
        z = tl.where(key_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing unmasked yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(z - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + keys[:, None] * Cv + ds[None, :], mask=key_ok[:, None] & dm[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(p, vt, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + (b * N + rows[:, None]) * Cv + ds[None, :], out, mask=row_ok[:, None] & dm[None, :])
    if pid_d == 0:
        tl.store(lse_ptr + b * N + rows, m_i + tl.log(l_i), mask=row_ok)
    if tl.max(bad, axis=0) > 0:
        tl.store(flag_ptr, 1)


def softmax_lookup(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """(out float32 [B, N, Cv], lse float32 [B, N]) of softmax(scale * q k^T) v with
    masked keys at -inf; q [B, N, C], k [1|B, M, C], v [1|B, M, Cv]."""
    B, N, C = q.shape
    M, Cv = v.shape[1], v.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cfg = _dot_config(q.dtype)
    if not triton_interpret():
        # 16-bit inputs: 64-row tiles, the row count of one sm_90 warpgroup MMA (wgmma)
        cfg = dict(cfg, BLOCK_M=32 if q.dtype == torch.float32 else 64, BLOCK_N=32)
    block_d = min(triton.next_power_of_2(max(Cv, 16)), 32 if triton_interpret() else 256)
    out = torch.empty(B, N, Cv, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, N, dtype=torch.float32, device=q.device)
    flag = torch.zeros(1, dtype=torch.int32, device=q.device)
    m8 = None if mask is None else mask.to(torch.int8).contiguous()
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(max(Cv, 1), block_d), B)
    _softmax_kernel[grid](
        q, k, v, q if m8 is None else m8, out, lse, flag, N, M, C, Cv, float(scale),
        0 if k.shape[0] == 1 else M * C, 0 if v.shape[0] == 1 else M * Cv,
        0 if m8 is None or m8.shape[0] == 1 else M,
        HAS_MASK=m8 is not None, IEEE=q.dtype == torch.float32, BLOCK_D=block_d, **cfg)
    if int(flag.item()):
        raise _nonfinite_error()
    return out, lse


@triton.jit
def _sparsemax_rows_kernel(x_ptr, y_ptr, flag_ptr, L, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    base = r * L
    mx = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    for s in range(0, L, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + offs, mask=offs < L, other=float("-inf")).to(tl.float32)
        mx = tl.maximum(mx, x)
        bad = tl.maximum(bad, ((x != x) | (x == float("inf"))).to(tl.int32))
    m = tl.max(mx, axis=0)
    if tl.max(bad, axis=0) > 0:
        tl.store(flag_ptr, 1)
    elif m == float("-inf"):
        tl.store(flag_ptr, 2)
    # Michelot from below: tau_0 = -1 <= tau (shifted values d = x - max);
    # tau_{t+1} = (sum_{d > tau_t} d - 1) / #{d > tau_t} increases to tau and
    # is exact as soon as the set stops shrinking.
    tau = -1.0
    prev = L + 1
    go = 1
    while go > 0:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        cnt = tl.zeros((BLOCK,), dtype=tl.int32)
        for s in range(0, L, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            d = tl.load(x_ptr + base + offs, mask=offs < L, other=float("-inf")).to(tl.float32) - m
            sel = d > tau
            acc += tl.where(sel, d, 0.0)
            cnt += sel.to(tl.int32)
        c = tl.sum(cnt, axis=0)
        tau = (tl.sum(acc, axis=0) - 1.0) / tl.maximum(c, 1).to(tl.float32)
        go = (c < prev).to(tl.int32)
        prev = c
    for s in range(0, L, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        d = tl.load(x_ptr + base + offs, mask=offs < L, other=float("-inf")).to(tl.float32) - m
        tl.store(y_ptr + base + offs, tl.maximum(d - tau, 0.0), mask=offs < L)


def sparsemax_rows(x: torch.Tensor) -> torch.Tensor:
    """Sparsemax of each row of a contiguous 2-D tensor (float32 result)."""
    R, L = x.shape
    y = torch.empty(R, L, dtype=torch.float32, device=x.device)
    if R == 0 or L == 0:
        return y
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    block = min(triton.next_power_of_2(L), 1024 if triton_interpret() else 4096)
    _sparsemax_rows_kernel[(R,)](x, y, flag, L, BLOCK=block)
    f = int(flag.item())
    if f == 1:
        raise ValueError("fastad.ops.sparsemax: `x` contains NaN or +inf")
    if f == 2:
        raise ValueError("fastad.ops.sparsemax: a slice of `x` is -inf everywhere (nothing to keep)")
    return y
