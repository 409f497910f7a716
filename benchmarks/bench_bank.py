"""ReferenceBank: build time, search time per query image, memory and recall of each
index kind, side by side with faiss IndexFlat on the same data.

quick: 100k rows at C = 128 and C = 1024; full adds 1M rows. Queries: one image of
576 patches (DictAS at 336 px) and of 4,096 patches (64 x 64 maps)."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastad.bank import ReferenceBank
from fastad.ops import nn_distance

KINDS = {
    "exact": {},
    "ivf": dict(nlist=1024, nprobe=16),
    "ivfpq": dict(nlist=1024, nprobe=16, nbits=8),
    "hnsw": dict(hnsw_m=32, ef_search=64),
}


def sizes(bench_size):
    rows = [100_000] + ([1_000_000] if bench_size == "full" else [])
    return [(n, c) for n in rows for c in (128, 1024)]


def data(n, c, seed=0, clusters=256):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, c, generator=g)
    x = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * torch.randn(n, c, generator=g)
    return F.normalize(x, dim=-1)


_CACHE: dict = {}


def built(kind, n, c):
    key = (kind, n, c)
    if key not in _CACHE:
        base = data(n, c)
        bank = ReferenceBank(c, metric="cosine", index=kind, **KINDS[kind])
        bank.add(base)
        bank.build(progress=False)
        _CACHE[key] = (base, bank)
    return _CACHE[key]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n_query", [576, 4096])
def test_bank_search(bench, bench_size, kind, n_query):
    for n, c in sizes(bench_size):
        if n > 100_000 and kind == "exact" and n_query == 4096 and c == 1024:
            continue  # 4 TFLOP per image: minutes on 2 cores
        base, bank = built(kind, n, c)
        q = data(n_query, c, seed=1) + 0.01
        res = bank.search(q, k=1)
        truth = nn_distance(q, base, k=1, metric="cosine").indices[:, 0]
        recall = float((res.indices[:, 0] == truth).float().mean())
        bench(lambda: bank.search(q, k=1), group=f"bank search {n}x{c}, {n_query} queries",
              impl=f"fastad {kind}", role="fastad", rounds=2, recall=recall)


@pytest.mark.parametrize("n_query", [576, 4096])
def test_faiss_flat_search(bench, bench_size, n_query):
    for n, c in sizes(bench_size):
        base = built("exact", n, c)[0]
        index = faiss.IndexFlatIP(c)
        index.add(base.numpy())
        q = F.normalize(data(n_query, c, seed=1) + 0.01, dim=-1).numpy()
        bench(lambda: index.search(q, 1), group=f"bank search {n}x{c}, {n_query} queries",
              impl="faiss IndexFlatIP", role="peer", rounds=2)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_bank_build(bench, bench_size, kind):
    n, c = sizes(bench_size)[0]
    base = data(n, c)

    def build():
        bank = ReferenceBank(c, metric="cosine", index=kind, **KINDS[kind])
        bank.add(base)
        return bank.build(progress=False)

    bench(build, group=f"bank build {n}x{c}", impl=f"fastad {kind}", role="fastad", rounds=1)
