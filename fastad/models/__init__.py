"""fastad.models: reference models of the papers, each runnable on plain torch
(``backend="reference"``) or on fastad ops (``backend="fastad"``) with equal outputs."""
from __future__ import annotations

from fastad.models.icas import ICAS
from fastad.models.saa_plus import SAAPlus

__all__ = ["ICAS", "SAAPlus"]
