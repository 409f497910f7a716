"""timm backbones from a local checkpoint or random weights; nothing is downloaded."""
from __future__ import annotations

import os
from typing import Any

import torch


def create_timm_model(name: str, checkpoint_path: str | os.PathLike | None = None, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)`` with weights from ``checkpoint_path`` (a local file,
    loaded through timm's own pretrained path so its key filters and ``features_only``
    conversion apply) or random initialisation when it is None. Never touches a model hub."""
    import timm

    if checkpoint_path is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    path = os.fspath(checkpoint_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fastad.models: checkpoint {path!r} for timm model {name!r} does not exist")
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
