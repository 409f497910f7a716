"""Map post-processing shared by the reference models: upsampling and a torch
Gaussian blur equal to ``scipy.ndimage.gaussian_filter``.

``gaussian_blur(x, sigma)`` filters the last two axes (H first, then W, as scipy
does for a 2-D map or for ``axes=(1, 2)`` on a stack of maps) with the sampled,
normalised kernel exp(-x^2 / (2 sigma^2)) of radius int(truncate * sigma + 0.5)
and scipy's "reflect" boundary (half-sample symmetric: d c b a | a b c d | d c b a,
repeated for radii longer than the map).

``precision="float64"`` mirrors scipy exactly: each axis pass accumulates in float64
and the result is rounded to the input dtype before the next pass (scipy writes
each pass into an array of the input dtype). ``precision="float32"`` accumulates
in float32 (within ~1e-6 of scipy for float32 maps in [0, 1]) and, for axes up to
1024 long, runs each pass as one GEMM with the banded [n, n] filter matrix (the
reflected taps folded in), which is several times faster than a 1-channel
convolution on CPU and GPU alike.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel1d", "gaussian_blur", "upsample_maps", "upsample_blur"]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """scipy's order-0 Gaussian kernel: radius int(truncate * sigma + 0.5), weights
    computed in float64 and normalised to sum 1, then cast to ``dtype``."""
    if not sigma > 0:
        raise ValueError(f"fastad.models.gaussian_blur: sigma must be > 0, got {sigma!r}")
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    phi = torch.exp(-0.5 / (float(sigma) * float(sigma)) * x * x)
    return (phi / phi.sum()).to(dtype)


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


_BANDED_MAX = 1024


def _banded_matrix(n: int, weights: torch.Tensor) -> torch.Tensor:
    """[n, n] matrix K with (x K^T)[i] = sum_t w[t] x[reflect(i + t - r)]."""
    radius = (weights.numel() - 1) // 2
    src = _reflect_index(n, radius, weights.device)
    pos = torch.arange(n, device=weights.device)[:, None] + torch.arange(2 * radius + 1, device=weights.device)
    k = torch.zeros(n, n, dtype=weights.dtype, device=weights.device)
    return k.scatter_add_(1, src[pos], weights.expand(n, -1).contiguous())


def _blur_last_axis(x: torch.Tensor, weights: torch.Tensor, banded: bool = False) -> torch.Tensor:
    n = x.shape[-1]
    if banded and n <= _BANDED_MAX:
        return x @ _banded_matrix(n, weights).T
    radius = (weights.numel() - 1) // 2
    padded = x.index_select(-1, _reflect_index(n, radius, x.device))
    flat = padded.reshape(-1, 1, n + 2 * radius)
    return F.conv1d(flat, weights.view(1, 1, -1)).reshape(x.shape)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0, precision: str = "float64") -> torch.Tensor:
    """Gaussian-smooth the last two axes of ``x`` [..., H, W] like
    ``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=truncate)``
    on each [H, W] map; returns the dtype of ``x``. See the module docstring."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"fastad.models.gaussian_blur: x must be a floating [..., H, W] tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if precision not in ("float64", "float32"):
        raise ValueError(f"fastad.models.gaussian_blur: precision must be 'float64' or 'float32', got {precision!r}")
    if x.numel() == 0:
        return x.clone()
    work = torch.float64 if precision == "float64" else torch.float32
    w = gaussian_kernel1d(sigma, truncate, dtype=work, device=x.device)
    out_dtype = x.dtype
    banded = precision == "float32"  # the float64 path keeps scipy's order of the taps
    # H pass (axis -2), rounded to the input dtype, then the W pass
    y = _blur_last_axis(x.transpose(-1, -2).to(work), w, banded).transpose(-1, -2).to(out_dtype)
    return _blur_last_axis(y.to(work), w, banded).to(out_dtype)


def upsample_maps(maps: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear",
                  align_corners: bool | None = False) -> torch.Tensor:
    """[B, h, w] -> [B, H, W] with ``F.interpolate`` (align_corners ignored for "nearest")."""
    if isinstance(size, int):
        size = (size, size)
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    ac = None if mode in ("nearest", "area", "nearest-exact") else align_corners
    return F.interpolate(maps[:, None], size=size, mode=mode, align_corners=ac)[:, 0]


@functools.lru_cache(maxsize=32)
def _axis_operator(n_in: int, n_out: int, mode: str, align_corners: bool | None, sigma: float | None,
                   truncate: float) -> torch.Tensor:
    """float64 [n_out, n_in] matrix of one axis of upsample-then-blur: interpolation
    of the identity (1-D; the other axis stays 1 -> 1), then the reflected Gaussian."""
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
    ac = None if mode in ("nearest", "area", "nearest-exact") else align_corners
    up = F.interpolate(eye, size=(n_out, 1), mode=mode, align_corners=ac)[:, 0, :, 0].T
    if sigma is None:
        return up
    return _banded_matrix(n_out, gaussian_kernel1d(sigma, truncate)) @ up


def upsample_blur(maps: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear",
                  align_corners: bool | None = False, sigma: float | None = None,
                  truncate: float = 4.0) -> torch.Tensor:
    """``gaussian_blur(upsample_maps(maps, size, mode, align_corners), sigma, truncate)``
    as one separable linear operator: out = A_H maps A_W^T with A = blur @ upsample per
    axis (both are linear and act on the axes separately), i.e. two small GEMMs of
    [H, h] x [h, w] x [w, W] instead of a full-resolution upsampling and a 2-D blur.
    Equal to the two-step result up to float32 rounding (~1e-7 on maps in [0, 1]).
    maps [B, h, w] float; the operators are built in float64 and cached."""
    if isinstance(size, int):
        size = (size, size)
    a_h = _axis_operator(maps.shape[-2], size[0], mode, align_corners, sigma, truncate)
    a_w = _axis_operator(maps.shape[-1], size[1], mode, align_corners, sigma, truncate)
    a_h = a_h.to(device=maps.device, dtype=maps.dtype)
    a_w = a_w.to(device=maps.device, dtype=maps.dtype)
    return a_h @ maps @ a_w.T
