"""InCTRL (v1, CVPR 2024) and InCTRLv2 as one model on an open_clip backbone.

Specification: ../shared/specs/inctrlv2.md (v1 exact from mala-lab/InCTRL@cc535d0
``open_clip/model.py``; v2 from the paper, which has no public code).

Per query image x with K-shot normal references P (all of one category):

* patch residual (v1 and v2): for each layer l, M^l[p] = min over all K*N reference
  patches r of ``residual_scale * (1 - cos(F^l_x[p], F^l_r))`` on the raw
  residual-stream tokens; M = mean over layers; s_p = max_p M.
* image residual: I = psi(f_v(x)), I_p = mean_k psi(f_v(x'_k)); s_i = eta(I_p - I)
  (v1 code) or eta(I - I_p) (v2 paper, Eq. 2).
* text score: s_a = softmax(tau_img * <f_v(x)/|f_v(x)|, [T_n, T_a]>)[a] with
  prompt-ensemble prototypes T_n, T_a.
* v1 score: (phi(M + s_a + s_i) + s_p) / 2 with the holistic head phi over the
  N patches (row-major grid). v1 has no segmentation output; its map is M, upsampled.
* v2 score: (1 - alpha) (s_i + s_a) / 2 + alpha s_p; semantic maps
  S_a = mean_l softmax_c(tau_patch <u_l, T_c>)[a], u_l = normalize(phi1_l(F^l)),
  S^_a likewise with phi2; map M' = (1 - beta) Phi(1/2 (M + S_a)) + beta Phi(1/2 (M + S^_a)),
  then a Gaussian blur.

Batched semantics: every query image of a batch is scored against the same cached
category references, image by image (the released v1 code scrambles images and
layers when the batch size is above 1; this model does not).

Backends (same outputs to fp32 rounding): ``"reference"`` mirrors the authors'
computation (per-image normalise + GEMM + row-min, a 2-way softmax per map, two
upsamplings, a float64 scipy-exact blur); ``"fastad"`` runs the residual on
``fastad.ops.nn_distance``, fuses the maps at patch resolution and applies the
upsampling and the blur as one separable linear operator (exact up to rounding:
all three steps are linear).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastad.models._base import FewShotCLIPModel
from fastad.models.checkpoint import backbone_weights_arg, load_mapped_state_dict, read_state_dict
from fastad.models.clip_backbone import POS_EMBED_RESIZE, CLIPBackbone, ImageFeatures
from fastad.models.losses import binary_focal_loss, dice_loss, focal_loss
from fastad.models.postprocess import gaussian_blur, upsample_blur, upsample_maps

__all__ = ["InCTRLConfig", "InCTRLv2", "InCTRLReferences", "inctrl_prompts", "patch_residual", "pixel_map"]

# mala-lab/InCTRL open_clip/model.py: states x templates (7 x 22 normal, 4 x 22 anomalous)
_STATES = {
    "normal": ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
               "{} without damage"],
    "anomaly": ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"],
}
_TEMPLATES = [
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of a {}.",
    "a dark photo of the {}.", "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.", "a photo of the {}.", "a photo of a {}.",
    "a photo of a small {}.", "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of a {} for visual inspection.", "a photo of the {} for visual inspection.",
    "a photo of a {} for anomaly detection.", "a photo of the {} for anomaly detection.",
]
# the authors' one-prompt special case for the semantic (CIFAR-10) datasets
_SEMANTIC_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
                     "animal")


def inctrl_prompts(class_name: str) -> tuple[list[str], list[str]]:
    """InCTRL's (normal, anomalous) prompt ensembles for a class name (spaces, not underscores)."""
    if class_name in _SEMANTIC_CLASSES:
        return ([f"a photo of {class_name} for anomaly detection."],
                [f"a photo without {class_name} for anomaly detection."])
    normal = [t.format(s.format(class_name)) for s in _STATES["normal"] for t in _TEMPLATES]
    anomaly = [t.format(s.format(class_name)) for s in _STATES["anomaly"] for t in _TEMPLATES]
    return normal, anomaly


@dataclass(frozen=True)
class InCTRLConfig:
    """Every choice of the model; fields marked [inferred] / [unknown] / [sibling]
    are not fixed by public code (see the spec) and default to the spec's proposal.

    Attributes:
        version: "v1" (InCTRL, holistic head, no segmentation) or "v2" (linear fusion, DASL/OASL maps).
        backbone: open_clip model name. v1: ViT-B-16-plus-240 [code]; v2: ViT-L-14-336 [inferred
            from Table 6's 437.6 M parameters].
        image_size: input size. v1: 240 [code]; v2: 518 [paper: "518x518 to match ViT-L/14"].
        quick_gelu: QuickGELU activations. v1: False (LAION weights, exact GELU) [code];
            v2: True (OpenAI ViT-L-14-336 weights) [inferred].
        pos_embed_resize: "bicubic_aa" (OpenCLIP, default) or "bilinear" (AnomalyCLIP lineage) [unknown for v2].
        layers: 1-based blocks whose raw tokens feed the residual (and the v2 maps).
            v1: (7, 9, 11) [code]; v2: (6, 12, 18, 24) [sibling: AnomalyCLIP / FAPrompt].
        residual_scale: M = scale * (1 - cos). 0.5 [v1 code; v2 Eq. 3 prints 1 - cos, unknown].
        image_residual: "prototype_minus_query" (v1 code: I_p - I) or "query_minus_prototype" (v2 Eq. 2).
        adapter_reduction: psi = Linear(D, D/r) -> ReLU -> Linear(D/r, D) -> ReLU, no biases [v1 code].
        head_hidden: hidden widths of eta / phi: Linear -> ReLU -> BN -> Linear -> ReLU -> BN -> Linear -> sigmoid.
        tau_img: temperature of the image-level text score s_a. 100 [v1 code; v2 Eq. 6 prints none].
        tau_patch: temperature of the v2 patch maps. 1/0.07 [sibling; v2 Eq. 7 prints none].
        patch_adapter_bias: phi1 / phi2 are one Linear(C, D) per layer [inferred from the parameter
            budget], with a bias when True.
        alpha: v2 weight of s_p in the image score (Eq. 9). 0.5 [paper, Fig. 4].
        beta: v2 weight of the OASL map (Eq. 17). 0.75 [paper, Fig. 4].
        upsample_mode, align_corners: Phi, patch grid -> image size. bilinear, False [sibling].
        sigma: Gaussian blur of the final map (scipy reflect, truncate 4) or None.
            v1: None; v2: 4.0 [sibling: AnomalyCLIP; the paper mentions none].
        truncate: Gaussian truncation (scipy's default 4.0).
        image_focal_on_logits: the image focal loss applies BCE-with-logits to the (sigmoid)
            scores, as the v1 code does [v1 code quirk]; False uses BCE on probabilities (v2).
        lr, weight_decay: v1: AdamW(1e-3, wd 0.01) [code]; v2: Adam(1e-3) [paper].
    """

    version: str = "v2"
    backbone: str = "ViT-L-14-336"
    image_size: int = 518
    quick_gelu: bool = True
    pos_embed_resize: str = "bicubic_aa"
    layers: tuple[int, ...] = (6, 12, 18, 24)
    residual_scale: float = 0.5
    image_residual: str = "query_minus_prototype"
    adapter_reduction: int = 4
    head_hidden: tuple[int, int] = (128, 64)
    tau_img: float = 100.0
    tau_patch: float = 1.0 / 0.07
    patch_adapter_bias: bool = True
    alpha: float = 0.5
    beta: float = 0.75
    upsample_mode: str = "bilinear"
    align_corners: bool = False
    sigma: float | None = 4.0
    truncate: float = 4.0
    image_focal_on_logits: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.version not in ("v1", "v2"):
            raise ValueError(f"InCTRLConfig: version must be 'v1' or 'v2', got {self.version!r}")
        if self.image_residual not in ("prototype_minus_query", "query_minus_prototype"):
            raise ValueError(f"InCTRLConfig: image_residual must be 'prototype_minus_query' or "
                             f"'query_minus_prototype', got {self.image_residual!r}")
        if self.pos_embed_resize not in POS_EMBED_RESIZE:
            raise ValueError(f"InCTRLConfig: pos_embed_resize must be one of {POS_EMBED_RESIZE}")
        if not self.residual_scale > 0:
            raise ValueError(f"InCTRLConfig: residual_scale must be > 0, got {self.residual_scale!r}")
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"InCTRLConfig: sigma must be > 0 or None, got {self.sigma!r}")
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "head_hidden", tuple(int(i) for i in self.head_hidden))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "InCTRLConfig":
        """"v1" (InCTRL as released) or "v2" (InCTRLv2 with the spec's inferred choices)."""
        if name == "v1":
            base = dict(version="v1", backbone="ViT-B-16-plus-240", image_size=240, quick_gelu=False,
                        layers=(7, 9, 11), image_residual="prototype_minus_query", sigma=None,
                        image_focal_on_logits=True, lr=1e-3, weight_decay=0.01)
        elif name == "v2":
            base = {}
        else:
            raise ValueError(f"InCTRLConfig.preset: unknown preset {name!r}; expected 'v1' or 'v2'")
        base.update(overrides)
        return cls(**base)


class ImageAdapter(nn.Module):
    """psi: Linear(D, D/r, no bias) -> ReLU -> Linear(D/r, D, no bias) -> ReLU."""

    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, dim // reduction, bias=False)
        self.up = nn.Linear(dim // reduction, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.up(F.relu(self.down(x))))


class ResidualHead(nn.Module):
    """eta / phi (the authors' TransformerBasicHead(d, 1)): Linear -> ReLU -> BN ->
    Linear -> ReLU -> BN -> Linear -> sigmoid, returning [B]."""

    def __init__(self, dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        h1, h2 = hidden
        self.fc1, self.bn1 = nn.Linear(dim, h1), nn.BatchNorm1d(h1)
        self.fc2, self.bn2 = nn.Linear(h1, h2), nn.BatchNorm1d(h2)
        self.fc3 = nn.Linear(h2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(F.relu(self.fc1(x)))
        x = self.bn2(F.relu(self.fc2(x)))
        return torch.sigmoid(self.fc3(x))[:, 0]


class PatchAdapter(nn.Module):
    """phi1 / phi2: one Linear(C, D) per layer, patch tokens -> text space."""

    def __init__(self, n_layers: int, width: int, dim: int, bias: bool) -> None:
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(width, dim, bias=bias) for _ in range(n_layers)])

    def forward(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [p(t) for p, t in zip(self.proj, tokens)]


@dataclass
class InCTRLReferences:
    """Cached per category: ``embeds`` [K, D] reference CLS embeddings (psi is trainable,
    so the prototype is recomputed per call: K x D work), ``banks`` one [K*N, C]
    patch bank per layer (shot-major), ``text`` [2, D] (normal, anomalous) prototypes."""

    embeds: torch.Tensor
    banks: list[torch.Tensor]
    text: torch.Tensor
    grid: tuple[int, int]

    @property
    def shots(self) -> int:
        return self.embeds.shape[0]


def _residual_reference(query: Sequence[torch.Tensor], banks: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """The authors' residual (open_clip/model.py L534-556): per image and layer,
    normalise by the plain L2 norm, one GEMM, scale * (1 - cos), row-min over the
    bank; mean over layers. Their per-patch loop is vectorised over the patches
    of one image (same values). query [B, N, C] per layer; banks [M, C] or [B, M, C]."""
    per_layer = []
    for q_l, r_l in zip(query, banks):
        rows = []
        for b in range(q_l.shape[0]):
            r = r_l if r_l.dim() == 2 else r_l[b]
            rn = r / r.norm(dim=-1, keepdim=True)
            qn = q_l[b] / q_l[b].norm(dim=-1, keepdim=True)
            rows.append((scale * (1 - qn @ rn.T)).min(dim=1).values)
        per_layer.append(torch.stack(rows))
    return torch.stack(per_layer).mean(dim=0)


def _residual_fastad(query: Sequence[torch.Tensor], banks: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """fastad.ops.nn_distance per layer (fused: no N x M matrix), mean over layers."""
    from fastad.ops import nn_distance

    per_layer = [nn_distance(q, r, k=1, metric="cosine", scale=scale).values[..., 0] for q, r in zip(query, banks)]
    return torch.stack(per_layer).mean(dim=0)


def patch_residual(query: Sequence[torch.Tensor], banks: Sequence[torch.Tensor], scale: float = 0.5,
                   backend: str = "reference") -> torch.Tensor:
    """The in-context patch residual M [B, N]: mean over layers of the min over the
    bank of ``scale * (1 - cos)``. query: [B, N, C] per layer; banks: [M, C] (shared)
    or [B, M, C] (per image) per layer. fp32.

    Peak memory: reference, one N x M fp32 block per image and layer (v2 4-shot:
    1369 x 5476, 30 MB); fastad, that of ``fastad.ops.nn_distance`` (no N x M block
    in its cpu / triton backends)."""
    query = [q.float() for q in query]
    banks = [r.float() for r in banks]
    if backend == "reference":
        return _residual_reference(query, banks, scale)
    if backend == "fastad":
        return _residual_fastad(query, banks, scale)
    raise ValueError(f"fastad.models.patch_residual: backend must be 'reference' or 'fastad', got {backend!r}")


def pixel_map(cfg: InCTRLConfig, backend: str, Mx: torch.Tensor, S_a: torch.Tensor | None = None,
              S_h: torch.Tensor | None = None, size: tuple[int, int] = (518, 518)) -> torch.Tensor:
    """The pixel-level map [B, H, W] from patch-level maps [B, h, w]. v1: Phi(M_x).
    v2 (Eq. 11, 15, 17): (1 - beta) Phi(1/2 (M_x + S_a)) + beta Phi(1/2 (M_x + S^_a)).
    Then the Gaussian blur when ``cfg.sigma`` is set. The reference upsamples both
    maps as printed and blurs in float64 (scipy-exact); fastad fuses the maps at
    patch resolution and applies upsampling and blur as one separable linear
    operator (``upsample_blur``: both steps are linear)."""
    if backend != "reference":  # one separable upsample + blur operator on the fused patch map
        fused = Mx if S_a is None else 0.5 * Mx + 0.5 * ((1 - cfg.beta) * S_a + cfg.beta * S_h)
        return upsample_blur(fused, size, cfg.upsample_mode, cfg.align_corners, cfg.sigma, cfg.truncate)
    up = lambda m: upsample_maps(m, size, cfg.upsample_mode, cfg.align_corners)  # noqa: E731
    if S_a is None:
        maps = up(Mx)
    else:
        maps = (1 - cfg.beta) * up(0.5 * (Mx + S_a)) + cfg.beta * up(0.5 * (Mx + S_h))
    if cfg.sigma is not None:
        maps = gaussian_blur(maps, cfg.sigma, cfg.truncate)
    return maps


class InCTRLv2(FewShotCLIPModel):
    """InCTRL / InCTRLv2 (see the module docstring).

    Args:
        config: an ``InCTRLConfig`` or a preset name ("v1", "v2").
        backbone_weights: CLIP weights for the backbone (local path, open_clip tag, or None for
            random); ``pretrained`` is its deprecated name.
        backend: "reference" or "fastad" (settable later through ``model.backend``).
        **overrides: config fields that replace the preset's.

    Use::

        model = InCTRLv2("v2", backbone_weights="ViT-L-14-336.pt").eval()
        model.set_references(normal_images, category="candle")      # once per category
        with torch.no_grad():
            scores, maps = model(images)                              # [B], [B, H, W]
    """

    resize_mode = "shortest"  # engine_test.py: Resize(S, bicubic) on the shorter side, CenterCrop(S)

    def __init__(self, config: InCTRLConfig | str = "v2", pretrained: str | None = None, backend: str = "reference",
                 *, backbone_weights: str | None = None, **overrides: Any) -> None:
        super().__init__(backend)
        pretrained = backbone_weights_arg("InCTRLv2", backbone_weights, "pretrained", pretrained)
        if isinstance(config, str):
            config = InCTRLConfig.preset(config, **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.backbone = CLIPBackbone(config.backbone, pretrained=pretrained, image_size=config.image_size,
                                     quick_gelu=config.quick_gelu, pos_embed_resize=config.pos_embed_resize)
        self.layers = self.backbone.check_layers(config.layers)
        dim, width = self.backbone.embed_dim, self.backbone.width
        if dim % config.adapter_reduction:
            raise ValueError(f"InCTRLConfig: adapter_reduction {config.adapter_reduction} must divide the "
                             f"embedding dimension {dim}")
        self.image_adapter = ImageAdapter(dim, config.adapter_reduction)
        self.image_head = ResidualHead(dim, config.head_hidden)
        if config.version == "v1":
            gh, gw = self.backbone.grid
            self.holistic_head = ResidualHead(gh * gw, config.head_hidden)
        else:
            self.dasl_adapter = PatchAdapter(len(self.layers), width, dim, config.patch_adapter_bias)
            self.oasl_adapter = PatchAdapter(len(self.layers), width, dim, config.patch_adapter_bias)

    # ------------------------------------------------------------------ references
    def set_references(self, images_or_features: torch.Tensor | ImageFeatures, category: str,
                       class_name: str | None = None, text_features: torch.Tensor | None = None) -> InCTRLReferences:
        """Encode the K normal reference images (or take precomputed ``ImageFeatures``)
        and the category's text prototypes once; later calls to ``forward`` score
        against them. ``class_name`` defaults to ``category`` with "_" -> " ";
        ``text_features`` [2, D] (normal, anomalous) skips the text tower."""
        feats = self._features(images_or_features, "reference")
        k = feats.embeds.shape[0]
        if k < 1:
            raise ValueError("fastad.models.InCTRLv2: set_references needs at least one reference image")
        if text_features is None:
            name = class_name if class_name is not None else category.replace("_", " ")
            text_features = self.backbone.text_prototypes(*inctrl_prompts(name))
        text_features = self._check_text(text_features, batched=False)
        refs = InCTRLReferences(embeds=feats.embeds.detach().float(),
                                banks=[t.detach().float().reshape(-1, t.shape[-1]) for t in feats.tokens],
                                text=text_features, grid=feats.grid)
        self.references[category] = refs
        self.active_category = category
        return refs

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, category: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores [B] and anomaly maps [B, H, W] (input resolution) for a batch of
        query images of ``category`` (default: the last one given to set_references)."""
        out = self.head(self._features(images, "query"), category)
        return out["image_scores"], out["anomaly_maps"]

    def head(self, features: ImageFeatures, category: str | None = None) -> dict[str, torch.Tensor]:
        """The anomaly-detection head on backbone features; returns every intermediate
        ("image_scores", "anomaly_maps", "patch_residual" [B, h, w], "s_i", "s_a", "s_p",
        v2: "S_a", "S_a_hat" [B, h, w]). Runs in fp32 with autocast disabled."""
        refs = self.references[self._category(category)]
        if features.grid != refs.grid:
            raise ValueError(f"fastad.models.InCTRLv2: query grid {features.grid} differs from the references' "
                             f"{refs.grid}")
        dev = features.embeds.device
        banks = [b.to(dev) for b in refs.banks]
        return self._parts(features, refs.embeds.to(dev), banks, refs.text.to(dev))

    def _parts(self, feats: ImageFeatures, ref_embeds: torch.Tensor, banks: Sequence[torch.Tensor],
               text: torch.Tensor) -> dict[str, torch.Tensor]:
        """ref_embeds [K, D] / banks [M, C] shared, or [B, K, D] / [B, M, C] per image; text [2, D] or [B, 2, D]."""
        cfg, backend = self.config, self.backend
        with torch.autocast(feats.embeds.device.type, enabled=False):
            emb = feats.embeds.float()
            tokens = [t.float() for t in feats.tokens]
            B = emb.shape[0]
            gh, gw = feats.grid

            M = patch_residual(tokens, banks, cfg.residual_scale, backend)  # [B, N]
            s_p = M.max(dim=-1).values

            iq = self.image_adapter(emb)
            ip = self.image_adapter(ref_embeds.float()).mean(dim=-2)
            residual = ip - iq if cfg.image_residual == "prototype_minus_query" else iq - ip
            s_i = self.image_head(residual)

            v = emb / emb.norm(dim=-1, keepdim=True)
            s_a = self._two_way(v[:, None, :], text, cfg.tau_img)[:, 0]

            out = {"patch_residual": M.reshape(B, gh, gw), "s_i": s_i, "s_a": s_a, "s_p": s_p}
            size = (gh * self.backbone.patch_size, gw * self.backbone.patch_size)
            if cfg.version == "v1":
                s_h = self.holistic_head(M + s_a[:, None] + s_i[:, None])
                out["image_scores"] = (s_h + s_p) / 2
                maps = pixel_map(cfg, backend, out["patch_residual"], size=size)
            else:
                out["image_scores"] = (1 - cfg.alpha) * (s_i + s_a) / 2 + cfg.alpha * s_p
                S_a = self._semantic_map(self.dasl_adapter(tokens), text).reshape(B, gh, gw)
                S_h = self._semantic_map(self.oasl_adapter(tokens), text).reshape(B, gh, gw)
                out["S_a"], out["S_a_hat"] = S_a, S_h
                maps = pixel_map(cfg, backend, out["patch_residual"], S_a, S_h, size)
            out["anomaly_maps"] = maps
        return out

    def _two_way(self, u: torch.Tensor, text: torch.Tensor, tau: float) -> torch.Tensor:
        """P(anomalous) = softmax_c(tau <u, T_c>)[a] for u [B, P, D] (unit rows) -> [B, P]."""
        if self.backend == "reference":
            logits = tau * (u @ text.transpose(-1, -2))
            return logits.softmax(dim=-1)[..., 1]
        diff = text[..., 1, :] - text[..., 0, :]  # 2-way softmax == sigmoid of the logit gap
        return torch.sigmoid(tau * (u @ diff[..., :, None])[..., 0])

    def _semantic_map(self, projected: Sequence[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        maps = [self._two_way(p / p.norm(dim=-1, keepdim=True), text, self.config.tau_patch) for p in projected]
        return torch.stack(maps).mean(dim=0)

    # ------------------------------------------------------------------ training
    def compute_losses(self, images: torch.Tensor | ImageFeatures, ref_images: torch.Tensor | ImageFeatures,
                       labels: torch.Tensor, masks: torch.Tensor | None = None,
                       text_features: torch.Tensor | None = None, class_names: Sequence[str] | None = None,
                       oasl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The papers' losses on a batch with per-image references (as the authors
        train: K random normals of the same category per query).

        Args:
            images: [B, 3, H, W] queries (or their ImageFeatures).
            ref_images: [B, K, 3, H, W] references per query (or ImageFeatures of the B*K
                images, query-major).
            labels: [B] 0 normal / 1 anomalous.
            masks: v2 only, [B, H, W] pixel ground truth (None: all zero, i.e. normal images).
            text_features: [2, D] or [B, 2, D]; else computed from ``class_names``.
            oasl: v2 only, [B] bool: True for the images that train only OASL (the paper's
                auxiliary train split, normal images), False for the DASL images (its test
                split). None: DASL on every image and OASL on the normal ones.

        v1: focal(final score) + focal(s_i) (BinaryFocalLoss, see the config's
        image_focal_on_logits). v2: L_DASL = focal(s) + Focal([Phi S_n, Phi S_a], G) +
        Dice(Phi S_a, G) + Dice(Phi M_p, G) on the batch, plus L_OASL = the same pixel
        terms with phi2 on the normal images only (G = 0). phi1 and phi2 share no
        parameters, so the summed loss trains them independently, as the paper asks.
        Returns a dict with "loss" and its terms."""
        cfg = self.config
        feats = self._features(images, "query")
        B = feats.embeds.shape[0]
        if isinstance(ref_images, torch.Tensor):
            if ref_images.dim() != 5 or ref_images.shape[0] != B:
                raise ValueError(f"fastad.models.InCTRLv2: ref_images must be [B={B}, K, 3, H, W], "
                                 f"got {tuple(ref_images.shape)}")
            ref_images = ref_images.flatten(0, 1)
        rfeats = self._features(ref_images, "reference")
        K = rfeats.embeds.shape[0] // B
        ref_embeds = rfeats.embeds.reshape(B, K, -1)
        banks = [t.reshape(B, K * t.shape[1], t.shape[2]) for t in rfeats.tokens]
        if text_features is None:
            if class_names is None:
                raise ValueError("fastad.models.InCTRLv2: pass text_features or class_names")
            cache: dict[str, torch.Tensor] = {}
            for name in class_names:
                if name not in cache:
                    cache[name] = self.backbone.text_prototypes(*inctrl_prompts(name.replace("_", " ")))
            text_features = torch.stack([cache[n] for n in class_names])
        text = self._check_text(text_features)
        parts = self._parts(feats, ref_embeds, banks, text)
        y = labels.to(self.device).float()
        on_logits = cfg.image_focal_on_logits
        if cfg.version == "v1":
            l_final = binary_focal_loss(parts["image_scores"], y, logits=on_logits)
            l_ref = binary_focal_loss(parts["s_i"], y, logits=on_logits)
            return {"loss": l_final + l_ref, "image": l_final, "image_residual": l_ref}
        size = parts["anomaly_maps"].shape[-2:]
        gt = torch.zeros((B, *size), device=self.device) if masks is None else (masks.to(self.device) > 0.5).float()
        if gt.shape[-2:] != size:
            raise ValueError(f"fastad.models.InCTRLv2: masks must be [B, {size[0]}, {size[1]}], got {tuple(gt.shape)}")
        up = lambda m: upsample_maps(m, size, cfg.upsample_mode, cfg.align_corners)  # noqa: E731

        def pixel_terms(S: torch.Tensor, Mx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            """Focal([Phi S_n, Phi S_a], G) + Dice(Phi S_a, G) + Dice(Phi 1/2 (M_x + S_a), G)."""
            s_up = up(S)
            return (focal_loss(torch.stack([1 - s_up, s_up], dim=1), g) + dice_loss(s_up, g)
                    + dice_loss(up(0.5 * (Mx + S)), g))

        Mx = parts["patch_residual"]
        if oasl is None:
            l_img = binary_focal_loss(parts["image_scores"], y, logits=on_logits)
            l_dasl = l_img + pixel_terms(parts["S_a"], Mx, gt)
            normal = y < 0.5
        else:
            normal = oasl.to(self.device).bool()
            if bool((y[normal] > 0.5).any()):
                raise ValueError("fastad.models.InCTRLv2: OASL images (oasl=True) must be normal")
            d = ~normal
            l_img = binary_focal_loss(parts["image_scores"][d], y[d], logits=on_logits)
            l_dasl = l_img + pixel_terms(parts["S_a"][d], Mx[d], gt[d])
        if bool(normal.any()):
            l_oasl = pixel_terms(parts["S_a_hat"][normal], Mx[normal], torch.zeros_like(gt[normal]))
        else:
            l_oasl = parts["S_a_hat"].sum() * 0.0
        return {"loss": l_dasl + l_oasl, "dasl": l_dasl, "image": l_img, "oasl": l_oasl}

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The authors' optimiser on the trainable parameters (v1 AdamW, v2 Adam)."""
        cfg = self.config
        if cfg.version == "v1":
            return torch.optim.AdamW(self.trainable_parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                     weight_decay=cfg.weight_decay)
        return torch.optim.Adam(self.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def training_step(self, optimizer: torch.optim.Optimizer, images: torch.Tensor | ImageFeatures,
                      ref_images: torch.Tensor | ImageFeatures, labels: torch.Tensor,
                      masks: torch.Tensor | None = None, **kwargs: Any) -> dict[str, float]:
        """One optimisation step on ``compute_losses``; returns the loss terms as floats."""
        self.train()
        optimizer.zero_grad(set_to_none=True)
        losses = self.compute_losses(images, ref_images, labels, masks, **kwargs)
        losses["loss"].backward()
        optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, source: str | os.PathLike | Mapping[str, Any]) -> None:
        """Load the authors' released InCTRL checkpoint (``{"model_state": ...}`` with
        their key names, CLIP weights included) or a fastad state dict of this model.
        A checkpoint without backbone keys keeps the backbone's current weights.
        Raises CheckpointKeyError listing missing / unexpected / mis-shaped keys."""
        state = read_state_dict(source, containers=("model_state", "state_dict", "model"))
        has_backbone = any(_rename_inctrl(k) is not None and _rename_inctrl(k).startswith("backbone.")
                           for k in state)

        def optional(key: str) -> bool:
            if key in ("backbone.clip.logit_scale", "backbone.clip.logit_bias"):
                return True  # CLIP's contrastive temperature: unused here, absent from InCTRL's class
            return key.startswith("backbone.") and not has_backbone

        load_mapped_state_dict(self, state, _rename_inctrl, f"InCTRLv2({self.config.version}).load_checkpoint",
                               optional)


_HEAD_KEYS = {"projection1": "fc1", "projection2": "fc2", "projection3": "fc3", "bn2": "bn1", "bn3": "bn2"}
_CLIP_PREFIXES = ("visual.", "transformer.", "token_embedding.", "ln_final.")
_CLIP_KEYS = ("positional_embedding", "text_projection", "logit_scale", "logit_bias")


def _rename_inctrl(key: str) -> str | None:
    """mala-lab/InCTRL key names -> ours (fastad names pass through unchanged)."""
    if key.startswith(_CLIP_PREFIXES) or key in _CLIP_KEYS:
        return "backbone.clip." + key
    if key.startswith("adapter.fc."):
        idx, rest = key[len("adapter.fc."):].split(".", 1)
        return {"0": "image_adapter.down.", "2": "image_adapter.up."}.get(idx, "image_adapter.fc." + idx + ".") + rest
    for theirs, ours in (("diff_head_ref.", "image_head."), ("diff_head.", "holistic_head.")):
        if key.startswith(theirs):
            sub, rest = key[len(theirs):].split(".", 1)
            if sub == "bn1":
                return None  # BatchNorm1d(dim_in): defined in TransformerBasicHead, never used in forward
            return ours + _HEAD_KEYS.get(sub, sub) + "." + rest
    return key

