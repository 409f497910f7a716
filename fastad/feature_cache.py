"""On-disk cache of frozen-backbone outputs, one entry per image.

The four methods' backbones are frozen, so training epochs, evaluation jobs that differ
only in shots or seed, and repeated scoring runs can encode each image once::

    cache = FeatureCache("~/.cache/fastad/features", key={"backbone": "ViT-L-14-336.pt",
                                                         "image_size": 518, "layers": [6, 12, 18, 24]})
    feats = cache.encode(model.encode, images)        # same result as model.encode(images)

Entries are keyed by ``key`` (a JSON-able description of what produced them: weights,
image size, layers, augmentation seed, ...) and by the image tensor's bytes (or
caller-given ids), written atomically and read back memory-mapped. Supported outputs: a
tensor with a leading batch dimension, or ``fastad.models.clip_backbone.ImageFeatures``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from fastad._io import atomic_write

__all__ = ["FeatureCache", "cache_key_digest", "weights_digest"]


def cache_key_digest(key: Mapping[str, Any]) -> str:
    """A stable short digest of a JSON-able mapping."""
    try:
        text = json.dumps(key, sort_keys=True, default=str)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"FeatureCache: key must be JSON-able, got {key!r} ({exc})") from exc
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _hash_tensor(h: Any, t: torch.Tensor, name: str = "") -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, dtypes, shapes, bytes), for
    ``key``: it tells random initialisations and different checkpoints apart."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        _hash_tensor(h, t, name)
    return h.hexdigest()[:20]


def _image_digest(image: torch.Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, image)
    return h.hexdigest()[:32]


def _split(out: Any, n: int) -> list[dict[str, Any]]:
    """Per-image dicts of tensors (batch dimension removed) from a batched output."""
    from fastad.models.clip_backbone import ImageFeatures

    if isinstance(out, torch.Tensor):
        return [{"kind": "tensor", "x": out[i].detach().cpu().clone()} for i in range(n)]
    if isinstance(out, ImageFeatures):
        return [{"kind": "features", "grid": list(out.grid), "embeds": out.embeds[i].detach().cpu().clone(),
                 "tokens": [t[i].detach().cpu().clone() for t in out.tokens]} for i in range(n)]
    raise TypeError(f"FeatureCache: the encoder returned {type(out).__name__}; "
                    "expected a tensor or ImageFeatures")


def _stack(items: list[dict[str, Any]], device: torch.device | None) -> Any:
    from fastad.models.clip_backbone import ImageFeatures

    kind = items[0]["kind"]
    if device is None:
        device = torch.device("cpu")
    if kind == "tensor":
        return torch.stack([it["x"] for it in items]).to(device)
    tokens = [torch.stack([it["tokens"][j] for it in items]).to(device) for j in range(len(items[0]["tokens"]))]
    return ImageFeatures(torch.stack([it["embeds"] for it in items]).to(device), tokens, tuple(items[0]["grid"]))


class FeatureCache:
    """Per-image cache of an encoder's outputs under ``root/<digest of key>/``.

    Args:
        root: cache folder (created on first write).
        key: what produced the features (backbone weights path or hash, image size,
            layers, preprocessing / augmentation seed); entries under another key are
            never returned.
    """

    def __init__(self, root: str | os.PathLike, key: Mapping[str, Any]):
        self.key = dict(key)
        self.dir = Path(root).expanduser() / cache_key_digest(self.key)
        self.hits = 0
        self.misses = 0

    def _file(self, ident: str) -> Path:
        return self.dir / ident[:2] / f"{ident}.pt"

    @staticmethod
    def _ident(ident: str) -> str:
        return hashlib.sha256(str(ident).encode()).hexdigest()[:32]

    def _read(self, ident: str) -> dict[str, Any] | None:
        try:
            return torch.load(self._file(ident), mmap=True, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            return None  # absent, or unreadable: recompute and rewrite

    def contains(self, ident: str) -> bool:
        """Whether the image called ``ident`` in :meth:`encode` has an entry."""
        return self._file(self._ident(ident)).is_file()

    def load(self, ids: Sequence[str], device: torch.device | str | None = None) -> Any:
        """The cached outputs of the images called ``ids`` in :meth:`encode`, stacked, without
        an encoder (memory-mapped reads). Raises KeyError naming the first id not cached."""
        items = []
        for i in ids:
            item = self._read(self._ident(i))
            if item is None:
                raise KeyError(f"FeatureCache: {i!r} is not cached in {self.dir}")
            items.append(item)
        self.hits += len(items)
        return _stack(items, None if device is None else torch.device(device))

    def encode(self, encoder: Callable[[torch.Tensor], Any], images: torch.Tensor,
               ids: Sequence[str] | None = None) -> Any:
        """``encoder(images)``, computing only the images not yet in the cache.

        ``ids`` (one string per image, e.g. path + preprocessing) replace the content
        hash of each image as its cache key."""
        n = images.shape[0]
        if ids is not None and len(ids) != n:
            raise ValueError(f"FeatureCache.encode: {len(ids)} ids for {n} images")
        idents = ([self._ident(i) for i in ids] if ids is not None else [_image_digest(im) for im in images])
        items: list[dict[str, Any] | None] = [self._read(ident) for ident in idents]
        todo = [i for i, it in enumerate(items) if it is None]
        self.hits += n - len(todo)
        self.misses += len(todo)
        if not todo:
            return _stack(items, images.device)  # type: ignore[arg-type]
        if not (self.dir / "key.json").exists():  # says what the folder holds
            with atomic_write(self.dir / "key.json", "w") as fh:
                json.dump(self.key, fh, indent=1, default=str)
        out = encoder(images[todo] if len(todo) < n else images)
        for i, item in zip(todo, _split(out, len(todo))):
            with atomic_write(self._file(idents[i])) as fh:
                torch.save(item, fh)
            items[i] = item
        if len(todo) == n:
            return out
        device = out.device if isinstance(out, torch.Tensor) else out.embeds.device
        return _stack(items, device)  # type: ignore[arg-type]
