"""``fastad score``: batch scoring of many images with a Ray Data pipeline.

Images are read in parallel read tasks and streamed (with Ray Data's backpressure) into
``map_batches`` over a pool of actors; each actor builds the model once and caches the
reference images' features, scores its batches and writes each image's map as
``maps/<n>_<stem>.npy`` and a heat overlay ``maps/<n>_<stem>.png`` (``n``: the image's position
in the input list). The driver collects one row per image into ``scores.parquet``: path,
score, decision (``score >= threshold``) and the two map paths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fastad._io import atomic_write

__all__ = ["ScoreSpec", "resolve_images", "write_prediction", "score"]

SCORE_METHODS = ("inctrlv2", "dictas", "icas")


@dataclass
class ScoreSpec:
    """The model every actor builds: ``method`` / ``checkpoint`` / ``backbone`` / ``config`` as
    in ``fastad.evaluate.build_runner``, ``category`` (the prompt's class name), the reference
    images (a folder, list file, glob or paths), and the torch seed of parts without weights."""

    method: str
    references: str | list[str]
    category: str = "object"
    checkpoint: str | None = None
    backbone: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0

    def build(self, device: str) -> Any:
        from fastad.evaluate import build_runner

        torch.manual_seed(self.init_seed)
        return build_runner(self.method, self.category, checkpoint=self.checkpoint, backbone=self.backbone,
                            config=self.config, device=device)


def resolve_images(spec: str | Path | Sequence[str | Path], what: str) -> list[str]:
    """Absolute image paths from a folder, list file, glob or sequence
    (``fastad.detector.list_images``, the same sources as ``fastad predict``)."""
    from fastad.detector import list_images

    return [str(p.resolve()) for p in list_images(spec, what)]


def write_prediction(out: str | Path, index: int, path: str, image: torch.Tensor, amap: torch.Tensor,
                     score: float, threshold: float, map_range: tuple[float, float]) -> dict[str, Any]:
    """Write one image's map (``.npy``) and overlay (``.png``) under ``out/maps`` atomically and
    return its table row (path, score, anomalous, map, overlay)."""
    from fastad.evaluate import write_overlay

    maps = Path(out) / "maps"
    stem = f"{index:06d}_{Path(path).stem}"
    npy, png = maps / f"{stem}.npy", maps / f"{stem}.png"
    with atomic_write(npy) as f:
        np.save(f, amap.float().cpu().numpy())
    write_overlay(png, image, amap, torch.zeros(amap.shape, dtype=torch.bool), *map_range)
    return {"index": index, "path": path, "score": float(score), "anomalous": bool(score >= threshold),
            "map": str(npy), "overlay": str(png)}


def _read_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data read step: the images at the model's input size, as fastad.evaluate reads them."""
    from fastad.data.mvtec import read_image

    return {"index": batch["index"], "path": batch["path"],
            "image": np.stack([read_image(p, size).numpy() for p in batch["path"]])}


class _Scorer:
    """Ray Data actor: the model and its references' features, built once per actor."""

    def __init__(self, spec: ScoreSpec, out: str, threshold: float, map_range: tuple[float, float]) -> None:
        from fastad.distributed._ray import task_device
        from fastad.data.mvtec import read_image
        from fastad.evaluate import StageMeter

        self.device = task_device()
        self.runner = spec.build(self.device)
        self.meter = StageMeter(self.device)
        refs = torch.stack([read_image(p, self.runner.size) for p in spec.references])
        self.runner.set_references(refs, self.meter)
        self.out, self.threshold, self.map_range = out, threshold, map_range

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.ascontiguousarray(batch["image"]))
        scores, maps = self.runner.predict(images, self.meter)
        rows = [write_prediction(self.out, int(i), str(p), img, m.detach().cpu(), float(s), self.threshold,
                                 self.map_range)
                for i, p, img, m, s in zip(batch["index"], batch["path"], images, maps, scores.tolist())]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def score(spec: ScoreSpec, images: str | Path | Sequence[str | Path], out: str | Path, *, address: str | None = None,
          batch_size: int = 8, actors: int = 1, gpus_per_actor: float | None = None, cpus_per_actor: float = 1,
          threshold: float = 0.5, map_range: tuple[float, float] = (0.0, 1.0), progress: bool = True) -> Path:
    """Score ``images`` with ``spec``'s model on a pool of ``actors`` Ray actors; returns the
    path of ``out/scores.parquet`` (rows in input order).

    ``gpus_per_actor`` defaults to 1 when the Ray cluster has GPUs, else 0 (CPU actors).
    ``map_range``: the anomaly-map values drawn as the coldest and hottest overlay colour."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastad.distributed._ray import cluster_has_gpus, ray_session

    if spec.method not in SCORE_METHODS:
        raise ValueError(f"--method {spec.method}: fastad score runs the few-shot methods {','.join(SCORE_METHODS)}")
    if batch_size < 1 or actors < 1:
        raise ValueError(f"--batch-size and --actors must be >= 1, got {batch_size} and {actors}")
    paths = resolve_images(images, "--images")
    spec = dataclasses.replace(spec, references=resolve_images(spec.references, "--references"))
    # built once here too: bad options fail before any Ray work, and the read step needs the input size
    size = spec.build("cpu").size
    out = Path(out).resolve()
    (out / "maps").mkdir(parents=True, exist_ok=True)
    with ray_session(address) as ray:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        gpus = (1.0 if gpus_per_actor is None else gpus_per_actor) if cluster_has_gpus(ray) else 0.0
        ds = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(paths)])
        ds = ds.map_batches(_read_batch, fn_kwargs={"size": size}, batch_size=batch_size)
        ds = ds.map_batches(_Scorer, fn_constructor_args=(spec, str(out), threshold, map_range),
                            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus,
                            num_cpus=cpus_per_actor)
        rows = sorted(ds.iter_rows(), key=lambda r: int(r["index"]))
    table = pa.table({"path": [str(r["path"]) for r in rows], "score": [float(r["score"]) for r in rows],
                      "anomalous": [bool(r["anomalous"]) for r in rows], "map": [str(r["map"]) for r in rows],
                      "overlay": [str(r["overlay"]) for r in rows]})
    table = table.replace_schema_metadata({"threshold": str(threshold), "method": spec.method})
    with atomic_write(out / "scores.parquet") as f:
        pq.write_table(table, f)
    return out / "scores.parquet"
