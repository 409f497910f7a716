"""Reference banks: per-category memories of normal patch features, searched exactly
(fastad's fused kernel) or approximately (faiss IVF / IVF-PQ / HNSW), on CPU or GPU,
saved to and loaded from a directory.

    bank = fastad.ReferenceBank(1024, metric="cosine", index="ivf", recall_target=0.95)
    bank.add(features, category="bottle")          # [B, P, C]: B images of P patches
    bank.build(coreset=0.1)                         # optional k-center coreset, index training
    values, indices = bank.search(query, k=1, category="bottle")
    image_ids, patches = bank.locate(indices, category="bottle")
    bank.save("banks/mvtec"); bank = fastad.ReferenceBank.load("banks/mvtec")

Search results follow ``fastad.ops.nn_distance``: cosine distance 1 - cos, L2 distance
(not squared), or inner-product similarity (descending), as float32 (the bank's precision,
whatever the query's dtype); missing neighbours (an approximate index that finds fewer
than k) have value +inf (-inf for "ip") and index -1. A query holding NaN or +-inf raises
``ValueError`` for every index kind.

On disk a bank is a folder holding version folders (``v-*``) and a pointer file
``CURRENT`` naming the complete one; :meth:`ReferenceBank.save` writes a new version and
switches the pointer with one atomic rename, so a reader always loads a complete old or
new bank, and concurrent savers take turns (a lock file).
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fastad._checks import describe
from fastad._io import atomic_write, file_sha256, fsync_dir
from fastad._version import __version__
from fastad.ops.nn_distance import NNResult, nn_distance

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; saves and loads are not coordinated
    fcntl = None

__all__ = ["ReferenceBank", "BankFormatError"]

METRICS = ("cosine", "l2", "ip")
INDEXES = ("exact", "ivf", "ivfpq", "hnsw")
FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)  # 1: the files directly in the bank folder, no pointer
_PARAMS = {
    "exact": (),
    "ivf": ("nlist", "nprobe", "recall_target"),
    "ivfpq": ("nlist", "nprobe", "m", "nbits", "refine", "recall_target"),
    "hnsw": ("hnsw_m", "ef_search", "ef_construction", "recall_target"),
}
_COMMON_PARAMS = ("gpu", "shard")
_SEARCH_PARAMS = ("nprobe", "ef_search", "refine") + _COMMON_PARAMS  # what load() may change
_INT_MAX = 2**31 - 1
# integer parameters: (lowest, highest) accepted value; faiss aborts or overflows outside
_INT_RANGES = {
    "nlist": (1, _INT_MAX), "nprobe": (1, _INT_MAX), "m": (1, _INT_MAX), "nbits": (1, 16),
    "refine": (0, 4096), "hnsw_m": (2, 1024), "ef_search": (1, _INT_MAX), "ef_construction": (1, _INT_MAX),
}
# defaults that keep recall@1 >= 0.95 on clustered data (benchmarks/bench_bank.py)
DEFAULT_NPROBE = 32
DEFAULT_REFINE = 256
DEFAULT_HNSW = dict(hnsw_m=32, ef_search=128, ef_construction=80)
_TUNED = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "ef_search"}  # what recall_target tunes
_RECALL_SAMPLE = 1000  # most held-out rows used to measure recall at build time
_CURRENT = "CURRENT"
_LOCK = ".lock"


class BankFormatError(ValueError):
    """A saved bank is missing, truncated, corrupt, or does not fit the request."""


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("fastad.ReferenceBank needs faiss: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


def _check_params(dim: int, index: str, params: dict) -> None:
    """Every index parameter in range before faiss sees it (faiss aborts, overflows or
    divides by zero on some out-of-range values)."""
    allowed = _PARAMS[index] + _COMMON_PARAMS
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"ReferenceBank: unknown parameters {unknown} for index={index!r}; allowed: {allowed}")
    for name, value in params.items():
        if name in _INT_RANGES:
            lo, hi = _INT_RANGES[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
                raise ValueError(f"ReferenceBank: `{name}` must be an integer in [{lo}, {hi}], got {value!r}")
        elif name == "recall_target":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
                raise ValueError(f"ReferenceBank: `recall_target` must be a number in (0, 1], got {value!r}")
        elif name == "gpu":
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"ReferenceBank: `gpu` must be None, True or False, got {value!r}")
        elif name == "shard" and not isinstance(value, bool):
            raise ValueError(f"ReferenceBank: `shard` must be True or False, got {value!r}")
    if "m" in params and dim % params["m"]:
        raise ValueError(f"ReferenceBank: ivfpq `m`={params['m']} must divide dim={dim}")


def _require_finite(where: str, name: str, t: torch.Tensor, rows: np.ndarray | None = None) -> None:
    """NaN / inf in ``t`` raise; ``rows`` (``t`` as faiss gets it) is checked instead when given,
    with numpy: a torch op right before a faiss search costs as much as the search (both
    OpenMP pools spin on the same cores)."""
    finite = np.isfinite(rows).all() if rows is not None else torch.isfinite(t).all()
    if t.numel() and not bool(finite):
        raise ValueError(f"ReferenceBank.{where}: `{name}` contains NaN or infinite values ({describe(t)})")


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
    recall: dict | None = None  # recall@1 measured at build time (recall_target)
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
            "ivf" (faiss IndexIVFFlat), "ivfpq" (faiss IndexIVFPQ, re-ranked exactly over
            the kept rows) or "hnsw" (faiss IndexHNSWFlat).
        **index_params: ivf: ``nlist`` (default ~4 sqrt(n)), ``nprobe`` (default 32);
            ivfpq: also ``m`` sub-quantisers (must divide dim; default dim // 4 capped at 64),
            ``nbits`` (default 8) and ``refine`` (default 256: keep the exact rows and
            re-rank ``refine * k`` PQ candidates exactly with faiss IndexRefineFlat; 0 keeps
            only the PQ codes, with PQ-approximate values and a much lower recall);
            hnsw: ``hnsw_m`` (32), ``ef_search`` (128), ``ef_construction`` (80).
            The defaults reach recall@1 >= 0.95 on clustered data (benchmarks/bench_bank.py).
            ``recall_target`` (ivf, ivfpq, hnsw): at :meth:`build`, hold out up to 1,000
            sampled rows of each category, build on the rest, double ``nprobe`` /
            ``ef_search`` from 1 / 16 until recall@1 of the held-out rows reaches the
            target plus a one-sided 95 % sampling margin, then add them; the measured recall is kept per category
            (:attr:`recall`, ``repr``, the saved metadata). The held-out rows then come
            last in the category's row order (:meth:`locate` maps rows to images as always).
            Any kind: ``gpu`` (None = use a GPU when faiss has GPU support and the query is
            on CUDA; False = never) and ``shard`` (spread a faiss index over all GPUs with
            faiss's sharding instead of replicating it).
    """

    def __init__(self, dim: int, metric: str = "cosine", index: str = "exact", **index_params: Any) -> None:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not 1 <= dim <= _INT_MAX:
            raise ValueError(f"ReferenceBank: `dim` must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"ReferenceBank: `metric` must be one of {METRICS}, got {metric!r}")
        if index not in INDEXES:
            raise ValueError(f"ReferenceBank: `index` must be one of {INDEXES}, got {index!r}")
        dim = int(dim)
        _check_params(dim, index, index_params)
        self.dim = dim
        self.metric = metric
        self.index_kind = index
        self.index_params = dict(index_params)
        self._cats: dict[str, _Category] = {}
        self._device_rows: dict[tuple[str, str], torch.Tensor] = {}  # exact: rows on the query's device
        self._gpu_indexes: dict[str, tuple[Any, Any]] = {}  # faiss GPU index and its resources

    def _drop_caches(self, category: str) -> None:
        self._gpu_indexes.pop(category, None)
        for key in [k for k in self._device_rows if k[0] == category]:
            del self._device_rows[key]

    # ------------------------------------------------------------------ adding
    @property
    def categories(self) -> list[str]:
        return list(self._cats)

    @property
    def recall(self) -> dict[str, dict]:
        """Per category: recall@1 measured on held-out rows at build time (``recall_target``),
        the sample size and the tuned setting; empty without ``recall_target``."""
        return {k: dict(c.recall) for k, c in self._cats.items() if c.recall is not None}

    def __len__(self) -> int:
        return sum(c.built + c.pending for c in self._cats.values())

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}: {c.built + c.pending}" for k, c in self._cats.items())
        text = f"ReferenceBank(dim={self.dim}, metric={self.metric!r}, index={self.index_kind!r}, rows={{{sizes}}}"
        if self.recall:
            measured = ", ".join(f"{k}: {r['recall_at_1']:.3f} at {r['param']}={r['value']}"
                                 for k, r in self.recall.items())
            text += f", recall@1={{{measured}}}"
        return text + ")"

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
        _require_finite("add", "features", features)
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
        for the faiss kinds (and the recall tuning of ``recall_target``). Only categories with
        new rows are rebuilt (a coreset applies to all rows of the category, old and new)."""
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
        elif "recall_target" in self.index_params:
            order = self._build_tuned(name, cat, feats, seed)
            feats, imgs, pats = feats[order], imgs[order], pats[order]
        else:
            cat.index = self._make_faiss_index(feats.shape[0], name)
            x = self._faiss_rows(feats)
            cat.index.train(x)
            cat.index.add(x)
        cat.row_image, cat.row_patch = imgs, pats
        self._clear_pending(name, cat)

    def _build_tuned(self, name: str, cat: _Category, feats: torch.Tensor, seed: int) -> torch.Tensor:
        """Build on all rows but a held-out sample, tune nprobe / ef_search until recall@1 of
        the sample reaches ``recall_target``, add the sample. Returns the new row order."""
        n = feats.shape[0]
        s = min(_RECALL_SAMPLE, n // 10)
        if s < 10:
            raise ValueError(f"ReferenceBank.build: `recall_target` needs at least 100 rows per category to "
                             f"measure recall on a held-out sample; category {name!r} has {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        order = torch.cat([perm[s:].sort().values, perm[:s].sort().values])
        kept, held = feats[order[:-s]], feats[order[-s:]]
        index = self._make_faiss_index(n - s, name)
        x = self._faiss_rows(kept)
        index.train(x)
        index.add(x)
        truth = nn_distance(held, kept, k=1, metric=self.metric).indices[:, 0]
        q = self._faiss_rows(held)
        param = _TUNED[self.index_kind]
        target = float(self.index_params["recall_target"])
        if param == "nprobe":
            nlist = _ivf(index).nlist
            values = sorted({min(2**i, nlist) for i in range(32) if 2 ** (i - 1) < nlist})
        else:
            values = [16 * 2**i for i in range(9)]  # 16 ... 4096
        # the sample's recall must clear the target by a one-sided 95 % sampling margin, so
        # that fresh queries reach the target too
        needed = min(1.0, target + 1.645 * math.sqrt(target * (1 - target) / s))
        measured = []
        for value in values:
            _set_search_param(index, param, value)
            found = torch.from_numpy(index.search(q, 1)[1][:, 0]).long()
            # a duplicate of the true neighbour is as near: count it as found
            hit = (found == truth) | ((found >= 0) & (kept[found.clamp_min(0)] == kept[truth]).all(dim=1))
            measured.append(float(hit.float().mean()))
            if measured[-1] >= needed:
                break
        best = len(measured) - 1
        if measured[-1] < needed:
            best = next(i for i, r in enumerate(measured) if r >= max(measured) - 0.005)
            warnings.warn(f"ReferenceBank.build: category {name!r} reaches recall@1 {measured[best]:.3f} at "
                          f"{param}={values[best]}, below recall_target={target}; using that setting",
                          RuntimeWarning, stacklevel=4)
        _set_search_param(index, param, values[best])
        index.add(q)
        cat.index = index
        cat.recall = {"recall_at_1": measured[best], "sample": s, "target": target, "param": param,
                      "value": values[best]}
        return order

    def _clear_pending(self, name: str, cat: _Category) -> None:
        cat.chunks.clear()
        cat.chunk_images.clear()
        cat.chunk_patches.clear()
        cat.dirty = False
        self._drop_caches(name)

    def _faiss_rows(self, x: torch.Tensor) -> np.ndarray:
        rows = np.array(x.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, order="C", copy=True)
        if self.metric == "cosine":
            _faiss().normalize_L2(rows)  # not torch's: see _require_finite
        return rows

    def _make_faiss_index(self, n: int, name: str):
        faiss = _faiss()
        p = self.index_params
        mt = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.index_kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, int(p.get("hnsw_m", DEFAULT_HNSW["hnsw_m"])), mt)
            index.hnsw.efConstruction = int(p.get("ef_construction", DEFAULT_HNSW["ef_construction"]))
            index.hnsw.efSearch = int(p.get("ef_search", DEFAULT_HNSW["ef_search"]))
            return index
        nlist = int(p.get("nlist", max(1, min(int(4 * n ** 0.5), n // 39 or 1))))
        if n < nlist:
            raise ValueError(f"ReferenceBank.build: category {name!r} has {n} rows, fewer than `nlist`={nlist} "
                             f"IVF lists; add more rows or lower nlist")
        quantizer = faiss.IndexFlatL2(self.dim) if mt == faiss.METRIC_L2 else faiss.IndexFlatIP(self.dim)
        nprobe = int(p.get("nprobe", DEFAULT_NPROBE))
        if self.index_kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, mt)
            index.nprobe = nprobe
            return index
        m = int(p.get("m", self._default_pq_m()))
        nbits = int(p.get("nbits", 8))
        if n < 2 ** nbits:
            raise ValueError(f"ReferenceBank.build: category {name!r} has {n} rows; IVF-PQ with `nbits`={nbits} "
                             f"needs at least {2 ** nbits} training rows")
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, m, nbits, mt)
        index.nprobe = nprobe
        refine = int(p.get("refine", DEFAULT_REFINE))
        if refine:
            index = faiss.IndexRefineFlat(index)
            index.k_factor = float(refine)
        return index

    def _default_pq_m(self) -> int:
        for m in range(min(64, max(1, self.dim // 4)), 0, -1):
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
    def _category(self, category: str | None) -> tuple[str, _Category]:
        if category is None:
            if not self._cats:
                raise KeyError("ReferenceBank: the bank is empty; add() rows and build() first")
            if len(self._cats) != 1:
                raise ValueError(f"ReferenceBank: `category` is required for a bank of {len(self._cats)} "
                                 f"categories: {self.categories}")
            category = next(iter(self._cats))
        cat = self._cats.get(category)
        if cat is None:
            raise KeyError(f"ReferenceBank: no category {category!r}; categories: {self.categories}")
        if cat.dirty:
            raise RuntimeError(f"ReferenceBank: category {category!r} has rows added since the last build(); "
                               f"call bank.build() before searching")
        return category, cat

    def search(self, query: torch.Tensor, k: int = 1, category: str | None = None) -> NNResult:
        """k nearest stored rows of every query row: query [N, C] or [B, N, C] -> NNResult
        (values, indices) [..., N, k], in the convention of ``fastad.ops.nn_distance``, values
        in float32. ``category`` may be left out when the bank holds one category. Indices are
        row numbers of the category; :meth:`locate` maps them to (image id, patch). NaN or
        infinite query values raise ``ValueError`` whatever the index kind."""
        category, cat = self._category(category)
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"ReferenceBank.search: `query` must be a torch.Tensor, got {type(query).__name__}")
        if query.dim() not in (2, 3) or query.shape[-1] != self.dim:
            raise ValueError(f"ReferenceBank.search: `query` must be [N, {self.dim}] or [B, N, {self.dim}], "
                             f"got shape {tuple(query.shape)}")
        if not query.is_floating_point():
            raise TypeError(f"ReferenceBank.search: `query` must be floating point, got {describe(query)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > cat.built:
            raise ValueError(f"ReferenceBank.search: `k` must be in [1, {cat.built}] for category {category!r}, "
                             f"got {k!r}")
        if self.index_kind == "exact":
            _require_finite("search", "query", query)
            # in the bank's precision: a float16 query against float16-rounded rows picks wrong neighbours
            q = query.float()
            feats = cat.features
            if feats.device != q.device:
                key = (category, str(q.device))
                feats = self._device_rows.get(key)
                if feats is None:
                    feats = self._device_rows[key] = cat.features.to(q.device)
            return nn_distance(q, feats, k=k, metric=self.metric)
        return self._faiss_search(category, cat, query, k)

    def _search_index(self, category: str, cat: _Category, on_cuda: bool):
        faiss = _faiss()
        use_gpu = self.index_params.get("gpu")
        if on_cuda and use_gpu is not False and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            cached = self._gpu_indexes.get(category)
            if cached is None:
                # faiss clones no IndexRefine: the IVF-PQ part goes to the GPU, the re-rank stays on the CPU
                base = faiss.downcast_index(cat.index.base_index) if isinstance(cat.index, faiss.IndexRefine) \
                    else cat.index
                if self.index_params.get("shard") and faiss.get_num_gpus() > 1:
                    co = faiss.GpuMultipleClonerOptions()
                    co.shard = True  # faiss's own sharding (IndexShards) over every GPU
                    cached = (faiss.index_cpu_to_all_gpus(base, co), None)
                else:
                    res = faiss.StandardGpuResources()
                    cached = (faiss.index_cpu_to_gpu(res, torch.cuda.current_device(), base), res)
                if base is not cat.index:
                    refined = faiss.IndexRefine(cached[0], cat.index.refine_index)
                    refined.k_factor = cat.index.k_factor
                    cached = (refined, cached)
                self._gpu_indexes[category] = cached
            return cached[0]
        if use_gpu is True:
            raise RuntimeError("ReferenceBank: gpu=True but faiss has no GPU support here (install faiss-gpu) "
                               "or the query is not on a CUDA device")
        return cat.index

    def _faiss_search(self, category: str, cat: _Category, query: torch.Tensor, k: int) -> NNResult:
        q3 = query[None] if query.dim() == 2 else query
        B, N, _ = q3.shape
        x = self._faiss_rows(q3.reshape(B * N, self.dim))
        _require_finite("search", "query", query, x)  # inf rows normalise to NaN: still caught
        index = self._search_index(category, cat, query.is_cuda)
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

    def locate(self, indices: torch.Tensor, category: str | None = None) -> tuple[list, torch.Tensor]:
        """Map row indices (any shape, -1 = none) to (image ids as a nested list, patch positions
        as a tensor of the same shape; -1 where the index is -1)."""
        _, cat = self._category(category)
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
        """Write the bank to folder ``path``: a new version folder, fsynced, then the pointer
        file ``CURRENT`` is switched to it in one atomic rename and older versions that no
        reader holds are deleted. Readers see the complete old or new bank at any moment,
        also when the saving process is killed; concurrent savers take turns."""
        dirty = [n for n, c in self._cats.items() if c.dirty]
        if dirty:
            raise RuntimeError(f"ReferenceBank.save: categories {dirty} have rows added since the last build(); "
                               f"call bank.build() first")
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"ReferenceBank.save: {path} exists and is not a folder; choose another path")
        if path.is_dir() and any(path.iterdir()) and not any(
                (path / f).exists() for f in (_CURRENT, _LOCK, "meta.json")):
            raise FileExistsError(f"ReferenceBank.save: {path} is a non-empty folder that holds no saved bank; "
                                  f"choose a new or empty folder")
        path.mkdir(parents=True, exist_ok=True)
        with _exclusive(path / _LOCK):
            version = Path(tempfile.mkdtemp(prefix="v-", dir=path))
            try:
                self._write_version(version)
                fsync_dir(version)
                fsync_dir(path)
                with atomic_write(path / _CURRENT, "w") as f:
                    f.write(version.name + "\n")
            except BaseException:
                shutil.rmtree(version, ignore_errors=True)
                raise
            _collect_garbage(path, version.name)

    def _write_version(self, folder: Path) -> None:
        faiss = _faiss()
        cats_meta = []
        for i, (name, cat) in enumerate(self._cats.items()):
            index = cat.index
            if self.index_kind == "exact":
                index = faiss.IndexFlatL2(self.dim)
                index.add(np.ascontiguousarray(cat.features.numpy()))
            index_file, rows_file = f"{i}.faiss", f"{i}.rows.npz"
            with atomic_write(folder / index_file) as f:
                faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
            with atomic_write(folder / rows_file) as f:
                np.savez(f, row_image=cat.row_image.numpy(), row_patch=cat.row_patch.numpy())
            entry = {"name": name, "rows": cat.built, "image_ids": cat.image_ids,
                     "index_file": index_file, "rows_file": rows_file,
                     "checksums": {f: _digest(folder / f) for f in (index_file, rows_file)}}
            if cat.recall is not None:
                entry["recall"] = cat.recall
            cats_meta.append(entry)
        meta = {"format": FORMAT_VERSION, "fastad_version": __version__, "dim": self.dim, "metric": self.metric,
                "index": self.index_kind,
                "index_params": {k: v for k, v in self.index_params.items() if k not in _COMMON_PARAMS},
                "categories": cats_meta}
        with atomic_write(folder / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike, dim: int | None = None, **index_params: Any) -> "ReferenceBank":
        """Read a bank written by :meth:`save` (the version ``CURRENT`` names, held against
        deletion while it is read), checking the format version, file sizes and checksums,
        and (when given) the expected ``dim``. ``index_params`` may override search-time
        settings such as ``nprobe``, ``ef_search``, ``refine`` or ``gpu``."""
        path = Path(path)
        with _current_version(path) as folder:
            meta_file = folder / "meta.json"
            meta = read_meta(meta_file, "ReferenceBank.load")
            fmt = meta.get("format")
            if fmt not in _READABLE_FORMATS:
                raise BankFormatError(f"ReferenceBank.load: {path} has format {fmt!r} (written by fastad "
                                      f"{meta.get('fastad_version')}); this fastad {__version__} reads formats "
                                      f"{_READABLE_FORMATS}")
            saved = meta.get("index_params") if isinstance(meta.get("index_params"), dict) else {}
            changed = sorted(k for k in set(index_params) - set(_SEARCH_PARAMS) if saved.get(k) != index_params[k])
            if changed:  # build-time settings may be repeated, not changed
                raise ValueError(f"ReferenceBank.load: only search-time settings {_SEARCH_PARAMS} can be changed "
                                 f"at load, got {changed} (saved: { {k: saved.get(k) for k in changed} }); the "
                                 f"index was built with the saved ones")
            if meta.get("index") in INDEXES and isinstance(meta.get("dim"), int):
                _check_params(meta["dim"], meta["index"], index_params)  # the caller's values, not the file's
            try:
                return cls._from_meta(folder, meta, dim, index_params)
            except BankFormatError:
                raise
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                raise BankFormatError(f"ReferenceBank.load: {meta_file} is incomplete or malformed "
                                      f"({exc!r})") from exc

    @classmethod
    def _from_meta(cls, folder: Path, meta: dict, dim: int | None, index_params: dict) -> "ReferenceBank":
        if dim is not None and meta["dim"] != dim:
            raise BankFormatError(f"ReferenceBank.load: {folder} holds dim={meta['dim']} features, "
                                  f"expected dim={dim}")
        params = {**meta.get("index_params", {}), **index_params}
        bank = cls(meta["dim"], metric=meta["metric"], index=meta["index"], **params)
        for cm in meta["categories"]:
            for fname, want in cm["checksums"].items():
                f = folder / fname
                if not f.is_file():
                    raise BankFormatError(f"ReferenceBank.load: {f} is missing (category {cm['name']!r})")
                got = _digest(f)
                if got["bytes"] != want["bytes"]:
                    raise BankFormatError(f"ReferenceBank.load: {f} is truncated or padded: {got['bytes']} bytes, "
                                          f"expected {want['bytes']}")
                if got["sha256"] != want["sha256"]:
                    raise BankFormatError(f"ReferenceBank.load: {f} is corrupt (sha256 mismatch)")
            cat = _Category(image_ids=list(cm["image_ids"]))
            index = bank._read_index(folder / cm["index_file"], cm)
            cat.row_image, cat.row_patch = _read_rows(folder / cm["rows_file"], cm)
            if bank.index_kind == "exact":
                cat.features = cls._stored_features_of(index)
            else:
                bank._apply_search_params(index, index_params)
                cat.index = index
                recall = cm.get("recall")
                overridden = recall is not None and recall.get("param") in index_params
                cat.recall = None if overridden else recall  # a changed setting makes the measured recall stale
            bank._cats[cm["name"]] = cat
        return bank

    def _read_index(self, file: Path, cm: dict):
        """The faiss index of one category: readable, of this bank's kind and size."""
        faiss = _faiss()
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as exc:
            raise BankFormatError(f"ReferenceBank.load: {file} is not a readable faiss index "
                                  f"({str(exc).splitlines()[0]})") from exc
        kinds = {"exact": faiss.IndexFlat, "ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat,
                 "ivfpq": (faiss.IndexIVFPQ, faiss.IndexRefine)}
        if not isinstance(index, kinds[self.index_kind]):
            raise BankFormatError(f"ReferenceBank.load: {file} holds a faiss {type(index).__name__}, not the "
                                  f"{self.index_kind!r} index the bank's meta.json names")
        if index.d != self.dim or index.ntotal != cm["rows"]:
            raise BankFormatError(f"ReferenceBank.load: {file} (category {cm['name']!r}) has d={index.d}, "
                                  f"{index.ntotal} rows; meta.json says d={self.dim}, {cm['rows']} rows")
        return index

    def _apply_search_params(self, index, overrides: dict) -> None:
        """Search-time settings: the saved index keeps its own (tuned) nprobe / efSearch unless
        given again here or in the bank's parameters."""
        faiss = _faiss()
        p = self.index_params
        if "nprobe" in p and self.index_kind in ("ivf", "ivfpq"):
            if "recall_target" not in p or "nprobe" in overrides:
                _set_search_param(index, "nprobe", int(p["nprobe"]))
        if "ef_search" in p and self.index_kind == "hnsw":
            if "recall_target" not in p or "ef_search" in overrides:
                _set_search_param(index, "ef_search", int(p["ef_search"]))
        if "refine" in overrides and isinstance(index, faiss.IndexRefine):
            if not overrides["refine"]:
                raise ValueError("ReferenceBank.load: `refine`=0 cannot drop the rows of a saved re-ranked "
                                 "IVF-PQ bank; give refine >= 1")
            index.k_factor = float(overrides["refine"])


def _ivf(index):
    """The IVF part of an IVF index, also inside a re-ranking IndexRefine."""
    return _faiss().extract_index_ivf(index)


def _set_search_param(index, param: str, value: int) -> None:
    if param == "nprobe":
        _ivf(index).nprobe = value
    else:
        index.hnsw.efSearch = value


def _read_rows(file: Path, cm: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The row map of one category (image position and patch of every row)."""
    try:
        with np.load(file, allow_pickle=False) as rows:
            row_image, row_patch = rows["row_image"], rows["row_patch"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise BankFormatError(f"ReferenceBank.load: {file} is not a readable row map ({exc})") from exc
    n = cm["rows"]
    for name, a in (("row_image", row_image), ("row_patch", row_patch)):
        if a.dtype.kind not in "iu" or a.shape != (n,):
            raise BankFormatError(f"ReferenceBank.load: {file}: `{name}` must be {n} integers, got "
                                  f"{a.dtype} of shape {a.shape}")
    if n and (row_image.min() < 0 or row_image.max() >= len(cm["image_ids"])):
        raise BankFormatError(f"ReferenceBank.load: {file}: `row_image` points outside the "
                              f"{len(cm['image_ids'])} image ids of category {cm['name']!r}")
    return torch.from_numpy(row_image.astype(np.int64)), torch.from_numpy(row_patch.astype(np.int64))


# ---------------------------------------------------------------------- on-disk versions
@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold the bank's saver lock (blocking): one saver at a time writes and collects garbage."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock, as does the death of the process


@contextlib.contextmanager
def _current_version(path: Path, attempts: int = 100) -> Iterator[Path]:
    """The folder ``CURRENT`` names, with a shared lock that keeps savers from deleting it
    while it is read. A pointer read just before a save switched it may name a folder being
    deleted: then read the pointer again."""
    pointer = path / _CURRENT
    if not pointer.exists() and (path / "meta.json").is_file():  # format 1: the files in the bank folder
        yield path
        return
    name = ""
    for _ in range(attempts):
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError:
            raise BankFormatError(f"ReferenceBank.load: {path} is not a saved bank (no {pointer} "
                                  f"or {path / 'meta.json'})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise BankFormatError(f"ReferenceBank.load: {pointer} is unreadable ({exc})") from exc
        if not name.startswith("v-") or "/" in name or os.sep in name:
            raise BankFormatError(f"ReferenceBank.load: {pointer} must name a version folder v-*, got {name[:80]!r}")
        folder = path / name
        try:
            fd = os.open(folder, os.O_RDONLY)
        except FileNotFoundError:
            time.sleep(0.005)
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_SH)
            complete = (folder / "meta.json").is_file()
            if complete:
                yield folder
        finally:
            os.close(fd)
        if complete:
            return
        time.sleep(0.005)
    raise BankFormatError(f"ReferenceBank.load: {pointer} names {name!r}, which is missing or incomplete")


def _collect_garbage(path: Path, current: str) -> None:
    """Delete the versions ``current`` replaced (and leftovers of killed savers), except
    those a reader holds: they go at a later save. Runs under the saver lock."""
    for entry in path.iterdir():
        if entry.name == current:
            continue
        if entry.name.startswith(f".{_CURRENT}.tmp-"):
            entry.unlink(missing_ok=True)  # a killed saver's pointer
        elif entry.name.startswith(".trash-"):
            shutil.rmtree(entry, ignore_errors=True)  # a version a killed saver was deleting
        elif entry.name.startswith("v-") and entry.is_dir():
            fd = os.open(entry, os.O_RDONLY)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                # renamed first: a saver killed mid-delete must not leave a half-deleted folder under
                # the name a reader that read CURRENT just before the switch is waiting to open
                trash = path / f".trash-{entry.name}"
                os.rename(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
            finally:
                os.close(fd)
    legacy = path / "meta.json"  # a format-1 bank saved over: its files go once CURRENT exists
    if legacy.is_file():
        with contextlib.suppress(ValueError, OSError, KeyError, TypeError, AttributeError):
            for cm in json.loads(legacy.read_text())["categories"]:
                for fname in (cm["index_file"], cm["rows_file"]):
                    if "/" not in fname:
                        (path / fname).unlink(missing_ok=True)
        legacy.unlink(missing_ok=True)
    fsync_dir(path)


def read_meta(meta_file: Path, who: str) -> dict:
    """A bank's JSON metadata as a dict; ``BankFormatError`` naming the file when it is
    unreadable, not JSON or not a JSON object."""
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BankFormatError(f"{who}: {meta_file} is corrupt ({exc})") from exc
    if not isinstance(meta, dict):
        raise BankFormatError(f"{who}: {meta_file} must hold a JSON object, got a {type(meta).__name__}")
    return meta


def _digest(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
