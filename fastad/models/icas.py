"""iCAS (In-Context Anomaly Segmentation): a reference model of the paper's equations, with the
details the paper leaves open taken from SINE (aim-uofa/SINE, the mask-classification in-context
segmenter iCAS builds on) and stated here.

Architecture (paper, with [SINE] / [choice] marking what the paper does not fix):
  * Encoder: frozen DINOv2 ViT (timm ``vit_large_patch14_dinov2`` at 518 x 518, a 37 x 37 patch
    grid), local checkpoint or random weights. Features: the last block's patch tokens before
    the final LayerNorm (``x_prenorm``, CLS dropped) [SINE].
  * Neck: Conv1x1(C_enc -> d, no bias), LayerNorm2d, Conv3x3(d -> d, no bias), LayerNorm2d; d = 256
    [SINE]. F_t, F_r below are neck outputs.
  * Mask (pixel) decoder: ConvT(d -> d/2, 2, 2), LayerNorm2d, GELU, ConvT(d/2 -> d, 2, 2): pixel
    embeddings P_t at 4x the patch grid (148 x 148 at 518) [SINE].
  * Prompt queries (semantic prompting): Q_p^0 = MaskPool(F_r, M_r), Q_ntp^0 = MaskPool(F_r, 1 - M_r)
    per prompt instance. MaskPool [SINE/ODISE]: features bilinearly upsampled to the 4x grid,
    the mask bilinearly resized to it (align_corners=False), binarised ``> 0``, plain mean
    (sum / (count + 1e-8)); the complement is ``resize(1 - M_r) > 0`` (the template's overlapping
    variant, where a boundary pixel can count in both).
  * Greedy Query Selection: K (200) content queries Q_c^0 = F_t[GQS(F_t)], the k-center greedy
    (farthest point) rule of Sener & Savarese on the neck features of each target image,
    Euclidean distance in the difference form of ``fastad.ops.kcenter_greedy`` (float32 differences,
    float64 squares, rounded to float32), started at index 0 (the argmax over an empty selection,
    first index on ties), already selected points never picked again [choice; ``gqs_metric``,
    ``gqs_init``].
    The query positional embedding is the sine embedding of the selected patch [choice].
  * In-context transformer decoder: 6 pre-norm layers, 8 heads, FFN 2048 [SINE]. Tokens: the K
    content queries and the class tokens {Q_p (N), Q_ntp (N), Q_fg, Q_bg} (Q_fg, Q_bg learnable),
    each group with a learnable type embedding [SINE]. Each layer: self-attention over all
    tokens; masked cross-attention of the content queries to F_t (+ sine positional embedding)
    with the Mask2Former mask (sigmoid of the previous prediction bilinearly resized to the patch
    grid < 0.5 is blocked; a fully blocked row is unblocked); FFN (separate FFNs for content and
    class tokens) [SINE]. There is no reference/target fusion layer: the paper feeds the
    reference only through MaskPool.
  * Heads, after a final LayerNorm: masks M_t = Q_c-embedding x P_t (mask embedding MLP 3 layers);
    class logits = min(exp(s), 100) * cos(Q_c^i, token), s learnable, init log(1/0.07) [SINE].
    Semantic classifier over {Q_p (N), Q_ntp (N), Q_bg}; non-target classifier over
    {Q_fg, Q_ntp (N), Q_bg} [paper].

Inference (``set_references`` then ``forward``):
  * references with masks (anomaly prompting): per prompt instance j,
    S^j = sum_i p_j^i sigmoid(M_t^i) with p_j^i the softmax column of Q_p^j in the semantic
    classifier, plus the MFM term with p_j^i = softmax over {Q_p^0, Q_ntp^0} of
    min(exp(s), 100) * cos(Q_m^i, .) [choice: the classifier's temperature], Q_m = MaskPool(F_t, M_t)
    pooled on the mask logits (``> 0``). The anomaly map is sum_j S^j.
  * references without masks (normal prompting): p^i = the Q_fg column of the non-target
    classifier; MFM: p^i = min_j (1 - cos(Q_m^i, Q_r^j)) with Q_r the pooled predicted masks of the
    references (bank of n * K rows) [paper].
  * Maps: mask logits bilinearly upsampled to the input size, then sigmoid, then the weighted sum
    (SINE's order); S = S_semantic + S_mfm. Image score: max of the map [choice]; binary mask:
    map > ``mask_threshold`` (0.7, SINE's few-shot evaluation) [choice].

Training (``loss``, General-to-Specific: both stages use the same loss and ``configure_optimizer``,
AdamW lr 1e-4, weight decay 0.05, the encoder frozen): Hungarian matching per image and per
decoder output with cost 2 * (-p_sem(c) - p_ntp(c)) + 5 * BCE + 5 * dice, then 2 * CE_semantic +
2 * CE_nontarget (no-object weight 0.1) + 5 * BCE + 5 * dice on the matched pairs, summed over the
initial prediction and every layer (deep supervision) [SINE weights]. Targets: each anomaly
segment j of the target has class Q_p^j (semantic) and Q_fg (non-target); the target's normal
region (outside every segment) is one more segment whose class is the Q_ntp group in both
classifiers (probability summed over the N non-target tokens) [choice]; unmatched queries are
Q_bg. Mask losses run densely on the 4x grid with the ground truth bilinearly resized to it
(SINE samples 12544 points of the same bilinear interpolation) [choice].

``backend="reference"`` runs GQS as a plain torch loop, MaskPool as interpolate + einsum and the
MFM nearest neighbour as a full cosine matrix; ``backend="fastad"`` runs them through
``fastad.ops.kcenter_greedy``, ``fastad.ops.mask_pool`` and ``fastad.ops.nn_distance``. Both give
the same outputs to float32 rounding.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastad.models._timm_backbones import create_timm_model
from fastad.models.checkpoint import backbone_weights_arg

__all__ = ["ICAS", "ICASOutput", "greedy_query_selection", "greedy_query_selection_reference", "mask_pool_features",
           "sine_position_embedding"]

BACKENDS = ("reference", "fastad")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"fastad.models.ICAS: `backend` must be one of {BACKENDS}, got {backend!r}")


# --------------------------------------------------------------------------- the ops the model uses


def greedy_query_selection_reference(x: torch.Tensor, k: int, metric: str = "l2", init: int = 0) -> torch.Tensor:
    """k-center greedy on one image's features x [N, C]: start at ``init``, then repeatedly take the
    point farthest from the selected set (first index on ties); selected points are never taken
    again, so duplicate rows give distinct indices. Distance: the difference form of
    ``fastad.ops.kcenter_greedy``'s definition, float32(sqrt(sum of float64 squares of the float32
    differences)); ``metric="cosine"`` runs it on rows L2-normalised in float64 and rounded to
    float32 (||u - v||^2 = 2 (1 - cos), the same order). Returns the indices [k] in selection order."""
    xf = x.detach().float()
    if metric == "cosine":
        xf = F.normalize(x.detach().double(), dim=-1, eps=1e-12).float()
    min_dist = torch.full((xf.shape[0],), float("inf"), dtype=torch.float32, device=x.device)
    taken = torch.zeros(xf.shape[0], dtype=torch.bool, device=x.device)
    selected: List[int] = []
    idx = int(init)
    for _ in range(k):
        selected.append(idx)
        taken[idx] = True
        d = (xf - xf[idx]).double().pow(2).sum(dim=1).sqrt().float()
        min_dist = torch.minimum(min_dist, d)
        idx = int(torch.argmax(torch.where(taken, float("-inf"), min_dist)))
    return torch.tensor(selected, dtype=torch.int64, device=x.device)


def greedy_query_selection(x: torch.Tensor, k: int, metric: str = "l2", init: int = 0, backend: str = "reference",
                           ops_backend: Optional[str] = None) -> torch.Tensor:
    """GQS for a batch x [B, N, C] -> indices [B, k] (per image, selection order).
    reference: :func:`greedy_query_selection_reference` per image; fastad: ``fastad.ops.kcenter_greedy``."""
    _check_backend(backend)
    if backend == "reference":
        return torch.stack([greedy_query_selection_reference(xi, k, metric, init) for xi in x])
    from fastad.ops import kcenter_greedy

    res = kcenter_greedy(x.detach().float().contiguous(), k, metric=metric, init=init, backend=ops_backend)
    return res.indices.to(torch.int64).reshape(x.shape[0], k)


def mask_pool_features(features: torch.Tensor, masks: torch.Tensor, size: Tuple[int, int],
                       backend: str = "reference", ops_backend: Optional[str] = None) -> torch.Tensor:
    """SINE's MaskPooling: features [B, C, h, w] bilinearly upsampled to ``size``, masks [B, R, H, W]
    bilinearly resized to ``size`` (align_corners=False), binarised ``> 0`` without gradient, plain
    mean (sum / (count + 1e-8)). Returns [B, R, C]; an empty mask gives the zero vector.
    reference: interpolate + einsum; fastad: ``fastad.ops.mask_pool`` (pools on the coarse grid with
    the adjoint of the upsampling)."""
    _check_backend(backend)
    if backend == "reference":
        x = features if tuple(features.shape[-2:]) == tuple(size) else F.interpolate(
            features, size=size, mode="bilinear", align_corners=False)
        m = masks.detach().to(x.dtype)
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        m = (m > 0).to(x.dtype)
        m = m / (m.sum(dim=(-1, -2), keepdim=True) + 1e-8)
        return torch.einsum("bchw,bqhw->bqc", x, m)
    from fastad.ops import mask_pool

    return mask_pool(features, masks.detach(), size=tuple(size), resize="bilinear", align_corners=False,
                     threshold=0.0, backend=ops_backend)


def sine_position_embedding(h: int, w: int, dim: int, device=None, temperature: float = 10000.0) -> torch.Tensor:
    """DETR / Mask2Former ``PositionEmbeddingSine(dim // 2, normalize=True)`` of an h x w grid: [dim, h, w]."""
    npf = dim // 2
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)[None, :].expand(h, w)
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    dim_t = torch.arange(npf, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / npf)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=3).flatten(2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=3).flatten(2)
    return torch.cat((py, px), dim=2).permute(2, 0, 1)


# --------------------------------------------------------------------------- modules


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of [B, C, H, W] (eps 1e-6, as SAM / SINE)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _MLP(nn.Module):
    def __init__(self, dim: int, out: int, layers: int) -> None:
        super().__init__()
        dims = [dim] * layers + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear2(F.relu(self.linear1(self.norm(x))))


class _DecoderLayer(nn.Module):
    """Pre-norm: self-attention over all tokens, masked cross-attention of the content queries
    into the target features, separate FFNs for content and class tokens."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn_content = _FFN(dim, ffn)
        self.ffn_class = _FFN(dim, ffn)

    def forward(self, content: torch.Tensor, tokens: torch.Tensor, content_pos: torch.Tensor, memory: torch.Tensor,
                memory_pos: torch.Tensor, cross_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        K = content.shape[1]
        x = torch.cat([content, tokens], dim=1)
        pos = torch.cat([content_pos, torch.zeros_like(tokens)], dim=1)
        y = self.self_norm(x)
        qk = y + pos
        x = x + self.self_attn(qk, qk, y, need_weights=False)[0]
        content, tokens = x[:, :K], x[:, K:]
        y = self.cross_norm(content)
        content = content + self.cross_attn(y + content_pos, memory + memory_pos, memory, attn_mask=cross_mask,
                                            need_weights=False)[0]
        return self.ffn_content(content), self.ffn_class(tokens)


@dataclass
class ICASOutput:
    """anomaly_map [B, S, S] (S = input side of the encoder); image_score [B] (max of the map);
    mask [B, S, S] bool (map > mask_threshold); semantic_maps [B, N, S, S] per prompt instance
    (anomaly prompting; None for normal prompting); mask_logits [B, K, 4h, 4w]; weights [B, K, J]
    (semantic) and mfm_weights [B, K, J] (J = N, or 1 for normal prompting); query_indices [B, K]."""

    anomaly_map: torch.Tensor
    image_score: torch.Tensor
    mask: torch.Tensor
    semantic_maps: Optional[torch.Tensor]
    mask_logits: torch.Tensor
    weights: torch.Tensor
    mfm_weights: torch.Tensor
    query_indices: torch.Tensor
    stage_times: Dict[str, float] = field(default_factory=dict)


class ICAS(nn.Module):
    """iCAS in-context anomaly segmentation (see the module docstring for every choice).

    Args:
        encoder: timm DINOv2 ViT name (``vit_large_patch14_dinov2``; tests use small configs).
        backbone_weights: local encoder weights; None gives random weights. Nothing is downloaded.
            ``checkpoint_path`` is its deprecated name.
        encoder_kwargs: extra ``timm.create_model`` arguments (e.g. ``depth=2`` for tests).
        image_size: encoder input side (518); images are resized to it.
        dim, num_queries, num_layers, num_heads, ffn_dim: decoder width (256), K (200), layers (6),
            heads (8), FFN width (2048).
        gqs_metric, gqs_init: GQS distance ("l2" or "cosine") and first index.
        use_mfm: add the mask-level feature matching score.
        mask_threshold: binarisation threshold of the anomaly map.
        backend: "reference" (plain torch) or "fastad" (fastad ops for GQS, MaskPool, MFM matching).
        ops_backend: backend passed to the fastad ops (None: the fastest available).
    """

    def __init__(self, encoder: str = "vit_large_patch14_dinov2", checkpoint_path: Optional[str] = None, *,
                 encoder_kwargs: Optional[dict] = None, image_size: int = 518, dim: int = 256, num_queries: int = 200,
                 num_layers: int = 6, num_heads: int = 8, ffn_dim: int = 2048, gqs_metric: str = "l2",
                 gqs_init: int = 0, use_mfm: bool = True, mask_threshold: float = 0.7,
                 class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 no_object_weight: float = 0.1, backend: str = "reference", ops_backend: Optional[str] = None,
                 backbone_weights: Optional[str] = None) -> None:
        super().__init__()
        checkpoint_path = backbone_weights_arg("ICAS", backbone_weights, "checkpoint_path", checkpoint_path)
        _check_backend(backend)
        if gqs_metric not in ("l2", "cosine"):
            raise ValueError(f"fastad.models.ICAS: `gqs_metric` must be 'l2' or 'cosine', got {gqs_metric!r}")
        self.encoder = create_timm_model(encoder, checkpoint_path, img_size=image_size, **(encoder_kwargs or {}))
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        patch = self.encoder.patch_embed.patch_size
        self.patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        self.image_size = int(image_size)
        self.grid = self.image_size // self.patch
        if num_queries > self.grid * self.grid:
            raise ValueError(f"fastad.models.ICAS: num_queries={num_queries} exceeds the {self.grid}x{self.grid} "
                             f"patch grid of a {image_size} px input")
        enc_dim = self.encoder.embed_dim
        self.neck = nn.Sequential(nn.Conv2d(enc_dim, dim, 1, bias=False), LayerNorm2d(dim),
                                  nn.Conv2d(dim, dim, 3, padding=1, bias=False), LayerNorm2d(dim))
        self.pixel_decoder = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2),
                                           nn.GELU(), nn.ConvTranspose2d(dim // 2, dim, 2, stride=2))
        self.layers = nn.ModuleList(_DecoderLayer(dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_embed = _MLP(dim, dim, 3)
        self.fg_bg = nn.Parameter(torch.randn(2, dim) * 0.02)
        self.type_embed = nn.Embedding(2, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.dim, self.num_queries, self.num_heads = dim, int(num_queries), num_heads
        self.gqs_metric, self.gqs_init = gqs_metric, int(gqs_init)
        self.use_mfm, self.mask_threshold = use_mfm, float(mask_threshold)
        self.weights = {"class": class_weight, "mask": mask_weight, "dice": dice_weight, "no_object": no_object_weight}
        self.backend, self.ops_backend = backend, ops_backend
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._refs: Optional[Dict[str, torch.Tensor]] = None

    # -- bookkeeping ---------------------------------------------------------

    def train(self, mode: bool = True) -> "ICAS":
        super().train(mode)
        self.encoder.eval()  # frozen: keep its eval behaviour
        return self

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizer(self, lr: float = 1e-4, weight_decay: float = 0.05) -> torch.optim.Optimizer:
        """AdamW over everything but the frozen encoder (the paper's setting for both stages)."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=lr, weight_decay=weight_decay)

    @property
    def mask_grid(self) -> Tuple[int, int]:
        return 4 * self.grid, 4 * self.grid

    # -- features ------------------------------------------------------------

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"fastad.models.ICAS: images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen DINOv2 patch tokens before the final norm: [B, C_enc, grid, grid]."""
        vit = self.encoder
        x = vit.patch_embed(self._prepare(images))
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        x = vit.blocks(x)[:, vit.num_prefix_tokens:]
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)

    def _masks_to(self, masks: torch.Tensor, n: int) -> torch.Tensor:
        if masks.dim() == 3:
            masks = masks[:, None]
        if masks.dim() != 4 or masks.shape[0] != n:
            raise ValueError(f"fastad.models.ICAS: masks must be [{n}, N, H, W], got {tuple(masks.shape)}")
        return masks.float()

    def _prompts(self, feats: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Q_p^0, Q_ntp^0 [B, N, d] from neck features [B, d, h, w] and masks [B, N, H, W]."""
        size = self.mask_grid
        if self.backend == "fastad":
            from fastad.ops import mask_pool

            pooled = mask_pool(feats, masks, size=size, resize="bilinear", align_corners=False, threshold=0.0,
                               complement=True, backend=self.ops_backend)  # [B, N, 2, d]: M_r and resize(1 - M_r)
            return pooled[:, :, 0], pooled[:, :, 1]
        both = torch.cat([masks, 1.0 - masks], dim=1)
        pooled = mask_pool_features(feats, both, size, "reference")
        n = masks.shape[1]
        return pooled[:, :n], pooled[:, n:]

    # -- decoder -------------------------------------------------------------

    def _heads(self, content: torch.Tensor, tokens: torch.Tensor, pixels: torch.Tensor):
        n = (tokens.shape[1] - 2) // 2
        qc = self.decoder_norm(content)
        tk = self.decoder_norm(tokens)
        scale = self.logit_scale.exp().clamp(max=100)
        logits = scale * torch.einsum("bkd,btd->bkt", F.normalize(qc, dim=-1), F.normalize(tk, dim=-1))
        p, ntp, fg, bg = logits[..., :n], logits[..., n:2 * n], logits[..., 2 * n:2 * n + 1], logits[..., 2 * n + 1:]
        semantic = torch.cat([p, ntp, bg], dim=-1)
        nontarget = torch.cat([fg, ntp, bg], dim=-1)
        masks = torch.einsum("bkd,bdhw->bkhw", self.mask_embed(qc), pixels)
        return semantic, nontarget, masks

    def _attention_mask(self, mask_logits: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(mask_logits.detach(), size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        blocked = small.sigmoid().flatten(2) < 0.5
        blocked[blocked.all(-1)] = False
        return blocked.repeat_interleave(self.num_heads, dim=0)

    def _decode(self, feats: torch.Tensor, q_p: torch.Tensor, q_ntp: torch.Tensor, times: Dict[str, float]):
        """Run GQS, the mask decoder and the in-context decoder on target neck features [B, d, h, w]
        with prompt queries [B, N, d]. Returns (outputs per prediction stage, pixel embeddings, indices)."""
        B, d, h, w = feats.shape
        t = time.perf_counter()
        flat = feats.flatten(2).transpose(1, 2)  # [B, hw, d]
        idx = greedy_query_selection(flat, self.num_queries, self.gqs_metric, self.gqs_init, self.backend,
                                     self.ops_backend)
        times["query_selection"] += time.perf_counter() - t
        t = time.perf_counter()
        pixels = self.pixel_decoder(feats)
        pe = sine_position_embedding(h, w, d, feats.device).flatten(1).T  # [hw, d]
        content = torch.gather(flat, 1, idx[..., None].expand(-1, -1, d)) + self.type_embed.weight[0]
        content_pos = pe[idx]
        fg_bg = self.fg_bg[None].expand(B, -1, -1)
        tokens = torch.cat([q_p, q_ntp, fg_bg], dim=1) + self.type_embed.weight[1]
        memory_pos = pe[None].expand(B, -1, -1)
        outputs = [self._heads(content, tokens, pixels)]
        for layer in self.layers:
            mask = self._attention_mask(outputs[-1][2])
            content, tokens = layer(content, tokens, content_pos, flat, memory_pos, mask)
            outputs.append(self._heads(content, tokens, pixels))
        times["decoders"] += time.perf_counter() - t
        return outputs, pixels, idx

    # -- inference -----------------------------------------------------------

    @torch.no_grad()
    def set_references(self, images: torch.Tensor, masks: Optional[torch.Tensor] = None) -> None:
        """Reference images [R, 3, H, W] and, for anomaly prompting, their prompt masks [R, N, H, W]
        (binary; the R * N masks become N_inst prompt instances). ``masks=None`` selects normal
        prompting (the references are normal samples: M_r is empty). Prompt queries (and, for
        normal prompting, the MFM bank of the references' pooled predicted masks) are computed here
        with the current weights: call again after loading or training weights."""
        times = {k: 0.0 for k in ("encoder", "pooling", "query_selection", "decoders", "mfm", "maps")}
        t = time.perf_counter()
        enc = self.encode(images)
        times["encoder"] += time.perf_counter() - t
        R = enc.shape[0]
        normal = masks is None
        m = torch.zeros(R, 1, self.image_size, self.image_size, device=enc.device) if normal else self._masks_to(masks, R)
        feats = self.neck(enc)
        t = time.perf_counter()
        q_p, q_ntp = self._prompts(feats, m)
        times["pooling"] += time.perf_counter() - t
        q_p, q_ntp = q_p.reshape(1, -1, self.dim), q_ntp.reshape(1, -1, self.dim)
        refs = {"q_p": q_p, "q_ntp": q_ntp, "normal": torch.tensor(normal)}
        if normal:
            outputs, _, _ = self._decode(feats, q_p.expand(R, -1, -1), q_ntp.expand(R, -1, -1), times)
            t = time.perf_counter()
            bank = mask_pool_features(feats, outputs[-1][2], self.mask_grid, self.backend, self.ops_backend)
            times["pooling"] += time.perf_counter() - t
            refs["bank"] = bank.reshape(-1, self.dim)
        self._refs = refs
        self.reference_stage_times = times

    def _mfm_weights(self, q_m: torch.Tensor, refs: Dict[str, torch.Tensor]) -> torch.Tensor:
        if bool(refs["normal"]):
            if self.backend == "reference":
                sim = F.normalize(q_m, dim=-1) @ F.normalize(refs["bank"], dim=-1).T
                return (1.0 - sim).min(dim=-1).values[..., None]
            from fastad.ops import nn_distance

            res = nn_distance(q_m.contiguous(), refs["bank"].contiguous(), k=1, metric="cosine", reduce="topk",
                              backend=self.ops_backend)
            return res.values[..., 0:1].to(q_m.dtype)
        prompts = torch.cat([refs["q_p"], refs["q_ntp"]], dim=1)[0]  # [2N, d]
        scale = self.logit_scale.exp().clamp(max=100)
        logits = scale * F.normalize(q_m, dim=-1) @ F.normalize(prompts, dim=-1).T
        return logits.softmax(-1)[..., : refs["q_p"].shape[1]]

    def _weighted_maps(self, mask_logits: torch.Tensor, weights: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """sum_i weights[b, i, j] * sigmoid(upsample(mask_logits[b, i])) -> [B, J, S, S], K in chunks so
        the [B, K, S, S] upsampled stack never exists at once."""
        B, K = mask_logits.shape[:2]
        S = self.image_size
        out = mask_logits.new_zeros(B, weights.shape[-1], S, S)
        for k0 in range(0, K, chunk):
            up = F.interpolate(mask_logits[:, k0:k0 + chunk], size=(S, S), mode="bilinear", align_corners=False)
            out += torch.einsum("bkhw,bkj->bjhw", up.sigmoid(), weights[:, k0:k0 + chunk])
        return out

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> ICASOutput:
        """Anomaly maps of target images [B, 3, H, W] (RGB, float in [0, 1] or uint8), against the
        references given to :meth:`set_references`."""
        if self._refs is None:
            raise RuntimeError("fastad.models.ICAS: call set_references(images, masks) before forward")
        refs = self._refs
        times = {k: 0.0 for k in ("encoder", "pooling", "query_selection", "decoders", "mfm", "maps")}
        t = time.perf_counter()
        enc = self.encode(images)
        times["encoder"] += time.perf_counter() - t
        B = enc.shape[0]
        t = time.perf_counter()
        feats = self.neck(enc)
        times["decoders"] += time.perf_counter() - t
        q_p, q_ntp = refs["q_p"].expand(B, -1, -1), refs["q_ntp"].expand(B, -1, -1)
        outputs, _, idx = self._decode(feats, q_p, q_ntp, times)
        semantic, nontarget, mask_logits = outputs[-1]
        normal = bool(refs["normal"])
        n = q_p.shape[1]
        weights = nontarget.softmax(-1)[..., :1] if normal else semantic.softmax(-1)[..., :n]
        mfm = torch.zeros_like(weights)
        if self.use_mfm:
            t = time.perf_counter()
            q_m = mask_pool_features(feats, mask_logits, self.mask_grid, self.backend, self.ops_backend)
            times["pooling"] += time.perf_counter() - t
            t = time.perf_counter()
            mfm = self._mfm_weights(q_m, refs)
            times["mfm"] += time.perf_counter() - t
        t = time.perf_counter()
        maps = self._weighted_maps(mask_logits, weights + mfm)
        anomaly = maps.sum(1)
        times["maps"] += time.perf_counter() - t
        return ICASOutput(anomaly_map=anomaly, image_score=anomaly.flatten(1).amax(1),
                          mask=anomaly > self.mask_threshold, semantic_maps=None if normal else maps,
                          mask_logits=mask_logits, weights=weights, mfm_weights=mfm, query_indices=idx,
                          stage_times=times)

    # -- training ------------------------------------------------------------

    def loss(self, target_images: torch.Tensor, target_masks: torch.Tensor, reference_images: torch.Tensor,
             reference_masks: torch.Tensor, encoded: bool = False,
             count_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """General-to-Specific training loss for a batch of (reference, target) pairs.

        target_images, reference_images: [B, 3, H, W]; reference_masks: [B, N, H, W] prompt masks
        (N prompt instances per pair; an all-zero mask is allowed); target_masks: [B, N, H, W], the
        target's ground-truth segment of each prompt instance (empty: not present). Returns
        ``{"loss": total, "ce_semantic", "ce_nontarget", "mask", "dice"}`` (components of the
        last decoder output; ``loss`` sums every output, deep supervision).
        ``encoded=True``: the images are already :meth:`encode` outputs [B, C_enc, h, w] (the
        frozen encoder's features, e.g. from a cache). ``count_reduce`` maps this batch's
        number of matched masks to the count that normalises the mask losses (data-parallel
        training: global count / world size); None: unchanged.
        """
        B = target_images.shape[0]
        t_masks = self._masks_to(target_masks, B)
        r_masks = self._masks_to(reference_masks, B)
        if t_masks.shape[1] != r_masks.shape[1]:
            raise ValueError(f"fastad.models.ICAS: target_masks has {t_masks.shape[1]} instances, reference_masks "
                             f"{r_masks.shape[1]}: they must correspond one to one")
        times = {k: 0.0 for k in ("query_selection", "decoders")}
        ref_feats = self.neck(reference_images if encoded else self.encode(reference_images))
        q_p, q_ntp = self._prompts(ref_feats, r_masks)
        feats = self.neck(target_images if encoded else self.encode(target_images))
        outputs, _, _ = self._decode(feats, q_p, q_ntp, times)
        gt = F.interpolate(t_masks, size=self.mask_grid, mode="bilinear", align_corners=False)
        total = feats.new_zeros(())
        parts: Dict[str, torch.Tensor] = {}
        for semantic, nontarget, mask_logits in outputs:
            parts = self._stage_loss(semantic, nontarget, mask_logits, gt, count_reduce)
            w = self.weights
            total = total + w["class"] * (parts["ce_semantic"] + parts["ce_nontarget"]) + \
                w["mask"] * parts["mask"] + w["dice"] * parts["dice"]
        return {"loss": total, **parts}

    def _segments(self, gt: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """Ground-truth segments of one image: the non-empty instance masks (class j) and the
        normal region (class -1, the Q_ntp group) when it is not empty."""
        n = gt.shape[0]
        keep = [j for j in range(n) if bool(gt[j].gt(0).any())]
        segs = [gt[j] for j in keep]
        normal = (1.0 - gt.clamp(0, 1).amax(0)) if n else torch.ones_like(gt[0])
        if bool(normal.gt(0).any()):
            segs.append(normal)
            keep.append(-1)
        return (torch.stack(segs) if segs else gt.new_zeros(0, *gt.shape[1:])), keep

    def _class_logprob(self, semantic: torch.Tensor, nontarget: torch.Tensor, classes: List[int], n: int):
        """log p(class group) [K, len(classes)] in both classifiers for one image. Semantic columns:
        [p_1..p_N, ntp_1..ntp_N, bg]; non-target: [fg, ntp_1..ntp_N, bg]."""
        ls, ln = semantic.log_softmax(-1), nontarget.log_softmax(-1)
        cols_s, cols_n = [], []
        for c in classes:
            if c == -1:
                cols_s.append(torch.logsumexp(ls[:, n:2 * n], dim=-1))
                cols_n.append(torch.logsumexp(ln[:, 1:n + 1], dim=-1))
            else:
                cols_s.append(ls[:, c])
                cols_n.append(ln[:, 0])
        empty = semantic.new_zeros(semantic.shape[0], 0)
        return (torch.stack(cols_s, 1) if cols_s else empty), (torch.stack(cols_n, 1) if cols_n else empty)

    def _stage_loss(self, semantic: torch.Tensor, nontarget: torch.Tensor, mask_logits: torch.Tensor,
                    gt: torch.Tensor, count_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                    ) -> Dict[str, torch.Tensor]:
        from scipy.optimize import linear_sum_assignment

        B, K = mask_logits.shape[:2]
        n = gt.shape[1]
        ce_s, ce_n, bce, dice, num_masks = [], [], [], [], 0
        for b in range(B):
            segs, classes = self._segments(gt[b])
            lp_s, lp_n = self._class_logprob(semantic[b], nontarget[b], classes, n)
            pred = mask_logits[b].flatten(1)
            tgt = segs.flatten(1)
            with torch.no_grad():
                hw = pred.shape[1]
                pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
                neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
                cost_bce = (pos @ tgt.T + neg @ (1 - tgt).T) / hw
                sig = pred.sigmoid()
                cost_dice = 1 - (2 * sig @ tgt.T + 1) / (sig.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
                cost = self.weights["class"] * -(lp_s.exp() + lp_n.exp()) + self.weights["mask"] * cost_bce + \
                    self.weights["dice"] * cost_dice
                rows, cols = linear_sum_assignment(cost.double().cpu().numpy())
            rows_t = torch.as_tensor(rows, dtype=torch.long, device=pred.device)
            cols_t = torch.as_tensor(cols, dtype=torch.long, device=pred.device)
            # classification: matched queries take their segment's class group, the rest Q_bg
            weight = torch.full((K,), self.weights["no_object"], device=pred.device)
            weight[rows_t] = 1.0
            nll_s = -semantic[b].log_softmax(-1)[:, -1]
            nll_n = -nontarget[b].log_softmax(-1)[:, -1]
            nll_s = nll_s.index_put((rows_t,), -lp_s[rows_t, cols_t])
            nll_n = nll_n.index_put((rows_t,), -lp_n[rows_t, cols_t])
            ce_s.append((weight * nll_s).sum() / weight.sum())
            ce_n.append((weight * nll_n).sum() / weight.sum())
            if len(rows):
                p, g = pred[rows_t], tgt[cols_t]
                bce.append(F.binary_cross_entropy_with_logits(p, g, reduction="none").mean(1).sum())
                s = p.sigmoid()
                dice.append((1 - (2 * (s * g).sum(-1) + 1) / (s.sum(-1) + g.sum(-1) + 1)).sum())
                num_masks += len(rows)
        denom = max(num_masks, 1) if count_reduce is None else \
            count_reduce(torch.tensor(float(num_masks), device=mask_logits.device)).clamp(min=1)
        zero = mask_logits.sum() * 0.0
        return {"ce_semantic": torch.stack(ce_s).mean(), "ce_nontarget": torch.stack(ce_n).mean(),
                "mask": (torch.stack(bce).sum() if bce else zero) / denom,
                "dice": (torch.stack(dice).sum() if dice else zero) / denom}
