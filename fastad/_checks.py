"""Argument validation shared by the ops: every message names the op, the
argument, and what was received (shape, dtype, device)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{str(t.dtype).replace('torch.', '')} tensor of shape {tuple(t.shape)} on {t.device}"
    return f"{type(t).__name__} {t!r}"


def check_tensor(op: str, name: str, t: object, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    """Check that ``t`` is a tensor of an allowed rank and dtype; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastad.ops.{op}: `{name}` must be a torch.Tensor, got {describe(t)}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"fastad.ops.{op}: `{name}` must have {want} dimensions, got {describe(t)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"fastad.ops.{op}: `{name}` must have dtype in ({names}), got {describe(t)}")
    return t


def check_same(op: str, **tensors: torch.Tensor | None) -> None:
    """All given tensors share one device and one dtype."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    k0, t0 = items[0]
    for k, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"fastad.ops.{op}: `{k}` and `{k0}` must be on one device, got {describe(t)} and {describe(t0)}")
        if t.dtype != t0.dtype:
            raise TypeError(f"fastad.ops.{op}: `{k}` and `{k0}` must have one dtype, got {describe(t)} and {describe(t0)}")


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """Reject NaN / inf values. One min/max pass without temporaries (NaN and +-inf
    reach the minimum or maximum); ``isfinite(t).all()`` would allocate 1.75x ``t``."""
    if not t.numel():
        return
    lo, hi = torch.aminmax(t)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"fastad.ops.{op}: `{name}` contains NaN or infinite values ({describe(t)})")


def check_choice(op: str, name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"fastad.ops.{op}: `{name}` must be one of {tuple(choices)}, got {value!r}")


# Row magnitudes the float32 kernels are exact for: squared norm at most 2^100 and,
# for a non-zero row, largest |entry| at least 2^-50, so that products, squares and
# their C-term sums stay in the normal float32 range. The C++ nn_distance kernel
# applies the same bounds inside its norm pass (csrc/cpu/nn_distance_kernel.cpp,
# row_norms: status "out_of_range"); other float32 paths call this first.
KERNEL_NORM_MAX = 2.0 ** 50
KERNEL_ABSMAX_MIN = 2.0 ** -50


def rows_in_kernel_range(*tensors: torch.Tensor) -> bool:
    """True when every row (last dimension) of every tensor is inside the range above;
    callers run an exact fallback otherwise. float16 rows always are."""
    for t in tensors:
        if not t.numel() or t.dtype in (torch.float16, torch.float64):
            continue
        norm = torch.linalg.vector_norm(t, dim=-1)  # inf when the float32 sum overflows: out of range
        amax = torch.linalg.vector_norm(t, ord=math.inf, dim=-1)
        if bool(((norm > KERNEL_NORM_MAX) | ((amax > 0) & (amax < KERNEL_ABSMAX_MIN))).any()):
            return False
    return True
