"""Readers for the MVTec AD folder layout and the VisA split-CSV layout.

MVTec AD: ``<root>/<category>/{train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png}``.
VisA: ``<root>/split_csv/1cls.csv`` with columns object, split, label, image, mask (paths
relative to ``root``), as the VisA release ships it.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPG", ".PNG")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normal images
    mask: Path | None  # None: all-normal ground truth


@dataclass(frozen=True)
class CategorySplit:
    category: str
    train: list[Path]  # normal images to draw few-shot references from
    test: list[Sample]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES)


def resolve_layout(root: str | Path, layout: str = "auto") -> str:
    """"mvtec" or "visa": ``layout``, or with "auto" "visa" when ``root/split_csv/1cls.csv`` exists."""
    if layout == "auto":
        layout = "visa" if (Path(root) / "split_csv" / "1cls.csv").is_file() else "mvtec"
    if layout not in ("mvtec", "visa"):
        raise ValueError(f"unknown layout {layout!r}; expected auto, mvtec or visa")
    return layout


def mvtec_categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def load_mvtec(root: str | Path, category: str) -> CategorySplit:
    """The train/test split of one category in the MVTec AD layout."""
    root = Path(root)
    cats = mvtec_categories(root)
    if category not in cats:
        raise ValueError(f"unknown category {category!r} in {root}; found {cats or 'none (no <category>/train/good)'}")
    base = root / category
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"{test_dir} is missing")
    test: list[Sample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for img in _images(defect_dir):
            if defect == "good":
                test.append(Sample(img, 0, defect, None))
                continue
            mask = base / "ground_truth" / defect / f"{img.stem}_mask.png"
            if not mask.is_file():
                raise FileNotFoundError(f"ground-truth mask {mask} for {img} is missing")
            test.append(Sample(img, 1, defect, mask))
    train = _images(base / "train" / "good")
    if not train:
        raise FileNotFoundError(f"{base / 'train' / 'good'} holds no images")
    if not test:
        raise FileNotFoundError(f"{test_dir} holds no images")
    return CategorySplit(category, train, test)


def load_visa(root: str | Path, category: str, split_csv: str | Path | None = None) -> CategorySplit:
    """One category of VisA from its split CSV (default ``<root>/split_csv/1cls.csv``)."""
    root = Path(root)
    csv_path = Path(split_csv) if split_csv else root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"VisA split file {csv_path} does not exist")
    train: list[Path] = []
    test: list[Sample] = []
    seen = set()
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                obj, split, label, image, mask = (row["object"], row["split"], row["label"], row["image"],
                                                  row.get("mask", ""))
            except KeyError as exc:
                raise ValueError(f"{csv_path} lacks column {exc} (want object, split, label, image, mask)") from exc
            seen.add(obj)
            if obj != category:
                continue
            img = root / image
            if not img.is_file():
                raise FileNotFoundError(f"{img} (listed in {csv_path}) does not exist")
            anomalous = label.strip().lower() not in ("normal", "good", "0")
            if split.strip().lower() == "train":
                if not anomalous:
                    train.append(img)
            else:
                m = root / mask if anomalous and mask else None
                if anomalous and (m is None or not m.is_file()):
                    raise FileNotFoundError(f"mask {m} of anomalous image {img} (listed in {csv_path}) does not exist")
                test.append(Sample(img, int(anomalous), "anomaly" if anomalous else "good", m))
    if category not in seen:
        raise ValueError(f"unknown category {category!r} in {csv_path}; found {sorted(seen)}")
    return CategorySplit(category, train, test)


def read_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """RGB image as float [3, H, W] in [0, 1], resized (bilinear, antialiased) to size x size."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def read_mask(path: str | Path | None, shape: tuple[int, int], size: int | None = None) -> torch.Tensor:
    """Binary mask [H, W] (bool). ``shape`` is the (H, W) of its original image, which the
    mask must match; with ``size`` it is resized (nearest) like the image."""
    if path is None:
        h, w = (size, size) if size is not None else shape
        return torch.zeros(h, w, dtype=torch.bool)
    try:
        with Image.open(path) as im:
            if (im.size[1], im.size[0]) != tuple(shape):
                raise ValueError(f"mask {path} is {im.size[1]}x{im.size[0]} but its image is {shape[0]}x{shape[1]}")
            im = im.convert("L")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.NEAREST)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read mask {path}: {exc}") from exc
    return torch.from_numpy(arr > 127)


def image_shape(path: str | Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
