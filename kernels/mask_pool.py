"""Triton kernel of fastad.ops.mask_pool: adjoint-projected mask weights.

One program computes one feature row ``y`` of the weight image of one mask:

    weights[n, o, y, x] = sum_{y', x'} Uy[y', y] * Ux[x', x] * b_o[n, y', x']

where ``b_o`` is the mask (o = 0) or its complement (o = 1) resized to the
pooling grid and binarised (or kept soft). The pooling rows y' and columns x'
that reach (y, x) are contiguous bands (the columns of the feature-resize
matrices), so the program gathers exactly the pooling pixels it needs and
recomputes their resized values from the source mask; nothing of size
[N, Hp, Wp] is written. The resize reproduces CUDA ``F.interpolate``
(bilinear with fused multiply-adds, nearest, area with row-major window sums).
Pixel counts come out per feature row ([N, nout, H]); each pooling pixel is
counted by exactly one program, its owner (the first feature row / column it
reaches), and the caller sums the rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

@triton.jit
def _resized(masks_ptr, base, Wm, Hp, yp, ok, ix0, ix1, lx0, lx1, yi_ptr, yl_ptr, AREA_KW,
             MODE: tl.constexpr, ONE_MINUS: tl.constexpr):
    """Mask value (or 1 - mask) resized to pooling row ``yp`` at the columns of ``ix0``/``ix1``.

    MODE (codes of csrc/cpu/mask_pool_kernel.h): 0 identity, 1 bilinear, 3 nearest, 4 area.
    """
    if MODE == 0:
        s = tl.load(masks_ptr + base + yp * Wm + ix0, mask=ok, other=0).to(tl.float32)
        if ONE_MINUS:
            s = 1.0 - s
        v = s
    elif MODE == 1:
        iy0 = tl.load(yi_ptr + yp).to(tl.int64)
        iy1 = tl.load(yi_ptr + Hp + yp).to(tl.int64)
        ly0 = tl.load(yl_ptr + yp)
        ly1 = tl.load(yl_ptr + Hp + yp)
        s00 = tl.load(masks_ptr + base + iy0 * Wm + ix0, mask=ok, other=0).to(tl.float32)
        s01 = tl.load(masks_ptr + base + iy0 * Wm + ix1, mask=ok, other=0).to(tl.float32)
        s10 = tl.load(masks_ptr + base + iy1 * Wm + ix0, mask=ok, other=0).to(tl.float32)
        s11 = tl.load(masks_ptr + base + iy1 * Wm + ix1, mask=ok, other=0).to(tl.float32)
        if ONE_MINUS:
            s00 = 1.0 - s00
            s01 = 1.0 - s01
            s10 = 1.0 - s10
            s11 = 1.0 - s11
        r0 = tl.fma(s00, lx0, s01 * lx1)
        r1 = tl.fma(s10, lx0, s11 * lx1)
        v = tl.fma(r0, ly0, r1 * ly1)
    elif MODE == 3:
        iy0 = tl.load(yi_ptr + yp).to(tl.int64)
        s = tl.load(masks_ptr + base + iy0 * Wm + ix0, mask=ok, other=0).to(tl.float32)
        if ONE_MINUS:
            s = 1.0 - s
        v = s
    else:
        ys = tl.load(yi_ptr + yp).to(tl.int64)
        ye = tl.load(yi_ptr + Hp + yp).to(tl.int64)
        acc = tl.zeros(ix0.shape, tl.float32)
        for ih in range(ys, ye):
            for dx in range(0, AREA_KW):
                col = ix0 + dx
                inside = ok & (col < ix1)
                s = tl.load(masks_ptr + base + ih * Wm + col, mask=inside, other=0).to(tl.float32)
                if ONE_MINUS:
                    s = 1.0 - s
                acc += tl.where(inside, s, 0.0)
        kh = (ye - ys).to(tl.float32)
        kw = (ix1 - ix0).to(tl.float32)
        v = acc / kh / tl.where(ok, kw, 1.0)
    return v


@triton.jit
def _mask_pool_weights_kernel(
    masks_ptr, w_ptr, cnt_ptr,
    Hm, Wm, Hp, Wp, H, W,
    yi_ptr, yl_ptr, xi_ptr, xl_ptr,
    clo_ptr, clen_ptr, cw_ptr, KY,
    hlo_ptr, hlen_ptr, hw_ptr, KX,
    yown_ptr, xown_ptr,
    threshold, AREA_KW,
    MODE: tl.constexpr, HARD: tl.constexpr, COMPLEMENT: tl.constexpr, NOUT: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_J: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    y = tl.program_id(1)
    base = n * Hm * Wm
    xs = tl.arange(0, BLOCK_X)
    js = tl.arange(0, BLOCK_J)
    x_ok = xs < W
    lo = tl.load(hlo_ptr + xs, mask=x_ok, other=0)
    ln = tl.load(hlen_ptr + xs, mask=x_ok, other=0)
    ok = x_ok[:, None] & (js[None, :] < ln[:, None])
    xp = lo[:, None] + js[None, :]
    hw = tl.load(hw_ptr + xs[:, None] * KX + js[None, :], mask=ok, other=0.0)
    owned_x = ok & (tl.load(xown_ptr + xp, mask=ok, other=-1) == xs[:, None])
    # resize tables of the pooling columns this program reads
    ix0 = tl.load(xi_ptr + xp, mask=ok, other=0).to(tl.int64)
    ix1 = tl.load(xi_ptr + Wp + xp, mask=ok, other=0).to(tl.int64)
    lx0 = tl.load(xl_ptr + xp, mask=ok, other=0.0)
    lx1 = tl.load(xl_ptr + Wp + xp, mask=ok, other=0.0)
    if MODE == 0:
        ix0 = xp.to(tl.int64)

    acc0 = tl.zeros([BLOCK_X], tl.float32)
    acc1 = tl.zeros([BLOCK_X], tl.float32)
    cnt0 = tl.zeros([BLOCK_X], tl.float32)
    cnt1 = tl.zeros([BLOCK_X], tl.float32)
    ylo = tl.load(clo_ptr + y)
    ylen = tl.load(clen_ptr + y)
    for k in range(0, ylen):
        yp = ylo + k
        uy = tl.load(cw_ptr + y * KY + k)
        owned = owned_x & (tl.load(yown_ptr + yp) == y)
        v = _resized(masks_ptr, base, Wm, Hp, yp, ok, ix0, ix1, lx0, lx1, yi_ptr, yl_ptr, AREA_KW, MODE, False)
        if HARD:
            b0 = tl.where(ok & (v > threshold), 1.0, 0.0)
        else:
            b0 = tl.where(ok, v, 0.0)
        acc0 += uy * tl.sum(hw * b0, axis=1)
        cnt0 += tl.sum(tl.where(owned, b0, 0.0), axis=1)
        if COMPLEMENT == 1:
            vc = _resized(masks_ptr, base, Wm, Hp, yp, ok, ix0, ix1, lx0, lx1, yi_ptr, yl_ptr, AREA_KW, MODE, True)
            if HARD:
                b1 = tl.where(ok & (vc > threshold), 1.0, 0.0)
            else:
                b1 = tl.where(ok, vc, 0.0)
            acc1 += uy * tl.sum(hw * b1, axis=1)
            cnt1 += tl.sum(tl.where(owned, b1, 0.0), axis=1)
        if COMPLEMENT == 2:
            if HARD:
                b1 = tl.where(ok & (v > threshold), 0.0, tl.where(ok, 1.0, 0.0))
            else:
                b1 = tl.where(ok, 1.0 - v, 0.0)
            acc1 += uy * tl.sum(hw * b1, axis=1)
            cnt1 += tl.sum(tl.where(owned, b1, 0.0), axis=1)

    row0 = (n * NOUT * H + y) * W
    tl.store(w_ptr + row0 + xs, acc0, mask=x_ok)
    tl.store(cnt_ptr + n * NOUT * H + y, tl.sum(cnt0, axis=0))
    if COMPLEMENT != 0:
        tl.store(w_ptr + row0 + H * W + xs, acc1, mask=x_ok)
        tl.store(cnt_ptr + n * NOUT * H + H + y, tl.sum(cnt1, axis=0))


def mask_pool_weights(masks: torch.Tensor, tables: dict, H: int, W: int, *, mode: int, hard: bool,
                      threshold: float, complement: int, interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [N, nout, H, W] and pooling-grid pixel counts [N, nout] of masks [N, Hm, Wm].

    ``tables`` holds the resize and band tables of fastad.ops.mask_pool as tensors
    on the masks' device; ``masks`` is contiguous (bool masks as uint8).
    """
    import torch  # the kernel itself builds without torch (tests compile it for sm_90 in a bare process)

    N, Hm, Wm = masks.shape
    nout = 1 if complement == 0 else 2
    weights = torch.empty((N, nout, H, W), dtype=torch.float32, device=masks.device)
    partial = torch.empty((N, nout, H), dtype=torch.float32, device=masks.device)
    if N == 0:
        return weights, partial.sum(-1)
    Hp, Wp = tables["y_idx"].shape[1], tables["x_idx"].shape[1]
    block_x = triton.next_power_of_2(W)
    block_j = triton.next_power_of_2(max(1, tables["band_x"]))
    tile = block_x * block_j
    num_warps = 1 if interpret else (4 if tile <= 2048 else 8)
    _mask_pool_weights_kernel[(N, H)](
        masks, weights, partial,
        Hm, Wm, Hp, Wp, H, W,
        tables["y_idx"], tables["y_lam"], tables["x_idx"], tables["x_lam"],
        tables["c_lo"], tables["c_len"], tables["c_w"], tables["c_w"].shape[1],
        tables["h_lo"], tables["h_len"], tables["h_w"], tables["h_w"].shape[1],
        tables["y_own"], tables["x_own"],
        threshold, tables["area_kw"],
        MODE=mode, HARD=hard, COMPLEMENT=complement, NOUT=nout,
        BLOCK_X=block_x, BLOCK_J=block_j, num_warps=num_warps,
    )
    return weights, partial.sum(-1)
