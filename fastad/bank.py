"""Reference banks: per-category memories of normal patch features, searched exactly
(fastad's fused kernel) or approximately (faiss IVF / IVF-PQ / HNSW), on CPU or GPU,
saved to and loaded from a directory.

    bank = fastad.ReferenceBank(1024, metric="cosine", index="ivf", nlist=1024, nprobe=16)
    bank.add(features, category="bottle")          # [B, P, C]: B images of P patches
    bank.build(coreset=0.1)                         # optional k-center coreset, index training
    values, indices = bank.search(query, k=1, category="bottle")
    image_ids, patches = bank.locate(indices, category="bottle")
    bank.save("banks/mvtec"); bank = fastad.ReferenceBank.load("banks/mvtec")

Search results follow ``fastad.ops.nn_distance``: cosine distance 1 - cos, L2 distance
(not squared), or inner-product similarity (descending); missing neighbours (an
approximate index that finds fewer than k) have value +inf (-inf for "ip") and index -1.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastad._version import __version__
from fastad.ops.nn_distance import NNResult, nn_distance

__all__ = ["ReferenceBank", "BankFormatError"]

METRICS = ("cosine", "l2", "ip")
INDEXES = ("exact", "ivf", "ivfpq", "hnsw")
FORMAT_VERSION = 1
_PARAMS = {
    "exact": (),
    "ivf": ("nlist", "nprobe"),
    "ivfpq": ("nlist", "nprobe", "m", "nbits"),
    "hnsw": ("hnsw_m", "ef_search", "ef_construction"),
}
_COMMON_PARAMS = ("gpu", "shard")


class BankFormatError(ValueError):
    """A saved bank is missing, truncated, corrupt, or does not fit the request."""


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("fastad.ReferenceBank needs faiss: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


@dataclass
class _Category:
    """Rows of one category: features (until built into faiss) and where each row came from."""

    chunks: list[torch.Tensor] = field(default_factory=list)
    chunk_images: list[torch.Tensor] = field(default_factory=list)
    chunk_patches: list[torch.Tensor] = field(default_factory=list)
    image_ids: list[Hashable] = field(default_factory=list)
    features: torch.Tensor | None = None  # exact index: the stored rows (float32)
    index: Any = None  # faiss index (CPU) for the approximate kinds
    row_image: torch.Tensor | None = None  # [n] position in image_ids
    row_patch: torch.Tensor | None = None  # [n] patch position within its image
    dirty: bool = False

    @property
    def pending(self) -> int:
        return sum(c.shape[0] for c in self.chunks)

    @property
    def built(self) -> int:
        return 0 if self.row_image is None else int(self.row_image.shape[0])


class ReferenceBank:
    """Per-category normal-feature memory with exact or faiss search.

    Args:
        dim: feature width C.
        metric: "cosine", "l2" or "ip" (same values as ``fastad.ops.nn_distance``).
        index: "exact" (fastad's fused nearest-neighbour kernel on the stored rows),
            "ivf" (faiss IndexIVFFlat), "ivfpq" (faiss IndexIVFPQ) or "hnsw" (faiss IndexHNSWFlat).
        **index_params: ivf: ``nlist`` (default ~4 sqrt(n)), ``nprobe`` (default 8);
            ivfpq: also ``m`` sub-quantisers (must divide dim; default dim // 8 capped at 64)
            and ``nbits`` (default 8); hnsw: ``hnsw_m`` (32), ``ef_search`` (64),
            ``ef_construction`` (80); any kind: ``gpu`` (None = use a GPU when faiss has GPU
            support and the query is on CUDA; False = never) and ``shard`` (spread a faiss
            index over all GPUs with faiss's sharding instead of replicating it).
    """

    def __init__(self, dim: int, metric: str = "cosine", index: str = "exact", **index_params: Any) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"ReferenceBank: `dim` must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"ReferenceBank: `metric` must be one of {METRICS}, got {metric!r}")
        if index not in INDEXES:
            raise ValueError(f"ReferenceBank: `index` must be one of {INDEXES}, got {index!r}")
        allowed = _PARAMS[index] + _COMMON_PARAMS
        unknown = sorted(set(index_params) - set(allowed))
        if unknown:
            raise ValueError(f"ReferenceBank: unknown parameters {unknown} for index={index!r}; allowed: {allowed}")
        if index == "ivfpq" and "m" in index_params and dim % int(index_params["m"]):
            raise ValueError(f"ReferenceBank: ivfpq `m`={index_params['m']} must divide dim={dim}")
        self.dim = dim
        self.metric = metric
        self.index_kind = index
        self.index_params = dict(index_params)
        self._cats: dict[str, _Category] = {}
        self._device_rows: dict[tuple[str, str, str], torch.Tensor] = {}  # exact: rows on the query's device
        self._gpu_indexes: dict[str, tuple[Any, Any]] = {}  # faiss GPU index and its resources

    def _drop_caches(self, category: str) -> None:
        self._gpu_indexes.pop(category, None)
        for key in [k for k in self._device_rows if k[0] == category]:
            del self._device_rows[key]

    # ------------------------------------------------------------------ adding
    @property
    def categories(self) -> list[str]:
        return list(self._cats)

    def __len__(self) -> int:
        return sum(c.built + c.pending for c in self._cats.values())

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}: {c.built + c.pending}" for k, c in self._cats.items())
        return f"ReferenceBank(dim={self.dim}, metric={self.metric!r}, index={self.index_kind!r}, rows={{{sizes}}})"

    def add(self, features: torch.Tensor, category: str = "default",
            image_ids: Sequence[Hashable] | Hashable | None = None) -> None:
        """Add normal features: [B, P, C] (B images of P patches; ``image_ids`` one per image)
        or [n, C] (one image of n patches; ``image_ids`` a single id). Ids default to running
        integers per category. Call :meth:`build` before searching."""
        if not isinstance(features, torch.Tensor):
            features = torch.as_tensor(np.asarray(features))
        if features.dim() not in (2, 3) or features.shape[-1] != self.dim:
            raise ValueError(f"ReferenceBank.add: `features` must be [n, {self.dim}] or [B, P, {self.dim}], "
                             f"got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"ReferenceBank.add: `features` must be floating point, got {features.dtype}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("ReferenceBank.add: `features` contains NaN or infinite values")
        if not isinstance(category, str) or not category:
            raise ValueError(f"ReferenceBank.add: `category` must be a non-empty string, got {category!r}")
        feats = features.detach().to("cpu", torch.float32)
        if feats.dim() == 2:
            feats = feats[None]
            ids = [image_ids] if image_ids is not None else None
        else:
            ids = list(image_ids) if image_ids is not None else None
        B, P, _ = feats.shape
        cat = self._cats.setdefault(category, _Category())
        if ids is None:
            start = len(cat.image_ids)
            ids = list(range(start, start + B))
        if len(ids) != B:
            raise ValueError(f"ReferenceBank.add: {B} images but {len(ids)} image_ids")
        for i in ids:
            if not isinstance(i, (int, str)):
                raise TypeError(f"ReferenceBank.add: image ids must be int or str (saved as JSON), got {i!r}")
        first = len(cat.image_ids)
        cat.image_ids.extend(ids)
        cat.chunks.append(feats.reshape(B * P, self.dim).contiguous())
        cat.chunk_images.append(torch.arange(first, first + B).repeat_interleave(P))
        cat.chunk_patches.append(torch.arange(P).repeat(B))
        cat.dirty = True
        self._drop_caches(category)

    # ------------------------------------------------------------------ building
    def build(self, coreset: float | int | None = None, progress: bool = True, seed: int = 0) -> "ReferenceBank":
        """Make every category searchable: optional k-center-greedy coreset (a ratio in (0, 1]
        or a row count, through ``fastad.ops.kcenter_greedy``), then index training and adding
        for the faiss kinds. Only categories with new rows are rebuilt (a coreset applies to all
        rows of the category, old and new)."""
        if coreset is not None:
            if isinstance(coreset, bool) or not isinstance(coreset, (int, float)) or coreset <= 0 or (
                    isinstance(coreset, float) and coreset > 1):
                raise ValueError(f"ReferenceBank.build: `coreset` must be a ratio in (0, 1] or a positive "
                                 f"row count, got {coreset!r}")
        todo = [name for name, c in self._cats.items() if c.dirty]
        for name in tqdm(todo, desc="building bank", disable=not progress or not todo, unit="category"):
            self._build_category(name, self._cats[name], coreset, progress, seed)
        return self

    def _build_category(self, name: str, cat: _Category, coreset: float | int | None, progress: bool,
                        seed: int) -> None:
        feats = torch.cat(cat.chunks)
        imgs, pats = torch.cat(cat.chunk_images), torch.cat(cat.chunk_patches)
        if cat.built:
            if self.index_kind != "exact":
                if coreset is not None:
                    raise ValueError(f"ReferenceBank.build: category {name!r} is already in a {self.index_kind!r} "
                                     f"index, which keeps no exact rows to select a coreset from; build the "
                                     f"coreset before the first build() or use a new bank")
                # a trained faiss index takes more rows as they are
                cat.index.add(self._faiss_rows(feats))
                cat.row_image, cat.row_patch = torch.cat([cat.row_image, imgs]), torch.cat([cat.row_patch, pats])
                self._clear_pending(name, cat)
                return
            feats = torch.cat([cat.features, feats])
            imgs, pats = torch.cat([cat.row_image, imgs]), torch.cat([cat.row_patch, pats])
        if coreset is not None:
            n = feats.shape[0]
            count = max(1, int(round(coreset * n))) if isinstance(coreset, float) else min(int(coreset), n)
            if count < n:
                from fastad.ops import kcenter_greedy

                metric = "cosine" if self.metric == "cosine" else "l2"
                sel = kcenter_greedy(feats, count, metric=metric, seed=seed, progress=progress).indices
                sel = sel.sort().values  # keep the original row order
                feats, imgs, pats = feats[sel], imgs[sel], pats[sel]
        if self.index_kind == "exact":
            cat.features = feats.contiguous()
        else:
            cat.index = self._make_faiss_index(feats.shape[0], name)
            x = self._faiss_rows(feats)
            cat.index.train(x)
            cat.index.add(x)
        cat.row_image, cat.row_patch = imgs, pats
        self._clear_pending(name, cat)

    def _clear_pending(self, name: str, cat: _Category) -> None:
        cat.chunks.clear()
        cat.chunk_images.clear()
        cat.chunk_patches.clear()
        cat.dirty = False
        self._drop_caches(name)

    def _faiss_rows(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach().to("cpu", torch.float32)
        if self.metric == "cosine":
            x = F.normalize(x, dim=-1, eps=1e-12)
        return np.ascontiguousarray(x.numpy())

    def _make_faiss_index(self, n: int, name: str):
        faiss = _faiss()
        p = self.index_params
        mt = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.index_kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, int(p.get("hnsw_m", 32)), mt)
            index.hnsw.efConstruction = int(p.get("ef_construction", 80))
            index.hnsw.efSearch = int(p.get("ef_search", 64))
            return index
        nlist = int(p.get("nlist", max(1, min(int(4 * n ** 0.5), n // 39 or 1))))
        if n < nlist:
            raise ValueError(f"ReferenceBank.build: category {name!r} has {n} rows, fewer than nlist={nlist} "
                             f"IVF lists; add more rows or lower nlist")
        quantizer = faiss.IndexFlatL2(self.dim) if mt == faiss.METRIC_L2 else faiss.IndexFlatIP(self.dim)
        if self.index_kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, mt)
        else:
            m = int(p.get("m", self._default_pq_m()))
            nbits = int(p.get("nbits", 8))
            if n < 2 ** nbits:
                raise ValueError(f"ReferenceBank.build: category {name!r} has {n} rows; IVF-PQ with nbits={nbits} "
                                 f"needs at least {2 ** nbits} training rows")
            index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, m, nbits, mt)
        index.nprobe = int(p.get("nprobe", 8))
        return index

    def _default_pq_m(self) -> int:
        for m in range(min(64, max(1, self.dim // 8)), 0, -1):
            if self.dim % m == 0:
                return m
        return 1

    @staticmethod
    def _stored_features_of(index) -> torch.Tensor:
        """Rows of a faiss flat index (exact banks are saved as IndexFlat files)."""
        faiss = _faiss()
        codes = faiss.vector_to_array(index.codes).view(np.float32)
        return torch.from_numpy(codes.reshape(index.ntotal, index.d).copy())

    # ------------------------------------------------------------------ search
    def _category(self, category: str) -> _Category:
        cat = self._cats.get(category)
        if cat is None:
            raise KeyError(f"ReferenceBank: no category {category!r}; categories: {self.categories}")
        if cat.dirty:
            raise RuntimeError(f"ReferenceBank: category {category!r} has rows added since the last build(); "
                               f"call bank.build() before searching")
        return cat

    def search(self, query: torch.Tensor, k: int = 1, category: str = "default") -> NNResult:
        """k nearest stored rows of every query row: query [N, C] or [B, N, C] -> NNResult
        (values, indices) [..., N, k], in the convention of ``fastad.ops.nn_distance``.
        Indices are row numbers of the category; :meth:`locate` maps them to (image id, patch)."""
        cat = self._category(category)
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"ReferenceBank.search: `query` must be a torch.Tensor, got {type(query).__name__}")
        if query.dim() not in (2, 3) or query.shape[-1] != self.dim:
            raise ValueError(f"ReferenceBank.search: `query` must be [N, {self.dim}] or [B, N, {self.dim}], "
                             f"got shape {tuple(query.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > cat.built:
            raise ValueError(f"ReferenceBank.search: `k` must be in [1, {cat.built}] for category {category!r}, "
                             f"got {k!r}")
        if self.index_kind == "exact":
            feats = cat.features
            if feats.device != query.device or feats.dtype != query.dtype:
                key = (category, str(query.device), str(query.dtype))
                feats = self._device_rows.get(key)
                if feats is None:
                    feats = self._device_rows[key] = cat.features.to(query.device, query.dtype)
            return nn_distance(query, feats, k=k, metric=self.metric)
        return self._faiss_search(category, cat, query, k)

    def _search_index(self, category: str, cat: _Category, on_cuda: bool):
        faiss = _faiss()
        use_gpu = self.index_params.get("gpu")
        if on_cuda and use_gpu is not False and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            cached = self._gpu_indexes.get(category)
            if cached is None:
                if self.index_params.get("shard") and faiss.get_num_gpus() > 1:
                    co = faiss.GpuMultipleClonerOptions()
                    co.shard = True  # faiss's own sharding (IndexShards) over every GPU
                    cached = (faiss.index_cpu_to_all_gpus(cat.index, co), None)
                else:
                    res = faiss.StandardGpuResources()
                    cached = (faiss.index_cpu_to_gpu(res, torch.cuda.current_device(), cat.index), res)
                self._gpu_indexes[category] = cached
            return cached[0]
        if use_gpu is True:
            raise RuntimeError("ReferenceBank: gpu=True but faiss has no GPU support here (install faiss-gpu) "
                               "or the query is not on a CUDA device")
        return cat.index

    def _faiss_search(self, category: str, cat: _Category, query: torch.Tensor, k: int) -> NNResult:
        q3 = query[None] if query.dim() == 2 else query
        B, N, _ = q3.shape
        index = self._search_index(category, cat, query.is_cuda)
        x = self._faiss_rows(q3.reshape(B * N, self.dim))
        dist, idx = index.search(x, k)
        values = torch.from_numpy(dist).float()
        indices = torch.from_numpy(idx).long()
        missing = indices < 0
        if self.metric == "cosine":
            values = 1.0 - values
        elif self.metric == "l2":
            values = values.clamp_min(0).sqrt()
        values = values.masked_fill(missing, float("-inf") if self.metric == "ip" else float("inf"))
        values = values.reshape(B, N, k).to(query.device)
        indices = indices.reshape(B, N, k).to(query.device)
        if query.dim() == 2:
            values, indices = values[0], indices[0]
        return NNResult(values, indices)

    def locate(self, indices: torch.Tensor, category: str = "default") -> tuple[list, torch.Tensor]:
        """Map row indices (any shape, -1 = none) to (image ids as a nested list, patch positions
        as a tensor of the same shape; -1 where the index is -1)."""
        cat = self._category(category)
        idx = torch.as_tensor(indices).cpu()
        if idx.numel() and (int(idx.max()) >= cat.built or int(idx.min()) < -1):
            raise IndexError(f"ReferenceBank.locate: indices must be in [-1, {cat.built}), got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        safe = idx.clamp_min(0)
        patches = cat.row_patch[safe].masked_fill(idx < 0, -1)
        img_pos = cat.row_image[safe].masked_fill(idx < 0, -1)
        ids = np.array(cat.image_ids + [None], dtype=object)[img_pos.numpy()]
        return ids.tolist(), patches

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the bank to directory ``path`` atomically: everything goes to a temporary
        sibling directory first, which then replaces ``path`` in one rename."""
        faiss = _faiss()
        dirty = [n for n, c in self._cats.items() if c.dirty]
        if dirty:
            raise RuntimeError(f"ReferenceBank.save: categories {dirty} have rows added since the last build(); "
                               f"call bank.build() first")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            cats_meta = []
            for i, (name, cat) in enumerate(self._cats.items()):
                index = cat.index
                if self.index_kind == "exact":
                    index = faiss.IndexFlatL2(self.dim)
                    index.add(np.ascontiguousarray(cat.features.numpy()))
                index_file, rows_file = f"{i}.faiss", f"{i}.rows.npz"
                faiss.write_index(index, str(tmp / index_file))
                with open(tmp / rows_file, "wb") as f:
                    np.savez(f, row_image=cat.row_image.numpy(), row_patch=cat.row_patch.numpy())
                cats_meta.append({"name": name, "rows": cat.built, "image_ids": cat.image_ids,
                                  "index_file": index_file, "rows_file": rows_file,
                                  "checksums": {f: _digest(tmp / f) for f in (index_file, rows_file)}})
            meta = {"format": FORMAT_VERSION, "fastad_version": __version__, "dim": self.dim, "metric": self.metric,
                    "index": self.index_kind,
                    "index_params": {k: v for k, v in self.index_params.items() if k not in _COMMON_PARAMS},
                    "categories": cats_meta}
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, dim: int | None = None, **index_params: Any) -> "ReferenceBank":
        """Read a bank written by :meth:`save`, checking the format version, file sizes and
        checksums, and (when given) the expected ``dim``. ``index_params`` may override
        search-time settings such as ``nprobe`` or ``gpu``."""
        faiss = _faiss()
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise BankFormatError(f"ReferenceBank.load: {meta_file} not found (not a saved bank)")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankFormatError(f"ReferenceBank.load: {meta_file} is corrupt ({exc})") from exc
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != FORMAT_VERSION:
            raise BankFormatError(f"ReferenceBank.load: {path} has format {fmt!r} (written by fastad "
                                  f"{meta.get('fastad_version')}); this fastad {__version__} reads format "
                                  f"{FORMAT_VERSION}")
        try:
            return cls._from_meta(path, meta, dim, index_params)
        except (KeyError, TypeError, AttributeError) as exc:
            raise BankFormatError(f"ReferenceBank.load: {meta_file} is incomplete or malformed ({exc!r})") from exc

    @classmethod
    def _from_meta(cls, path: Path, meta: dict, dim: int | None, index_params: dict) -> "ReferenceBank":
        faiss = _faiss()
        if dim is not None and meta["dim"] != dim:
            raise BankFormatError(f"ReferenceBank.load: {path} holds dim={meta['dim']} features, expected dim={dim}")
        params = {**meta.get("index_params", {}), **index_params}
        bank = cls(meta["dim"], metric=meta["metric"], index=meta["index"], **params)
        for cm in meta["categories"]:
            for fname, want in cm["checksums"].items():
                f = path / fname
                if not f.is_file():
                    raise BankFormatError(f"ReferenceBank.load: {f} is missing (category {cm['name']!r})")
                got = _digest(f)
                if got["bytes"] != want["bytes"]:
                    raise BankFormatError(f"ReferenceBank.load: {f} is truncated or padded: {got['bytes']} bytes, "
                                          f"expected {want['bytes']}")
                if got["sha256"] != want["sha256"]:
                    raise BankFormatError(f"ReferenceBank.load: {f} is corrupt (sha256 mismatch)")
            index = faiss.read_index(str(path / cm["index_file"]))
            if index.d != meta["dim"] or index.ntotal != cm["rows"]:
                raise BankFormatError(f"ReferenceBank.load: index of category {cm['name']!r} has d={index.d}, "
                                      f"{index.ntotal} rows; meta says d={meta['dim']}, {cm['rows']} rows")
            rows = np.load(path / cm["rows_file"])
            cat = _Category(image_ids=list(cm["image_ids"]))
            cat.row_image = torch.from_numpy(rows["row_image"])
            cat.row_patch = torch.from_numpy(rows["row_patch"])
            if cat.row_image.shape[0] != cm["rows"]:
                raise BankFormatError(f"ReferenceBank.load: row map of category {cm['name']!r} has "
                                      f"{cat.row_image.shape[0]} rows, expected {cm['rows']}")
            if bank.index_kind == "exact":
                cat.features = cls._stored_features_of(index)
            else:
                if "nprobe" in params and hasattr(index, "nprobe"):
                    index.nprobe = int(params["nprobe"])
                if "ef_search" in params and hasattr(index, "hnsw"):
                    index.hnsw.efSearch = int(params["ef_search"])
                cat.index = index
            bank._cats[cm["name"]] = cat
        return bank


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
