"""fastad.patch_anomalib on anomalib's own PatchCore model and KCenterGreedy: the patched
classes select the same coresets and give the same anomaly maps and scores as anomalib's
code, and patching / unpatching is exact, idempotent, nestable and thread-safe."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import torch

import fastad
from fastad.integrations.anomalib import AnomalibPatch, patched_targets, unpatch_anomalib

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _restore_anomalib():
    yield
    unpatch_anomalib()


@pytest.fixture(scope="module")
def classes():
    pytest.importorskip("anomalib")
    from anomalib.models.components.sampling.k_center_greedy import KCenterGreedy
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    return PatchcoreModel, KCenterGreedy


@pytest.fixture(scope="module")
def patchcore(classes):
    """anomalib's PatchcoreModel on a random resnet18 (nothing downloaded) and tiny images."""
    PatchcoreModel, _ = classes
    torch.manual_seed(0)
    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False, num_neighbors=9)
    g = torch.Generator().manual_seed(1)
    train = [torch.rand(4, 3, 64, 64, generator=g) for _ in range(3)]  # 3 x 4 x 8 x 8 = 768 patches
    # 20 images x 64 patches: more than anomalib's 1,024-row chunk, so its chunked path runs too
    test = torch.rand(20, 3, 64, 64, generator=g)
    test[3, :, 20:40, 20:40] = 1.0  # a bright "defect"
    return model, train, test


def fit(model, train, ratio: float, seed: int) -> torch.Tensor:
    """PatchCore training: embeddings of the train images, then anomalib's coreset subsampling."""
    model.train()
    model.embedding_store.clear()
    with torch.no_grad():
        for x in train:
            model(x)
    torch.manual_seed(seed)
    np.random.seed(seed)  # anomalib's projection also draws from numpy's global generator
    model.subsample_embedding(ratio)
    model.eval()
    return model.memory_bank.clone()


def infer(model, images, num_neighbors: int):
    model.num_neighbors = num_neighbors
    with torch.no_grad():
        out = model(images)
    return out.pred_score.clone(), out.anomaly_map.clone()


def exact_nn(embedding: torch.Tensor, bank: torch.Tensor, k: int):
    d = torch.cdist(embedding.double(), bank.double())
    v, i = torch.sort(d, dim=1, stable=True)
    return v[:, :k], i[:, :k]


def gram_tolerance(embedding: torch.Tensor, bank: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Bound on anomalib's float32 Gram-form error in distances ``dist`` [n] or [n, k]:
    |err(d^2)| <= gamma_C (|x| + |y|)^2, so |err(d)| <= min(|err(d^2)| / (2d), sqrt(|err(d^2)|))."""
    gamma = embedding.shape[1] * torch.finfo(torch.float32).eps
    nx = embedding.double().norm(dim=1)
    err_sq = gamma * (nx + bank.double().norm(dim=1).max()) ** 2
    err_sq = err_sq if dist.dim() == 1 else err_sq[:, None]
    return torch.minimum(err_sq / (2 * dist.double().clamp_min(1e-30)), err_sq.sqrt())


def assert_same_neighbours(got, want, embedding: torch.Tensor, bank: torch.Tensor) -> None:
    """fastad's (values, indices) are the exact nearest neighbours, and anomalib's agree with them
    up to anomalib's Gram-form rounding: values within the bound, indices equal except between
    bank rows whose exact distances are closer than that."""
    k = 1 if got[1].dim() == 1 else got[1].shape[1]
    ev, ei = exact_nn(embedding, bank, k)
    gv, gi, wv, wi = (t if t.dim() == 2 else t[:, None] for t in (*got, *want))
    assert torch.equal(gi, ei)
    torch.testing.assert_close(gv, ev.float(), rtol=1e-5, atol=1e-7)
    tol = gram_tolerance(embedding, bank, ev)
    assert bool(((wv.double() - ev).abs() <= tol + 1e-7).all())
    differ = wi != gi
    if bool(differ.any()):  # only near-ties may resolve differently
        dw = torch.cdist(embedding.double(), bank.double()).gather(1, wi)
        assert bool(((dw - ev).abs() <= 2 * tol + 1e-7)[differ].all())


# ------------------------------------------------------------------ PatchCore end to end
def test_patchcore_same_coreset_maps_and_scores(classes, patchcore):
    PatchcoreModel, _ = classes
    model, train, test = patchcore
    bank0 = fit(model, train, 0.1, seed=5)
    want = {k: infer(model, test, k) for k in (9, 1)}
    emb = model.reshape_embedding(model.generate_embedding(
        {k: model.feature_pooler(v) for k, v in model.feature_extractor(test).items()})).detach()
    want_nn = model.nearest_neighbors(emb, 1)

    with fastad.patch_anomalib():  # `model` was built before: the class-level patch reaches it
        assert vars(PatchcoreModel)["nearest_neighbors"].__wrapped__ is not None
        bank1 = fit(model, train, 0.1, seed=5)
        got = {k: infer(model, test, k) for k in (9, 1)}
        got_nn = model.nearest_neighbors(emb, 1)

    assert bank1.shape == (76, 384)
    assert torch.equal(bank0, bank1), "the patched KCenterGreedy selected another coreset"
    assert torch.equal(got_nn[1], want_nn[1])  # the same nearest bank rows on these features
    assert_same_neighbours(got_nn, want_nn, emb, bank1)
    for k in (9, 1):
        (s0, m0), (s1, m1) = want[k], got[k]
        assert s1.shape == s0.shape == (20,) and m1.shape == m0.shape == (20, 1, 64, 64)
        torch.testing.assert_close(s1, s0, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m1, m0, rtol=1e-4, atol=1e-6)
    assert int(got[1][0].argmax()) == 3  # the bright square stands out in both


# ------------------------------------------------------------------ nearest_neighbors
@pytest.mark.parametrize("n,m,c,k", [(1, 1, 3, 1), (7, 50, 16, 1), (1100, 300, 64, 1), (513, 200, 32, 9),
                                     (40, 9, 8, 9)])
def test_nearest_neighbors_matches_anomalib(classes, n, m, c, k):
    PatchcoreModel, _ = classes
    g = torch.Generator().manual_seed(n + m)
    model = PatchcoreModel.__new__(PatchcoreModel)
    torch.nn.Module.__init__(model)
    model.register_buffer("memory_bank", torch.randn(m, c, generator=g))
    emb = torch.randn(n, c, generator=g)
    want = model.nearest_neighbors(emb, k)
    with fastad.patch_anomalib(coreset=False):
        got = model.nearest_neighbors(emb, k)
    for w, o in zip(want, got):
        assert o.shape == w.shape == ((n,) if k == 1 else (n, k))
        assert o.dtype == w.dtype
    assert_same_neighbours(got, want, emb, model.memory_bank)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_nearest_neighbors_dtypes(classes, dtype):
    PatchcoreModel, _ = classes
    g = torch.Generator().manual_seed(3)
    model = PatchcoreModel.__new__(PatchcoreModel)
    torch.nn.Module.__init__(model)
    bank = torch.randn(60, 24, generator=g)
    emb = torch.randn(30, 24, generator=g)
    model.register_buffer("memory_bank", bank.to(dtype))
    with fastad.patch_anomalib(coreset=False):
        v, i = model.nearest_neighbors(emb.to(dtype), 3)
    assert v.dtype == dtype and v.shape == (30, 3) and i.dtype == torch.int64
    ref = fastad.ops.nn_distance_reference(emb.to(dtype)[None], bank.to(dtype)[None], k=3, metric="l2")
    assert torch.equal(i, ref.indices[0])
    torch.testing.assert_close(v, ref.values[0].to(dtype), rtol=0, atol=0)


def test_nearest_neighbors_rejects_nan(classes):
    PatchcoreModel, _ = classes
    model = PatchcoreModel.__new__(PatchcoreModel)
    torch.nn.Module.__init__(model)
    model.register_buffer("memory_bank", torch.randn(10, 4))
    emb = torch.randn(5, 4)
    emb[2, 1] = float("nan")
    with fastad.patch_anomalib(coreset=False), pytest.raises(ValueError, match="nn_distance.*NaN"):
        model.nearest_neighbors(emb, 1)


def test_tracing_keeps_anomalibs_export_friendly_code(classes):
    PatchcoreModel, _ = classes
    model = PatchcoreModel.__new__(PatchcoreModel)
    torch.nn.Module.__init__(model)
    model.register_buffer("memory_bank", torch.randn(10, 4, generator=torch.Generator().manual_seed(0)))

    class Search(torch.nn.Module):
        def __init__(self, pc):
            super().__init__()
            self.pc = pc

        def forward(self, e):
            return self.pc.nearest_neighbors(e, 1)

    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    with fastad.patch_anomalib(coreset=False):
        traced = torch.jit.trace(Search(model), emb)
    assert "fastad" not in str(traced.graph) and "matmul" in str(traced.graph)
    assert torch.equal(traced(emb)[1], Search(model)(emb)[1])


# ------------------------------------------------------------------ KCenterGreedy alone
def clustered(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(max(1, n // 40), c, generator=g) * 4
    return centers[torch.randint(0, centers.shape[0], (n,), generator=g)] + torch.randn(n, c, generator=g)


@pytest.mark.parametrize("n,c,ratio,three_d,kind", [
    (10, 5, 0.1, False, "gauss"),      # one pick: the random start alone
    (50, 8, 0.2, False, "gauss"),
    (700, 64, 0.05, False, "clustered"),
    (1500, 96, 0.02, True, "gauss"),   # 3-D embedding: anomalib skips the projection
    (3000, 128, 0.01, False, "clustered"),
    (2000, 256, 0.1, False, "gauss"),
])
def test_kcenter_greedy_same_coreset(classes, n, c, ratio, three_d, kind):
    _, KCenterGreedy = classes
    x = clustered(n, c, seed=n) if kind == "clustered" else torch.randn(n, c, generator=torch.Generator().manual_seed(n))
    emb = x.reshape(n, 2, c // 2) if three_d else x

    def run():
        torch.manual_seed(11)
        np.random.seed(11)
        sampler = KCenterGreedy(embedding=emb, sampling_ratio=ratio)
        idx = sampler.select_coreset_idxs()
        return idx, sampler.sample_coreset(), torch.rand(3), np.random.rand(3)

    want = run()
    with fastad.patch_anomalib(nearest_neighbors=False):
        got = run()
    assert len(got[0]) == int(n * ratio) and len(set(got[0])) == len(got[0])
    assert got[0] == want[0]
    assert torch.equal(got[1], want[1])
    # the same random numbers were consumed (projection and start)
    assert torch.equal(got[2], want[2]) and np.array_equal(got[3], want[3])


def test_kcenter_greedy_other_dtypes(classes):
    _, KCenterGreedy = classes
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(2))

    def run(t):
        torch.manual_seed(4)
        np.random.seed(4)
        return KCenterGreedy(embedding=t, sampling_ratio=0.05).select_coreset_idxs()

    want64 = run(x.double())
    with fastad.patch_anomalib(nearest_neighbors=False):
        assert run(x.double()) == want64  # float64: anomalib's own code runs
        half = run(x.half())
    want_half = run(x.half())
    assert len(half) == 20 and len(set(half)) == 20 and half[0] == want_half[0]


# ------------------------------------------------------------------ patch mechanics
def test_patch_and_unpatch_restore_the_originals(classes):
    PatchcoreModel, KCenterGreedy = classes
    nn0, kc0 = vars(PatchcoreModel)["nearest_neighbors"], vars(KCenterGreedy)["select_coreset_idxs"]
    assert patched_targets() == ()
    handle = fastad.patch_anomalib()
    assert isinstance(handle, AnomalibPatch) and handle.targets == ("nearest_neighbors", "coreset")
    nn1, kc1 = vars(PatchcoreModel)["nearest_neighbors"], vars(KCenterGreedy)["select_coreset_idxs"]
    assert nn1 is not nn0 and kc1 is not kc0
    assert nn1.__wrapped__ is nn0 and kc1.__wrapped__ is kc0
    assert nn1.__name__ == "nearest_neighbors"
    assert set(patched_targets()) == {"nearest_neighbors", "coreset"}
    fastad.unpatch_anomalib()
    assert vars(PatchcoreModel)["nearest_neighbors"] is nn0 and vars(KCenterGreedy)["select_coreset_idxs"] is kc0
    assert patched_targets() == ()
    fastad.unpatch_anomalib()  # no-op
    handle.undo()  # a released handle does nothing
    assert vars(PatchcoreModel)["nearest_neighbors"] is nn0


def test_double_patching_is_harmless(classes):
    PatchcoreModel, KCenterGreedy = classes
    nn0 = vars(PatchcoreModel)["nearest_neighbors"]
    fastad.patch_anomalib()
    nn1 = vars(PatchcoreModel)["nearest_neighbors"]
    fastad.patch_anomalib()
    assert vars(PatchcoreModel)["nearest_neighbors"] is nn1  # not wrapped twice
    assert nn1.__wrapped__ is nn0
    with fastad.patch_anomalib():
        assert vars(PatchcoreModel)["nearest_neighbors"] is nn1
    assert vars(PatchcoreModel)["nearest_neighbors"] is nn1  # still held by the plain calls
    fastad.unpatch_anomalib()
    assert vars(PatchcoreModel)["nearest_neighbors"] is nn0


def test_nested_blocks_and_partial_patches(classes):
    PatchcoreModel, KCenterGreedy = classes
    nn0, kc0 = vars(PatchcoreModel)["nearest_neighbors"], vars(KCenterGreedy)["select_coreset_idxs"]
    with fastad.patch_anomalib(coreset=False) as outer:
        assert outer.targets == ("nearest_neighbors",) and patched_targets() == ("nearest_neighbors",)
        assert vars(KCenterGreedy)["select_coreset_idxs"] is kc0
        with fastad.patch_anomalib():
            assert set(patched_targets()) == {"nearest_neighbors", "coreset"}
        assert patched_targets() == ("nearest_neighbors",)
        assert vars(KCenterGreedy)["select_coreset_idxs"] is kc0
    assert patched_targets() == ()
    assert vars(PatchcoreModel)["nearest_neighbors"] is nn0


def test_context_manager_restores_on_exceptions(classes):
    PatchcoreModel, KCenterGreedy = classes
    nn0, kc0 = vars(PatchcoreModel)["nearest_neighbors"], vars(KCenterGreedy)["select_coreset_idxs"]
    with pytest.raises(RuntimeError, match="boom"):
        with fastad.patch_anomalib():
            assert vars(PatchcoreModel)["nearest_neighbors"] is not nn0
            raise RuntimeError("boom")
    assert vars(PatchcoreModel)["nearest_neighbors"] is nn0 and vars(KCenterGreedy)["select_coreset_idxs"] is kc0
    assert patched_targets() == ()


def test_concurrent_blocks(classes):
    PatchcoreModel, _ = classes
    nn0 = vars(PatchcoreModel)["nearest_neighbors"]
    errors = []
    start = threading.Barrier(6)

    def worker():
        start.wait()
        for _ in range(200):
            with fastad.patch_anomalib():
                if vars(PatchcoreModel)["nearest_neighbors"] is nn0:  # held by this block: must be patched
                    errors.append("unpatched inside a block")

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert patched_targets() == () and vars(PatchcoreModel)["nearest_neighbors"] is nn0


def test_clear_import_error_without_anomalib(monkeypatch):
    # None in sys.modules makes the import fail as if the package were missing
    monkeypatch.setitem(sys.modules, "anomalib.models.image.patchcore.torch_model", None)
    with pytest.raises(ImportError, match="fastad.patch_anomalib needs anomalib"):
        fastad.patch_anomalib()
    assert patched_targets() == ()


def test_lazy_exports():
    from fastad.integrations import anomalib as integration

    assert fastad.patch_anomalib is integration.patch_anomalib
    assert fastad.unpatch_anomalib is integration.unpatch_anomalib
