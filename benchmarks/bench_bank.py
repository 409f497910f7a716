"""ReferenceBank: build time, search time per query image, memory and recall of each
index kind, side by side with faiss IndexFlat on the same data.

quick: 100k rows at C = 128; full: 100k and 1M rows at C = 128 and 1,024. Queries: one image of
576 patches (DictAS at 336 px) and of 4,096 patches (64 x 64 maps)."""
from __future__ import annotations

import faiss
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
    if bench_size == "quick":  # index training at C = 1024 alone takes minutes on 2 cores
        return [(100_000, 128)]
    return [(n, c) for n in (100_000, 1_000_000) for c in (128, 1024)]


def data(n, c, seed=0, clusters=256):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, c, generator=g)
    x = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * torch.randn(n, c, generator=g)
    return F.normalize(x, dim=-1)


_CACHE: dict = {}


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        cases = sizes(metafunc.config.getoption("--bench-size"))
        metafunc.parametrize("size", cases, ids=[f"{n}x{c}" for n, c in cases], scope="module")


def index_mib(bank: ReferenceBank) -> float:
    """Resident size of the category's index (faiss: its serialised size; exact: the rows)."""
    cat = bank._cats["default"]
    if bank.index_kind == "exact":
        return cat.features.numel() * cat.features.element_size() / 2**20
    return len(faiss.serialize_index(cat.index)) / 2**20


def built(kind, n, c):
    key = (kind, n, c)
    if key not in _CACHE:
        _CACHE.clear()  # one bank at a time: 1M x 1024 rows are 4 GiB
        base = data(n, c)
        bank = ReferenceBank(c, metric="cosine", index=kind, **KINDS[kind])
        bank.add(base)
        bank.build(progress=False)
        _CACHE[key] = (base, bank)
    return _CACHE[key]


def _skip_exact_full(n, c, kind, n_query):
    if n > 100_000 and kind == "exact" and n_query == 4096 and c == 1024:
        pytest.skip("4 TFLOP per image: minutes on 2 cores")


@pytest.mark.parametrize("n_query", [576, 4096])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bank_search(bench, size, kind, n_query):
    n, c = size
    _skip_exact_full(n, c, kind, n_query)
    base, bank = built(kind, n, c)
    q = data(n_query, c, seed=1) + 0.01
    res = bank.search(q, k=1)
    truth = nn_distance(q, base, k=1, metric="cosine").indices[:, 0]
    recall = float((res.indices[:, 0] == truth).float().mean())
    print(f"\n{kind} {n}x{c}: recall@1 {recall:.3f}, index {index_mib(bank):.1f} MiB")
    impl = "fastad exact" if kind == "exact" else f"fastad {kind} (faiss, recall@1 {recall:.2f})"
    bench(lambda: bank.search(q, k=1), group=f"bank search {n}x{c}, {n_query} queries",
          impl=impl, role="fastad", rounds=2, recall=recall, index_mib=index_mib(bank))


@pytest.mark.parametrize("n_query", [576, 4096])
def test_faiss_flat_search(bench, size, n_query):
    n, c = size
    _skip_exact_full(n, c, "exact", n_query)
    base = data(n, c)
    index = faiss.IndexFlatIP(c)
    index.add(base.numpy())
    q = F.normalize(data(n_query, c, seed=1) + 0.01, dim=-1).numpy()
    bench(lambda: index.search(q, 1), group=f"bank search {n}x{c}, {n_query} queries",
          impl="faiss IndexFlatIP", role="peer", rounds=2)


@pytest.mark.parametrize("kind", list(KINDS))
def test_bank_build(bench, size, kind):
    n, c = size
    base = data(n, c)

    def build():
        bank = ReferenceBank(c, metric="cosine", index=kind, **KINDS[kind])
        bank.add(base)
        return bank.build(progress=False)

    # only the exact bank compares with faiss Flat; the others' build is faiss's own training
    group = f"bank build {n}x{c}" if kind == "exact" else f"bank build {n}x{c}, {kind} (faiss training + add)"
    bench(build, group=group, impl=f"fastad {kind}", role="fastad", rounds=1)


def test_faiss_flat_build(bench, size):
    n, c = size
    base = data(n, c).numpy()

    def build():
        index = faiss.IndexFlatIP(c)
        index.add(base)
        return index

    bench(build, group=f"bank build {n}x{c}", impl="faiss IndexFlatIP", role="peer", rounds=1)
