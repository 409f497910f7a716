"""fastad.models: reference models of the papers, each runnable on plain torch
mirroring the authors' code (``backend="reference"``) or on fastad ops
(``backend="fastad"``) with equal outputs."""
from __future__ import annotations

from fastad.models.checkpoint import CheckpointKeyError
from fastad.models.clip_backbone import TINY_CLIP_CONFIGS, CLIPBackbone, ImageFeatures, create_clip
from fastad.models.dictas import DictAS, DictASConfig
from fastad.models.icas import ICAS
from fastad.models.inctrlv2 import InCTRLConfig, InCTRLv2
from fastad.models.postprocess import gaussian_blur, upsample_blur, upsample_maps
from fastad.models.saa_plus import SAAPlus

__all__ = [
    "CheckpointKeyError",
    "CLIPBackbone",
    "DictAS",
    "DictASConfig",
    "ICAS",
    "ImageFeatures",
    "InCTRLConfig",
    "InCTRLv2",
    "SAAPlus",
    "TINY_CLIP_CONFIGS",
    "create_clip",
    "gaussian_blur",
    "upsample_blur",
    "upsample_maps",
]
