"""What InCTRLv2 and DictAS share: the backend switch, the per-category reference
cache, and keeping the frozen backbone in eval mode."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastad.models.clip_backbone import CLIPBackbone, ImageFeatures

MODEL_BACKENDS = ("reference", "fastad")


class FewShotCLIPModel(nn.Module):
    """Base of the few-shot CLIP models: ``backbone`` (frozen ``CLIPBackbone``),
    ``backend`` ("reference" or "fastad", settable), and ``references`` (a dict
    category -> cached reference data, filled by ``set_references``)."""

    backbone: CLIPBackbone
    layers: tuple[int, ...]

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.references: dict[str, Any] = {}
        self.active_category: str | None = None

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in MODEL_BACKENDS:
            raise ValueError(f"fastad.models: backend must be one of {MODEL_BACKENDS}, got {value!r}")
        self._backend = value

    def train(self, mode: bool = True) -> "FewShotCLIPModel":
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout / batch statistics there
        return self

    @property
    def device(self) -> torch.device:
        return self.backbone.clip.visual.conv1.weight.device

    resize_mode = "shortest"

    def preprocess(self):
        """PIL image -> normalised [3, S, S] tensor for this model (open_clip's eval
        transform: bicubic resize, centre crop, OpenAI CLIP mean / std)."""
        import open_clip

        return open_clip.image_transform(self.backbone.image_size, is_train=False,
                                         mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD,
                                         resize_mode=self.resize_mode)

    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """Backbone pass: CLS embeddings and patch tokens of the configured layers."""
        return self.backbone.encode_image(images.to(self.device), self.layers)

    def _features(self, images_or_features: torch.Tensor | ImageFeatures, what: str) -> ImageFeatures:
        if isinstance(images_or_features, ImageFeatures):
            feats = images_or_features
            if len(feats.tokens) != len(self.layers):
                raise ValueError(f"fastad.models: {what} features hold {len(feats.tokens)} layers, the model uses "
                                 f"{len(self.layers)} ({self.layers})")
            n = feats.grid[0] * feats.grid[1]
            for t in feats.tokens:
                if t.dim() != 3 or t.shape[0] != feats.embeds.shape[0] or t.shape[1] != n \
                        or t.shape[2] != self.backbone.width:
                    raise ValueError(f"fastad.models: {what} tokens must be [B, {n}, {self.backbone.width}] "
                                     f"(grid {feats.grid}), got {tuple(t.shape)}")
            return feats.to(self.device)
        with torch.no_grad():
            return self.encode(images_or_features)

    def _check_text(self, text: torch.Tensor, batched: bool = True) -> torch.Tensor:
        """[2, D] (normal, anomalous) text prototypes, or [B, 2, D] per image when ``batched``."""
        dim = self.backbone.embed_dim
        if not isinstance(text, torch.Tensor) or text.shape[-2:] != (2, dim) or text.dim() > (3 if batched else 2):
            want = f"[2, {dim}]" + (f" or [B, 2, {dim}]" if batched else "")
            raise ValueError(f"fastad.models.{type(self).__name__}: text_features must be {want} (normal, "
                             f"anomalous), got {tuple(getattr(text, 'shape', ()))}")
        return text.detach().float().to(self.device)

    def _category(self, category: str | None) -> str:
        category = category if category is not None else self.active_category
        if category is None or category not in self.references:
            known = sorted(self.references)
            raise KeyError(f"fastad.models: no references for category {category!r}; call "
                           f"set_references(images, category=...) first (known: {known})")
        return category

    def clear_references(self) -> None:
        self.references.clear()
        self.active_category = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
