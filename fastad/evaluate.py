"""``fastad evaluate``: run one of the four reference models on one category of an MVTec AD
(or VisA split-CSV) folder and write its anomaly maps, metrics and per-stage cost.

Outputs under ``out``:

* ``metrics.json`` — method, category, shots, the reference images used, every metric of
  ``fastad.metrics.evaluate`` (image AUROC / AP / F1-max, pixel AUROC / AP / F1-max, AUPRO@0.3
  exact and 200-threshold, region F1), seconds and peak memory (MiB above the memory in use
  when the stage began) of each stage, device and versions;
* ``metrics.csv`` — the same metrics, one ``metric,value`` row each;
* ``scores.csv`` — per test image: path, defect, label, image score;
* ``maps/<defect>/<name>.png`` — the test image with its anomaly map as a heat overlay (one
  colour scale for the whole category) and the ground-truth outline in green.

Images are read at the model's input size (square resize); ground-truth masks are resized to
it with nearest sampling, and metrics are computed at that resolution.
"""
from __future__ import annotations

import ast
import csv
import json
import platform
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fastad._io import atomic_write
from fastad._memory import PeakMemory
from fastad.data.mvtec import (CategorySplit, image_shape, load_mvtec, load_visa, read_image, read_mask,
                               resolve_layout)

METHODS = ("inctrlv2", "dictas", "saa_plus", "icas")


class EvaluationError(ValueError):
    """A user-facing problem with the data, the checkpoint or the options."""


class StageMeter:
    """Wall time and peak memory per named stage (summed / maxed over calls)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_bytes: dict[str, int] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with PeakMemory(self.device) as pm:
            try:
                yield
            finally:
                self.seconds[stage] += time.perf_counter() - t0
        if pm.bytes is not None:
            self.peak_bytes[stage] = max(self.peak_bytes.get(stage, 0), pm.bytes)

    def add(self, prefix: str, seconds: dict[str, float]) -> None:
        """Fold a model's own stage timings (e.g. ``ICASOutput.stage_times``) in."""
        for k, v in seconds.items():
            self.seconds[f"{prefix}: {k}"] += float(v)

    def report(self) -> dict[str, dict[str, float | None]]:
        return {k: {"seconds": round(v, 4),
                    "peak_mib": round(self.peak_bytes[k] / 2**20, 1) if k in self.peak_bytes else None}
                for k, v in self.seconds.items()}


class Runner(Protocol):
    """What ``evaluate`` needs from a model: its input side, a few-shot setup and a batch
    prediction returning image scores [B] and maps [B, S, S]."""

    size: int
    shots_used: bool

    def set_references(self, images: torch.Tensor, meter: StageMeter) -> None: ...

    def predict(self, images: torch.Tensor, meter: StageMeter) -> tuple[torch.Tensor, torch.Tensor]: ...

    def finalize(self, scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class _Runner:
    shots_used = True

    def finalize(self, scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return scores, maps


class CLIPRunner(_Runner):
    """InCTRLv2 / DictAS: CLIP-normalised inputs, the backbone pass and the head timed apart."""

    feature_cache = None  # a fastad.feature_cache.FeatureCache shared by runs that see the same images

    def __init__(self, model: Any, category: str, class_name: str | None = None) -> None:
        import open_clip

        self.model, self.category, self.class_name = model.eval(), category, class_name
        self.size = int(model.backbone.image_size)
        dev = model.device
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=dev).view(1, 3, 1, 1)

    def _norm(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.model.device) - self.mean) / self.std

    def _encode(self, images: torch.Tensor) -> Any:
        """The frozen backbone's features, through ``feature_cache`` (a FeatureCache) when set."""
        x = self._norm(images)
        return self.model.encode(x) if self.feature_cache is None else self.feature_cache.encode(self.model.encode, x)

    @torch.no_grad()
    def set_references(self, images: torch.Tensor, meter: StageMeter) -> None:
        with meter("references (encode + cache)"):
            prepare = getattr(self.model, "prepare_references", None)  # DictAS: the authors' screw rotations
            if prepare is not None:
                images = prepare(images, self.category)
            self.model.set_references(self._encode(images), category=self.category, class_name=self.class_name)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, meter: StageMeter) -> tuple[torch.Tensor, torch.Tensor]:
        with meter("backbone (CLIP image encoder)"):
            feats = self._encode(images)
        with meter(f"head ({self.model.backend} backend)"):
            out = self.model.head(feats, self.category)
        return out["image_scores"], out["anomaly_maps"]


class ICASRunner(_Runner):
    """iCAS with normal prompting: the few-shot references are normal images."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.size = int(model.image_size)

    def set_references(self, images: torch.Tensor, meter: StageMeter) -> None:
        with meter("references (encode + prompts)"):
            self.model.set_references(images.to(self.model.pixel_mean.device))
        meter.add("references", self.model.reference_stage_times)

    def predict(self, images: torch.Tensor, meter: StageMeter) -> tuple[torch.Tensor, torch.Tensor]:
        with meter("model"):
            out = self.model(images.to(self.model.pixel_mean.device))
        meter.add("model", out.stage_times)
        return out.image_score, out.anomaly_map


class SAAPlusRunner(_Runner):
    """SAA+ is zero-shot: no references; maps are min-max normalised over the category."""

    shots_used = False

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.size = int(model.out_size)

    def set_references(self, images: torch.Tensor, meter: StageMeter) -> None:
        return None

    def predict(self, images: torch.Tensor, meter: StageMeter) -> tuple[torch.Tensor, torch.Tensor]:
        with meter("model"):
            out = self.model(images)
        meter.add("model", self.model.last_stage_times)
        return out.image_scores, out.anomaly_maps

    def finalize(self, scores: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.model.normalize(maps)
        return maps.flatten(1).amax(1), maps


# --------------------------------------------------------------------------- building models
def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["image_size=64", "backbone=fastad-tiny"]`` -> {"image_size": 64, "backbone": "fastad-tiny"}
    (values are Python literals where they parse as one, strings otherwise)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvaluationError(f"--config expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def check_device(device: str) -> None:
    """EvaluationError (naming --device) for a device string torch rejects or CUDA that is not here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EvaluationError(f"--device {device!r} is not a torch device ({exc}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise EvaluationError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")


def _valid_keys(method: str) -> list[str]:
    """The ``--config`` keys the model of ``method`` accepts (for error messages)."""
    import dataclasses
    import inspect

    from fastad import models

    cls = {"inctrlv2": models.InCTRLv2, "dictas": models.DictAS, "icas": models.ICAS, "saa_plus": models.SAAPlus}[method]
    keys = {n for n, p in inspect.signature(cls).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    keys -= {"pretrained", "checkpoint_path", "backbone_weights", "backend", "config", "category", "proposer",
             "refiner", "dataset"}
    if method in ("inctrlv2", "dictas"):
        from fastad.models.dictas import DictASConfig
        from fastad.models.inctrlv2 import InCTRLConfig

        keys |= {f.name for f in dataclasses.fields(InCTRLConfig if method == "inctrlv2" else DictASConfig)}
        if method == "inctrlv2":
            keys.add("preset")
    return sorted(keys)


def _check_file(path: str | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise EvaluationError(f"{what} {path} does not exist")


@contextmanager
def _checkpoint_errors(path: str, method: str) -> Iterator[None]:
    """Checkpoint problems as EvaluationErrors that name the file."""
    from fastad.models.checkpoint import CheckpointKeyError

    try:
        yield
    except CheckpointKeyError as exc:
        raise EvaluationError(f"checkpoint {path} is not a checkpoint of {method} in this configuration:\n  {exc}") from exc
    except Exception as exc:  # unpickling errors of a corrupt or foreign file
        raise EvaluationError(f"cannot read checkpoint {path} for {method}: {exc}") from exc


def _load_icas_checkpoint(model: Any, path: str) -> None:
    """A state dict of ``fastad.models.ICAS`` (encoder keys optional: the frozen encoder
    keeps the ``--backbone-weights`` weights when the checkpoint leaves it out)."""
    from fastad.models.checkpoint import load_mapped_state_dict, read_state_dict

    state = read_state_dict(path, containers=("model", "state_dict", "model_state"))
    has_encoder = any(k.startswith("encoder.") for k in state)
    load_mapped_state_dict(model, state, lambda k: k, "ICAS checkpoint",
                           optional=lambda k: k.startswith("encoder.") and not has_encoder)


def build_runner(method: str, category: str, *, checkpoint: str | None = None, backbone: str | None = None,
                 config: dict[str, Any] | None = None, device: str = "cpu", backend: str = "fastad",
                 dataset: str = "mvtec", proposer_config: str | None = None, proposer_checkpoint: str | None = None,
                 sam_checkpoint: str | None = None, sam_type: str = "vit_h") -> Runner:
    """The model of ``method`` with its weights, wrapped for ``evaluate``.

    ``checkpoint``: the method's trained weights (InCTRL / DictAS: the authors' release or a
    fastad state dict; iCAS: a state dict of ``fastad.models.ICAS``; SAA+: unused, see below).
    ``backbone``: the frozen backbone's weights (CLIP for InCTRLv2 / DictAS, DINOv2 for iCAS,
    WideResNet-50-2 for SAA+'s saliency). ``config``: constructor overrides of the model
    (e.g. ``{"backbone": "fastad-tiny", "image_size": 64}``; InCTRLv2 takes ``preset`` v1 / v2).
    ``dataset``: SAA+'s prompt table; DictAS applies the authors' rules of that dataset and
    ``category`` (alpha = 0 for the categories they list, rotated references for screw: see
    ``DictAS.apply_dataset_rules`` / ``prepare_references``). SAA+ needs GroundingDINO (``proposer_config`` + ``proposer_checkpoint``) and SAM
    (``sam_checkpoint``, else boxes are filled as masks).
    """
    if method not in METHODS:
        raise EvaluationError(f"unknown method {method!r}; expected one of {METHODS}")
    config = dict(config or {})
    check_device(device)
    for path, what in ((checkpoint, "checkpoint"), (backbone, "backbone weights"),
                       (proposer_checkpoint, "GroundingDINO checkpoint"), (proposer_config, "GroundingDINO config"),
                       (sam_checkpoint, "SAM checkpoint")):
        _check_file(path, what)
    try:
        if method in ("inctrlv2", "dictas"):
            from fastad.models import DictAS, InCTRLv2

            if method == "inctrlv2":
                model = InCTRLv2(config.pop("preset", "v2"), backbone_weights=backbone, backend=backend, **config)
            else:
                model = DictAS(backbone_weights=backbone, backend=backend, **config)
                model.apply_dataset_rules(dataset, category)
            if checkpoint is not None:
                with _checkpoint_errors(checkpoint, method):
                    model.load_checkpoint(checkpoint)
            return CLIPRunner(model.to(device), category, class_name=category.replace("_", " "))
        if method == "icas":
            from fastad.models import ICAS

            model = ICAS(backbone_weights=backbone, backend=backend, **config)
            if checkpoint is not None:
                with _checkpoint_errors(checkpoint, method):
                    _load_icas_checkpoint(model, checkpoint)
            return ICASRunner(model.to(device))
        from fastad.models import SAAPlus
        from fastad.models.saa_plus import BoxMaskRefiner, GroundingDINOProposer, SAMRefiner

        if proposer_config is None or proposer_checkpoint is None:
            raise EvaluationError("saa_plus proposes defect boxes with GroundingDINO: give --proposer-config "
                                  "(GroundingDINO_SwinT_OGC.py) and --proposer-checkpoint (groundingdino_swint_ogc.pth)")
        proposer = GroundingDINOProposer.from_config(proposer_config, proposer_checkpoint, device=device)
        refiner = SAMRefiner.from_checkpoint(sam_type, sam_checkpoint, device=device) if sam_checkpoint \
            else BoxMaskRefiner()
        model = SAAPlus(category, proposer, refiner, dataset=dataset, backbone_weights=backbone, backend=backend,
                        **config)
        return SAAPlusRunner(model.to(device))
    except EvaluationError:
        raise
    except (TypeError, ValueError) as exc:  # an unknown --config key or a value the model rejects
        raise EvaluationError(f"{method}: bad model configuration (--config {config}): {exc}; "
                              f"valid --config keys: {', '.join(_valid_keys(method))}") from exc
    except (RuntimeError, KeyError, OSError, EOFError, __import__("pickle").UnpicklingError) as exc:
        if backbone is None:
            raise
        # the frozen backbone's weights are read in the constructor: a foreign file fails there
        raise EvaluationError(f"--backbone-weights {backbone} cannot be loaded as the backbone of {method} "
                              f"(config {config or 'default'}): {str(exc).splitlines()[0][:300]}") from exc
    except ImportError as exc:
        raise EvaluationError(f"{method} needs a package that is not installed: {exc}") from exc


# --------------------------------------------------------------------------- data
def load_split(data: str | Path, category: str, layout: str = "auto") -> tuple[CategorySplit, str]:
    """The category's split and the layout used ("mvtec" or "visa")."""
    data = Path(data)
    if not data.is_dir():
        raise EvaluationError(f"dataset folder {data} does not exist")
    try:
        layout = resolve_layout(data, layout)
        split = load_mvtec(data, category) if layout == "mvtec" else load_visa(data, category)
    except (FileNotFoundError, ValueError) as exc:
        raise EvaluationError(str(exc)) from exc
    return split, layout


def choose_references(split: CategorySplit, shots: int, seed: int, references: str | Path | None,
                      data: str | Path) -> list[Path]:
    """``shots`` normal training images drawn with ``seed``, or the images listed (one path per
    line, absolute or relative to ``data`` or to the category folder) in ``references``."""
    if references is not None:
        listing = Path(references)
        if not listing.is_file():
            raise EvaluationError(f"reference list {listing} does not exist")
        paths = []
        for line in listing.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            cands = [Path(line), Path(data) / line, Path(data) / split.category / line]
            found = next((p for p in cands if p.is_file()), None)
            if found is None:
                raise EvaluationError(f"reference image {line!r} listed in {listing} does not exist")
            paths.append(found)
        if not paths:
            raise EvaluationError(f"reference list {listing} lists no images")
        return paths
    if shots < 1:
        raise EvaluationError(f"--shots must be >= 1, got {shots}")
    if shots > len(split.train):
        raise EvaluationError(f"{shots} shots requested but {split.category} has only {len(split.train)} normal "
                              "training images")
    g = torch.Generator().manual_seed(seed)
    return [split.train[i] for i in torch.randperm(len(split.train), generator=g)[:shots].tolist()]


def _read_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    try:
        return torch.stack([read_image(p, size) for p in paths])
    except ValueError as exc:
        raise EvaluationError(str(exc)) from exc


def _read_masks(split: CategorySplit, size: int) -> torch.Tensor:
    try:
        return torch.stack([read_mask(s.mask, image_shape(s.path), size) for s in split.test])
    except ValueError as exc:
        raise EvaluationError(str(exc)) from exc


# --------------------------------------------------------------------------- overlays
def _heat(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, a jet-like blue-cyan-yellow-red ramp."""
    v = np.clip(values, 0, 1)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], -1) * 255).astype(np.uint8)


def blend_overlay(img: np.ndarray, amap: torch.Tensor, lo: float, hi: float, mask: np.ndarray | None,
                  outline: tuple[int, int, int]) -> np.ndarray:
    """uint8 [H, W, 3]: ``img`` (float [H, W, 3], 0..255) blended with the map's heat colours
    (the map scaled to [lo, hi]), the outline of the boolean ``mask`` drawn in ``outline``."""
    heat = _heat((amap.float().cpu().numpy() - lo) / max(hi - lo, 1e-12)).astype(np.float32)
    out = (0.55 * img + 0.45 * heat).astype(np.uint8)
    if mask is not None and mask.any():
        inner = mask.copy()
        inner[1:, :] &= mask[:-1, :]
        inner[:-1, :] &= mask[1:, :]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        out[mask & ~inner] = outline
    return out


def write_overlay(path: Path, image: torch.Tensor, amap: torch.Tensor, mask: torch.Tensor, lo: float,
                  hi: float) -> None:
    """Image [3, S, S] in [0, 1] blended with the map scaled to [lo, hi]; mask outline in green;
    written atomically as PNG."""
    from PIL import Image

    img = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.float32)
    with atomic_write(path) as f:
        Image.fromarray(blend_overlay(img, amap, lo, hi, mask.numpy(), (0, 255, 0))).save(f, format="PNG")


# --------------------------------------------------------------------------- the evaluation
@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    stages: dict[str, dict[str, float | None]]
    scores: torch.Tensor
    maps: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def evaluate(runner: Runner, data: str | Path, category: str, out: str | Path | None = None, *, shots: int = 4,
             seed: int = 0, references: str | Path | None = None, layout: str = "auto", batch_size: int = 8,
             overlays: bool = True, progress: bool = True, method: str = "", device: str = "cpu",
             options: dict[str, Any] | None = None) -> EvaluationResult:
    """Run ``runner`` over the test split of ``category`` and score it with fastad.metrics;
    writes the files listed in the module docstring when ``out`` is given. ``options`` (e.g.
    the weights' paths and the model config) are recorded in ``metrics.json``."""
    from fastad import __version__, metrics

    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1, got {batch_size}")
    meter = StageMeter(device)
    with meter("read data"):
        split, layout = load_split(data, category, layout)
        size = runner.size
        refs = choose_references(split, shots, seed, references, data) if runner.shots_used else []
        ref_images = _read_images(refs, size) if refs else None
        masks = _read_masks(split, size)
        labels = torch.tensor([s.label for s in split.test])
    if ref_images is not None:
        runner.set_references(ref_images, meter)
    scores, maps = [], []
    bar = tqdm(total=len(split.test), desc=f"{method or 'evaluate'} {category}", unit="img", disable=not progress)
    for i in range(0, len(split.test), batch_size):
        batch = split.test[i:i + batch_size]
        with meter("read data"):
            images = _read_images([s.path for s in batch], size)
        s, m = runner.predict(images, meter)
        if tuple(m.shape[-2:]) != (size, size):
            raise EvaluationError(f"{method}: the model returned maps of {tuple(m.shape[-2:])}, expected {size}x{size}")
        scores.append(s.detach().float().cpu())
        maps.append(m.detach().float().cpu())
        bar.update(len(batch))
    bar.close()
    scores_t, maps_t = runner.finalize(torch.cat(scores), torch.cat(maps))
    with meter("metrics (fastad.metrics)"):
        results = metrics.evaluate(scores_t, maps_t, labels, masks, undefined="nan", progress=False)
    info = {"method": method, "category": category, "layout": layout, "data": str(data),
            "shots": len(refs), "seed": seed if references is None else None,
            "references": [str(p) for p in refs], "test_images": len(split.test),
            "anomalous_images": int(labels.sum()), "map_size": size, "device": device,
            "fastad": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), **(options or {})}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if overlays:
            with meter("write overlays"):
                lo, hi = float(maps_t.min()), float(maps_t.max())
                # the colour scale needs every map first; images are read again rather than
                # kept through the run (hundreds of MiB at 518 px for a VisA category)
                for j, smp in enumerate(tqdm(split.test, desc="overlays", disable=not progress)):
                    img = _read_images([smp.path], size)[0]
                    write_overlay(out / "maps" / smp.defect / f"{smp.path.stem}.png", img, maps_t[j], masks[j], lo, hi)
        with open(out / "scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "defect", "label", "score"])
            for smp, sc in zip(split.test, scores_t.tolist()):
                w.writerow([str(smp.path), smp.defect, smp.label, f"{sc:.6g}"])
        with open(out / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["metric", "value"])
            for k, v in results.items():
                w.writerow([k, f"{v:.6f}"])
    stages = meter.report()
    if out is not None:
        (out / "metrics.json").write_text(json.dumps({**info, "metrics": results, "stages": stages}, indent=1))
    return EvaluationResult(results, stages, scores_t, maps_t, info)


def format_result(result: EvaluationResult) -> str:
    info = result.info
    lines = [f"fastad evaluate: {info['method']} on {info['category']} ({info['layout']} layout), "
             f"{info['shots']}-shot, {info['test_images']} test images ({info['anomalous_images']} anomalous)", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result.metrics.items()]
    return "\n".join(lines + [""] + stage_table(result.stages))


def stage_table(stages: dict[str, dict[str, float | None]]) -> list[str]:
    """Markdown rows of ``StageMeter.report()``."""
    lines = ["| stage | seconds | peak MiB |", "|---|---:|---:|"]
    for k, v in stages.items():
        peak = "" if v["peak_mib"] is None else f"{v['peak_mib']:.1f}"
        lines.append(f"| {k} | {v['seconds']:.3f} | {peak} |")
    return lines
