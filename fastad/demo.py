"""``fastad demo``: few-shot and zero-shot detection end to end on the built-in synthetic
dataset with a real pretrained backbone (EfficientNet-Lite0, ImageNet weights):
patch features -> fastad nearest-neighbour residuals and self-similarity saliency ->
maps -> fastad.metrics, with the time of each stage."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastad.data.mvtec import image_shape, load_mvtec, mvtec_categories, read_image, read_mask
from fastad.data.synthetic import CATEGORIES, make_demo_dataset
from fastad.evaluate import StageMeter, choose_references, stage_table


def run_demo(data_dir: str | Path = "demo-data", shots: int = 4, seed: int = 0, image_size: int = 224,
             backend: str | None = None, progress: bool = True) -> dict:
    """Run the demo and return {"metrics": {category: {method: {...}}}, "stages": {stage: {seconds, peak_mib}}}."""
    from fastad import metrics
    from fastad.backbones import EfficientNetFeatures
    from fastad.fewshot import PatchNNDetector

    data_dir = Path(data_dir)
    timer = StageMeter()
    if not data_dir.is_dir() or not mvtec_categories(data_dir):
        with timer("make demo data"):
            make_demo_dataset(data_dir)
    with timer("load backbone"):
        detector = PatchNNDetector(EfficientNetFeatures("pretrained"), backend=backend)
    results: dict = {}
    cats = [c for c in CATEGORIES if c in mvtec_categories(data_dir)] or mvtec_categories(data_dir)
    for cat in tqdm(cats, desc="categories", disable=not progress):
        split = load_mvtec(data_dir, cat)
        with timer("read images"):
            refs = torch.stack([read_image(p, image_size) for p in choose_references(split, shots, seed, None, data_dir)])
            images = torch.stack([read_image(s.path, image_size) for s in split.test])
            masks = torch.stack([read_mask(s.mask, image_shape(s.path), image_size) for s in split.test])
            labels = torch.tensor([s.label for s in split.test])
        with timer("features (EfficientNet-Lite0)"):
            detector.fit(refs)
            feats, grid = detector.patches(images)
        out = {}
        with timer("few-shot residual (nn_distance)"):
            patch_values = {"few-shot residual": detector.residual(feats)}
        with timer("zero-shot saliency (nn_distance)"):
            patch_values["zero-shot saliency"] = detector.saliency(feats)
        for method, values in patch_values.items():
            with timer("maps (upsample + smooth)"):
                scores, maps = detector.finish(values, grid, (image_size, image_size))
            with timer("metrics (fastad.metrics)"):
                out[method] = {
                    "image AUROC": metrics.auroc(scores, labels),
                    "pixel AUROC": metrics.auroc(maps, masks),
                    "AUPRO@0.3": metrics.aupro(maps, masks),
                }
        results[cat] = out
    methods = next(iter(results.values())).keys()
    results["mean"] = {m: {k: sum(results[c][m][k] for c in cats) / len(cats) for k in results[cats[0]][m]}
                       for m in methods}
    return {"metrics": results, "stages": timer.report(), "shots": shots, "categories": cats}


def format_report(report: dict) -> str:
    lines = [f"fastad demo: {report['shots']}-shot, EfficientNet-Lite0 (ImageNet) features, "
             f"synthetic MVTec-layout data from scikit-image textures", "",
             "| category | method | image AUROC | pixel AUROC | AUPRO@0.3 |", "|---|---|---:|---:|---:|"]
    for cat, per_method in report["metrics"].items():
        for method, m in per_method.items():
            lines.append(f"| {cat} | {method} | {m['image AUROC']:.3f} | {m['pixel AUROC']:.3f} | "
                         f"{m['AUPRO@0.3']:.3f} |")
    lines += [""] + stage_table(report["stages"])
    return "\n".join(lines)
