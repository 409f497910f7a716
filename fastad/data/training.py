"""Training sets for ``fastad train``: every image of the chosen categories of an MVTec AD
(or VisA split-CSV) folder, with its split, label and mask, plus the exact geometric views
(the dihedral group: right-angle rotations and flips) the protocols use as augmentations.

The views are exact on both images and masks and finite (8 per image), so the frozen
backbone's output of every view a schedule can draw is encoded once and cached.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fastad.data.mvtec import image_shape, mvtec_categories, read_image, read_mask, resolve_layout

__all__ = ["TrainImage", "TrainingSet", "load_training_set", "dihedral", "N_VIEWS", "read_view"]

N_VIEWS = 8  # rot90 by 0..3 quarter turns, each with and without a horizontal flip


@dataclass(frozen=True)
class TrainImage:
    path: Path
    category: str
    label: int  # 0 normal, 1 anomalous
    mask: Path | None  # None: all-normal ground truth
    split: str  # "train" (normal images) or "test"


@dataclass
class TrainingSet:
    """All images of ``categories`` under ``root`` (``layout`` "mvtec" or "visa")."""

    root: Path
    layout: str
    categories: list[str]
    images: list[TrainImage]

    def select(self, category: str | None = None, label: int | None = None, split: str | None = None) -> list[int]:
        """Indices of the images matching every given field."""
        return [i for i, im in enumerate(self.images)
                if (category is None or im.category == category) and (label is None or im.label == label)
                and (split is None or im.split == split)]

    def summary(self) -> dict[str, dict[str, int]]:
        """Per category: train normals, test normals, test anomalies."""
        out = {}
        for c in self.categories:
            out[c] = {"train_normal": len(self.select(c, 0, "train")), "test_normal": len(self.select(c, 0, "test")),
                      "test_anomalous": len(self.select(c, 1, "test"))}
        return out


def _visa_categories(root: Path) -> list[str]:
    with open(root / "split_csv" / "1cls.csv", newline="") as f:
        return sorted({row["object"] for row in csv.DictReader(f) if "object" in row})


def load_training_set(root: str | Path, categories: Sequence[str] | None = None, layout: str = "auto") -> TrainingSet:
    """Read the splits of ``categories`` (default: every category found). Raises
    FileNotFoundError / ValueError naming the folder, file or category at fault."""
    from fastad.evaluate import EvaluationError, load_split

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    layout = resolve_layout(root, layout)
    found = mvtec_categories(root) if layout == "mvtec" else _visa_categories(root)
    if not categories:
        if not found:
            raise FileNotFoundError(f"dataset folder {root} holds no category: expected <category>/train/good, "
                                    "<category>/test/<defect> and <category>/ground_truth/<defect> (MVTec AD layout) "
                                    "or split_csv/1cls.csv (VisA)")
        categories = found
    images: list[TrainImage] = []
    for cat in categories:
        try:
            split, _ = load_split(root, cat, layout)
        except EvaluationError as exc:
            raise ValueError(f"category {cat!r}: {exc}") from exc
        if not split.train:
            raise FileNotFoundError(f"category {cat!r} in {root} has no normal training images")
        images += [TrainImage(p, cat, 0, None, "train") for p in split.train]
        images += [TrainImage(s.path, cat, s.label, s.mask, "test") for s in split.test]
    for im in images:  # headers only: a broken file is named now, not hours into a run
        shape = image_shape(im.path)
        if im.mask is not None and image_shape(im.mask) != shape:
            raise ValueError(f"mask {im.mask} is {image_shape(im.mask)} but its image {im.path} is {shape}")
    return TrainingSet(root, layout, list(categories), images)


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0..7) of [..., H, W]: ``view % 4`` quarter turns, then a horizontal
    flip when ``view >= 4``; view 0 is the identity."""
    if not 0 <= view < N_VIEWS:
        raise ValueError(f"dihedral: view must be in 0..{N_VIEWS - 1}, got {view}")
    x = torch.rot90(x, view % 4, dims=(-2, -1))
    return x.flip(-1) if view >= 4 else x


def read_view(image: TrainImage, size: int, view: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The image [3, S, S] in [0, 1] and its mask [S, S] (float 0 / 1) under ``view``,
    read as ``fastad evaluate`` reads them (square resize; mask nearest)."""
    img = read_image(image.path, size)
    mask = read_mask(image.mask, image_shape(image.path), size).float()
    return dihedral(img, view), dihedral(mask, view)
