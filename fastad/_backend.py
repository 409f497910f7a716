"""Backend discovery and per-call backend choice for fastad.ops.

Backends:
  reference  plain PyTorch, the definition of every op (any device)
  cpu        C++ kernels in fastad._C (CPU tensors)
  triton     Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  cuda       CUDA C++ kernels in fastad._C, where an op has them (CUDA tensors)

``backend=None`` picks triton (else cuda) for CUDA tensors, cpu for CPU tensors,
and falls back to the reference when the fast backend is not available.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Iterable

import torch

from fastad import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def _unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run here (None when it can). Kept free of calls into
    fastad._C so that torch.compile can trace the backend choice."""
    if name == "reference":
        return None
    if name == "cpu":
        return _ext.C_ERROR if _ext._C is None else None
    if name == "triton":
        err = _triton_import_error()
        if err:
            return err
        if torch.cuda.is_available() or triton_interpret():
            return None
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels in the CPU interpreter)"
    if name == "cuda":
        if _ext._C is None:
            return _ext.C_ERROR
        if not _ext.WITH_CUDA:
            return "fastad._C was built without CUDA sources (FASTAD_BUILD_CUDA=1 to force)"
        return None if torch.cuda.is_available() else "no CUDA device"
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def _status(name: str) -> BackendStatus:
    reason = _unavailable(name)
    if reason is not None:
        return BackendStatus(name, False, reason)
    if name == "reference":
        detail = "plain PyTorch"
    elif name == "cpu":
        detail = f"fastad._C, {_ext.cpu_isa()} kernels, {_ext.num_threads()} threads"
    elif torch.cuda.is_available():
        detail = f"CUDA device {torch.cuda.get_device_name()}"
    else:
        detail = "TRITON_INTERPRET=1: kernels run in the CPU interpreter"
    return BackendStatus(name, True, detail)


def backends() -> dict[str, BackendStatus]:
    """Which backends can run here, and why not for those that cannot."""
    return {name: _status(name) for name in BACKENDS}


def resolve_backend(op: str, backend: str | None, device: torch.device, supported: Iterable[str]) -> str:
    """Choose the backend for one call of ``op`` on tensors living on ``device``.

    ``supported`` lists the backends ``op`` implements. An explicit ``backend``
    that cannot run raises BackendUnavailableError naming the reason.
    """
    supported = tuple(supported)
    if backend is None:
        order = ("triton", "cuda") if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
        for name in order:
            if name in supported and _unavailable(name) is None:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"fastad.ops.{op}: unknown backend {backend!r}; expected one of {BACKENDS} or None")
    if backend not in supported:
        raise BackendUnavailableError(f"fastad.ops.{op} has no {backend!r} backend (it has {supported})")
    reason = _unavailable(backend)
    if reason is not None:
        raise BackendUnavailableError(f"fastad.ops.{op}: backend {backend!r} is unavailable: {reason}")
    if backend == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"fastad.ops.{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"fastad.ops.{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
        raise BackendUnavailableError(
            f"fastad.ops.{op}: backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got tensors on {device}")
    return backend
