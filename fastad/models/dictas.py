"""DictAS (few-shot anomaly segmentation as dictionary lookup) on an open_clip backbone.

Specification: ../shared/specs/dictas.md and the authors' code (xiaozhen228/DictAS:
models/DictAS.py, models/SPM.py, test.py, train.py, models/utils.py).

For every selected layer l (raw residual-stream patch tokens, CLS removed) and
scale s in (1, 3):

1. query tokens pass the value generator: x_q = g_V(F^l_x)            (test.py)
2. scale 3: 3x3 average pooling, stride 1, zero padding counted, on the patch grid,
   applied to x_q and to each reference image's tokens; scale 1: unchanged
3. dictionary: keys F_K = g_K(refs), values F_V = g_V(refs), the generators' self-
   attention running over all K*N reference tokens jointly (the authors concatenate
   the shots into one sequence); cached per category by ``set_references``
4. F_Q = g_Q(x_q); w = sparsemax(F_Q F_K^T * C^-1/2) over the M = K*N keys; F_r = w F_V
5. map_{l,s} = 1 - (cos(x_q, F_r) + 1) / 2

The 8 maps are upsampled (bilinear, align_corners=True) to the image size,
averaged, and Gaussian-smoothed (sigma 6, reflect, truncate 4). Image score:
alpha * p_text + (1 - alpha) * max(map), p_text = softmax(100 <f_v(x)/|f_v(x)|,
[T_n, T_a]>)[a] with the APRIL-GAN prompt ensemble; the authors min-max normalise
both terms over a category's test images first (``category_scores``).

Batched semantics: all query images of a batch look up the same cached dictionary
(the authors' test loop runs one image at a time).

Backends (same outputs to fp32 rounding): ``"reference"`` mirrors the authors
(dense logits, sort-based sparsemax as in SPM.py, 8 upsamplings, float64 scipy-exact
blur); ``"fastad"`` looks up with ``fastad.ops.dict_lookup`` (no N x M logits),
averages the 8 maps at patch resolution and applies upsampling and blur as one
separable linear operator (exact up to rounding: every step is linear).

Dataset rules of the authors' test code (``fastad evaluate`` applies them, see
``DictAS.apply_dataset_rules`` / ``DictAS.prepare_references``):

* ``screw`` with at most 4 shots: every reference image is followed by 9 rotated copies
  (-180 to 180 degrees in steps of 45; dataset.py ``Roate_support``: albumentations 1.3.1
  ``Rotate``, i.e. ``cv2.warpAffine`` on the uint8 image about its centre - 0.5, bilinear,
  reflect-101 border), so the dictionary holds 10 K images;
* alpha = 0.2 on MVTec AD and VisA; elsewhere alpha = 0 (image score = map maximum only) for
  ``bracket_brown``, ``metal1``, ``metal2`` and ``wood``, 0.5 for the other categories
  (metric_and_visualization.py).

Per-dataset layers / scales / sigma (models/utils.py ``BESTSEGMENTATION``; the released
generators load whatever the layers, ``Fuse_Feature`` is built for 4 layers and is
training-only): VisA: layers (6, 12, 18, 24), scales (1, 3), sigma 6; MVTec AD: (6, 12),
(1, 3), 6; BTAD: (6, 12), (1,), 6; MPDD / MVTec 3D: (6, 12, 18, 24), (1,), 6; the
classification-first variant uses sigma 2 (MVTec AD, MVTec 3D) or no blur.

Note: the authors' CLIP re-implementation (models/transformer.py) uses exact
``nn.GELU`` even with OpenAI weights, which were trained with QuickGELU; their
released generators were trained on those features, hence ``quick_gelu=False``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastad.models._base import FewShotCLIPModel
from fastad.models._opencv import import_cv2
from fastad.models.checkpoint import backbone_weights_arg, load_mapped_state_dict, read_state_dict
from fastad.models.clip_backbone import POS_EMBED_RESIZE, CLIPBackbone, ImageFeatures
from fastad.models.postprocess import gaussian_blur, upsample_blur, upsample_maps

__all__ = ["DictASConfig", "DictAS", "DictASReferences", "dictas_prompts", "sparsemax_sort", "dictionary_lookup",
           "category_scores", "pixel_map", "rotate_references"]

# xiaozhen228/DictAS models/prompt_ensemble.py (the APRIL-GAN ensemble)
_NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                  "{} without damage"]
_ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
_TEMPLATES = [
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.", "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg \\ photo of the {}.",  # sic: the authors' source has '\ ' (a literal backslash)
    "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
]

LOOKUP_MODES = ("sparsemax", "softmax", "argmax")


def dictas_prompts(class_name: str) -> tuple[list[str], list[str]]:
    """DictAS's (normal, abnormal) prompt ensembles (7 x 35 and 5 x 35); the class
    name is used as given (the authors keep underscores)."""
    normal = [t.format(s.format(class_name)) for s in _NORMAL_STATES for t in _TEMPLATES]
    abnormal = [t.format(s.format(class_name)) for s in _ABNORMAL_STATES for t in _TEMPLATES]
    return normal, abnormal


@dataclass(frozen=True)
class DictASConfig:
    """Every choice of the model (authors' defaults).

    Attributes:
        backbone, image_size: CLIP ViT-L-14-336 at 336 (24 x 24 patches).
        quick_gelu: False: the authors' CLIP uses exact GELU (see the module docstring).
        pos_embed_resize: when image_size differs from the backbone's native size.
        layers: 1-based blocks of the patch tokens: (6, 12, 18, 24) (the authors use (6, 12)
            for MVTec AD / BTAD at test time, models/utils.py BESTSEGMENTATION).
        scales: pooling kernel sizes: (1, 3) ((1,) for MVTec 3D / MPDD / BTAD).
        generator_heads: heads of the generators' self-attention (4).
        generator_dropout: dropout in the generators' MLP (0.1; inactive in eval mode).
        lookup: "sparsemax" (the paper), "softmax" or "argmax" (hard max) (ablations).
        lookup_scale: logit scale; None = C^-1/2 (single head over the full width).
        query_value_generator: the query tokens pass g_V first at test time (test.py).
        upsample_mode, align_corners: map upsampling: bilinear, True.
        sigma, truncate: Gaussian blur of the averaged map (6, 4.0); None disables it.
        alpha: weight of the text score in the image score (0.2: MVTec AD / VisA).
        tau_text: temperature of the text score (100).
        fuse_layers: layers concatenated by the training-only ``Fuse_Feature`` (the authors'
            ``k = 4``, whatever ``layers`` is: their checkpoints hold a (C/2, 4C) fuse weight, and
            evaluation with fewer layers never calls it); training needs len(layers) == fuse_layers.
        rotate_categories, rotate_max_shots, rotate_angles: categories whose references get
            rotated copies when at most ``rotate_max_shots`` shots are given (the authors:
            ``screw``, 4, -180..180 step 45); see ``DictAS.prepare_references``.
        zero_alpha_categories, other_alpha: outside MVTec AD / VisA the authors' metric code
            scores these categories with alpha = 0 and the others with 0.5 (their --alpha);
            ``alpha`` itself is the MVTec AD / VisA value. See ``DictAS.apply_dataset_rules``.
        lambda_cqc, lambda_tac: weights of the contrastive query and text alignment
            constraints in the training loss (0.1, 0.1).
        lr, betas: Adam(1e-4, (0.5, 0.999)) as in train.py.
        train_query_value_generator: training passes the query tokens through g_V (the
            authors switch this on after their first stage, when g_V is frozen).
    """

    backbone: str = "ViT-L-14-336"
    image_size: int = 336
    quick_gelu: bool = False
    pos_embed_resize: str = "bicubic_aa"
    layers: tuple[int, ...] = (6, 12, 18, 24)
    scales: tuple[int, ...] = (1, 3)
    generator_heads: int = 4
    generator_dropout: float = 0.1
    lookup: str = "sparsemax"
    lookup_scale: float | None = None
    query_value_generator: bool = True
    upsample_mode: str = "bilinear"
    align_corners: bool = True
    sigma: float | None = 6.0
    truncate: float = 4.0
    alpha: float = 0.2
    tau_text: float = 100.0
    fuse_layers: int = 4
    rotate_categories: tuple[str, ...] = ("screw",)
    rotate_max_shots: int = 4
    rotate_angles: tuple[float, ...] = tuple(float(a) for a in range(-180, 181, 45))
    zero_alpha_categories: tuple[str, ...] = ("bracket_brown", "metal1", "metal2", "wood")
    other_alpha: float = 0.5
    lambda_cqc: float = 0.1
    lambda_tac: float = 0.1
    lr: float = 1e-4
    betas: tuple[float, float] = field(default=(0.5, 0.999))
    train_query_value_generator: bool = False

    def __post_init__(self) -> None:
        if self.lookup not in LOOKUP_MODES:
            raise ValueError(f"DictASConfig: lookup must be one of {LOOKUP_MODES}, got {self.lookup!r}")
        if self.pos_embed_resize not in POS_EMBED_RESIZE:
            raise ValueError(f"DictASConfig: pos_embed_resize must be one of {POS_EMBED_RESIZE}")
        scales = tuple(int(s) for s in self.scales)
        if not scales or any(s < 1 for s in scales):
            raise ValueError(f"DictASConfig: scales must be positive pooling sizes, got {self.scales!r}")
        if self.sigma is not None and not self.sigma > 0:
            raise ValueError(f"DictASConfig: sigma must be > 0 or None, got {self.sigma!r}")
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "rotate_categories", tuple(self.rotate_categories))
        object.__setattr__(self, "rotate_angles", tuple(float(a) for a in self.rotate_angles))
        object.__setattr__(self, "zero_alpha_categories", tuple(self.zero_alpha_categories))
        if self.fuse_layers < 1:
            raise ValueError(f"DictASConfig: fuse_layers must be >= 1, got {self.fuse_layers!r}")

    def dataset_alpha(self, dataset: str, category: str) -> float:
        """alpha for ``category`` of ``dataset`` (names as ``fastad evaluate --dataset``, any
        case), the authors' rule: ``alpha`` on MVTec AD / VisA; elsewhere 0 for
        ``zero_alpha_categories``, else ``other_alpha``."""
        if dataset.lower() in ("mvtec", "visa"):
            return self.alpha
        return 0.0 if category in self.zero_alpha_categories else self.other_alpha

    def rotates_references(self, category: str, shots: int) -> bool:
        """Whether ``prepare_references`` adds rotated copies (the authors' ``screw`` rule)."""
        return category in self.rotate_categories and shots <= self.rotate_max_shots


# ---------------------------------------------------------------------------- generators


class GeneratorMLP(nn.Module):
    """The authors' ``MLP``: Linear -> Dropout -> (+ res) -> Linear -> LayerNorm -> Linear(no bias); no activation."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc3 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.norm(self.fc2(self.drop(self.fc1(x)) + res)))


class AttnBlock(nn.Module):
    """The authors' ``Attn_Block``: LayerNorm, bias-free q/k/v projections, multi-head
    self-attention (SDPA), then ``GeneratorMLP`` with the normalised input as residual."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"DictAS: generator_heads {heads} must divide the width {dim}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.mlp = GeneratorMLP(dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.norm(x)
        B, N, C = xn.shape
        split = lambda t: t.reshape(B, N, self.heads, C // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q_proj(xn)), split(self.k_proj(xn)), split(self.v_proj(xn)))
        return self.mlp(y.transpose(1, 2).reshape(B, N, C), xn)


class ValueGenerator(nn.Module):
    """g_V(x) = x + AttnBlock(x)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.block = AttnBlock(dim, heads, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class GlobalFeature(nn.Module):
    """The authors' ``Global_Feature`` (training only, text alignment constraint):
    concatenate the layers' tokens, Linear(C*L, C/2), attention pooling over the
    patches, Linear(C/2, D). The authors build it with L = 4 (``k = 4``) in every setting."""

    def __init__(self, width: int, n_layers: int, embed_dim: int) -> None:
        super().__init__()
        self.fuse = nn.Linear(width * n_layers, width // 2)
        self.score = nn.Linear(width // 2, 1)
        self.proj = nn.Linear(width // 2, embed_dim)

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.fuse(torch.cat(list(tokens), dim=2))
        w = self.score(x).softmax(dim=1)
        return self.proj((w * x).sum(dim=1))


# ---------------------------------------------------------------------------- lookup


def sparsemax_sort(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The authors' sort-based sparsemax (models/SPM.py): subtract the max, sort
    descending, support k = max{j : 1 + j z_(j) > cumsum_j}, tau = (sum of the
    support - 1) / k, max(z - tau, 0). Autograd differentiates through sort/cumsum."""
    z = z.movedim(dim, -1)
    z = z - z.max(dim=-1, keepdim=True).values
    zs = torch.sort(z, dim=-1, descending=True).values
    rng = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    is_gt = (1 + rng * zs > torch.cumsum(zs, dim=-1)).to(z.dtype)
    k = (is_gt * rng).max(dim=-1, keepdim=True).values
    tau = ((is_gt * zs).sum(dim=-1, keepdim=True) - 1) / k
    return torch.clamp(z - tau, min=0).movedim(-1, dim)


def _weights(logits: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "sparsemax":
        return sparsemax_sort(logits, dim=-1)
    if mode == "softmax":
        return logits.softmax(dim=-1)
    return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)


def dictionary_lookup(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                      mode: str = "sparsemax", backend: str = "reference") -> torch.Tensor:
    """F_r = weights(query keys^T * scale) values for query [B, N, C], keys / values
    [M, C] (shared) or [B, M, C] (per image). ``backend="reference"``: the authors'
    dense logits + ``sparsemax_sort`` (softmax / one-hot argmax for the ablations);
    ``"fastad"``: ``fastad.ops.dict_lookup`` (streams the keys, never stores N x M logits).

    Peak memory: reference, the B x N x M fp32 logits, weights and sort (4-shot:
    576 x 2304 per image, 5 MB each); fastad, O(B N k) for a support of k keys."""
    if mode not in LOOKUP_MODES:
        raise ValueError(f"fastad.models.dictionary_lookup: mode must be one of {LOOKUP_MODES}, got {mode!r}")
    if backend == "fastad":
        from fastad.ops import dict_lookup

        out = dict_lookup(query, keys, values, scale=scale, mode=mode)
        return out[0] if isinstance(out, tuple) else out
    if backend != "reference":
        raise ValueError(f"fastad.models.dictionary_lookup: backend must be 'reference' or 'fastad', got {backend!r}")
    k = keys if keys.dim() == 3 else keys[None]
    v = values if values.dim() == 3 else values[None]
    logits = torch.einsum("bnc,bmc->bnm", query, k.expand(query.shape[0], -1, -1)) * scale
    return torch.einsum("bnm,bmc->bnc", _weights(logits, mode), v.expand(query.shape[0], -1, -1))


def _pool(tokens: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """The authors' ``Padding_same``: zero padding (left/top (k-1)//2, right/bottom k//2),
    then k x k average pooling with stride 1 (padded zeros counted), on [B, N, C] tokens."""
    if size == 1:
        return tokens
    B, N, C = tokens.shape
    x = tokens.transpose(1, 2).reshape(B, C, *grid)
    lo, hi = (size - 1) // 2, size // 2
    x = F.avg_pool2d(F.pad(x, (lo, hi, lo, hi)), kernel_size=size, stride=1)
    return x.reshape(B, C, N).transpose(1, 2)


def category_scores(text_probs: torch.Tensor, map_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """The authors' image scores over all test images of one category
    (metric_and_visualization.py): min-max normalise the text probabilities and the
    maximum of the smoothed maps separately (+1e-6 in the denominators), then
    alpha * text + (1 - alpha) * map."""
    def mm(x: torch.Tensor) -> torch.Tensor:
        return (x - x.min()) / (x.max() - x.min() + 1e-6)

    return alpha * mm(text_probs) + (1 - alpha) * mm(map_max)


def pixel_map(cfg: DictASConfig, backend: str, patch_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, L*S, h, w] per-layer / per-scale maps -> the smoothed map [B, H, W]. Reference
    (test.py): upsample each map, average, blur in float64 (scipy-exact); fastad:
    average at patch resolution, then upsampling and blur as one separable linear
    operator (``upsample_blur``; exact up to rounding: every step is linear)."""
    if backend != "reference":
        return upsample_blur(patch_maps.mean(dim=1), size, cfg.upsample_mode, cfg.align_corners, cfg.sigma,
                             cfg.truncate)
    ups = [upsample_maps(patch_maps[:, i], size, cfg.upsample_mode, cfg.align_corners)
           for i in range(patch_maps.shape[1])]
    amap = torch.stack(ups, dim=0).mean(dim=0)
    if cfg.sigma is not None:
        amap = gaussian_blur(amap, cfg.sigma, cfg.truncate)
    return amap


def rotate_references(images: torch.Tensor, angles: Sequence[float]) -> torch.Tensor:
    """The authors' ``Roate_support`` (dataset.py): each image [K, 3, H, W] (RGB, uint8 or
    float in [0, 1]) followed by its rotations by ``angles`` degrees, as albumentations 1.3.1
    ``Rotate(limit=(a, a))`` computes them: ``cv2.warpAffine`` of the uint8 image, rotation
    about (W/2 - 0.5, H/2 - 0.5), bilinear, reflect-101 border. Returns [K * (1 + len(angles)),
    3, H, W] in the input's dtype (float inputs are rounded to uint8 first, as the
    authors' images are). Needs OpenCV (``pip install opencv-python-headless``)."""
    cv2 = import_cv2("DictAS reference rotation")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"fastad.models.rotate_references: images must be [K, 3, H, W], got {tuple(images.shape)}")
    is_uint8 = images.dtype == torch.uint8
    pixels = images if is_uint8 else (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    H, W = pixels.shape[-2:]
    out = []
    for img in pixels.permute(0, 2, 3, 1).cpu().numpy():
        out.append(img)
        for a in angles:
            m = cv2.getRotationMatrix2D((W / 2 - 0.5, H / 2 - 0.5), float(a), 1.0)
            out.append(cv2.warpAffine(img, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101))
    res = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device)
    return res if is_uint8 else res.to(images.dtype) / 255.0


@dataclass
class DictASReferences:
    """Cached per category: ``keys`` / ``values`` [M, C] per (layer index, scale)
    (M = K*N), ``text`` [2, D] (normal, abnormal) prototypes, the patch ``grid``."""

    keys: dict[tuple[int, int], torch.Tensor]
    values: dict[tuple[int, int], torch.Tensor]
    text: torch.Tensor
    grid: tuple[int, int]
    shots: int


class DictAS(FewShotCLIPModel):
    """DictAS (see the module docstring).

    Args:
        config: a ``DictASConfig`` (default: the authors' settings).
        backbone_weights: CLIP weights for the backbone (local path, open_clip tag, or None for
            random); ``pretrained`` is its deprecated name.
        backend: "reference" or "fastad" (settable later through ``model.backend``).
        **overrides: config fields to replace.

    Use::

        model = DictAS(backbone_weights="ViT-L-14-336px.pt").eval()
        model.load_checkpoint("DictAS_weight/train_visa.pth")
        model.set_references(normal_images, category="bottle")
        with torch.no_grad():
            scores, maps = model(images)        # [B], [B, 336, 336]
    """

    resize_mode = "squash"  # test.py: Resize((S, S), bicubic), then CenterCrop(S)

    def __init__(self, config: DictASConfig | None = None, pretrained: str | None = None,
                 backend: str = "reference", *, backbone_weights: str | None = None, **overrides: Any) -> None:
        super().__init__(backend)
        pretrained = backbone_weights_arg("DictAS", backbone_weights, "pretrained", pretrained)
        config = config if config is not None else DictASConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.backbone = CLIPBackbone(config.backbone, pretrained=pretrained, image_size=config.image_size,
                                     quick_gelu=config.quick_gelu, pos_embed_resize=config.pos_embed_resize)
        self.layers = self.backbone.check_layers(config.layers)
        width = self.backbone.width
        self.query_generator = AttnBlock(width, config.generator_heads, config.generator_dropout)
        self.key_generator = AttnBlock(width, config.generator_heads, config.generator_dropout)
        self.value_generator = ValueGenerator(width, config.generator_heads, config.generator_dropout)
        self.global_feature = GlobalFeature(width, config.fuse_layers, self.backbone.embed_dim)
        for name, module in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(module, nn.Linear):  # the authors' _initialize_weights
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def lookup_scale(self) -> float:
        s = self.config.lookup_scale
        return float(s) if s is not None else self.backbone.width ** -0.5

    # ------------------------------------------------------------------ dataset rules
    def apply_dataset_rules(self, dataset: str, category: str) -> None:
        """Set ``config.alpha`` by the authors' rule for ``category`` of ``dataset``
        (``DictASConfig.dataset_alpha``); ``fastad evaluate`` calls it."""
        self.config = dataclasses.replace(self.config, alpha=self.config.dataset_alpha(dataset, category))

    def prepare_references(self, images: torch.Tensor, category: str) -> torch.Tensor:
        """The reference images [K, 3, H, W] (RGB in [0, 1] or uint8) the authors build the
        dictionary of ``category`` from: with their rotated copies for ``rotate_categories``
        at most ``rotate_max_shots`` shots (``rotate_references``), else unchanged.
        ``fastad evaluate`` applies it to the images it reads (at the model's input size; the
        authors rotate the full-resolution image before resizing)."""
        if not self.config.rotates_references(category, images.shape[0]):
            return images
        return rotate_references(images, self.config.rotate_angles)

    # ------------------------------------------------------------------ references
    def set_references(self, images_or_features: torch.Tensor | ImageFeatures, category: str,
                       class_name: str | None = None, text_features: torch.Tensor | None = None) -> DictASReferences:
        """Build and cache the category's dictionaries (keys / values for every layer
        and scale, from the K reference images or their ``ImageFeatures``) and text
        prototypes (``class_name`` defaults to ``category``; ``text_features`` [2, D]
        skips the text tower). The generators run in eval mode, without gradients."""
        feats = self._features(images_or_features, "reference")
        k = feats.embeds.shape[0]
        if k < 1:
            raise ValueError("fastad.models.DictAS: set_references needs at least one reference image")
        if text_features is None:
            text_features = self.backbone.text_prototypes(*dictas_prompts(class_name or category))
        text = self._check_text(text_features, batched=False)
        was_training = self.training
        self.eval()
        keys, values = {}, {}
        try:
            with torch.no_grad():
                for li, tok in enumerate(feats.tokens):
                    for s in self.config.scales:
                        pooled = _pool(tok.float(), feats.grid, s).reshape(1, -1, tok.shape[-1])
                        keys[li, s] = self.key_generator(pooled)[0]
                        values[li, s] = self.value_generator(pooled)[0]
        finally:
            self.train(was_training)
        refs = DictASReferences(keys=keys, values=values, text=text, grid=feats.grid, shots=k)
        self.references[category] = refs
        self.active_category = category
        return refs

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, category: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores [B] (alpha * p_text + (1 - alpha) * max of the map, per image) and
        anomaly maps [B, H, W] for query images of ``category`` (default: the last one
        given to set_references)."""
        out = self.head(self._features(images, "query"), category)
        return out["image_scores"], out["anomaly_maps"]

    def head(self, features: ImageFeatures, category: str | None = None) -> dict[str, torch.Tensor]:
        """The lookup head on backbone features; returns "image_scores", "anomaly_maps",
        "text_probs", "map_max" [B] and "patch_maps" [B, L * S, h, w] (the per-layer,
        per-scale maps). fp32 with autocast disabled."""
        refs = self.references[self._category(category)]
        if features.grid != refs.grid:
            raise ValueError(f"fastad.models.DictAS: query grid {features.grid} differs from the references' "
                             f"{refs.grid}")
        cfg, backend = self.config, self.backend
        dev = features.embeds.device
        with torch.autocast(dev.type, enabled=False):
            B = features.embeds.shape[0]
            gh, gw = features.grid
            maps = []
            for li, tok in enumerate(features.tokens):
                x = tok.float()
                if cfg.query_value_generator:
                    x = self.value_generator(x)
                for s in cfg.scales:
                    xs = _pool(x, features.grid, s)
                    q = self.query_generator(xs)
                    r = dictionary_lookup(q, refs.keys[li, s].to(dev), refs.values[li, s].to(dev),
                                          self.lookup_scale, cfg.lookup, backend)
                    con = F.cosine_similarity(xs, r, dim=-1)
                    maps.append(1 - (con + 1) * 0.5)
            patch_maps = torch.stack(maps, dim=1).reshape(B, len(maps), gh, gw)
            size = (gh * self.backbone.patch_size, gw * self.backbone.patch_size)
            amap = pixel_map(cfg, backend, patch_maps, size)
            emb = features.embeds.float()
            v = emb / emb.norm(dim=-1, keepdim=True)
            text_probs = (cfg.tau_text * v @ refs.text.to(dev).T).softmax(dim=-1)[:, 1]
            map_max = amap.amax(dim=(-2, -1))
            scores = cfg.alpha * text_probs + (1 - cfg.alpha) * map_max
        return {"image_scores": scores, "anomaly_maps": amap, "text_probs": text_probs, "map_max": map_max,
                "patch_maps": patch_maps}

    # ------------------------------------------------------------------ training
    def compute_losses(self, images: torch.Tensor | ImageFeatures, ref_images: torch.Tensor | ImageFeatures,
                       masks: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor | None = None,
                       class_names: Sequence[str] | None = None,
                       count_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The authors' self-supervised losses (train.py, models/DictAS.py "train_self").

        Args:
            images: [B, 3, H, W] query images (synthesised anomalies) or their ImageFeatures.
            ref_images: [B, 3, H, W] one reference per query, or [B, K, 3, H, W]; each query
                gets its own dictionary (or ImageFeatures of the B*K images, query-major).
            masks: [B, H, W] anomaly masks of the queries.
            labels: [B] 0 normal / 1 anomalous.
            text_features: [2, D] or [B, 2, D]; else built from ``class_names``.
            count_reduce: maps this batch's count of CQC-active images to the count that
                normalises it (data-parallel training: the global count / world size, so
                that averaged gradients equal those of the whole batch); None: unchanged.

        Per layer and scale, with d = 1 - cos(pooled query, retrieval) on the patch grid
        and the mask resized (bilinear, align_corners=True) and thresholded at 0.5:
        query loss = mean_b (normal-patch mean of d); CQC = mean over the images with
        loss_n > loss_a > 0 of loss_n - loss_a; summed over layers and scales. TAC:
        cross-entropy of 100 <GlobalFeature(query tokens), T> against the label plus
        that of the scale-1 retrievals against "normal". loss = query + lambda_cqc CQC
        + lambda_tac TAC."""
        cfg = self.config
        feats = self._features(images, "query")
        B = feats.embeds.shape[0]
        if isinstance(ref_images, torch.Tensor):
            if ref_images.dim() == 4:
                ref_images = ref_images[:, None]
            if ref_images.dim() != 5 or ref_images.shape[0] != B:
                raise ValueError(f"fastad.models.DictAS: ref_images must be [B={B}, (K,) 3, H, W], "
                                 f"got {tuple(ref_images.shape)}")
            ref_images = ref_images.flatten(0, 1)
        rfeats = self._features(ref_images, "reference")
        K = rfeats.embeds.shape[0] // B
        if text_features is None:
            if class_names is None:
                raise ValueError("fastad.models.DictAS: pass text_features or class_names")
            cache: dict[str, torch.Tensor] = {}
            for name in class_names:
                if name not in cache:
                    cache[name] = self.backbone.text_prototypes(*dictas_prompts(name))
            text_features = torch.stack([cache[n] for n in class_names])
        text = self._check_text(text_features)
        text = text.expand(B, 2, -1) if text.dim() == 2 else text

        gh, gw = feats.grid
        gt = F.interpolate(masks.to(self.device).float()[:, None], size=(gh, gw), mode="bilinear",
                           align_corners=True)[:, 0]
        gt = torch.where(gt > 0.5, torch.ones_like(gt), torch.where(gt < 0.5, torch.zeros_like(gt), gt))
        g_normal = (gt == 0).to(gt.dtype).reshape(B, -1)
        g_abnormal = gt.reshape(B, -1)

        loss_query = feats.embeds.new_zeros(())
        loss_cqc = feats.embeds.new_zeros(())
        queries, retrieved = [], []
        for li, (tok, rtok) in enumerate(zip(feats.tokens, rfeats.tokens)):
            x = tok.float()
            if cfg.train_query_value_generator:
                x = self.value_generator(x)
            r = rtok.float().reshape(B, K, -1, rtok.shape[-1])
            for s in cfg.scales:
                xs = _pool(x, feats.grid, s)
                rs = _pool(r.flatten(0, 1), feats.grid, s).reshape(B, -1, r.shape[-1])
                out = dictionary_lookup(self.query_generator(xs), self.key_generator(rs), self.value_generator(rs),
                                        self.lookup_scale, cfg.lookup, self.backend)
                if s == 1:
                    queries.append(x)
                    retrieved.append(out)
                d = 1 - F.cosine_similarity(xs, out, dim=-1)
                loss_n = (d * g_normal).sum(1) / (g_normal.sum(1) + 1e-6)
                loss_a = (d * g_abnormal).sum(1) / (g_abnormal.sum(1) + 1e-6)
                cqc = torch.where(loss_a == 0, torch.zeros_like(loss_n), loss_n - loss_a).clamp(min=0)
                active = (cqc != 0).sum()
                if count_reduce is not None:
                    active = count_reduce(active)
                loss_cqc = loss_cqc + cqc.sum() / (active + 1e-6)
                loss_query = loss_query + loss_n.mean()
        if not queries:
            raise ValueError("DictASConfig: training needs scale 1 in scales (the text alignment constraint)")
        if len(queries) != cfg.fuse_layers:
            raise ValueError(f"DictASConfig: training concatenates the {len(queries)} layers {self.layers} into "
                             f"Fuse_Feature, built for fuse_layers={cfg.fuse_layers}; train with "
                             f"{cfg.fuse_layers} layers or set fuse_layers={len(queries)}")
        unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
        x_q = unit(self.global_feature([unit(t) for t in queries]))
        x_r = unit(self.global_feature([unit(t) for t in retrieved]))
        logits_q = cfg.tau_text * (x_q[:, None, :] @ text.transpose(1, 2))[:, 0]
        logits_r = cfg.tau_text * (x_r[:, None, :] @ text.transpose(1, 2))[:, 0]
        y = labels.to(self.device).long()
        loss_tac = F.cross_entropy(logits_q, y) + F.cross_entropy(logits_r, torch.zeros_like(y))
        loss = loss_query + cfg.lambda_cqc * loss_cqc + cfg.lambda_tac * loss_tac
        return {"loss": loss, "query": loss_query, "cqc": loss_cqc, "tac": loss_tac}

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam(lr, betas) on the trainable parameters, as train.py."""
        return torch.optim.Adam(self.trainable_parameters(), lr=self.config.lr, betas=self.config.betas)

    def training_step(self, optimizer: torch.optim.Optimizer, images: torch.Tensor | ImageFeatures,
                      ref_images: torch.Tensor | ImageFeatures, masks: torch.Tensor, labels: torch.Tensor,
                      **kwargs: Any) -> dict[str, float]:
        """One optimisation step on ``compute_losses``; returns the loss terms as floats."""
        self.train()
        optimizer.zero_grad(set_to_none=True)
        losses = self.compute_losses(images, ref_images, masks, labels, **kwargs)
        losses["loss"].backward()
        optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, source: str | os.PathLike | Mapping[str, Any]) -> None:
        """Load the authors' released generators (``{"Mymodel": state_dict}`` with their
        key names, e.g. DictAS_weight/train_visa.pth) or a fastad state dict of this
        model. The CLIP weights come from ``pretrained`` unless the checkpoint has them.
        Raises CheckpointKeyError listing missing / unexpected / mis-shaped keys."""
        state = read_state_dict(source, containers=("Mymodel", "state_dict", "model"))
        has_backbone = any(_rename_dictas(k).startswith("backbone.") for k in state)

        def optional(key: str) -> bool:
            if key in ("backbone.clip.logit_scale", "backbone.clip.logit_bias"):
                return True
            return key.startswith("backbone.") and not has_backbone

        load_mapped_state_dict(self, state, _rename_dictas, "DictAS.load_checkpoint", optional)


_DICTAS_MODULES = (("Query_Generator.", "query_generator."), ("Key_Generator.", "key_generator."),
                   ("Value_Generator.AttnBlock.", "value_generator.block."))
_DICTAS_BLOCK = {"norm1": "norm", "TwoLayerMLP.linear1": "mlp.fc1", "TwoLayerMLP.linear2": "mlp.fc2",
                 "TwoLayerMLP.norm": "mlp.norm", "TwoLayerMLP.linear3": "mlp.fc3"}
_DICTAS_GLOBAL = {"fuse_modules": "fuse", "compress": "score", "post_process": "proj"}


def _rename_dictas(key: str) -> str:
    """xiaozhen228/DictAS ``MyDictionary`` key names -> ours (fastad names pass through)."""
    for theirs, ours in _DICTAS_MODULES:
        if key.startswith(theirs):
            rest = key[len(theirs):]
            for old, new in _DICTAS_BLOCK.items():
                if rest.startswith(old + "."):
                    return ours + new + rest[len(old):]
            return ours + rest
    if key.startswith("Fuse_Feature."):
        sub, rest = key[len("Fuse_Feature."):].split(".", 1)
        return "global_feature." + _DICTAS_GLOBAL.get(sub, sub) + "." + rest
    return key
