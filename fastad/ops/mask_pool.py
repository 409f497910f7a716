"""Mask pooling: the mean feature inside each mask, with the masks and features
resized to a common pooling grid (iCAS / SINE MaskPooling, SAA+ mask rescoring).

The reference (``mask_pool_reference``) is the definition: ``F.interpolate`` of
the features and of the masks to the pooling grid, optional binarisation
``> threshold``, then ``einsum(features, mask / (count + eps))``.

The fast backends never build the upsampled features nor the resized masks.
Resizing features to the pooling grid is a linear map U = Uy (x) Ux, so

    pool(U F, b) = (Uy^T b Ux) . F / |b|

Each mask is streamed row by row through its resize to the pooling grid
(reproducing ``F.interpolate``'s indices, weights and rounding, so that the
binarisation matches the reference bit for bit), binarised, and projected back
onto the feature grid with the sparse adjoint Uy^T . Ux (a few taps per pixel).
What is left is a small GEMM per image: weights [R, H*W] x features [H*W, C].
"""
import functools
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from fastad import _ext
from fastad._backend import resolve_backend, triton_interpret
from fastad._checks import FLOAT_DTYPES, check_choice, check_finite, check_tensor, describe

__all__ = ["mask_pool", "mask_pool_reference", "MaskPoolOutput"]

OP = "mask_pool"
RESIZE_MODES = ("bilinear", "nearest", "area")
MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16)
_COMPLEMENT_CODES = {"overlap": 1, "partition": 2}

# Codes shared with csrc/cpu/mask_pool_kernel.h.
_MASK_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3, torch.bool: 3}
_IDENTITY, _SEPARABLE, _POINTWISE, _NEAREST, _AREA = range(5)
_PW_VEC_PLAIN, _PW_VEC_FMA, _PW_TAIL_PLAIN, _PW_TAIL_FMA = range(4)

# Scratch for the adjoint weights of one chunk of masks, in floats (16 MiB).
_CHUNK_FLOATS = 1 << 22

_f32 = np.float32


class MaskPoolOutput(NamedTuple):
    """``mask_pool(..., return_counts=True)``: pooled means and mask sizes.

    ``counts`` ([B, R] or [B, R, 2], float32) is the number of pooling-grid pixels
    in each binarised mask (the sum of the soft weights when ``threshold`` is
    None); ``counts == 0`` marks an empty mask, whose ``pooled`` row is zero.
    """

    pooled: torch.Tensor
    counts: torch.Tensor


# --------------------------------------------------------------------------- reference


def _interp(x: torch.Tensor, size: Tuple[int, int], resize: str, align_corners: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if x.numel() == 0:  # F.interpolate rejects empty batches
        return x.new_zeros((*x.shape[:2], *size))
    if resize == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    return F.interpolate(x, size=size, mode=resize)


def mask_pool_reference(features: torch.Tensor, masks: torch.Tensor, size: Union[int, Sequence[int], None] = None,
                        resize: str = "bilinear", align_corners: bool = False, threshold: Optional[float] = None,
                        complement: Union[bool, str] = False, eps: float = 1e-8) -> MaskPoolOutput:
    """Plain PyTorch definition of :func:`mask_pool` (returns pooled and counts).

    Computes in float32: features and masks are converted with ``.float()``,
    resized with ``F.interpolate`` when their grid differs from ``size``,
    binarised with ``> threshold`` (no gradient) unless ``threshold`` is None,
    and pooled with ``einsum("bchw,brhw->brc", x, w / (w.sum + eps))``. The
    result is cast to ``features.dtype``.
    """
    sh, sw, comp = _normalise(features, masks, size, resize, align_corners, threshold, complement, eps)
    grid = (sh, sw)
    x = _interp(features.float(), grid, resize, align_corners)
    m = masks.float()
    resized = _interp(m, grid, resize, align_corners)

    def pool(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        count = w.sum(dim=(-2, -1))
        return torch.einsum("bchw,brhw->brc", x, w / (count + eps)[..., None, None]), count

    def binarise(w: torch.Tensor) -> torch.Tensor:
        return w if threshold is None else (w > threshold).float()

    inside, count = pool(binarise(resized))
    if comp == 0:
        return MaskPoolOutput(inside.to(features.dtype), count)
    if comp == 1:  # SINE template applied to 1 - M: resize(1 - m), then binarise
        outside, count_c = pool(binarise(_interp(1 - m, grid, resize, align_corners)))
    else:  # exact partition: 1 - binarise(resize(m))
        outside, count_c = pool(1 - binarise(resized))
    return MaskPoolOutput(torch.stack([inside, outside], dim=2).to(features.dtype), torch.stack([count, count_c], dim=2))


# --------------------------------------------------------------------------- validation


def _normalise(features, masks, size, resize, align_corners, threshold, complement, eps) -> Tuple[int, int, int]:
    check_tensor(OP, "features", features, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor(OP, "masks", masks, ndim=4, dtypes=MASK_DTYPES)
    if masks.device != features.device:
        raise ValueError(f"fastad.ops.{OP}: `masks` and `features` must be on one device, got "
                         f"{describe(masks)} and {describe(features)}")
    if masks.shape[0] != features.shape[0]:
        raise ValueError(f"fastad.ops.{OP}: `masks` [B, R, Hm, Wm] and `features` [B, C, H, W] must share B, got "
                         f"{describe(masks)} and {describe(features)}")
    if min(features.shape[-2:]) < 1 or min(masks.shape[-2:]) < 1:
        raise ValueError(f"fastad.ops.{OP}: spatial sizes must be >= 1, got `features` {describe(features)} "
                         f"and `masks` {describe(masks)}")
    check_choice(OP, "resize", resize, RESIZE_MODES)
    if not isinstance(align_corners, bool):
        raise TypeError(f"fastad.ops.{OP}: `align_corners` must be a bool, got {describe(align_corners)}")
    if align_corners and resize != "bilinear":
        raise ValueError(f"fastad.ops.{OP}: `align_corners=True` needs resize='bilinear' (as F.interpolate), "
                         f"got resize={resize!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or threshold != threshold):
        raise ValueError(f"fastad.ops.{OP}: `threshold` must be None or a number (not NaN), got {describe(threshold)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"fastad.ops.{OP}: `eps` must be a number >= 0, got {describe(eps)}")
    if complement is False:
        comp = 0
    elif complement is True:
        comp = 1
    elif isinstance(complement, str) and complement in _COMPLEMENT_CODES:
        comp = _COMPLEMENT_CODES[complement]
    else:
        raise ValueError(f"fastad.ops.{OP}: `complement` must be False, True, 'overlap' or 'partition', "
                         f"got {describe(complement)}")
    if size is None:
        sh, sw = int(features.shape[-2]), int(features.shape[-1])
    elif isinstance(size, int) and not isinstance(size, bool):
        sh = sw = size
    elif (isinstance(size, (tuple, list)) and len(size) == 2
          and all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
        sh, sw = int(size[0]), int(size[1])
    else:
        raise ValueError(f"fastad.ops.{OP}: `size` must be None, an int or a pair of ints, got {describe(size)}")
    if sh < 1 or sw < 1:
        raise ValueError(f"fastad.ops.{OP}: `size` must be positive, got {size!r}")
    return sh, sw, comp


def _check_values(features: torch.Tensor, masks: torch.Tensor) -> None:
    """A NaN / inf would spread over every pooled mean it touches (in a mask, to the
    count too): refuse it, as the other ops do. Runs inside the op (data-dependent)."""
    check_finite(OP, "features", features)
    if masks.dtype.is_floating_point:
        check_finite(OP, "masks", masks)


# --------------------------------------------------------------------------- resize tables


def _linear_axis(src: int, dst: int, align_corners: bool, src_fma: bool) -> Tuple[np.ndarray, np.ndarray]:
    """torch's bilinear source indices and lambdas along one axis (no antialias).

    ``src_fma``: the source coordinate ``scale * (dst + 0.5) - 0.5`` is one fused
    multiply-add, as in torch's AVX2/AVX-512 and CUDA builds.
    """
    d = np.arange(dst)
    if src == dst:
        return np.stack([d, d]).astype(np.int32), np.stack([np.ones(dst, _f32), np.zeros(dst, _f32)])
    if align_corners:
        scale = _f32(src - 1) / _f32(dst - 1) if dst > 1 else _f32(0)
        real = (scale * d.astype(_f32)).astype(_f32)
    else:
        scale = _f32(src) / _f32(dst)
        t = d.astype(_f32) + _f32(0.5)
        if src_fma:  # exact in float64 (a product of two floats), then one rounding
            real = (np.float64(scale) * t.astype(np.float64) - 0.5).astype(_f32)
        else:
            real = ((scale * t).astype(_f32) - _f32(0.5)).astype(_f32)
        real = np.maximum(real, _f32(0))
    i0 = np.minimum(np.floor(real).astype(np.int64), src - 1)
    l1 = np.clip(real - i0.astype(_f32), _f32(0), _f32(1)).astype(_f32)
    l0 = (_f32(1) - l1).astype(_f32)
    i1 = i0 + (i0 < src - 1)
    return np.stack([i0, i1]).astype(np.int32), np.stack([l0, l1])


def _nearest_axis(src: int, dst: int) -> np.ndarray:
    d = np.arange(dst)
    if src == dst:
        return d
    scale = _f32(src) / _f32(dst)
    return np.minimum(np.floor((d.astype(_f32) * scale).astype(_f32)).astype(np.int64), src - 1)


def _area_axis(src: int, dst: int) -> Tuple[np.ndarray, np.ndarray]:
    d = np.arange(dst, dtype=np.int64)
    return (d * src) // dst, -((-(d + 1) * src) // dst)


def _axis_tables(src: int, dst: int, resize: str, align_corners: bool, src_fma: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Resize tables of one axis: idx [2, dst] int32, lam [2, dst] float32."""
    if resize == "bilinear":
        return _linear_axis(src, dst, align_corners, src_fma)
    lam = np.zeros((2, dst), _f32)
    if resize == "nearest":
        i = _nearest_axis(src, dst)
        return np.stack([i, i]).astype(np.int32), lam
    start, end = _area_axis(src, dst)
    return np.stack([start, end]).astype(np.int32), lam


def _resize_matrix(src: int, dst: int, resize: str, align_corners: bool, src_fma: bool) -> np.ndarray:
    """Dense [dst, src] matrix of the 1-D resize (features to the pooling grid)."""
    u = np.zeros((dst, src), np.float64)
    rows = np.arange(dst)
    if resize == "bilinear":
        idx, lam = _linear_axis(src, dst, align_corners, src_fma)
        np.add.at(u, (rows, idx[0]), lam[0])
        np.add.at(u, (rows, idx[1]), lam[1])
    elif resize == "nearest":
        u[rows, _nearest_axis(src, dst)] = 1.0
    else:
        start, end = _area_axis(src, dst)
        for r in rows:
            u[r, start[r]:end[r]] = 1.0 / (end[r] - start[r])
    return u.astype(_f32)


def _bands(u: np.ndarray, multiple: int = 1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous nonzero range of every row of ``u``: lo, len and the weights padded to K."""
    n = u.shape[0]
    lo = np.zeros(n, np.int32)
    ln = np.zeros(n, np.int32)
    for i in range(n):
        nz = np.flatnonzero(u[i])
        if nz.size:
            lo[i], ln[i] = nz[0], nz[-1] - nz[0] + 1
    k = max(1, int(ln.max()) if n else 1)
    k = -(-k // multiple) * multiple
    w = np.zeros((n, k), _f32)
    for i in range(n):
        w[i, :ln[i]] = u[i, lo[i]:lo[i] + ln[i]]
    return lo, ln, w


@dataclass(frozen=True, eq=False)  # hashed by identity: plans are cached
class _Plan:
    mode: int
    y_idx: np.ndarray
    y_lam: np.ndarray
    x_idx: np.ndarray
    x_lam: np.ndarray
    # C++: rows of Uy (taps of each pooling row), columns of Ux (band of each feature column)
    v_lo: np.ndarray
    v_len: np.ndarray
    v_w: np.ndarray
    h_lo: np.ndarray
    h_len: np.ndarray
    h_w: np.ndarray
    # Triton: columns of Uy, and the feature row / column that counts each pooling pixel
    c_lo: np.ndarray
    c_len: np.ndarray
    c_w: np.ndarray
    y_own: np.ndarray
    x_own: np.ndarray


@functools.lru_cache(maxsize=64)
def _plan(mask_hw: Tuple[int, int], grid: Tuple[int, int], feat_hw: Tuple[int, int], resize: str,
          align_corners: bool, src_fma: bool, pointwise: bool) -> _Plan:
    (hm, wm), (hp, wp), (h, w) = mask_hw, grid, feat_hw
    if mask_hw == grid:
        mode = _IDENTITY
        y_idx, y_lam = _axis_tables(hm, hp, "nearest", False, src_fma)
        x_idx, x_lam = _axis_tables(wm, wp, "nearest", False, src_fma)
    else:
        mode = {"bilinear": _POINTWISE if pointwise else _SEPARABLE, "nearest": _NEAREST, "area": _AREA}[resize]
        y_idx, y_lam = _axis_tables(hm, hp, resize, align_corners, src_fma)
        x_idx, x_lam = _axis_tables(wm, wp, resize, align_corners, src_fma)
    uy = _resize_matrix(h, hp, resize, align_corners, src_fma)  # [hp, h]
    ux = _resize_matrix(w, wp, resize, align_corners, src_fma)  # [wp, w]
    v_lo, v_len, v_w = _bands(uy)
    h_lo, h_len, h_w = _bands(ux.T, multiple=8)
    c_lo, c_len, c_w = _bands(uy.T)
    y_own = (uy != 0).argmax(axis=1).astype(np.int32)
    x_own = (ux != 0).argmax(axis=1).astype(np.int32)
    return _Plan(mode, y_idx, y_lam, x_idx, x_lam, v_lo, v_len, v_w, h_lo, h_len, h_w,
                 c_lo, c_len, c_w, y_own, x_own)


@functools.lru_cache(maxsize=16)
def _device_tables(plan: _Plan, device: torch.device) -> Dict[str, object]:
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    x_idx = plan.x_idx
    area_kw = int((x_idx[1] - x_idx[0]).max()) if plan.mode == _AREA else 0
    return {"y_idx": t(plan.y_idx), "y_lam": t(plan.y_lam), "x_idx": t(x_idx), "x_lam": t(plan.x_lam),
            "c_lo": t(plan.c_lo), "c_len": t(plan.c_len), "c_w": t(plan.c_w),
            "h_lo": t(plan.h_lo), "h_len": t(plan.h_len), "h_w": t(plan.h_w),
            "y_own": t(plan.y_own), "x_own": t(plan.x_own),
            "band_x": int(plan.h_len.max()), "area_kw": area_kw}


# --------------------------------------------------------------------------- torch's rounding on this CPU


@dataclass(frozen=True)
class _Rounding:
    """How the running torch build rounds bilinear resizing on the CPU.

    torch computes a resize with one of two kernels: a separable one (horizontal
    then vertical two-tap sums) and, for outputs with H + W <= 128, channels-last
    inputs with R > 3, or R == 3 on one thread, a pointwise one (four products
    per pixel; channels in full SIMD vectors use one summation order, the tail
    another). Whether products are fused (fma) depends on the build and CPU.
    ``exact`` is False when no known combination reproduced torch (the results
    then differ only where a resized value lies within rounding of the threshold).
    """

    src_fma: bool = True
    sep_fma: bool = True
    pw_vec: int = _PW_VEC_FMA
    pw_tail: int = _PW_TAIL_FMA
    width: int = 8
    exact: bool = False


def _resize_masks(masks: torch.Tensor, plan: _Plan, rounding: _Rounding, r_total: int,
                  one_minus: bool = False) -> torch.Tensor:
    """Masks [N, Hm, Wm] (N a multiple of r_total) resized by the C++ kernel."""
    out = torch.empty((masks.shape[0], plan.y_idx.shape[1], plan.x_idx.shape[1]), dtype=torch.float32)
    _ext._C.mask_resize(_mask_array(masks), _MASK_CODES[masks.dtype], plan.mode, plan.y_idx, plan.y_lam,
                        plan.x_idx, plan.x_lam, rounding.sep_fma, rounding.pw_vec, rounding.pw_tail, 0, r_total,
                        r_total - r_total % rounding.width, one_minus, out.numpy(), _ext.num_threads())
    return out


@functools.lru_cache(maxsize=1)
def _cpu_rounding() -> _Rounding:
    """Find the rounding of this torch build by resizing random masks both ways."""
    g = torch.Generator().manual_seed(0)
    masks = torch.randn(1, 2, 7, 5, generator=g)
    want = F.interpolate(masks, size=(100, 40), mode="bilinear", align_corners=False)[0]  # separable kernel
    found = None
    for src_fma in (True, False):
        for sep_fma in (True, False):
            plan = _plan((7, 5), (100, 40), (1, 1), "bilinear", False, src_fma, False)
            if torch.equal(_resize_masks(masks[0], plan, _Rounding(src_fma, sep_fma), 2), want):
                found = (src_fma, sep_fma)
                break
        if found:
            break
    if found is None:
        return _Rounding()
    r = 45  # full vectors and a tail for SIMD widths 4, 8 and 16
    masks = torch.randn(1, r, 7, 5, generator=g)
    want = F.interpolate(masks, size=(13, 11), mode="bilinear", align_corners=False)[0]  # pointwise kernel
    plan = _plan((7, 5), (13, 11), (1, 1), "bilinear", False, found[0], True)
    for pw_vec in (_PW_VEC_FMA, _PW_VEC_PLAIN):
        for pw_tail in (_PW_TAIL_FMA, _PW_TAIL_PLAIN):
            for width in (8, 16, 4):
                rounding = _Rounding(found[0], found[1], pw_vec, pw_tail, width, True)
                if torch.equal(_resize_masks(masks[0], plan, rounding, r), want):
                    return rounding
    return _Rounding(found[0], found[1])


def _pointwise_path(masks: torch.Tensor, grid: Tuple[int, int]) -> bool:
    """Whether torch's CPU bilinear resize of ``masks.float()`` to ``grid`` takes the pointwise kernel."""
    r = masks.shape[1]
    return ((masks.is_contiguous(memory_format=torch.channels_last) and r > 3) or grid[0] + grid[1] <= 128
            or (torch.get_num_threads() == 1 and r == 3))


def _cpu_plan(masks: torch.Tensor, grid: Tuple[int, int], feat_hw: Tuple[int, int], resize: str,
              align_corners: bool) -> Tuple[_Plan, _Rounding]:
    """Tables and rounding that make the C++ resize of ``masks`` [B, R, Hm, Wm] equal torch's."""
    mask_hw = tuple(masks.shape[-2:])
    if resize == "bilinear":
        rounding = _cpu_rounding()
        pointwise = mask_hw != grid and _pointwise_path(masks, grid)
    else:
        rounding, pointwise = _Rounding(), False
    return _plan(mask_hw, grid, feat_hw, resize, align_corners, rounding.src_fma, pointwise), rounding


def _cpu_resize(masks: torch.Tensor, grid: Tuple[int, int], resize: str = "bilinear",
                    align_corners: bool = False, one_minus: bool = False) -> torch.Tensor:
    """What the C++ kernel binarises: ``F.interpolate((1 - masks if one_minus else masks).float(), grid)``
    ([B, R, Hp, Wp] float32, CPU), computed row by row with torch's rounding."""
    plan, rounding = _cpu_plan(masks, grid, (1, 1), resize, align_corners)
    B, R = masks.shape[:2]
    flat = masks.contiguous().reshape(B * R, *masks.shape[-2:])
    return _resize_masks(flat, plan, rounding, max(1, R), one_minus).view(B, R, *grid)


# --------------------------------------------------------------------------- weights backends


def _mask_array(masks: torch.Tensor) -> np.ndarray:
    if masks.dtype == torch.bool:
        return masks.view(torch.uint8).numpy()
    return _ext.as_array(masks)


@dataclass(frozen=True)
class _Call:
    """Everything but the tensors: one mask_pool call, resolved."""

    grid: Tuple[int, int]
    resize: str
    align_corners: bool
    threshold: Optional[float]
    complement: int
    eps: float
    backend: str

    @property
    def nout(self) -> int:
        return 1 if self.complement == 0 else 2


class _Weights:
    """Computes the adjoint weights [n, nout, H*W] and counts [n, nout] of chunks of masks."""

    def __init__(self, call: _Call, features: torch.Tensor, masks: torch.Tensor):
        self.call = call
        self.R = masks.shape[1]
        self.hw = tuple(features.shape[-2:])
        self.masks = masks.contiguous()
        if masks.dtype == torch.bool:
            self.masks = self.masks.view(torch.uint8)
        mask_hw = tuple(masks.shape[-2:])
        hard = call.threshold is not None
        self.hard = hard
        with np.errstate(over="ignore"):  # torch also compares with the threshold cast to float32
            self.threshold = float(np.float32(call.threshold)) if hard else 0.0
        if call.backend == "cpu":
            self.plan, self.rounding = _cpu_plan(masks, call.grid, self.hw, call.resize, call.align_corners)
        else:
            # CUDA's F.interpolate: separable two-tap sums with fused multiply-adds
            self.plan = _plan(mask_hw, call.grid, self.hw, call.resize, call.align_corners, True, False)
            self.tables = _device_tables(self.plan, masks.device)

    def __call__(self, b0: int, b1: int, r0: int, r1: int) -> Tuple[torch.Tensor, torch.Tensor]:
        m = self.masks[b0:b1, r0:r1].reshape(-1, *self.masks.shape[-2:])
        h, w = self.hw
        nout = self.call.nout
        if self.call.backend == "cpu":
            weights = torch.empty((m.shape[0], nout, h, w), dtype=torch.float32)
            counts = torch.empty((m.shape[0], nout), dtype=torch.float32)
            p, rd = self.plan, self.rounding
            _ext._C.mask_pool_weights(
                _ext.as_array(m), _MASK_CODES[m.dtype], p.mode, p.y_idx, p.y_lam, p.x_idx, p.x_lam,
                rd.sep_fma, rd.pw_vec, rd.pw_tail, r0, self.R, self.R - self.R % rd.width,
                self.hard, self.threshold, self.call.complement,
                p.v_lo, p.v_len, p.v_w, p.h_lo, p.h_len, p.h_w,
                weights.numpy(), counts.numpy(), _ext.num_threads())
        else:
            from fastad.kernels.mask_pool import mask_pool_weights

            weights, counts = mask_pool_weights(
                m, self.tables, h, w, mode=self.plan.mode, hard=self.hard, threshold=self.threshold,
                complement=self.call.complement, interpret=triton_interpret())
        return weights.view(m.shape[0], nout, h * w), counts


def _chunks(B: int, R: int, per_mask: int, per_image_extra: int = 0):
    """(b0, b1, r0, r1) blocks whose scratch fits in _CHUNK_FLOATS (at least one mask):
    ``per_mask`` floats of weights per mask, plus ``per_image_extra`` per image."""
    per_image = max(1, R * per_mask + per_image_extra)
    if per_image <= _CHUNK_FLOATS:
        step = max(1, _CHUNK_FLOATS // per_image)
        for b0 in range(0, B, step):
            yield b0, min(B, b0 + step), 0, R
        return
    step = max(1, _CHUNK_FLOATS // max(1, per_mask))
    for b in range(B):
        for r0 in range(0, R, step):
            yield b, b + 1, r0, min(R, r0 + step)


def _forward(features: torch.Tensor, masks: torch.Tensor, call: _Call) -> Tuple[torch.Tensor, torch.Tensor]:
    B, C, H, W = features.shape
    R = masks.shape[1]
    nout = call.nout
    shape = (B, R, C) if nout == 1 else (B, R, 2, C)
    out = torch.zeros(shape, dtype=torch.float32, device=features.device)
    counts = torch.zeros(shape[:-1], dtype=torch.float32, device=features.device)
    if B * R == 0:
        return out.to(features.dtype), counts
    out4, counts3 = out.view(B, R, nout, C), counts.view(B, R, nout)
    weights = _Weights(call, features, masks)
    converted = 0 if features.dtype == torch.float32 else C * H * W  # float32 copy of the chunk's features
    for b0, b1, r0, r1 in _chunks(B, R, nout * H * W, converted):
        nb, nr = b1 - b0, r1 - r0
        w, cnt = weights(b0, b1, r0, r1)
        cnt = cnt.view(nb, nr, nout)
        counts3[b0:b1, r0:r1] = cnt
        if C:
            f = features[b0:b1].reshape(nb, C, H * W).to(torch.float32)
            pooled = torch.bmm(w.view(nb, nr * nout, H * W), f.transpose(1, 2)).view(nb, nr, nout, C)
            out4[b0:b1, r0:r1] = pooled / (cnt[..., None] + call.eps)
    return out.to(features.dtype), counts


def _backward_features(grad: torch.Tensor, features: torch.Tensor, masks: torch.Tensor, call: _Call) -> torch.Tensor:
    """grad_F = sum_r (U^T b_r) (grad_r / (|b_r| + eps)), with the weights recomputed chunk by chunk."""
    B, C, H, W = features.shape
    R = masks.shape[1]
    nout = call.nout
    grad_f = torch.zeros((B, C, H * W), dtype=torch.float32, device=features.device)
    if B * R * C == 0:
        return grad_f.view(B, C, H, W).to(features.dtype)
    grad4 = grad.reshape(B, R, nout, C)
    weights = _Weights(call, features, masks)
    for b0, b1, r0, r1 in _chunks(B, R, nout * H * W):
        nb, nr = b1 - b0, r1 - r0
        w, cnt = weights(b0, b1, r0, r1)
        gs = grad4[b0:b1, r0:r1].to(torch.float32) / (cnt.view(nb, nr, nout, 1) + call.eps)
        grad_f[b0:b1] += torch.bmm(gs.reshape(nb, nr * nout, C).transpose(1, 2), w.view(nb, nr * nout, H * W))
    return grad_f.view(B, C, H, W).to(features.dtype)


def _resize_adjoint(grad: torch.Tensor, masks: torch.Tensor, call: _Call) -> torch.Tensor:
    """Adjoint of the mask resize (pooling grid -> mask grid), as torch's interpolate backward."""
    in_size = list(masks.shape)
    if tuple(in_size[-2:]) == call.grid:
        return grad
    if call.resize == "bilinear":
        return torch.ops.aten.upsample_bilinear2d_backward(grad, list(call.grid), in_size, call.align_corners)
    if call.resize == "nearest":
        return torch.ops.aten.upsample_nearest2d_backward(grad, list(call.grid), in_size)
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad, masks.float())


def _soft_mask_grad(grad: torch.Tensor, features: torch.Tensor, masks: torch.Tensor, pooled: torch.Tensor,
                    counts: torch.Tensor, call: _Call) -> torch.Tensor:
    """Mask gradient of the soft (threshold=None) pooling.

    d pooled_c / d w_p = ((U F)_pc - pooled_c) / (|w| + eps) for the resized mask w;
    the complement weights (resize(1 - m) or 1 - resize(m)) contribute with a minus sign.
    """
    B, C, H, W = features.shape
    R = masks.shape[1]
    nout = call.nout
    gs = grad.reshape(B, R, nout, C).to(torch.float32) / (counts.reshape(B, R, nout, 1) + call.eps)
    proj = torch.einsum("bkc,bchw->bkhw", gs.reshape(B, R * nout, C), features.to(torch.float32))
    proj = _interp(proj, call.grid, call.resize, call.align_corners).reshape(B, R, nout, *call.grid)
    shift = (gs * pooled.reshape(B, R, nout, C).to(torch.float32)).sum(-1)
    gw = proj - shift[..., None, None]
    g = gw[:, :, 0] - gw[:, :, 1] if nout == 2 else gw[:, :, 0]
    return _resize_adjoint(g.contiguous(), masks, call).to(masks.dtype)


# --------------------------------------------------------------------------- torch.library


def _call(size_h: int, size_w: int, resize: str, align_corners: bool, threshold: Optional[float], complement: int,
          eps: float, backend: str) -> _Call:
    return _Call((size_h, size_w), resize, align_corners, threshold, complement, eps, backend)


@torch.library.custom_op("fastad::mask_pool", mutates_args=())
def _mask_pool_op(features: torch.Tensor, masks: torch.Tensor, size_h: int, size_w: int, resize: str,
                  align_corners: bool, threshold: Optional[float], complement: int, eps: float,
                  backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_values(features, masks)
    return _forward(features, masks, _call(size_h, size_w, resize, align_corners, threshold, complement, eps, backend))


@_mask_pool_op.register_fake
def _(features, masks, size_h, size_w, resize, align_corners, threshold, complement, eps, backend):
    B, C = features.shape[:2]
    R = masks.shape[1]
    shape = (B, R, C) if complement == 0 else (B, R, 2, C)
    return features.new_empty(shape), features.new_empty(shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastad::mask_pool_backward", mutates_args=())
def _mask_pool_backward_op(grad: torch.Tensor, features: torch.Tensor, masks: torch.Tensor, size_h: int, size_w: int,
                           resize: str, align_corners: bool, threshold: Optional[float], complement: int, eps: float,
                           backend: str) -> torch.Tensor:
    call = _call(size_h, size_w, resize, align_corners, threshold, complement, eps, backend)
    return _backward_features(grad, features, masks, call)


@_mask_pool_backward_op.register_fake
def _(grad, features, masks, size_h, size_w, resize, align_corners, threshold, complement, eps, backend):
    return torch.empty_like(features)


def _setup_context(ctx, inputs, output):
    features, masks, *args = inputs
    pooled, counts = output
    ctx.args = args
    ctx.save_for_backward(features, masks, pooled, counts)


def _backward(ctx, grad_pooled, grad_counts):
    features, masks, pooled, counts = ctx.saved_tensors
    call = _call(*ctx.args)
    grad_f = grad_m = None
    if ctx.needs_input_grad[0]:
        grad_f = torch.ops.fastad.mask_pool_backward(grad_pooled, features, masks, *ctx.args)
    if ctx.needs_input_grad[1] and call.threshold is None:
        grad_m = _soft_mask_grad(grad_pooled, features, masks, pooled, counts, call)
    return (grad_f, grad_m) + (None,) * len(ctx.args)


torch.library.register_autograd("fastad::mask_pool", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def mask_pool(features: torch.Tensor, masks: torch.Tensor, size: Union[int, Sequence[int], None] = None,
              resize: str = "bilinear", align_corners: bool = False, threshold: Optional[float] = None,
              complement: Union[bool, str] = False, eps: float = 1e-8, backend: Optional[str] = None, *,
              return_counts: bool = False) -> Union[torch.Tensor, MaskPoolOutput]:
    """Mean of ``features`` inside each mask, on a common pooling grid.

    Args:
        features: [B, C, H, W] float32 / float16 / bfloat16.
        masks: [B, R, Hm, Wm] at any resolution; bool, uint8 or float (binary masks,
            soft masks or logits). Bool/uint8 masks are read as they are (no float copy).
        size: pooling grid (h, w) or an int; default the features' grid. Features and
            masks are resized to it with ``F.interpolate(..., mode=resize)`` when their
            grid differs (iCAS/SINE: the 4x mask-feature grid, bilinear,
            align_corners=False, no antialias).
        resize: "bilinear", "nearest" (torch's legacy nearest) or "area"
            (adaptive average pooling); ``align_corners`` only with "bilinear".
        threshold: None pools with the resized mask values as soft weights; a number
            binarises the resized masks with ``> threshold`` (0 for logits, as SINE's
            MaskPooling; 0.5 for probabilities). Binary pooling is a plain mean.
        complement: False; True or "overlap" also pools the complement computed as
            ``binarise(resize(1 - m))`` (SINE's MaskPooling applied to 1 - M_r, the
            iCAS non-target prompt; with threshold 0 it overlaps the mask on its
            boundary); "partition" uses ``1 - binarise(resize(m))``, an exact partition.
        eps: denominator ``count + eps``; an empty mask pools to the zero vector.
        backend: None (cpu for CPU tensors, triton for CUDA), "reference", "cpu", "triton".
        return_counts: also return the pooling-grid pixel counts (see MaskPoolOutput).

    Returns:
        pooled [B, R, C] (or [B, R, 2, C]: inside, complement) in ``features.dtype``;
        a MaskPoolOutput(pooled, counts) with ``return_counts=True``.

    Gradients: with respect to ``features`` always; with respect to float ``masks``
    only when ``threshold`` is None (binarisation has no gradient), as in the reference.

    Exactness: pooling after a linear resize equals pooling the adjoint-resized
    mask on the feature grid, so the fast backends differ from the reference only
    by float32 summation order, provided they binarise the same pixels. The cpu
    backend reproduces torch's CPU resize bit for bit (indices, weights, which of
    its kernels torch picks, and its fused multiply-adds, detected once per
    process), hence identical counts. The triton backend follows CUDA's
    F.interpolate formulas; on a GPU it is unverified here whether every value
    lying exactly on the threshold is rounded to the same side.

    Peak memory (cpu, triton): the output and counts, plus one chunk of adjoint
    weights of at most 16 MiB (min(B*R*nout*H*W, 4M) floats) and, for float16 /
    bfloat16 features, a float32 copy of that chunk's features; the C++ kernel adds
    per thread a few pooling rows and an [nout, H, Wp] accumulator. No
    [B, R, Hp, Wp] or [B, C, Hp, Wp] tensor is built. The reference holds the
    resized features and masks (about B*(C + 3R)*Hp*Wp floats). Soft-mask
    gradients hold [B, R, nout, Hp, Wp]. With ``eps=0`` an empty mask gives NaN,
    as in the reference. NaN or infinite ``features`` or float ``masks`` raise ValueError.
    """
    sh, sw, comp = _normalise(features, masks, size, resize, align_corners, threshold, complement, eps)
    if not isinstance(return_counts, bool):
        raise TypeError(f"fastad.ops.{OP}: `return_counts` must be a bool, got {describe(return_counts)}")
    name = resolve_backend(OP, backend, features.device, ("reference", "cpu", "triton"))
    if name == "reference":
        _check_values(features, masks)
        result = mask_pool_reference(features, masks, (sh, sw), resize, align_corners, threshold, complement, eps)
    else:
        thr = None if threshold is None else float(threshold)
        result = MaskPoolOutput(*torch.ops.fastad.mask_pool(features, masks, sh, sw, resize, align_corners, thr,
                                                            comp, float(eps), name))
    return result if return_counts else result.pooled
