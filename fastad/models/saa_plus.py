"""SAA+ (Segment Any Anomaly +, Cao et al. 2023): zero-shot anomaly segmentation by hybrid
prompting of foundation models, as the authors' code (caoyunkang/Segment-Any-Anomaly,
``SAA/model.py``) computes it.

Pipeline per image (``SAAPlus.forward``):

1. Object pass: the box proposer (GroundingDINO in the paper) is prompted with the category's
   object prompt; boxes are kept when their confidence > ``box_threshold`` (0.1) and their
   normalised area < 1 / object_number. The largest kept box area is the object area (1 when
   nothing is kept).
2. Defect pass: every ``(caption, filtered_phrase)`` pair of the category table (three general
   prompts, then the authors' manual ones); boxes kept when confidence > ``box_threshold``,
   0 < area < object area * ``defect_area_threshold`` and their phrase does not contain the
   filtered phrase (the object's own name). No NMS. The refiner (SAM) turns every kept box into
   a mask at image resolution. Nothing kept: one empty mask with score 0.
3. Saliency from WideResNet-50-2 layers 1-3 (timm ``wide_resnet50_2``; 256 / 512 / 1024 channels,
   the deeper two nearest-upsampled to layer 1's grid, concatenated to 1792 channels, L2-normalised
   per position):
     * single-object categories (object_number == 1): the image resized to 256 x 256, a 64 x 64
       grid X, D = 0.5 * (1 - X X^T) over all 4096 positions, saliency = the mean of the 400
       largest entries of each row (the authors' code takes the largest distances; the paper's
       text says nearest neighbours);
     * multi-instance categories: the image resized to 1024 x 1024 (a 256 x 256 grid), the object
       masks (refined object boxes) nearest-resized to the grid; each position inside an object
       gets 0.5 * (1 - max cosine similarity) to the positions of the OTHER objects, positions
       outside every object get 0. The authors loop over pixels in Python; positions inside
       the current object are zeroed (not removed) in their bank, which this definition keeps:
       where another object overlaps the current one, a zero vector (distance 0.5) is in the bank.
   The saliency map is bilinearly resized to the image (cv2.INTER_LINEAR sampling).
4. Rescoring: score = box confidence * exp(3 * mean saliency inside the mask) (an empty mask
   keeps its confidence, as exp(0)).
5. Confidence prompt: the K (table ``k_mask``) highest rescored masks; ties at the cut go to the
   lower proposal index (see the deviations below).
6. Fusion: A = sum_i m_i s_i / (1 + sum_i m_i), bilinearly resized to ``out_size`` (400 in the
   paper's evaluation). ``SAAPlus.normalize`` is the per-category global min-max normalisation
   applied over all test images of a category.

``backend="reference"`` runs all of this as the authors do (full 4096 x 4096 matrix, sort, Python
pixel loop, per-mask means); ``backend="fastad"`` runs the saliency through
``fastad.ops.nn_distance`` (top-400 mean of the largest cosine distances; the multi-instance
variant with instance labels and ``group_match="other"``) and the rescoring through
``fastad.ops.mask_pool``. Both give the same maps to float32 rounding.

Input convention (``input_convention``): the authors read images with ``cv2.imread`` (BGR
uint8) and pass that array on: GroundingDINO gets it converted to RGB, SAM gets the BGR array
as if it were RGB, and the WideResNet gets ``cv2.resize`` (INTER_LINEAR, uint8 arithmetic) of
the BGR array, normalised with the RGB ImageNet statistics. ``"authors"`` (the default, needed
to reproduce the paper's numbers) does exactly that from the RGB input (float inputs are
rounded to uint8 first); ``"rgb"`` feeds RGB everywhere and resizes in float
(``F.interpolate(bilinear, align_corners=False, antialias=False)``, cv2.INTER_LINEAR's
sampling without the uint8 rounding). The two give different maps: the channel order changes
the WRN features outright. Proposers always get the RGB image; refiners get what SAM gets
(BGR under ``"authors"``).

Deviations from the authors' script, all documented choices:
  * no object box on a single-object category: the authors' script raises (their object masks
    are then a Python list, and ``visual_saliency_calculation`` indexes it with a tuple);
    fastad goes on with object area 1 (the area their ``ensemble_text_guided_mask_proposal``
    returns when no box is kept: defect boxes up to ``defect_area_threshold`` of the image
    pass) and the single-object saliency, which never uses the object mask;
  * ties of the rescored confidences at the top-K cut keep the lower proposal index (the
    earlier prompt, then the detector's order); the authors' ``np.argsort()[-K:]`` leaves the
    order of equal values unspecified (numpy's sort is not stable: on numpy 2.4 it keeps the
    higher index for a few masks and mixes them from 8 masks on);
  * object masks are refined only when the multi-instance saliency needs them (the authors
    refine them and discard them for single-object categories: same output);
  * a multi-instance category image with fewer than two non-empty object masks falls back to the
    single-object saliency (the authors' loop fails there);
  * ``normalize`` maps a constant set of maps to zeros (the authors divide by zero).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastad.models._opencv import import_cv2
from fastad.models._timm_backbones import create_timm_model
from fastad.models.checkpoint import backbone_weights_arg
from fastad.models.saa_tables import CategoryConfig, category_config

__all__ = ["SAAPlus", "SAAPlusOutput", "Proposals", "SaliencyFeatures", "StaticProposer", "BoxMaskRefiner",
           "SAMRefiner", "GroundingDINOProposer", "prepare_caption", "self_similarity_saliency",
           "multi_instance_saliency", "multi_instance_saliency_reference", "rescore", "confidence_fusion", "authors_resize"]

BACKENDS = ("reference", "fastad")
INPUT_CONVENTIONS = ("authors", "rgb")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Proposals(NamedTuple):
    """Output of a box proposer for one image and one caption.

    boxes: [Q, 4] normalised (cx, cy, w, h) in [0, 1] (GroundingDINO's ``pred_boxes``);
    scores: [Q] box confidence (GroundingDINO: max over text tokens of the sigmoid logits);
    phrases: Q strings, the phrase the detector reads for each box (only consulted for boxes
    whose score passes the box threshold).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    phrases: Sequence[str]


BoxProposer = Callable[[torch.Tensor, str], Proposals]
"""(image [3, H, W] RGB float in [0, 1], caption) -> Proposals."""
MaskRefiner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(image [3, H, W], boxes [R, 4] xyxy in pixels) -> masks [R, H, W] bool."""


def prepare_caption(text: str) -> str:
    """GroundingDINO caption as the authors build it: lower case, stripped, ending with '.'."""
    caption = text.lower().strip()
    return caption if caption.endswith(".") else caption + "."


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"fastad.models: `backend` must be one of {BACKENDS}, got {backend!r}")


def _resize_bilinear(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


# --------------------------------------------------------------------------- saliency


def self_similarity_saliency(features: torch.Tensor, k: int = 400, backend: str = "reference",
                             ops_backend: Optional[str] = None) -> torch.Tensor:
    """Single-object saliency of one feature map [C, h, w] (L2-normalised per position):
    the mean of the k largest entries of each row of D = 0.5 * (1 - X X^T).

    reference: the authors' computation (full [hw, hw] matrix, descending sort), O((hw)^2) memory;
    fastad: ``fastad.ops.nn_distance(X, X, k, metric="cosine", scale=0.5, reduce="mean_largest")``.
    Returns [h, w].
    """
    _check_backend(backend)
    C, h, w = features.shape
    if not 1 <= k <= h * w:
        raise ValueError(f"fastad.models.SAAPlus: saliency k={k} must be in [1, {h * w}] for a {h}x{w} feature map")
    X = features.reshape(C, h * w)
    if backend == "reference":
        D = 0.5 * (1.0 - X.T @ X)
        D = D.sort(dim=1, descending=True).values
        return D[:, :k].mean(dim=1).reshape(h, w)
    from fastad.ops import nn_distance

    Xt = X.T.contiguous()
    res = nn_distance(Xt, Xt, k=k, metric="cosine", scale=0.5, reduce="mean_largest", backend=ops_backend)
    return res.values.to(features.dtype).reshape(h, w)


def multi_instance_saliency_reference(features: torch.Tensor, instance_masks: torch.Tensor) -> torch.Tensor:
    """The authors' multi-instance saliency, loop for loop (``visual_saliency_calculation`` and
    ``region_feature_extraction``): features [C, h, w] L2-normalised, instance_masks [I, h, w]
    bool with at least two non-empty masks. Returns [h, w]."""
    C, h, w = features.shape
    masks = instance_masks.bool()
    rows = masks.tolist()
    maps = []
    for i in range(masks.shape[0]):
        clone = features.clone()
        query, locations = [], []
        for y in range(h):
            row = rows[i][y]
            for x in range(w):
                if row[x]:
                    query.append(clone[:, y, x].clone())
                    locations.append((y, x))
                    clone[:, y, x] = 0.0
        flat = clone.reshape(C, -1)
        bank = torch.cat([flat[:, masks[j].reshape(-1)] for j in range(masks.shape[0]) if j != i], dim=1).T
        similarity = (torch.stack(query) @ bank.T).max(dim=1).values
        score = 0.5 * (1.0 - similarity)
        instance_map = torch.zeros(h, w, dtype=features.dtype, device=features.device)
        for (y, x), s in zip(locations, score):
            instance_map[y, x] = s
        maps.append(instance_map)
    return torch.stack(maps).max(dim=0).values


def multi_instance_saliency(features: torch.Tensor, instance_masks: torch.Tensor, backend: str = "reference",
                            ops_backend: Optional[str] = None) -> torch.Tensor:
    """Multi-instance saliency of one feature map [C, h, w]: every position inside an object gets
    0.5 * (1 - max cosine similarity to the positions of the other objects); 0 elsewhere.

    ``instance_masks`` [I, h, w] bool, at least two non-empty. reference: the authors' per-pixel loop
    (:func:`multi_instance_saliency_reference`); fastad: one masked nearest-neighbour call
    (``fastad.ops.nn_distance`` with instance labels, ``group_match="other"``) when the masks are
    disjoint, one call per object when they overlap (then the authors' zeroed bank entries add
    the distance 0.5). Returns [h, w].
    """
    _check_backend(backend)
    masks = instance_masks.bool()
    if masks.dim() != 3 or masks.shape[1:] != features.shape[1:]:
        raise ValueError(f"fastad.models.SAAPlus: instance_masks must be [I, {features.shape[1]}, "
                         f"{features.shape[2]}], got {tuple(instance_masks.shape)}")
    if int((masks.flatten(1).any(1)).sum()) < 2:
        raise ValueError("fastad.models.SAAPlus: multi-instance saliency needs at least two non-empty instance masks")
    if backend == "reference":
        return multi_instance_saliency_reference(features, masks)
    from fastad.ops import nn_distance

    C, h, w = features.shape
    X = features.reshape(C, h * w).T.contiguous()
    m = masks.reshape(masks.shape[0], h * w)
    cover = m.sum(0)
    out = torch.zeros(h * w, dtype=features.dtype, device=features.device)
    kwargs = dict(k=1, metric="cosine", scale=0.5, reduce="topk", backend=ops_backend)
    if bool((cover <= 1).all()):
        pix = cover.nonzero()[:, 0]
        labels = m[:, pix].to(torch.int64).argmax(0)
        q = X[pix].contiguous()
        res = nn_distance(q, q, query_groups=labels, bank_groups=labels, group_match="other", **kwargs)
        out[pix] = res.values[:, 0].to(out.dtype)
        return out.reshape(h, w)
    for i in range(m.shape[0]):
        if not bool(m[i].any()):
            continue
        others = torch.cat([m[:i], m[i + 1:]]).any(0)
        bank = others & ~m[i]
        if bool(bank.any()):
            d = nn_distance(X[m[i]].contiguous(), X[bank].contiguous(), **kwargs).values[:, 0].to(out.dtype)
        else:
            d = torch.full((int(m[i].sum()),), float("inf"), dtype=out.dtype, device=out.device)
        if bool((others & m[i]).any()):  # zeroed bank entries: cosine 0, distance 0.5
            d = d.clamp_max(0.5)
        out[m[i]] = torch.maximum(out[m[i]], d)
    return out.reshape(h, w)


# --------------------------------------------------------------------------- rescoring and fusion


def rescore(saliency: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, backend: str = "reference",
            gamma: float = 3.0, ops_backend: Optional[str] = None) -> torch.Tensor:
    """score_i * exp(gamma * mean of the saliency inside mask i).

    saliency [h, w] at feature resolution, bilinearly resized to the masks' grid (cv2.INTER_LINEAR
    sampling); masks [R, H, W] bool; scores [R]. An empty mask keeps its score (exp(0)).
    reference: the authors' per-mask loop on the resized map; fastad: ``fastad.ops.mask_pool``
    (pools on the coarse grid with the adjoint of the upsampling, never materialising the
    resized map per mask).
    """
    _check_backend(backend)
    R, H, W = masks.shape
    if backend == "reference":
        up = _resize_bilinear(saliency[None, None], (H, W))[0, 0]
        means = []
        for r in range(R):
            inside = up[masks[r]]
            means.append(inside.mean() if inside.numel() else up.new_zeros(()))
        mean = torch.stack(means) if means else up.new_zeros((0,))
    else:
        from fastad.ops import mask_pool

        pooled = mask_pool(saliency[None, None].float(), masks[None], size=(H, W), resize="bilinear",
                           align_corners=False, threshold=0.5, backend=ops_backend)
        mean = pooled[0, :, 0].to(saliency.dtype)
    return scores.to(mean.dtype) * torch.exp(gamma * mean)


def confidence_fusion(masks: torch.Tensor, scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the k highest-scoring masks (ties to the lower index) and fuse them:
    A = sum_i m_i s_i / (1 + sum_i m_i). masks [R, H, W] bool, scores [R]. Returns (A [H, W], kept indices)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    kept = masks[order].to(scores.dtype)
    s = scores[order]
    num = torch.einsum("rhw,r->hw", kept, s)
    return num / (1.0 + kept.sum(0)), order


# --------------------------------------------------------------------------- features


class SaliencyFeatures(nn.Module):
    """WideResNet-50-2 layers 1-3 (timm ``wide_resnet50_2``, ``features_only``), deeper maps
    nearest-upsampled to layer 1's grid, concatenated (1792 channels) and L2-normalised per position.

    Args:
        backbone: timm model name (any ``features_only`` CNN works; tests use small ones).
        checkpoint_path: local weights file; None gives random weights. Nothing is downloaded.
    """

    def __init__(self, backbone: str = "wide_resnet50_2", checkpoint_path: Optional[str] = None,
                 out_indices: Tuple[int, ...] = (1, 2, 3)) -> None:
        super().__init__()
        self.backbone = create_timm_model(backbone, checkpoint_path, features_only=True, out_indices=out_indices)
        self.backbone.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        return sum(self.backbone.feature_info.channels())

    @torch.no_grad()
    def forward(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] (RGB, or BGR under SAA+'s "authors" input convention),
        resized to size x size -> [B, C, size/4, size/4]."""
        x = _resize_bilinear(images.float(), (size, size))
        x = (x - self.mean) / self.std
        feats = self.backbone(x)
        grid = feats[0].shape[-2:]
        feats = [feats[0]] + [F.interpolate(f, size=grid, mode="nearest") for f in feats[1:]]
        return F.normalize(torch.cat(feats, dim=1), dim=1)


# --------------------------------------------------------------------------- proposers and refiners


class StaticProposer:
    """A proposer from fixed detections: ``{caption: Proposals}`` (captions as
    :func:`prepare_caption` makes them); other captions get no box. Useful for cached detector
    outputs and for tests."""

    def __init__(self, table: Dict[str, Proposals]) -> None:
        self.table = {prepare_caption(k): v for k, v in table.items()}

    def __call__(self, image: torch.Tensor, caption: str) -> Proposals:
        if caption in self.table:
            return self.table[caption]
        return Proposals(torch.zeros(0, 4), torch.zeros(0), [])


class BoxMaskRefiner:
    """A refiner that fills each box (xyxy, pixels; pixel centres inside the box). A SAM-free
    baseline and a deterministic stand-in."""

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        H, W = image.shape[-2:]
        ys = torch.arange(H, dtype=torch.float32, device=boxes.device) + 0.5
        xs = torch.arange(W, dtype=torch.float32, device=boxes.device) + 0.5
        b = boxes.float()
        in_y = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] <= b[:, 3:4])
        in_x = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] <= b[:, 2:3])
        return in_y[:, :, None] & in_x[:, None, :]


def _image_to_uint8_hwc(image: torch.Tensor):
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def authors_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """The authors' WRN input: the image [3, H, W] (RGB in [0, 1]) as the uint8 BGR array
    ``cv2.imread`` gives, ``cv2.resize`` to size x size (INTER_LINEAR), as [1, 3, size, size]
    float in [0, 1], still BGR (the feature extractor normalises it with the RGB statistics,
    as the authors' ``ModelINet`` does)."""
    cv2 = import_cv2("SAAPlus(input_convention='authors')")
    bgr = _image_to_uint8_hwc(image)[:, :, ::-1]
    resized = cv2.resize(bgr, (size, size))
    return torch.from_numpy(resized).permute(2, 0, 1)[None].float().div(255.0).to(image.device)


class SAMRefiner:
    """Box -> mask with the ``segment-anything`` package (``pip install fastad[sam]``):
    ``SamPredictor.predict_torch(boxes=..., multimask_output=False)``, as the authors call it.
    The image embedding is computed once per image object (the same tensor passed again reuses it).

    Args:
        sam: a ``segment_anything.modeling.Sam`` (e.g. ``sam_model_registry["vit_h"](checkpoint=path)``).
    """

    def __init__(self, sam: nn.Module) -> None:
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(sam)
        self._image: Optional[torch.Tensor] = None

    @classmethod
    def from_checkpoint(cls, model_type: str = "vit_h", checkpoint: Optional[str] = None,
                        device: Union[str, torch.device] = "cpu") -> "SAMRefiner":
        """Build SAM ``model_type`` (vit_h / vit_l / vit_b) from a local checkpoint (None: random weights)."""
        from segment_anything import sam_model_registry

        return cls(sam_model_registry[model_type](checkpoint=checkpoint).to(device).eval())

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        H, W = image.shape[-2:]
        if self._image is not image:
            self.predictor.set_image(_image_to_uint8_hwc(image), image_format="RGB")
            self._image = image
        device = self.predictor.device
        transformed = self.predictor.transform.apply_boxes_torch(boxes.float().to(device), (H, W))
        masks, _, _ = self.predictor.predict_torch(point_coords=None, point_labels=None, boxes=transformed,
                                                   multimask_output=False)
        return masks[:, 0].to(image.device)


def _groundingdino_size(h: int, w: int, size: int, max_size: Optional[int]) -> Tuple[int, int]:
    """GroundingDINO's ``RandomResize([size], max_size)`` output size (its get_size_with_aspect_ratio)."""
    if max_size is not None:
        lo, hi = float(min(h, w)), float(max(h, w))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


class GroundingDINOProposer:
    """Text-prompted boxes from a GroundingDINO model (the ``groundingdino`` package, when
    installed), as the authors call it: image resized to 800 (longest side at most 1333),
    ImageNet-normalised; ``pred_logits.sigmoid()``; box score = max over tokens; the phrase of a box
    is decoded from the tokens above ``text_threshold`` (``get_phrases_from_posmap``), only for
    boxes whose score passes ``box_threshold`` (the others are dropped by SAA+ before their phrase
    is read).

    Args:
        model: a built GroundingDINO model (has ``.tokenizer``), e.g. from :meth:`from_config`.
    """

    def __init__(self, model: nn.Module, box_threshold: float = 0.1, text_threshold: float = 0.1,
                 size: int = 800, max_size: int = 1333) -> None:
        self.model = model
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.size = size
        self.max_size = max_size

    @classmethod
    def from_config(cls, config_file: str, checkpoint: str, device: Union[str, torch.device] = "cpu",
                    **kwargs) -> "GroundingDINOProposer":
        """Build from a GroundingDINO config file (e.g. GroundingDINO_SwinT_OGC.py) and a local checkpoint."""
        from groundingdino.models import build_model
        from groundingdino.util.slconfig import SLConfig
        from groundingdino.util.utils import clean_state_dict

        args = SLConfig.fromfile(config_file)
        args.device = str(device)
        model = build_model(args)
        state = torch.load(checkpoint, map_location="cpu")
        model.load_state_dict(clean_state_dict(state["model"]), strict=False)
        return cls(model.eval().to(device), **kwargs)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, caption: str) -> Proposals:
        from groundingdino.util.utils import get_phrases_from_posmap

        H, W = image.shape[-2:]
        size = _groundingdino_size(H, W, self.size, self.max_size)
        x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        device = next(self.model.parameters()).device
        x = ((x - mean) / std).to(device)
        outputs = self.model(x, captions=[caption])
        logits = outputs["pred_logits"].sigmoid()[0].cpu()
        boxes = outputs["pred_boxes"][0].cpu()
        scores = logits.max(dim=1).values
        tokenizer = self.model.tokenizer
        tokenized = tokenizer(caption)
        phrases = [get_phrases_from_posmap(logit > self.text_threshold, tokenized, tokenizer)
                   if float(score) > self.box_threshold else "" for logit, score in zip(logits, scores)]
        return Proposals(boxes, scores, phrases)


# --------------------------------------------------------------------------- the model


@dataclass
class SAAPlusOutput:
    """anomaly_maps [B, out, out]: fused maps before the per-category min-max normalisation;
    saliency_maps [B, H, W]: saliency at image resolution; image_scores [B]: max of each map;
    details: per image, the kept boxes (xyxy pixels), their confidences, rescored confidences
    and the indices of the top-K masks."""

    anomaly_maps: torch.Tensor
    saliency_maps: torch.Tensor
    image_scores: torch.Tensor
    details: List[Dict[str, torch.Tensor]] = field(default_factory=list)


class SAAPlus(nn.Module):
    """SAA+ zero-shot anomaly segmentation (see the module docstring for the exact pipeline).

    Args:
        category: a :class:`~fastad.models.saa_tables.CategoryConfig`, or a category name looked up in
            the authors' table of ``dataset``.
        proposer: box proposer ``(image, caption) -> Proposals`` (``GroundingDINOProposer``, ``StaticProposer``).
        refiner: box -> mask model ``(image, boxes_xyxy) -> masks`` (``SAMRefiner``, ``BoxMaskRefiner``).
        dataset: table to look ``category`` up in ("mvtec", "visa", "ksdd2", "mtd").
        backbone, backbone_weights: the saliency CNN (timm name; local weights or None for random;
            ``checkpoint_path`` is the deprecated name of ``backbone_weights``).
        feature_extractor: a ready module ``(images, size) -> [B, C, h, w]`` instead of ``backbone``.
        box_threshold: minimum box confidence (strictly greater), 0.1 in the authors' runs.
        saliency_k: neighbours averaged per position (N = 400).
        single_size, multi_size: image side fed to the CNN for single-object / multi-instance saliency.
        out_size: side of the output anomaly map (400 in the paper's evaluation).
        gamma: rescoring exponent factor (3).
        input_convention: "authors" (BGR uint8 into SAM and the WRN, cv2 resizes; the default) or
            "rgb" (RGB floats); see the module docstring. "authors" needs OpenCV.
        backend: "reference" (the authors' computation in plain torch) or "fastad" (fastad ops).
        ops_backend: backend passed to the fastad ops (None: the fastest available).
        **overrides: fields of the category configuration to replace (e.g. ``k_mask=3``).
    """

    def __init__(self, category: Union[str, CategoryConfig], proposer: BoxProposer, refiner: MaskRefiner, *,
                 dataset: str = "mvtec", backbone: str = "wide_resnet50_2", checkpoint_path: Optional[str] = None,
                 feature_extractor: Optional[nn.Module] = None, box_threshold: float = 0.1,
                 saliency_k: int = 400, single_size: int = 256, multi_size: int = 1024, out_size: int = 400,
                 gamma: float = 3.0, backend: str = "reference", ops_backend: Optional[str] = None,
                 input_convention: str = "authors", backbone_weights: Optional[str] = None, **overrides) -> None:
        super().__init__()
        checkpoint_path = backbone_weights_arg("SAAPlus", backbone_weights, "checkpoint_path", checkpoint_path)
        _check_backend(backend)
        if input_convention not in INPUT_CONVENTIONS:
            raise ValueError(f"fastad.models.SAAPlus: input_convention must be one of {INPUT_CONVENTIONS}, "
                             f"got {input_convention!r}")
        if input_convention == "authors":
            import_cv2("SAAPlus(input_convention='authors')")
        if isinstance(category, CategoryConfig):
            self.config = category.with_overrides(**overrides) if overrides else category
        else:
            self.config = category_config(dataset, category, **overrides)
        self.proposer = proposer
        self.refiner = refiner
        self.features = feature_extractor if feature_extractor is not None else SaliencyFeatures(backbone, checkpoint_path)
        self.box_threshold = float(box_threshold)
        self.saliency_k = int(saliency_k)
        self.single_size = int(single_size)
        self.multi_size = int(multi_size)
        self.out_size = int(out_size)
        self.gamma = float(gamma)
        self.backend = backend
        self.ops_backend = ops_backend
        self.input_convention = input_convention
        self.last_stage_times: Dict[str, float] = {}

    # -- pieces --------------------------------------------------------------

    def _propose(self, image: torch.Tensor, prompts: Sequence[Tuple[str, str]], max_area: float,
                 min_area: float) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """Kept boxes (normalised cxcywh), their scores and the largest kept area (0 if none)."""
        boxes, scores = [], []
        for caption, filtered in prompts:
            caption = prepare_caption(caption)
            props = self.proposer(image, caption)
            b = props.boxes.float().reshape(-1, 4).cpu()
            s = props.scores.float().reshape(-1).cpu()
            area = b[:, 2] * b[:, 3]
            keep = (s > self.box_threshold) & (area < max_area) & (area > min_area)
            for q in keep.nonzero()[:, 0].tolist():
                if props.phrases[q].count(filtered) > 0:
                    continue
                boxes.append(b[q])
                scores.append(s[q])
        if not boxes:
            return torch.zeros(0, 4), torch.zeros(0), 0.0
        boxes_t = torch.stack(boxes)
        return boxes_t, torch.stack(scores), float((boxes_t[:, 2] * boxes_t[:, 3]).max())

    @staticmethod
    def _to_xyxy(boxes: torch.Tensor, H: int, W: int) -> torch.Tensor:
        b = boxes * torch.tensor([W, H, W, H], dtype=boxes.dtype)
        xy = b[:, :2] - b[:, 2:] / 2
        return torch.cat([xy, xy + b[:, 2:]], dim=1)

    def _refine(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        H, W = image.shape[-2:]
        seen = image.flip(0) if self.input_convention == "authors" else image  # the authors' SAM sees BGR
        masks = self.refiner(seen, self._to_xyxy(boxes, H, W).to(image.device))
        return masks.to(torch.bool).reshape(boxes.shape[0], H, W)

    def _features(self, image: torch.Tensor, size: int) -> torch.Tensor:
        """Saliency features [C, size/4, size/4] of one image in the input convention."""
        if self.input_convention == "authors":
            return self.features(authors_resize(image, size), size)[0]
        return self.features(image[None], size)[0]

    def _saliency(self, image: torch.Tensor, object_boxes: torch.Tensor, times: Dict[str, float]) -> torch.Tensor:
        """Saliency at feature resolution [h, w]."""
        instance_masks = None
        if self.config.object_number > 1 and object_boxes.shape[0] >= 2:
            t = time.perf_counter()
            obj = self._refine(image, object_boxes)
            times["refine"] += time.perf_counter() - t
            obj = obj[obj.flatten(1).any(1)]
            if obj.shape[0] >= 2:
                instance_masks = obj
        t = time.perf_counter()
        size = self.single_size if instance_masks is None else self.multi_size
        feats = self._features(image, size)
        times["features"] += time.perf_counter() - t
        t = time.perf_counter()
        if instance_masks is not None:
            grid = feats.shape[-2:]
            small = F.interpolate(instance_masks[:, None].float(), size=grid, mode="nearest")[:, 0].bool()
            if int(small.flatten(1).any(1).sum()) >= 2:
                sal = multi_instance_saliency(feats, small[small.flatten(1).any(1)], self.backend, self.ops_backend)
                times["saliency"] += time.perf_counter() - t
                return sal
            t0 = time.perf_counter()
            feats = self._features(image, self.single_size)
            times["features"] += time.perf_counter() - t0
        sal = self_similarity_saliency(feats, self.saliency_k, self.backend, self.ops_backend)
        times["saliency"] += time.perf_counter() - t
        return sal

    # -- forward -------------------------------------------------------------

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> SAAPlusOutput:
        """images: [B, 3, H, W] (or [3, H, W]) RGB, float in [0, 1] or uint8."""
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"fastad.models.SAAPlus: images must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        cfg = self.config
        times = {k: 0.0 for k in ("proposals", "refine", "features", "saliency", "rescoring", "fusion")}
        maps, saliencies, details = [], [], []
        for b in range(images.shape[0]):
            image = images[b]
            H, W = image.shape[-2:]
            t = time.perf_counter()
            obj_boxes, _, obj_area = self._propose(image, [(cfg.object_prompt, "PlaceHolder")], cfg.object_max_area, 0.0)
            if obj_boxes.shape[0] == 0:
                obj_area = 1.0
            boxes, scores, _ = self._propose(image, cfg.text_prompts, obj_area * cfg.defect_area_threshold, 0.0)
            times["proposals"] += time.perf_counter() - t
            t = time.perf_counter()
            if boxes.shape[0]:
                masks = self._refine(image, boxes)
            else:
                masks = torch.zeros(1, H, W, dtype=torch.bool, device=image.device)
                scores = torch.zeros(1)
            times["refine"] += time.perf_counter() - t
            sal = self._saliency(image, obj_boxes, times)
            t = time.perf_counter()
            rescored = rescore(sal, masks, scores.to(sal.device), self.backend, self.gamma, self.ops_backend)
            times["rescoring"] += time.perf_counter() - t
            t = time.perf_counter()
            fused, kept = confidence_fusion(masks, rescored, cfg.k_mask)
            fused = _resize_bilinear(fused[None, None], (self.out_size, self.out_size))[0, 0]
            saliencies.append(_resize_bilinear(sal[None, None], (H, W))[0, 0])
            times["fusion"] += time.perf_counter() - t
            maps.append(fused)
            details.append({"boxes": self._to_xyxy(boxes, H, W), "box_scores": scores, "rescored": rescored,
                            "kept": kept})
        self.last_stage_times = times
        anomaly = torch.stack(maps)
        return SAAPlusOutput(anomaly, torch.stack(saliencies), anomaly.flatten(1).amax(1), details)

    @staticmethod
    def normalize(maps: torch.Tensor) -> torch.Tensor:
        """Global min-max normalisation over all maps of a category (the authors' ``normalize``);
        a constant set maps to zeros."""
        lo, hi = maps.min(), maps.max()
        span = hi - lo
        if not bool(span > 0) or not math.isfinite(float(span)):
            return torch.zeros_like(maps)
        return (maps - lo) / span
