"""ReferenceBank: exact search equals nn_distance, approximate recall, persistence."""
import json
import os

import numpy as np
import pytest
import torch

import fastad
from fastad.bank import BankFormatError, ReferenceBank
from fastad.ops import nn_distance


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """faiss's OpenMP threads spin against the other processes of a busy 2-core machine
    (3x slower index training than one thread); these banks are tiny."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def current(bank_path):
    """The version folder a saved bank's pointer names."""
    return bank_path / (bank_path / "CURRENT").read_text().strip()


def clustered(n, dim, clusters, seed, spread=0.15):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    return centers[labels] + spread * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_exact_search_equals_nn_distance(metric):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 50, 16, generator=g)
    bank = ReferenceBank(16, metric=metric)
    bank.add(feats, category="a", image_ids=["x", "y", "z"])
    bank.build(progress=False)
    q = torch.randn(2, 7, 16, generator=g)
    got = bank.search(q, k=3, category="a")
    want = nn_distance(q, feats.reshape(-1, 16), k=3, metric=metric)
    torch.testing.assert_close(got.values, want.values)
    assert torch.equal(got.indices, want.indices)
    ids, patches = bank.locate(got.indices, category="a")
    flat = got.indices.reshape(-1)
    assert [i for row in ids for r in row for i in r] == [["x", "y", "z"][int(j) // 50] for j in flat]
    assert torch.equal(patches.reshape(-1), flat % 50)


def test_categories_are_searched_separately_and_len_counts_rows():
    bank = ReferenceBank(4, metric="l2")
    bank.add(torch.zeros(5, 4), category="zeros")
    bank.add(torch.ones(2, 3, 4), category="ones")
    bank.build(progress=False)
    assert bank.categories == ["zeros", "ones"] and len(bank) == 11
    q = torch.full((1, 4), 0.9)
    assert bank.search(q, category="ones").values.item() == pytest.approx(0.2)
    assert bank.search(q, category="zeros").values.item() == pytest.approx(1.8)
    with pytest.raises(KeyError, match="no category 'twos'"):
        bank.search(q, category="twos")


def test_adding_after_build_requires_rebuild_and_extends_rows():
    bank = ReferenceBank(4, metric="l2")
    bank.add(torch.zeros(1, 4))
    bank.build(progress=False)
    bank.add(torch.ones(1, 4), image_ids="late")
    with pytest.raises(RuntimeError, match="call bank.build"):
        bank.search(torch.ones(1, 4))
    bank.build(progress=False)
    r = bank.search(torch.ones(1, 4))
    assert r.indices.item() == 1 and bank.locate(r.indices)[0] == [["late"]]


def recall_at_1(bank, base, queries, metric):
    got = bank.search(queries, k=1).indices[:, 0]
    want = nn_distance(queries, base, k=1, metric=metric).indices[:, 0]
    return float((got == want).float().mean())


@pytest.mark.parametrize("kind,params,bound", [
    ("ivf", dict(nlist=32, nprobe=4), 0.95),
    ("ivfpq", dict(nlist=32, nprobe=4, m=16, nbits=6), 0.8),
    ("hnsw", dict(hnsw_m=16, ef_search=64), 0.95),
])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_approximate_recall_on_clustered_data(kind, params, bound, metric):
    """Queries are perturbed bank rows: each has one clear nearest neighbour."""
    base = clustered(5000, 32, 32, seed=1, spread=0.5)
    g = torch.Generator().manual_seed(9)
    queries = base[torch.randperm(5000, generator=g)[:300]] + 0.05 * torch.randn(300, 32, generator=g)
    bank = ReferenceBank(32, metric=metric, index=kind, **params)
    bank.add(base)
    bank.build(progress=False)
    assert recall_at_1(bank, base, queries, metric) >= bound


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_ivf_probing_every_list_is_exact(metric):
    base = clustered(2000, 16, 8, seed=2)
    q = clustered(50, 16, 8, seed=3)
    bank = ReferenceBank(16, metric=metric, index="ivf", nlist=8, nprobe=8)
    bank.add(base)
    bank.build(progress=False)
    got = bank.search(q, k=4)
    want = nn_distance(q, base, k=4, metric=metric)
    torch.testing.assert_close(got.values, want.values, atol=2e-4, rtol=1e-5)
    assert float((got.indices == want.indices).float().mean()) > 0.99


@pytest.mark.parametrize("kind,params", [("exact", {}), ("ivf", dict(nlist=16, nprobe=3)),
                                         ("ivfpq", dict(nlist=16, m=8, nbits=8)), ("hnsw", {})])
def test_save_load_round_trip_is_identical(tmp_path, kind, params):
    bank = ReferenceBank(16, metric="cosine", index=kind, **params)
    bank.add(clustered(1200, 16, 8, seed=4).reshape(4, 300, 16), category="a", image_ids=[3, 1, "b", 7])
    bank.add(clustered(800, 16, 8, seed=5), category="b")
    bank.build(progress=False)
    q = clustered(40, 16, 8, seed=6)
    before = {c: bank.search(q, k=2, category=c) for c in bank.categories}
    bank.save(tmp_path / "bank")
    loaded = ReferenceBank.load(tmp_path / "bank", dim=16)
    assert loaded.categories == bank.categories and len(loaded) == len(bank)
    for c in bank.categories:
        after = loaded.search(q, k=2, category=c)
        assert torch.equal(after.values, before[c].values) and torch.equal(after.indices, before[c].indices)
        assert loaded.locate(after.indices, c) [0] == bank.locate(before[c].indices, c)[0]
    # saving over an existing bank replaces it; the old version is deleted
    bank.save(tmp_path / "bank")
    assert sorted(os.listdir(tmp_path)) == ["bank"]
    assert sorted(os.listdir(tmp_path / "bank")) == [".lock", "CURRENT", current(tmp_path / "bank").name]


@pytest.fixture
def saved(tmp_path):
    bank = ReferenceBank(8, metric="l2", index="exact")
    bank.add(torch.randn(20, 8), category="a")
    bank.build(progress=False)
    bank.save(tmp_path / "bank")
    return tmp_path / "bank"


def test_load_rejects_truncated_and_corrupt_files(saved):
    index_file = current(saved) / "0.faiss"
    data = index_file.read_bytes()
    index_file.write_bytes(data[:-10])
    with pytest.raises(BankFormatError, match="truncated"):
        ReferenceBank.load(saved)
    index_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BankFormatError, match="corrupt"):
        ReferenceBank.load(saved)
    os.remove(index_file)
    with pytest.raises(BankFormatError, match="missing"):
        ReferenceBank.load(saved)


def test_load_rejects_wrong_dim_version_and_bad_meta(saved, tmp_path):
    with pytest.raises(BankFormatError, match="dim=8 features, expected dim=16"):
        ReferenceBank.load(saved, dim=16)
    meta_file = current(saved) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(BankFormatError, match="format 99"):
        ReferenceBank.load(saved)
    meta_file.write_text("{not json")
    with pytest.raises(BankFormatError, match="corrupt"):
        ReferenceBank.load(saved)
    meta_file.write_text(json.dumps({"format": 2, "dim": 8}))
    with pytest.raises(BankFormatError, match="malformed"):
        ReferenceBank.load(saved)
    with pytest.raises(BankFormatError, match="not a saved bank"):
        ReferenceBank.load(tmp_path / "nothing")


def test_crash_during_save_leaves_previous_bank_intact(saved, monkeypatch):
    before = (current(saved) / "meta.json").read_text()
    entries = sorted(os.listdir(saved))
    bank = ReferenceBank(8, metric="l2")
    bank.add(torch.randn(5, 8), category="new")
    bank.build(progress=False)
    import faiss

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(OSError, match="disk full"):
        bank.save(saved)
    assert (current(saved) / "meta.json").read_text() == before
    assert sorted(os.listdir(saved.parent)) == ["bank"]
    assert sorted(os.listdir(saved)) == entries  # no half-written version left behind
    assert ReferenceBank.load(saved).categories == ["a"]


def test_coreset_keeps_kcenter_rows():
    feats = clustered(400, 8, 4, seed=7)
    bank = ReferenceBank(8, metric="l2")
    bank.add(feats)
    bank.build(coreset=0.1, progress=False)
    assert len(bank) == 40
    sel = fastad.ops.kcenter_greedy(feats, 40, metric="l2", seed=0).indices.sort().values
    r = bank.search(feats[sel], k=1)
    assert torch.equal(r.values[:, 0], torch.zeros(40))
    _, patches = bank.locate(r.indices[:, 0])
    assert torch.equal(patches, sel)


@pytest.mark.parametrize("ctor,match", [
    (lambda: ReferenceBank(0), "`dim` must be a positive integer"),
    (lambda: ReferenceBank(8, metric="dot"), "`metric` must be one of"),
    (lambda: ReferenceBank(8, index="lsh"), "`index` must be one of"),
    (lambda: ReferenceBank(8, index="ivf", m=4), "unknown parameters \\['m'\\]"),
    (lambda: ReferenceBank(10, index="ivfpq", m=4), "must divide dim=10"),
])
def test_constructor_errors(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_usage_errors():
    bank = ReferenceBank(8)
    with pytest.raises(ValueError, match=r"must be \[n, 8\]"):
        bank.add(torch.randn(3, 7))
    with pytest.raises(ValueError, match="NaN"):
        bank.add(torch.full((2, 8), float("nan")))
    with pytest.raises(ValueError, match="2 images but 1 image_ids"):
        bank.add(torch.randn(2, 3, 8), image_ids=[1])
    bank.add(torch.randn(3, 8))
    bank.build(progress=False)
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 3\]"):
        bank.search(torch.randn(1, 8), k=4)
    with pytest.raises(ValueError, match=r"`query` must be \[N, 8\]"):
        bank.search(torch.randn(1, 9))
    small = ReferenceBank(8, index="ivf", nlist=16)
    small.add(torch.randn(10, 8))
    with pytest.raises(ValueError, match="fewer than `nlist`=16"):
        small.build(progress=False)


def test_lazy_attribute_on_package():
    assert fastad.ReferenceBank is ReferenceBank


def normal_and_held_out(n, n_query, dim=32, clusters=32, seed=11):
    """bench_bank's kind of data, small: unit rows around random centres; the queries are
    more samples of the same clusters, not in the bank."""
    x = torch.nn.functional.normalize(clustered(n + n_query, dim, clusters, seed, spread=0.5 / 5.66), dim=-1)
    return x[:n].contiguous(), x[n:].contiguous()


def recall_via_locate(bank, base, queries, metric):
    """recall@1, mapping the bank's rows back to `base` (added as one image) with locate."""
    _, patches = bank.locate(bank.search(queries, k=1).indices[:, 0])
    return float((patches == nn_distance(queries, base, k=1, metric=metric).indices[:, 0]).float().mean())


@pytest.mark.parametrize("kind,metric", [("ivf", "cosine"), ("ivf", "l2"), ("ivfpq", "cosine"), ("hnsw", "cosine"),
                                         ("hnsw", "l2")])
def test_defaults_reach_the_stated_recall(kind, metric):
    base, queries = normal_and_held_out(4000, 300)
    bank = ReferenceBank(32, metric=metric, index=kind)
    bank.add(base)
    bank.build(progress=False)
    assert recall_via_locate(bank, base, queries, metric) >= 0.95


def test_ivfpq_re_ranks_its_candidates_exactly():
    base, queries = normal_and_held_out(3000, 100)
    kept = ReferenceBank(32, metric="l2", index="ivfpq", nlist=16, m=8, nbits=4, refine=32)
    codes_only = ReferenceBank(32, metric="l2", index="ivfpq", nlist=16, m=8, nbits=4, refine=0)
    for bank in (kept, codes_only):
        bank.add(base)
        bank.build(progress=False)
    want = nn_distance(queries, base, k=3, metric="l2")
    got = kept.search(queries, k=3)
    torch.testing.assert_close(got.values, base[got.indices].sub(queries[:, None]).norm(dim=-1), atol=1e-5, rtol=0)
    assert float((got.indices == want.indices).float().mean()) >= 0.95
    approx = codes_only.search(queries, k=3)  # PQ distances: not the exact ones
    assert not torch.allclose(approx.values, base[approx.indices].sub(queries[:, None]).norm(dim=-1), atol=1e-5)


@pytest.mark.parametrize("kind,params,param", [("ivf", dict(nlist=64), "nprobe"),
                                               ("ivfpq", dict(nlist=64, m=8, nbits=4), "nprobe"),
                                               ("hnsw", dict(hnsw_m=4), "ef_search")])
def test_recall_target_tunes_measures_and_is_saved(tmp_path, kind, params, param):
    base, queries = normal_and_held_out(4000, 300)
    bank = ReferenceBank(32, metric="cosine", index=kind, recall_target=0.97, **params)
    bank.add(base)
    bank.build(progress=False)
    r = bank.recall["default"]
    assert r["recall_at_1"] >= 0.97 and r["sample"] == 400 and r["param"] == param and r["target"] == 0.97
    assert f"recall@1={{default: {r['recall_at_1']:.3f} at {param}={r['value']}}}" in repr(bank)
    # the held-out estimate holds for fresh queries, and the row order still maps through locate
    assert recall_via_locate(bank, base, queries, "cosine") >= 0.93
    rows = torch.tensor([0, 1234, 3999])
    _, patches = bank.locate(bank.search(base[rows], k=1).indices[:, 0])
    assert torch.equal(patches, rows)
    bank.save(tmp_path / "bank")
    loaded = ReferenceBank.load(tmp_path / "bank")
    assert loaded.recall == bank.recall and repr(loaded) == repr(bank)
    assert torch.equal(loaded.search(queries).indices, bank.search(queries).indices)
    assert ReferenceBank.load(tmp_path / "bank", **{param: 1}).recall == {}  # another setting: no stale claim


def test_unreachable_recall_target_warns_and_keeps_the_best():
    base, _ = normal_and_held_out(3000, 0)
    bank = ReferenceBank(32, metric="l2", index="ivfpq", nlist=8, m=2, nbits=4, refine=0, recall_target=1.0)
    bank.add(base)
    with pytest.warns(RuntimeWarning, match="below recall_target=1.0"):
        bank.build(progress=False)
    r = bank.recall["default"]
    assert r["recall_at_1"] < 1.0 and 1 <= r["value"] <= 8
