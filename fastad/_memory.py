"""Peak-memory measurement that sees every allocation (torch, numpy, C++, faiss).

On CPU: the process's resident-set high-water mark (VmHWM), reset before the
measured call through /proc/self/clear_refs (Linux). On CUDA: torch's peak
allocated bytes.
"""
from __future__ import annotations

import gc
from typing import Any, Callable

import torch


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``bytes`` is the peak extra memory above what was in use on
    entry (None where the platform cannot tell). Not reentrant: an inner one resets
    the outer one's high-water mark on CPU."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._before: int | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif _reset_rss_peak():
            kib = _status_kib("VmRSS")
            self._before = None if kib is None else kib * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
            return
        peak = _status_kib("VmHWM")
        self.bytes = None if peak is None else max(0, peak * 1024 - self._before)


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[Any, int | None]:
    """Run ``fn()`` and return (its result, peak extra bytes above the memory in use
    before the call), or None for the bytes where the platform cannot tell."""
    with PeakMemory(device) as pm:
        out = fn()
    return out, pm.bytes
