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


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[Any, int | None]:
    """Run ``fn()`` and return (its result, peak extra bytes above the memory in use
    before the call), or None for the bytes where the platform cannot tell."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    if not _reset_rss_peak():
        return fn(), None
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return out, None
    return out, max(0, peak - before) * 1024
