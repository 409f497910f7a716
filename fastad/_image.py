"""Small image utilities shared by the models and the demo."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _symmetric_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of scipy's 'reflect' padding (d c b a | a b c d | d c b a), any pad width."""
    idx = torch.arange(-pad, n + pad, device=device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing over the last two axes, equal to
    ``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=truncate)`` applied per
    map (float32 in, float32 out). ``sigma <= 0`` returns the input."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=maps.device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    w = (w / w.sum()).to(maps.dtype)
    shape = maps.shape
    h, wd = shape[-2:]
    y = maps.reshape(-1, 1, h, wd)
    y = y[..., _symmetric_index(h, radius, maps.device), :]
    y = F.conv2d(y, w.view(1, 1, -1, 1))
    y = y[..., _symmetric_index(wd, radius, maps.device)]
    y = F.conv2d(y, w.view(1, 1, 1, -1))
    return y.reshape(shape)


def resize_maps(maps: torch.Tensor, size: tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of [..., h, w] maps to [..., H, W]."""
    shape = maps.shape
    y = F.interpolate(maps.reshape(-1, 1, *shape[-2:]), size=size, mode="bilinear", align_corners=align_corners)
    return y.reshape(*shape[:-2], *size)


def grid_side(n: int) -> int:
    """Side of a square patch grid with n positions."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} patches do not form a square grid")
    return side
