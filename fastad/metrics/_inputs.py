"""Input normalisation for fastad.metrics: torch tensors or numpy arrays (or
nested sequences) in, contiguous torch tensors out, with errors that name the
metric, the argument, its shape and its dtype."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from fastad._backend import BackendUnavailableError
from fastad import _ext


class UndefinedMetricError(ValueError):
    """The metric has no value for these inputs (e.g. no anomalous sample)."""


def describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)} on {x.device}"
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


def as_tensor(op: str, name: str, x: Any) -> torch.Tensor:
    """Zero-copy tensor view of a tensor / array; sequences are stacked by numpy."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if x is None:
        raise TypeError(f"fastad.metrics.{op}: `{name}` is required, got None")
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged nested sequences, unconvertible objects
            raise ValueError(f"fastad.metrics.{op}: `{name}` must be a tensor, an array or a rectangular "
                             f"(non-ragged) sequence of numbers, got {describe(x)}: {exc}") from None
    if arr.dtype == object:
        raise TypeError(f"fastad.metrics.{op}: `{name}` must be numeric (maps of one size), got {describe(arr)}")
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    with warnings.catch_warnings():  # read-only arrays: fastad never writes into inputs
        warnings.simplefilter("ignore", UserWarning)
        try:
            return torch.from_numpy(arr)
        except TypeError as exc:
            raise TypeError(f"fastad.metrics.{op}: `{name}` has an unsupported dtype: {describe(arr)}") from exc


def scores_tensor(op: str, name: str, x: Any) -> torch.Tensor:
    """Scores as a contiguous float32 / float64 tensor (16-bit floats are widened
    exactly; integers and booleans become float64)."""
    t = as_tensor(op, name, x)
    if t.is_complex():
        raise TypeError(f"fastad.metrics.{op}: `{name}` must be real, got {describe(t)}")
    if t.numel() == 0:
        raise ValueError(f"fastad.metrics.{op}: `{name}` is empty ({describe(t)})")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.is_floating_point():
        t = t.double()
    return t.contiguous()


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"fastad.metrics.{op}: `{name}` contains NaN or infinite values ({describe(t)})")


def nonfinite_error(op: str, name: str, t: torch.Tensor, count: int) -> ValueError:
    return ValueError(f"fastad.metrics.{op}: `{name}` contains {count} NaN or infinite values ({describe(t)})")


def binary_tensor(op: str, name: str, x: Any) -> torch.Tensor:
    """0/1 labels or masks as a contiguous uint8 tensor; anything else is an error."""
    t = as_tensor(op, name, x)
    if t.numel() == 0:
        raise ValueError(f"fastad.metrics.{op}: `{name}` is empty ({describe(t)})")
    if t.dtype == torch.bool:
        return t.contiguous().view(torch.uint8)
    if t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"fastad.metrics.{op}: `{name}` must be binary (only 0 and 1), got {describe(t)}")
    return t.to(torch.uint8).contiguous()


def _squeezed(shape: torch.Size) -> list[int]:
    return [d for d in shape if d != 1]


def same_layout(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """Scores and labels are compared element by element (flattened)."""
    if a.numel() != b.numel() or _squeezed(a.shape) != _squeezed(b.shape):
        raise ValueError(f"fastad.metrics.{op}: `{a_name}` and `{b_name}` must have the same shape, "
                         f"got {describe(a)} and {describe(b)}")


def maps_and_masks(op: str, maps: Any, masks: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) float maps and uint8 masks from (H, W), (N, H, W) or (N, 1, H, W)."""
    m = scores_tensor(op, "maps", maps)
    g = binary_tensor(op, "masks", masks)

    def to3(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2:
            return t.unsqueeze(0)
        if t.dim() == 4 and t.shape[1] == 1:
            return t[:, 0]
        if t.dim() == 3:
            return t
        raise ValueError(f"fastad.metrics.{op}: `{name}` must have shape (H, W), (N, H, W) or (N, 1, H, W), "
                         f"got {describe(t)}")

    m3, g3 = to3("maps", m), to3("masks", g)
    if m3.shape != g3.shape:
        raise ValueError(f"fastad.metrics.{op}: `maps` and `masks` must have the same shape, "
                         f"got {describe(m)} and {describe(g)}")
    if g3.device != m3.device:
        g3 = g3.to(m3.device)
    return m3.contiguous(), g3.contiguous()


def use_cpp(op: str, backend: str | None, device: torch.device) -> bool:
    """True to run the C++ kernels; False for the PyTorch reference."""
    if backend not in (None, "cpu", "reference"):
        raise ValueError(f"fastad.metrics.{op}: unknown backend {backend!r}; expected None, 'cpu' or 'reference'")
    if backend == "reference":
        return False
    have = _ext._C is not None and hasattr(_ext._C, "metrics_curve_stats")
    if backend == "cpu":
        if not have:
            raise BackendUnavailableError(f"fastad.metrics.{op}: backend 'cpu' is unavailable: "
                                          f"{_ext.C_ERROR or 'fastad._C has no metric kernels'}")
        if device.type != "cpu":
            raise BackendUnavailableError(f"fastad.metrics.{op}: backend 'cpu' needs CPU inputs, got inputs on {device}")
        return True
    return have and device.type == "cpu"


def numpy_view(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()
