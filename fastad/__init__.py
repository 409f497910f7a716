"""fastad: fused, exact kernels and reference models for few-shot and zero-shot
industrial anomaly detection.

    import fastad
    d = fastad.ops.nn_distance(query, bank, k=1, metric="cosine")
    fastad.backends()   # what can run here, and why not
    det = fastad.fit("patchnn", normal="good/", calibrate="held_out_good/", out="detector/")
    pred = fastad.load_detector("detector/").predict("new_images/")   # scores, maps, decisions
"""
from __future__ import annotations

import importlib
from typing import Any

from fastad._backend import BackendStatus, BackendUnavailableError, backends
from fastad._version import __version__
from fastad import ops

__all__ = ["__version__", "backends", "BackendStatus", "BackendUnavailableError", "ops", "fit", "load_detector"]

# Heavy optional pieces (faiss, open_clip, timm) load on first use.
_LAZY = {
    "ReferenceBank": ("fastad.bank", "ReferenceBank"),
    "fit": ("fastad.detector", "fit"),
    "load_detector": ("fastad.detector", "load_detector"),
    "metrics": ("fastad.metrics", None),
    "models": ("fastad.models", None),
    "patch_anomalib": ("fastad.integrations.anomalib", "patch_anomalib"),
    "unpatch_anomalib": ("fastad.integrations.anomalib", "unpatch_anomalib"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'fastad' has no attribute {name!r}")
