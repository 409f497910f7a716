"""open_clip backbone shared by the CLIP-based reference models (InCTRLv2, DictAS).

``CLIPBackbone`` wraps an open_clip ``CLIP`` and gives what the anomaly-detection
heads need: the projected CLS embedding and the raw residual-stream patch tokens
of chosen transformer blocks (1-based block indices, CLS removed, row-major over
the patch grid, before ``ln_post`` and without projection: C = vision width), and
prompt-ensemble text prototypes.

Models are built from open_clip's model configs (``open_clip.get_model_config``)
or from the tiny test configs in ``TINY_CLIP_CONFIGS``; ``pretrained`` is a local
checkpoint path (open_clip / OpenAI TorchScript / plain state dict), an open_clip
pretrained tag (which downloads), or None for random weights.
"""
from __future__ import annotations

import copy
import os
import zipfile
from dataclasses import dataclass
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TINY_CLIP_CONFIGS", "POS_EMBED_RESIZE", "ImageFeatures", "CLIPBackbone", "clip_model_config",
           "create_clip", "load_clip_weights"]

# Small CLIP configs for tests: a few ms per image on a CPU core, no download.
# The text tower keeps the real BPE vocabulary (49408) so open_clip's tokenizer works.
TINY_CLIP_CONFIGS: dict[str, dict] = {
    "fastad-tiny": {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "fastad-tiny-p16": {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 48, "layers": 3, "width": 64, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
}

# How the positional embedding follows an input size other than the config's:
#   "bicubic_aa": resized once when the model is built (open_clip's resize_pos_embed:
#                 bicubic, antialias, align_corners=False), the OpenCLIP convention;
#   "bilinear":   the native embedding is interpolated on every forward (bilinear,
#                 align_corners=False), the AnomalyCLIP / FAPrompt convention.
POS_EMBED_RESIZE = ("bicubic_aa", "bilinear")


def clip_model_config(name: str) -> dict:
    """A deep copy of the model config ``name`` (a tiny test config or an open_clip config)."""
    if name in TINY_CLIP_CONFIGS:
        return copy.deepcopy(TINY_CLIP_CONFIGS[name])
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"fastad.models: unknown CLIP model {name!r}; expected an open_clip model name "
                         f"(open_clip.list_models()) or one of {sorted(TINY_CLIP_CONFIGS)}")
    return copy.deepcopy(cfg)


def _is_torchscript(path: str) -> bool:
    """OpenAI's released CLIP files are TorchScript archives (a zip with constants.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def load_clip_weights(model: nn.Module, path: str) -> None:
    """Load a CLIP checkpoint file into an open_clip ``CLIP`` (strict): OpenAI's
    TorchScript files, open_clip checkpoints and plain state dicts. A positional
    embedding of another grid size is resized with open_clip's ``resize_pos_embed``
    (bicubic, antialias)."""
    if _is_torchscript(path):
        state = torch.jit.load(path, map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        open_clip.model.resize_pos_embed(state, model)
        model.load_state_dict(state, strict=True)
    else:
        open_clip.load_checkpoint(model, path, strict=True, weights_only=False)


def create_clip(name: str, pretrained: str | None = None, image_size: int | None = None,
                quick_gelu: bool = False) -> nn.Module:
    """An open_clip ``CLIP`` in fp32 (eval mode).

    Args:
        name: open_clip model name (e.g. "ViT-L-14-336") or a key of TINY_CLIP_CONFIGS.
        pretrained: None (random weights), a local checkpoint path, or an open_clip
            pretrained tag (downloads).
        image_size: input size the model is built for (the positional embedding is
            resized to its grid); None keeps the config's.
        quick_gelu: QuickGELU activations (OpenAI-trained weights) instead of exact GELU.
    """
    cfg = clip_model_config(name)
    quick_gelu = bool(cfg.pop("quick_gelu", False)) or quick_gelu
    if cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {}) \
            or "timm_model_name" in cfg.get("vision_cfg", {}) or isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):
        raise ValueError(f"fastad.models: {name!r} is not a plain CLIP ViT (custom text tower, timm or ResNet "
                         f"vision tower); the reference models need open_clip's VisionTransformer")
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = int(image_size)
    if pretrained is not None and not os.path.isfile(pretrained):
        if name in TINY_CLIP_CONFIGS:
            raise ValueError(f"fastad.models: pretrained={pretrained!r} is not a file")
        model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu,
                                       force_image_size=image_size)
        return model.float().eval()
    model = open_clip.CLIP(**cfg, quick_gelu=quick_gelu)
    if pretrained is not None:
        load_clip_weights(model, pretrained)
    return model.float().eval()


@dataclass
class ImageFeatures:
    """Backbone outputs of a batch of images.

    ``embeds``: [B, D] projected CLS embeddings (``ln_post(cls) @ proj``);
    ``tokens``: one [B, N, C] tensor per requested layer, raw residual-stream patch
    tokens (CLS removed, row-major over the ``grid``)."""

    embeds: torch.Tensor
    tokens: list[torch.Tensor]
    grid: tuple[int, int]

    def to(self, *args, **kwargs) -> "ImageFeatures":
        return ImageFeatures(self.embeds.to(*args, **kwargs), [t.to(*args, **kwargs) for t in self.tokens], self.grid)

    def __len__(self) -> int:
        return self.embeds.shape[0]


class CLIPBackbone(nn.Module):
    """A frozen open_clip CLIP with multi-layer patch-token extraction.

    Args:
        name, pretrained, quick_gelu: see ``create_clip``.
        image_size: the input size the models run at.
        pos_embed_resize: one of POS_EMBED_RESIZE.
    """

    def __init__(self, name: str, pretrained: str | None = None, image_size: int | None = None,
                 quick_gelu: bool = False, pos_embed_resize: str = "bicubic_aa") -> None:
        super().__init__()
        if pos_embed_resize not in POS_EMBED_RESIZE:
            raise ValueError(f"fastad.models: pos_embed_resize must be one of {POS_EMBED_RESIZE}, "
                             f"got {pos_embed_resize!r}")
        self.name = name
        self.pos_embed_resize = pos_embed_resize
        native = clip_model_config(name)["vision_cfg"]["image_size"]
        self.image_size = int(image_size if image_size is not None else native)
        build_size = self.image_size if pos_embed_resize == "bicubic_aa" else None
        self.clip = create_clip(name, pretrained=pretrained, image_size=build_size, quick_gelu=quick_gelu)
        visual = self.clip.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" \
                or getattr(visual, "input_patchnorm", False):
            raise ValueError(f"fastad.models: {name!r} does not pool the CLS token; the reference models need "
                             f"a CLS-token CLIP ViT")
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self._tokenizer = None

    # ---------------------------------------------------------------- properties
    @property
    def width(self) -> int:
        """Channel count C of the patch tokens."""
        return self.clip.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        """Dimension D of the image / text embeddings."""
        return self.clip.visual.proj.shape[1]

    @property
    def depth(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @property
    def patch_size(self) -> int:
        return self.clip.visual.conv1.kernel_size[0]

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid at ``image_size``."""
        return (self.image_size // self.patch_size, self.image_size // self.patch_size)

    def check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        layers = tuple(int(i) for i in layers)
        if not layers or any(i < 1 or i > self.depth for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"fastad.models: layers must be distinct 1-based block indices in [1, {self.depth}] "
                             f"for {self.name!r}, got {layers}")
        return layers

    # ---------------------------------------------------------------- image tower
    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.clip.visual.positional_embedding
        n_old = pos.shape[0] - 1
        side = int(round(n_old ** 0.5))
        if (side, side) == grid:
            return pos
        img = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.pos_embed_resize == "bilinear":
            img = F.interpolate(img, size=grid, mode="bilinear", align_corners=False)
        else:
            img = F.interpolate(img, size=grid, mode="bicubic", antialias=True, align_corners=False)
        return torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)], dim=0)

    def encode_image(self, images: torch.Tensor, layers: Sequence[int]) -> ImageFeatures:
        """CLS embeddings and patch tokens of ``layers`` (1-based) for images [B, 3, H, W]."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) \
                else type(images).__name__
            raise ValueError(f"fastad.models: images must be a [B, 3, H, W] tensor, got {got}")
        p = self.patch_size
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"fastad.models: image size {tuple(images.shape[-2:])} is not a multiple of the "
                             f"patch size {p}")
        layers = self.check_layers(layers)
        visual = self.clip.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(grid).to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        batch_first = getattr(visual.transformer, "batch_first", False)
        if not batch_first:
            x = x.transpose(0, 1)
        tokens: list[torch.Tensor] = []
        wanted = {l: i for i, l in enumerate(layers)}
        slots: list[torch.Tensor | None] = [None] * len(layers)
        for idx, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)
            if idx in wanted:
                t = x if batch_first else x.transpose(0, 1)
                slots[wanted[idx]] = t[:, 1:, :]
        tokens = [t for t in slots if t is not None]
        cls_out = (x[:, 0] if batch_first else x[0])
        embeds = visual.ln_post(cls_out) @ visual.proj
        return ImageFeatures(embeds, tokens, grid)

    # ---------------------------------------------------------------- text tower
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            ctx = self.clip.context_length
            self._tokenizer = open_clip.SimpleTokenizer(context_length=ctx)
        return self._tokenizer

    @torch.no_grad()
    def text_prototypes(self, normal_prompts: Sequence[str], abnormal_prompts: Sequence[str],
                        chunk: int = 64) -> torch.Tensor:
        """[2, D] (normal, abnormal) prompt-ensemble prototypes: every prompt embedding
        L2-normalised, averaged per class, and re-normalised (fp32)."""
        device = self.clip.visual.conv1.weight.device
        protos = []
        for prompts in (normal_prompts, abnormal_prompts):
            if not prompts:
                raise ValueError("fastad.models: empty prompt list")
            embs = []
            for i in range(0, len(prompts), chunk):
                toks = self.tokenizer(list(prompts[i:i + chunk])).to(device)
                e = self.clip.encode_text(toks).float()
                embs.append(e / e.norm(dim=-1, keepdim=True))
            mean = torch.cat(embs).mean(dim=0)
            protos.append(mean / mean.norm())
        return torch.stack(protos)
