"""A small synthetic anomaly-detection dataset in the MVTec AD layout, built from the
real photos and textures that scikit-image ships, with drawn defects and exact masks.

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png

Normal images are random crops (with flips and right-angle rotations) of one texture:
train crops come from the top half of the source, test crops from the bottom half.
Defects: "scratch" (a thin curved stroke), "hole" (a dark ellipse with a soft rim
inside the mask), "stain" (a tinted blob). The mask is exactly the set of changed pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

DEFECTS = ("scratch", "hole", "stain")


def _texture(name: str) -> np.ndarray:
    import skimage.data as sd

    img = {"brick": sd.brick, "grass": sd.grass, "gravel": sd.gravel,
           "tissue": sd.immunohistochemistry}[name]()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].astype(np.uint8)


CATEGORIES = ("brick", "grass", "gravel", "tissue")


def _crop(src: np.ndarray, size: int, rng: np.random.Generator, top_half: bool) -> np.ndarray:
    h, w, _ = src.shape
    half = h // 2
    y0 = rng.integers(0, half - size + 1) if top_half else rng.integers(half, h - size + 1)
    x0 = rng.integers(0, w - size + 1)
    out = src[y0:y0 + size, x0:x0 + size]
    out = np.rot90(out, rng.integers(0, 4))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    mask = np.zeros(img.shape[:2], bool)
    p0, p1, p2 = (rng.uniform(0.15, 0.85, 2) * size for _ in range(3))
    width = rng.uniform(1.5, 3.0)
    yy, xx = np.mgrid[:size, :size]
    for t in np.linspace(0, 1, 4 * size):  # quadratic Bezier stroke
        c = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        r = width
        y0, y1 = int(max(0, c[0] - r - 1)), int(min(size, c[0] + r + 2))
        x0, x1 = int(max(0, c[1] - r - 1)), int(min(size, c[1] + r + 2))
        mask[y0:y1, x0:x1] |= (yy[y0:y1, x0:x1] - c[0]) ** 2 + (xx[y0:y1, x0:x1] - c[1]) ** 2 <= r * r
    color = np.array([235, 235, 225]) if rng.random() < 0.5 else np.array([25, 20, 20])
    img[mask] = color
    return mask


def _hole(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ry, rx = rng.uniform(0.04, 0.09, 2) * size
    yy, xx = np.mgrid[:size, :size]
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    mask = d <= 1.0
    shade = (15 + 50 * d[mask])[:, None]
    img[mask] = np.clip(shade + rng.normal(0, 4, (mask.sum(), 1)), 0, 255)
    return mask


def _stain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    mask = np.zeros(img.shape[:2], bool)
    for _ in range(rng.integers(3, 6)):  # union of nearby ellipses: an irregular blob
        oy, ox = rng.normal(0, 0.04 * size, 2)
        ry, rx = rng.uniform(0.03, 0.07, 2) * size
        mask |= ((yy - cy - oy) / ry) ** 2 + ((xx - cx - ox) / rx) ** 2 <= 1.0
    tint = np.array(rng.choice([[200, 60, 30], [40, 150, 40], [60, 60, 200], [180, 150, 20]]), float)
    img[mask] = np.clip(0.4 * img[mask] + 0.6 * tint, 0, 255)
    return mask


_DRAW: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "scratch": _scratch, "hole": _hole, "stain": _stain}


def make_demo_dataset(root: str | Path, categories: tuple[str, ...] = CATEGORIES, size: int = 224,
                      n_train: int = 16, n_test_good: int = 10, n_test_defect: int = 6, seed: int = 0) -> Path:
    """Write the dataset under ``root`` (existing files are overwritten) and return ``root``."""
    root = Path(root)
    for ci, cat in enumerate(categories):
        if cat not in CATEGORIES:
            raise ValueError(f"unknown demo category {cat!r}; choose from {CATEGORIES}")
        src = _texture(cat)
        rng = np.random.default_rng(seed * 1000 + ci)
        base = root / cat
        for split, count, top in (("train", n_train, True), ("test", n_test_good, False)):
            d = base / split / "good"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_crop(src, size, rng, top)).save(d / f"{i:03d}.png")
        for defect in DEFECTS:
            d, g = base / "test" / defect, base / "ground_truth" / defect
            d.mkdir(parents=True, exist_ok=True)
            g.mkdir(parents=True, exist_ok=True)
            for i in range(n_test_defect):
                img = _crop(src, size, rng, False).copy()
                mask = _DRAW[defect](img, rng)
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i:03d}.png")
                Image.fromarray((mask * 255).astype(np.uint8)).save(g / f"{i:03d}_mask.png")
    return root
