"""fastad.models: reference models of the papers, on fastad ops (``backend="fastad"``)
or on plain PyTorch mirroring the authors' code (``backend="reference"``)."""
from __future__ import annotations

from fastad.models.checkpoint import CheckpointKeyError
from fastad.models.clip_backbone import TINY_CLIP_CONFIGS, CLIPBackbone, ImageFeatures, create_clip
from fastad.models.dictas import DictAS, DictASConfig
from fastad.models.inctrlv2 import InCTRLConfig, InCTRLv2
from fastad.models.postprocess import gaussian_blur, upsample_blur, upsample_maps

__all__ = [
    "CheckpointKeyError",
    "CLIPBackbone",
    "DictAS",
    "DictASConfig",
    "ImageFeatures",
    "InCTRLConfig",
    "InCTRLv2",
    "TINY_CLIP_CONFIGS",
    "create_clip",
    "gaussian_blur",
    "upsample_blur",
    "upsample_maps",
]
