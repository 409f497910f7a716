"""A ``ReferenceBank`` split over Ray actors, for banks larger than one machine.

    bank = ShardedBank(1024, metric="cosine", index="exact", shards=4)   # 4 Ray actors
    bank.add(features, category="bottle")        # whole images go to one shard each
    bank.build()
    values, indices = bank.search(query, k=3, category="bottle")
    image_ids, patches = bank.locate(indices, category="bottle")
    bank.save("banks/big"); bank = ShardedBank.load("banks/big")

Each shard is an actor holding its own ``fastad.ReferenceBank`` (driven only through its
public add / build / search / save / load / locate). Row numbers are global: the order in
which rows were added, as in one ReferenceBank over the same rows. ``search`` asks every shard
for its k best rows and merges them exactly (ties to the lowest global row), so an exact
sharded bank returns what one exact bank returns. A faiss IVF shard trains its own coarse
quantizer on its own rows: results equal one IVF bank's when every list is probed
(``nprobe >= nlist``), and are each shard's approximate top-k otherwise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np
import torch

from fastad._io import atomic_dir, atomic_write
from fastad.ops.nn_distance import NNResult

__all__ = ["ShardedBank"]

FORMAT_VERSION = 1


class _Shard:
    """The Ray actor of one shard (created through ``ray.remote``)."""

    def __init__(self, dim: int, metric: str, index: str, params: dict[str, Any], path: str | None = None) -> None:
        from fastad.bank import ReferenceBank

        self.bank = ReferenceBank.load(path, dim=dim, **params) if path else \
            ReferenceBank(dim, metric=metric, index=index, **params)

    def add(self, features: torch.Tensor, category: str, image_ids: list) -> None:
        self.bank.add(features, category=category, image_ids=image_ids)

    def build(self, progress: bool) -> None:
        self.bank.build(progress=progress)

    def search(self, query: torch.Tensor, k: int, category: str) -> tuple[torch.Tensor, torch.Tensor]:
        res = self.bank.search(query, k=k, category=category)
        return res.values.cpu(), res.indices.cpu()

    def locate(self, indices: torch.Tensor, category: str) -> tuple[list, torch.Tensor]:
        return self.bank.locate(indices, category=category)

    def save(self, path: str) -> None:
        self.bank.save(path)


class ShardedBank:
    """``ReferenceBank``-compatible bank whose rows live in ``shards`` Ray actors.

    Args:
        dim, metric, index, **index_params: as ``fastad.ReferenceBank``.
        shards: number of actors; images are dealt to them round-robin per category.
        num_gpus_per_shard / num_cpus_per_shard: the Ray resources each actor reserves (default
            none, so any number of shards fit); actors are spread over the nodes.

    Needs a running Ray (``ray.init()`` or ``fastad.distributed.ray_session``); ``save`` and
    ``load`` need a folder every actor's node can reach (a shared file system on a cluster).
    """

    def __init__(self, dim: int, metric: str = "cosine", index: str = "exact", *, shards: int = 2,
                 num_gpus_per_shard: float = 0, num_cpus_per_shard: float = 0, **index_params: Any) -> None:
        from fastad.bank import ReferenceBank

        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"ShardedBank: `shards` must be a positive integer, got {shards!r}")
        ReferenceBank(dim, metric=metric, index=index, **index_params)  # validates the arguments here
        self.dim, self.metric, self.index_kind, self.index_params = dim, metric, index, dict(index_params)
        self.shards = shards
        self._resources = {"num_gpus": num_gpus_per_shard, "num_cpus": num_cpus_per_shard}
        # per category: the next image position and, per shard, the global row of each local row
        self._images: dict[str, int] = {}
        self._rows: dict[str, list[list[torch.Tensor]]] = {}
        self._actors = self._spawn([None] * shards)

    def _spawn(self, paths: Sequence[str | None]) -> list[Any]:
        from fastad.distributed._ray import import_ray

        ray = import_ray()
        if not ray.is_initialized():
            raise RuntimeError("ShardedBank needs a running Ray: call ray.init() (or ray.init(address=...)) first")
        actor = ray.remote(_Shard).options(scheduling_strategy="SPREAD", **self._resources)
        return [actor.remote(self.dim, self.metric, self.index_kind, self.index_params, p) for p in paths]

    @staticmethod
    def _get(refs: Any) -> Any:
        from fastad.distributed._ray import import_ray

        return import_ray().get(refs)

    # ------------------------------------------------------------------ adding
    @property
    def categories(self) -> list[str]:
        return list(self._rows)

    def __len__(self) -> int:
        return sum(int(t.numel()) for per in self._rows.values() for s in per for t in s)

    def __repr__(self) -> str:
        return (f"ShardedBank(dim={self.dim}, metric={self.metric!r}, index={self.index_kind!r}, "
                f"shards={self.shards}, rows={len(self)})")

    def add(self, features: torch.Tensor, category: str = "default",
            image_ids: Sequence[Hashable] | Hashable | None = None) -> None:
        """As ``ReferenceBank.add``: [B, P, C] (B images) or [n, C] (one image). Each image's
        rows go to one shard, image j of the category to shard j mod ``shards``."""
        if not isinstance(features, torch.Tensor):
            features = torch.as_tensor(np.asarray(features))
        if features.dim() not in (2, 3) or features.shape[-1] != self.dim:
            raise ValueError(f"ShardedBank.add: `features` must be [n, {self.dim}] or [B, P, {self.dim}], "
                             f"got shape {tuple(features.shape)}")
        if not isinstance(category, str) or not category:
            raise ValueError(f"ShardedBank.add: `category` must be a non-empty string, got {category!r}")
        feats = features.detach().cpu()
        if feats.dim() == 2:
            feats, ids = feats[None], None if image_ids is None else [image_ids]
        else:
            ids = None if image_ids is None else list(image_ids)
        B, P, _ = feats.shape
        first_image = self._images.get(category, 0)
        if ids is None:  # the running integers one ReferenceBank would give
            ids = list(range(first_image, first_image + B))
        if len(ids) != B:
            raise ValueError(f"ShardedBank.add: {B} images but {len(ids)} image_ids")
        rows = self._rows.setdefault(category, [[] for _ in range(self.shards)])
        first_row = sum(int(t.numel()) for s in rows for t in s)
        calls = []
        for s in range(self.shards):
            sel = [j for j in range(B) if (first_image + j) % self.shards == s]
            if not sel:
                continue
            calls.append(self._actors[s].add.remote(feats[sel], category, [ids[j] for j in sel]))
            rows[s].append((first_row + torch.tensor(sel)[:, None] * P + torch.arange(P)).reshape(-1))
        self._get(calls)  # shard errors (bad dtype, NaN, ids) surface here
        self._images[category] = first_image + B

    def build(self, progress: bool = False) -> "ShardedBank":
        """Build every shard (in parallel). k-center coresets are global and not sharded: build
        them on one ReferenceBank (or with ``fastad.ops.kcenter_greedy``) before adding here."""
        self._get([a.build.remote(progress) for a in self._actors])
        return self

    # ------------------------------------------------------------------ search
    def _shard_rows(self, category: str) -> list[torch.Tensor]:
        if category not in self._rows:
            raise KeyError(f"ShardedBank: no category {category!r}; categories: {self.categories}")
        return [torch.cat(s) if s else torch.empty(0, dtype=torch.long) for s in self._rows[category]]

    def search(self, query: torch.Tensor, k: int = 1, category: str = "default") -> NNResult:
        """As ``ReferenceBank.search``: every shard's k best rows, merged exactly (values first,
        then the lowest global row). Indices are global rows of the category."""
        from fastad.distributed._ray import import_ray

        rows = self._shard_rows(category)
        total = sum(int(r.numel()) for r in rows)
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"ShardedBank.search: `query` must be a torch.Tensor, got {type(query).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > total:
            raise ValueError(f"ShardedBank.search: `k` must be in [1, {total}] for category {category!r}, got {k!r}")
        q = import_ray().put(query.detach().cpu())
        live = [s for s in range(self.shards) if rows[s].numel()]
        parts = self._get([self._actors[s].search.remote(q, min(k, int(rows[s].numel())), category) for s in live])
        values = torch.cat([v for v, _ in parts], dim=-1)
        glob = torch.cat([torch.where(i >= 0, rows[s][i.clamp_min(0)], i) for s, (_, i) in zip(live, parts)], dim=-1)
        # lowest global row first, then a stable sort by value keeps it first among equal values
        order = torch.sort(glob.masked_fill(glob < 0, torch.iinfo(torch.long).max), dim=-1, stable=True).indices
        values, glob = values.gather(-1, order), glob.gather(-1, order)
        order = torch.sort(values, dim=-1, descending=self.metric == "ip", stable=True).indices[..., :k]
        return NNResult(values.gather(-1, order).to(query.device), glob.gather(-1, order).to(query.device))

    def locate(self, indices: torch.Tensor, category: str = "default") -> tuple[list, torch.Tensor]:
        """As ``ReferenceBank.locate``: global rows (any shape, -1 = none) -> (image ids as a
        nested list, patch positions)."""
        rows = self._shard_rows(category)
        idx = torch.as_tensor(indices).cpu().long()
        total = sum(int(r.numel()) for r in rows)
        if idx.numel() and (int(idx.max()) >= total or int(idx.min()) < -1):
            raise IndexError(f"ShardedBank.locate: indices must be in [-1, {total}), got range "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        shard_of = torch.full((total,), -1, dtype=torch.long)
        local_of = torch.full((total,), -1, dtype=torch.long)
        for s, r in enumerate(rows):
            shard_of[r], local_of[r] = s, torch.arange(r.numel())
        flat = idx.reshape(-1)
        ids = np.full(flat.numel(), None, dtype=object)
        patches = torch.full((flat.numel(),), -1, dtype=torch.long)
        valid = flat >= 0
        for s in range(self.shards):
            pos = torch.nonzero(valid & (shard_of[flat.clamp_min(0)] == s)).reshape(-1)
            if pos.numel():
                sid, spatch = self._get(self._actors[s].locate.remote(local_of[flat[pos]], category))
                ids[pos.numpy()] = np.array(sid + [None], dtype=object)[:-1]
                patches[pos] = spatch.long()
        return ids.reshape(tuple(idx.shape)).tolist(), patches.reshape(idx.shape)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write ``path/shard-<i>/`` (each with ``ReferenceBank.save``) and ``path/sharded.json``
        (the global row of every shard row) into a temporary sibling folder, renamed into
        place in one step."""
        path = Path(path).resolve()
        with atomic_dir(path, replace=True) as tmp:
            self._get([a.save.remote(str(tmp / f"shard-{s}")) for s, a in enumerate(self._actors)])
            rows = {c: [r.tolist() for r in self._shard_rows(c)] for c in self._rows}
            meta = {"format": FORMAT_VERSION, "dim": self.dim, "metric": self.metric, "index": self.index_kind,
                    "index_params": self.index_params, "shards": self.shards, "images": self._images, "rows": rows}
            with atomic_write(tmp / "sharded.json", "w") as f:
                json.dump(meta, f)

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_gpus_per_shard: float = 0, num_cpus_per_shard: float = 0,
             **index_params: Any) -> "ShardedBank":
        """Read a bank written by :meth:`save`: one actor per saved shard, each loading its
        ReferenceBank (with its checks); ``index_params`` override search-time settings."""
        from fastad.bank import BankFormatError, read_meta

        path = Path(path).resolve()
        meta_file = path / "sharded.json"
        if not meta_file.is_file():
            raise BankFormatError(f"ShardedBank.load: {meta_file} not found (not a saved sharded bank)")
        meta = read_meta(meta_file, "ShardedBank.load")
        if meta.get("format") != FORMAT_VERSION:
            raise BankFormatError(f"ShardedBank.load: {path} has format {meta.get('format')!r}, expected "
                                  f"{FORMAT_VERSION}")
        for s in range(meta["shards"]):
            if not (path / f"shard-{s}").is_dir():
                raise BankFormatError(f"ShardedBank.load: {path / f'shard-{s}'} is missing")
        bank = cls.__new__(cls)
        bank.dim, bank.metric, bank.index_kind = meta["dim"], meta["metric"], meta["index"]
        bank.index_params = {**meta["index_params"], **index_params}
        bank.shards = meta["shards"]
        bank._resources = {"num_gpus": num_gpus_per_shard, "num_cpus": num_cpus_per_shard}
        bank._images = dict(meta["images"])
        bank._rows = {c: [[torch.tensor(r, dtype=torch.long)] for r in per] for c, per in meta["rows"].items()}
        bank._actors = bank._spawn([str(path / f"shard-{s}") for s in range(bank.shards)])
        bank._get([a.__ray_ready__.remote() for a in bank._actors])  # a corrupt shard raises here
        return bank
