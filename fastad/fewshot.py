"""A compact few-shot / zero-shot patch detector on any CNN feature extractor: the
engine of ``fastad demo``.

* few-shot residual (InCTRL / PatchCore style): the anomaly of a test patch is its
  cosine distance to the nearest patch of the k normal reference images
  (``fastad.ops.nn_distance``, k = 1);
* zero-shot saliency (SAA+ style self-similarity): the mean of a patch's distances to
  its ``saliency_k`` nearest patches of the same image — a patch unlike most of its own
  image is salient (``nn_distance(x, x, reduce="mean_smallest")``).

Maps are upsampled to the image size and smoothed (Gaussian, sigma in pixels; one
separable operator, ``fastad.models.postprocess.upsample_blur``); the image score is the maximum of the
smoothed map.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastad.models.postprocess import upsample_blur
from fastad.ops import nn_distance


class PatchNNDetector:
    def __init__(self, extractor: Callable[[torch.Tensor], torch.Tensor], saliency_k: float = 0.1,
                 sigma: float = 4.0, backend: str | None = None) -> None:
        """``extractor`` maps images [B, 3, H, W] to features [B, C, h, w]; ``saliency_k``
        is the share of the image's patches averaged by the saliency."""
        if not 0 < saliency_k <= 1:
            raise ValueError(f"saliency_k must be in (0, 1], got {saliency_k}")
        self.extractor = extractor
        self.saliency_k = saliency_k
        self.sigma = sigma
        self.backend = backend
        self.bank: torch.Tensor | None = None

    def patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, h*w, C] patch features and the grid (h, w)."""
        feats = self.extractor(images)
        B, C, h, w = feats.shape
        return feats.flatten(2).transpose(1, 2).contiguous(), (h, w)

    def fit(self, references: torch.Tensor) -> "PatchNNDetector":
        """Cache the patch bank of the normal reference images [K, 3, H, W]."""
        feats, _ = self.patches(references)
        self.bank = feats.reshape(-1, feats.shape[-1])
        return self

    def residual(self, feats: torch.Tensor) -> torch.Tensor:
        if self.bank is None:
            raise RuntimeError("PatchNNDetector: call fit(reference_images) first")
        return nn_distance(feats, self.bank, k=1, metric="cosine", backend=self.backend).values[..., 0]

    def saliency(self, feats: torch.Tensor) -> torch.Tensor:
        k = max(1, round(self.saliency_k * feats.shape[1]))
        return nn_distance(feats, feats, k=k, metric="cosine", reduce="mean_smallest", backend=self.backend).values

    def finish(self, values: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch values [B, h*w] -> (image scores [B], smoothed maps [B, H, W])."""
        # upsampling and blurring are linear and separable: one operator per axis
        # (equal to upsample-then-blur up to float32 rounding)
        maps = upsample_blur(values.reshape(-1, *grid), size, sigma=self.sigma if self.sigma > 0 else None)
        return maps.flatten(1).amax(1), maps
