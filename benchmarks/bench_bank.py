"""ReferenceBank: build time, search time per query image, memory and recall of each
index kind.

Like with like: the exact bank runs beside faiss IndexFlatIP tuned at its best
(``tune_faiss``); an approximate bank is a faiss index, so it runs beside the same faiss
index searched directly (the ratio is fastad's wrapper overhead) with its recall@1 in the
row's label, at the defaults and tuned with ``recall_target=0.95``.

Data: unit-norm rows around 256 random cluster centres. Queries ("normal patches") are
further samples of the same clusters, held out of the bank; recall on queries from other
clusters (far from every row, the kind of an anomalous patch) is recorded beside it.

quick: 100k rows at C = 128; full: 100k and 1M rows at C = 128 and 1,024. Queries: one image of
576 patches (DictAS at 336 px) and of 4,096 patches (64 x 64 maps)."""
from __future__ import annotations

import faiss
import pytest
import torch
import torch.nn.functional as F

from conftest import tune_faiss
from fastad.bank import ReferenceBank
from fastad.ops import nn_distance

KINDS = ("exact", "ivf", "ivfpq", "hnsw")
SETTINGS = {"defaults": {}, "recall_target=0.95": dict(recall_target=0.95)}
N_QUERY = (576, 4096)


def sizes(bench_size):
    if bench_size == "quick":  # index training at C = 1024 alone takes minutes on 2 cores
        return [(100_000, 128)]
    return [(n, c) for n in (100_000, 1_000_000) for c in (128, 1024)]


def data(n, c, seed=0, clusters=256):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, c, generator=g)
    x = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * torch.randn(n, c, generator=g)
    return F.normalize(x, dim=-1)


_DATA: dict = {}
_BANKS: dict = {}


def rows_and_queries(n, c):
    """Bank rows, normal queries (held-out samples of the same clusters) and queries from
    other clusters."""
    if (n, c) not in _DATA:
        _DATA.clear()  # 1M x 1024 rows are 4 GiB
        _BANKS.clear()
        x = data(n + max(N_QUERY), c)
        _DATA[n, c] = (x[:n].contiguous(), x[n:].contiguous(), data(max(N_QUERY), c, seed=1))
    return _DATA[n, c]


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


def new_bank(kind, setting, n, c):
    base, _, _ = rows_and_queries(n, c)
    bank = ReferenceBank(c, metric="cosine", index=kind, **SETTINGS[setting])
    bank.add(base)
    return bank.build(progress=False)


def built(kind, setting, n, c):
    if (kind, setting) not in _BANKS:
        _BANKS.clear()  # one bank at a time
        _BANKS[kind, setting] = new_bank(kind, setting, n, c)
    return _BANKS[kind, setting]


def recall_at_1(bank, queries, base):
    found = bank.search(queries, k=1).indices[:, 0]
    _, patches = bank.locate(found)  # one image: the patch is the row of `base`
    truth = nn_distance(queries, base, k=1, metric="cosine").indices[:, 0]
    return float((patches == truth).float().mean())


# one bank at a time (1M x 1024 rows are 4 GiB): its build, then its searches and their peers
CASES = [("build", "exact", "defaults", 0), ("build peer", "exact", "defaults", 0)]
CASES += [(what, "exact", "defaults", nq) for nq in N_QUERY for what in ("search", "search peer")]
for _kind in KINDS[1:]:
    for _setting in SETTINGS:
        CASES += [("build", _kind, _setting, 0)]
        CASES += [(what, _kind, _setting, nq) for nq in N_QUERY for what in ("search", "search peer")]


@pytest.fixture(scope="module", autouse=True)
def _tuned_faiss():
    tune_faiss()


@pytest.mark.parametrize("what,kind,setting,n_query", CASES,
                         ids=[f"{w.replace(' ', '_')}-{k}-{s}-{q}" for w, k, s, q in CASES])
def test_bank(bench, size, what, kind, setting, n_query):
    n, c = size
    if n > 100_000 and kind == "exact" and n_query == 4096 and c == 1024:
        pytest.skip("4 TFLOP per image: minutes on 2 cores")
    base, normal, other = rows_and_queries(n, c)
    if what == "build" and kind != "exact":
        # faiss training and adding (and the recall tuning): no peer, faiss does the work
        _BANKS.clear()
        _BANKS[kind, setting] = bench(lambda: new_bank(kind, setting, n, c), group=f"bank build {n}x{c}, {kind} "
                                      f"{setting}", impl=f"fastad {kind}", role="fastad", rounds=1, memory=False)
        return
    if what.startswith("build"):
        x = base.numpy()

        def flat():
            index = faiss.IndexFlatIP(c)
            index.add(x)
            return index

        fn, impl = (flat, "faiss IndexFlatIP") if what == "build peer" else (
            lambda: new_bank("exact", "defaults", n, c), "fastad exact")
        bench(fn, group=f"bank build {n}x{c}, exact", impl=impl, role=what == "build" and "fastad" or "peer",
              rounds=5)
        return
    bank = built(kind, setting, n, c)
    q = normal[:n_query]
    qn = q.numpy()
    if kind == "exact":
        group = f"bank search {n}x{c}, {n_query} queries, exact"
        if what == "search":
            bench(lambda: bank.search(q, k=1), group=group, impl="fastad exact", role="fastad", rounds=5,
                  index_mib=index_mib(bank))
        else:
            index = faiss.IndexFlatIP(c)
            index.add(base.numpy())
            bench(lambda: index.search(qn, 1), group=group, impl="faiss IndexFlatIP (tuned)", role="peer",
                  rounds=5)
        return
    tuned = bank.recall.get("default")
    label = f"{kind} {setting}" + (f" -> {tuned['param']}={tuned['value']}" if tuned else "")
    group = f"bank search {n}x{c}, {n_query} queries, {label}"
    if what == "search":
        recall, recall_other = recall_at_1(bank, q, base), recall_at_1(bank, other[:n_query], base)
        print(f"\n{label} {n}x{c}, {n_query} queries: recall@1 {recall:.3f} (other clusters {recall_other:.3f}), "
              f"index {index_mib(bank):.1f} MiB, measured at build: {tuned}")
        bench(lambda: bank.search(q, k=1), group=group, impl=f"fastad {kind} (recall@1 {recall:.3f}, other "
              f"clusters {recall_other:.3f})", role="fastad", rounds=5, recall=recall,
              recall_other_clusters=recall_other, index_mib=index_mib(bank))
    else:
        index = bank._cats["default"].index  # the faiss index itself, with the bank's settings
        bench(lambda: index.search(qn, 1), group=group, impl=f"faiss {type(index).__name__} direct",
              role="peer", rounds=5)
