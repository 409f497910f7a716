"""Access to the compiled extension ``fastad._C`` and zero-copy tensor hand-off.

The C++ kernels take numpy views of contiguous CPU tensors (plain pybind11, no
torch headers), so the extension builds in seconds and works with any torch.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    from fastad import _C  # type: ignore[attr-defined]

    C_ERROR: str | None = None
    WITH_CUDA: bool = bool(_C.with_cuda)
except ImportError as exc:  # not built, or built for another Python
    _C = None
    C_ERROR = f"fastad._C is not importable ({type(exc).__name__}: {exc}); rebuild with `make build`"
    WITH_CUDA = False

# Codes shared with csrc/common.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def as_array(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor; 2-byte floats travel as int16 bits."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy()
    return t.numpy()


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def num_threads() -> int:
    """Threads the C++ kernels use: the same as torch's intra-op pool."""
    return torch.get_num_threads()


def cpu_isa() -> str | None:
    """ISA variant the C++ kernels run (generic / avx2 / avx512), None without _C."""
    return None if _C is None else _C.cpu_isa()
