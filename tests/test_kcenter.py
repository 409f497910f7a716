"""fastad.ops.kcenter_greedy: the reference loop's semantics, every backend against
it (identical indices and radius), greedy validity in float64, bad input."""
import math

import numpy as np
import pytest
import torch

import fastad
from fastad import _ext
from fastad.ops import kcenter as kc
from fastad.ops.kcenter import kcenter_greedy, kcenter_greedy_reference, kcenter_projection_matrix

from conftest import requires_cpu_ext, requires_cuda, requires_triton

# Relative tolerance of the float64 greedy-validity check: the canonical distance is
# within ~1.2e-7 of the exact one (float32 differences, final rounding to float32).
GREEDY_RTOL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clustered(n: int, c: int, seed: int, latent: int = 8, blobs: int = 24) -> torch.Tensor:
    """Points on a few blobs in a low-dimensional latent space: what makes the
    triangle-inequality pruning work, as on real patch features."""
    g = gen(seed)
    centers = torch.randn(blobs, latent, generator=g) * 4
    lab = torch.randint(0, blobs, (n,), generator=g)
    spread = torch.rand(blobs, generator=g) + 0.3
    z = centers[lab] + torch.randn(n, latent, generator=g) * spread[lab, None]
    w = torch.randn(latent, c, generator=g) / latent ** 0.5
    return z @ w + 0.05 * torch.randn(n, c, generator=g)


def select(x, k, metric="l2", init=0, backend="reference", **kw):
    return kcenter_greedy(x, k, metric=metric, init=init, backend=backend, **kw)


def assert_same(a, b):
    assert a.indices.dtype == b.indices.dtype == torch.int64
    assert torch.equal(a.indices.cpu(), b.indices.cpu()), (a.indices, b.indices)
    assert torch.equal(a.radius.cpu(), b.radius.cpu()), (a.radius, b.radius)


def assert_greedy_valid(x: torch.Tensor, res, metric="l2", init_centers=None):
    """Every pick maximises the float64 distance to the points selected before it
    (within GREEDY_RTOL), no pick repeats, and the radius is the final coverage."""
    xs = x if x.dim() == 3 else x.unsqueeze(0)
    idx = res.indices if res.indices.dim() == 2 else res.indices.unsqueeze(0)
    rad = res.radius.reshape(-1)
    for b in range(xs.shape[0]):
        f = xs[b].double()
        if metric == "cosine":
            f = f / f.norm(dim=1, keepdim=True)
        picks = idx[b].tolist()
        assert len(set(picks)) == len(picks)
        chosen = [] if init_centers is None else sorted(set(init_centers[b].tolist()))
        assert not set(chosen) & set(picks)
        mind = torch.full((f.shape[0],), math.inf, dtype=torch.float64)
        for c in chosen:
            mind = torch.minimum(mind, (f - f[c]).norm(dim=1))
        sel = torch.zeros(f.shape[0], dtype=torch.bool)
        sel[chosen] = True
        for t, p in enumerate(picks):
            if chosen or t:
                free = mind.masked_fill(sel, -math.inf)
                top = free.max().item()
                assert mind[p].item() >= top - GREEDY_RTOL * top, (b, t, p, mind[p].item(), top)
            sel[p] = True
            mind = torch.minimum(mind, (f - f[p]).norm(dim=1))
        want = mind.max().item()
        if metric == "cosine":
            want = want ** 2 / 2
        assert abs(rad[b].item() - want) <= 1e-6 * max(1.0, want)


# ------------------------------------------------------------------ reference
def test_reference_small_handmade_cases():
    x = torch.tensor([[0.0], [1.0], [10.0], [4.0]])
    r = kcenter_greedy_reference(x, 3)
    assert r.indices.tolist() == [0, 2, 3]
    assert r.radius.item() == 1.0
    # ties go to the lowest index
    assert kcenter_greedy_reference(torch.tensor([[0.0], [1.0], [-1.0]]), 2).indices.tolist() == [0, 1]
    # start elsewhere
    assert kcenter_greedy_reference(x, 2, init=2).indices.tolist() == [2, 0]


def test_reference_duplicates_give_distinct_indices_and_zero_radius():
    x = torch.ones(6, 3)
    r = kcenter_greedy_reference(x, 6, init=4)
    assert r.indices.tolist() == [4, 0, 1, 2, 3, 5]
    assert r.radius.item() == 0.0
    y = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [3.0, 4.0]])
    r = kcenter_greedy_reference(y, 3)
    assert r.indices.tolist() == [0, 2, 1]
    assert r.radius.item() == 0.0


def test_reference_init_centers_and_empty_init():
    x = torch.tensor([[0.0], [1.0], [10.0], [4.0], [7.0]])
    r = kcenter_greedy_reference(x, 2, init=torch.tensor([2, 0]))
    assert r.indices.tolist() == [3, 4]  # 4 is 4 from 0 (> 3 = 7 -> 10), then 7 (3 from 4 and 10)
    assert r.radius.item() == 1.0
    # nothing selected yet: every distance is +inf, the first pick is index 0
    assert kcenter_greedy_reference(x, 2, init=torch.zeros(0, dtype=torch.long)).indices.tolist() == [0, 2]
    # [B, M] init, one row per problem
    xb = torch.stack([x, x.flip(0)])
    r = kcenter_greedy_reference(xb, 1, init=torch.tensor([[2], [2]]))
    assert r.indices.tolist() == [[0], [4]]


def test_reference_canonical_distance_is_the_pairwise_tree():
    g = gen(3)
    x = torch.randn(1, 5, 7, generator=g)
    c = torch.randn(1, 7, generator=g)
    got = kc._canonical_dist(x, c)[0]
    for i in range(5):
        t = [float(np.float32(v)) ** 2 for v in (x[0, i] - c[0]).tolist()] + [0.0]  # pad to 8
        while len(t) > 1:
            t = [t[2 * j] + t[2 * j + 1] for j in range(len(t) // 2)]
        assert got[i].item() == float(np.float32(math.sqrt(t[0])))
    exact = (x[0].double() - c[0].double()).norm(dim=1)
    assert torch.allclose(got.double(), exact, rtol=3e-7, atol=0)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_reference_picks_are_greedy_in_float64(metric):
    x = clustered(300, 24, seed=1)
    r = kcenter_greedy_reference(x, 40, metric=metric)
    assert_greedy_valid(x, r, metric)
    init = torch.tensor([5, 9, 5])
    r = kcenter_greedy_reference(x, 20, metric=metric, init=init)
    assert_greedy_valid(x, r, metric, init_centers=init.unsqueeze(0))


def test_reference_batch_equals_problems_alone_and_shapes():
    x = torch.randn(3, 50, 6, generator=gen(4))
    r = kcenter_greedy_reference(x, 9, init=2)
    assert r.indices.shape == (3, 9) and r.radius.shape == (3,)
    assert r.radius.dtype == torch.float32
    for b in range(3):
        one = kcenter_greedy_reference(x[b], 9, init=2)
        assert one.indices.shape == (9,) and one.radius.shape == ()
        assert_same(one, type(one)(r.indices[b], r.radius[b]))


def test_cosine_ignores_row_scale_and_reports_one_minus_cos():
    x = torch.randn(80, 5, generator=gen(5))
    scale = 2.0 ** torch.randint(-3, 4, (80, 1), generator=gen(6)).float()  # exact rescaling
    a = kcenter_greedy_reference(x, 10, metric="cosine")
    b = kcenter_greedy_reference(x * scale, 10, metric="cosine")
    assert_same(a, b)
    u = x.double() / x.double().norm(dim=1, keepdim=True)
    cos_to_nearest = (u @ u[a.indices].T).max(dim=1).values
    assert abs(a.radius.item() - (1 - cos_to_nearest.min().item())) < 1e-6


def test_random_init_is_seeded():
    x = torch.randn(8, 40, 3, generator=gen(7))
    a = kcenter_greedy(x, 5, init="random", seed=11, backend="reference")
    b = kcenter_greedy(x, 5, init="random", seed=11, backend="reference")
    c = kcenter_greedy(x, 5, init="random", seed=12, backend="reference")
    assert_same(a, b)
    assert not torch.equal(a.indices[:, 0], c.indices[:, 0])
    torch.manual_seed(0)
    d = kcenter_greedy(x, 5, init="random", backend="reference")
    torch.manual_seed(0)
    assert_same(d, kcenter_greedy(x, 5, init="random", backend="reference"))


def test_projection_is_seeded_sparse_and_equals_projecting_first():
    r = kcenter_projection_matrix(256, 32, seed=3)
    assert r.shape == (32, 256) and r.dtype == torch.float32
    assert torch.equal(r, kcenter_projection_matrix(256, 32, seed=3))
    nz = r[r != 0].abs()
    assert torch.allclose(nz, torch.full_like(nz, math.sqrt(16.0 / 32)))  # sqrt(1/density / out_dim)
    assert 0.03 < (r != 0).float().mean().item() < 0.10  # density 1/16
    x = clustered(200, 256, seed=8)
    a = kcenter_greedy(x, 12, projection_dim=32, seed=3, backend="reference")
    b = kcenter_greedy(x @ r.T, 12, backend="reference")
    assert_same(a, b)


# ------------------------------------------------------------- C++ backend
CPU_CASES = [  # (B, N, C, k, dtype, init)
    (1, 1, 3, 1, torch.float32, 0),
    (1, 7, 1, 7, torch.float32, 3),
    (2, 7, 5, 4, torch.float16, "random"),
    (1, 513, 33, 60, torch.float32, torch.tensor([7, 500, 7])),
    (3, 200, 64, 30, torch.bfloat16, 0),
    (2, 300, 130, 25, torch.float32, torch.tensor([[1, 2], [299, 0]])),
]


@requires_cpu_ext
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"B{c[0]}N{c[1]}C{c[2]}k{c[3]}{str(c[4])[6:]}")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cpu_matches_reference(cpu_isa, case, metric):
    B, N, C, k, dtype, init = case
    x = (clustered(B * N, C, seed=N + C).reshape(B, N, C) if N > 1 else torch.randn(B, N, C, generator=gen(1)))
    x = x.to(dtype)
    if B == 1:
        x = x[0]
    want = select(x, k, metric, init, "reference", seed=5)
    got = select(x, k, metric, init, "cpu", seed=5)
    assert_same(want, got)


def _cpu_direct(x, k, init, storage, metric="l2", rotate=None):
    mode, init_t = kc._init_arg(init)
    xb, forced, picks = kc._prepare(x, k, metric, init_t, mode, None, None)
    return kc._select_cpu(xb, forced, picks, False, storage, rotate)


def _ref_direct(x, k, init, metric="l2"):
    mode, init_t = kc._init_arg(init)
    xb, forced, picks = kc._prepare(x, k, metric, init_t, mode, None, None)
    return kc._select_reference(xb, forced, picks, False)


# How the C++ kernel stores its approximate rows: the input itself, or an fp16 / bf16
# copy, plain or PCA-rotated (its first 32 coordinates inline in the cluster lists).
STORAGES = [("input", False), ("fp16", False), ("fp16", True), ("bf16", False), ("bf16", True)]


@requires_cpu_ext
@pytest.mark.parametrize("data", ["clustered", "gaussian", "duplicates", "integer_ties", "offset", "half"])
def test_cpu_storages_match_reference_on_hard_data(cpu_isa, data):
    g = gen(9)
    if data == "clustered":
        x = clustered(1200, 96, seed=2)
    elif data == "gaussian":
        x = torch.randn(1000, 64, generator=g)
    elif data == "duplicates":  # many zero distances: the rule must still give distinct picks
        x = torch.randn(900, 40, generator=g)
        x[300:600] = x[:300]
        x[600:] = x[5]
    elif data == "integer_ties":  # exact ties everywhere: lowest index must win
        x = torch.randint(-3, 4, (800, 12), generator=g).float()
    elif data == "offset":  # large common offset, tiny spread: the copy is centred and scaled
        x = 1000.0 + 1e-3 * clustered(1000, 64, seed=4)
    else:  # fp16 input: the copy re-quantises it
        x = clustered(1000, 128, seed=5).half()
    k = 350 if data == "duplicates" else 100
    want = _ref_direct(x[None], k, 0)
    for storage, rotate in STORAGES:
        got = _cpu_direct(x[None], k, 0, storage, rotate=rotate)
        assert torch.equal(want[0], got[0]), (storage, rotate)
        assert torch.equal(want[1], got[1]), (storage, rotate)
    if data == "duplicates":  # k - 1 argmax picks after the start 0
        assert len(set(got[0][0].tolist()) | {0}) == k


def test_pca_basis_is_orthonormal_and_skips_unstructured_data():
    x = clustered(3000, 128, seed=7)[None]
    u, sig = kc._pca_basis(x, kc._row_mean(x))
    assert u.shape == (1, 128, 32) and u.dtype == torch.float64
    assert torch.allclose(u[0].T @ u[0], torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert 1.0 <= sig.item() < 1.0 + 1e-6
    noise = torch.randn(1, 3000, 128, generator=gen(8))
    assert kc._pca_basis(noise, kc._row_mean(noise))[0].shape[2] == 0


@requires_cpu_ext
def test_cpu_parallel_paths_match_reference():
    """Big enough for the multithreaded passes and the pruning; plain and rotated copy."""
    x = clustered(40000, 32, seed=6)
    want = _ref_direct(x[None], 48, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = _cpu_direct(x[None], 48, 0, "auto")
        got_rot = _cpu_direct(x[None], 48, 0, "fp16", rotate=True)
        xb = torch.stack([x[:20000], x[20000:]])  # two problems: parallel over problems
        got_b = _cpu_direct(xb, 30, torch.tensor([[4], [9]]), "auto")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert torch.equal(want[0], got_rot[0]) and torch.equal(want[1], got_rot[1])
    want_b = _ref_direct(xb, 30, torch.tensor([[4], [9]]))
    assert torch.equal(want_b[0], got_b[0]) and torch.equal(want_b[1], got_b[1])


@requires_cpu_ext
def test_cpu_picks_are_greedy_in_float64_and_all_points():
    x = clustered(400, 16, seed=10)
    r = select(x, 60, backend="cpu")
    assert_greedy_valid(x, r)
    r = select(x, 400, backend="cpu", init=17)  # k = N: a permutation, radius 0
    assert sorted(r.indices.tolist()) == list(range(400)) and r.radius.item() == 0.0
    init = torch.arange(0, 400, 2)
    r = select(x, 200, backend="cpu", init=init)  # every point left
    assert sorted(r.indices.tolist()) == list(range(1, 400, 2)) and r.radius.item() == 0.0


@requires_cpu_ext
def test_cpu_progress_bar_gives_the_same_result(capsys):
    x = clustered(600, 8, seed=11)
    a = select(x, 50, backend="cpu", progress=True)
    assert "k-center greedy" in capsys.readouterr().err
    assert_same(a, select(x, 50, backend="reference"))


@requires_cpu_ext
def test_cpu_binding_rechecks_arguments():
    x = np.zeros((1, 5, 3), dtype=np.float32)
    mu = np.zeros((1, 3), np.float32)
    none = np.zeros((1, 3, 0), np.float64)
    one = np.ones(1, np.float32)

    def make(xx=x, forced=np.zeros((1, 1), np.int64), picks=2, storage=0, m=mu, basis=none, sig=one):
        return _ext._C.KCenter(xx, 0, forced, picks, storage, m, basis, sig)

    with pytest.raises(ValueError, match="float32"):
        make(xx=x.astype(np.float64))
    with pytest.raises(ValueError, match="out of range"):
        make(forced=np.array([[5]], np.int64))
    with pytest.raises(ValueError, match="cannot pick"):
        make(forced=np.array([[1, 1]], np.int64), picks=5)
    with pytest.raises(ValueError, match="shape"):
        make(forced=np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match="storage"):
        make(storage=7)
    with pytest.raises(ValueError, match="3 dimensions"):
        make(xx=x[0])
    with pytest.raises(ValueError, match="mu"):
        make(m=np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="basis"):
        make(basis=np.zeros((1, 3, 2), np.float32))
    with pytest.raises(ValueError, match="sig"):
        make(basis=np.zeros((1, 3, 2), np.float64), sig=np.zeros(1, np.float32))
    sel = make()
    sel.advance(2, 1)
    with pytest.raises(ValueError, match="indices"):
        sel.result(np.zeros((1, 3), np.int64), np.zeros(1, np.float32))


# ----------------------------------------------------------- Triton backend
TRITON_CASES = [  # (B, N, C, k, dtype, init, persistent)  -- small: the interpreter is slow
    (2, 37, 5, 9, torch.float32, 0, True),
    (1, 45, 70, 12, torch.float16, torch.tensor([3, 40, 3]), True),
    (3, 20, 9, 20, torch.bfloat16, "random", True),
    (2, 41, 33, 8, torch.float32, torch.tensor([[1], [2]]), False),
    (1, 30, 3, 10, torch.float32, 5, False),
]


@requires_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"B{c[0]}N{c[1]}C{c[2]}k{c[3]}{'P' if c[6] else 'S'}")
def test_triton_matches_reference(case):
    from fastad.kernels.kcenter import kcenter_select

    B, N, C, k, dtype, init, persistent = case
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = clustered(B * N, C, seed=N).reshape(B, N, C).to(dtype)
    x[:, 4:8] = x[:, :4]  # duplicates
    mode, init_t = kc._init_arg(init)
    xb, forced, picks = kc._prepare(x, k, "l2", init_t, mode, None, 2)
    want = kc._select_reference(xb, forced, picks, False)
    got = kcenter_select(xb.to(dev), forced.to(dev), picks, persistent=persistent)
    assert torch.equal(want[0], got[0].cpu()) and torch.equal(want[1], got[1].cpu())


@requires_triton
def test_triton_public_path_with_progress_and_cosine():
    x = clustered(40, 6, seed=12)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = kcenter_greedy(x.to(dev), 6, metric="cosine", backend="triton", progress=True)
    assert_same(kcenter_greedy_reference(x, 6, metric="cosine"), got)


@requires_cuda
def test_triton_on_gpu_icas_shape():
    x = torch.randn(4, 1369, 256, generator=gen(13))
    want = kcenter_greedy_reference(x, 200)
    assert_same(want, kcenter_greedy(x.cuda(), 200))
    assert_same(want, kcenter_greedy(x.cuda(), 200, backend="triton", progress=True))


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=requires_cpu_ext)])
def test_bad_input_is_rejected_clearly(backend):
    x = torch.randn(10, 3)

    def run(*a, **kw):
        return kcenter_greedy(*a, backend=backend, **kw)

    with pytest.raises(ValueError, match=r"`k` must be in \[1, N=10\], got 0"):
        run(x, 0)
    with pytest.raises(ValueError, match="got 11"):
        run(x, 11)
    with pytest.raises(TypeError, match="`k` must be an int"):
        run(x, 2.0)
    with pytest.raises(ValueError, match="at least one point"):
        run(torch.zeros(0, 3), 1)
    with pytest.raises(ValueError, match="at least one point"):
        run(torch.zeros(4, 0), 1)
    with pytest.raises(ValueError, match="dimensions"):
        run(torch.zeros(5), 1)
    with pytest.raises(TypeError, match="dtype"):
        run(torch.zeros(5, 2, dtype=torch.int64), 1)
    y = x.clone()
    y[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        run(y, 2)
    y[3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        run(y, 2)
    with pytest.raises(ValueError, match=r"`init` indices must be in \[0, N=10\)"):
        run(x, 2, init=10)
    with pytest.raises(ValueError, match=r"`init` indices must be in \[0, N=10\)"):
        run(x, 2, init=-1)
    with pytest.raises(ValueError, match=r"`init` indices must be in"):
        run(x, 2, init=torch.tensor([0, 12]))
    with pytest.raises(ValueError, match="exceeds the 7 points not in `init`"):
        run(x, 8, init=torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="must have B = 2 rows"):
        run(torch.randn(2, 10, 3), 2, init=torch.tensor([[0], [1], [2]]))
    with pytest.raises(TypeError, match="integer indices"):
        run(x, 2, init=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="'random'"):
        run(x, 2, init="first")
    with pytest.raises(ValueError, match="metric"):
        run(x, 2, metric="l1")
    with pytest.raises(ValueError, match="projection_dim"):
        run(x, 2, projection_dim=0)
    z = x.clone()
    z[4] = 0
    with pytest.raises(ValueError, match="non-zero rows"):
        run(z, 2, metric="cosine")
    assert run(z, 2).indices.shape == (2,)  # a zero row is fine for l2


def test_explicit_unavailable_backend_is_clear():
    with pytest.raises(fastad.BackendUnavailableError, match="kcenter_greedy"):
        kcenter_greedy(torch.randn(5, 2), 2, backend="cuda")


# ------------------------------------------------------- torch.compile, anomalib
def test_torch_compile_fullgraph():
    x = torch.randn(2, 30, 4, generator=gen(14))

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        r = kcenter_greedy(x, 5, init=torch.tensor([1]), projection_dim=3, seed=0)
        return r.indices + 0, r.radius * 1

    idx, rad = f(x)
    want = kcenter_greedy(x, 5, init=torch.tensor([1]), projection_dim=3, seed=0, backend="reference")
    assert torch.equal(idx, want.indices) and torch.equal(rad, want.radius)


def anomalib_select(features: torch.Tensor, coreset_size: int, start: int) -> list[int]:
    """anomalib 2.7 KCenterGreedy.select_coreset_idxs, line for line, on already
    projected features and a given start (anomalib draws it with torch.randint)."""
    min_distances = None
    idx = torch.tensor(start)
    selected = [idx]
    for _ in range(coreset_size - 1):
        distances = torch.linalg.norm(features - features[idx].squeeze(), ord=2, dim=1, keepdim=True)
        min_distances = distances if min_distances is None else torch.minimum(min_distances, distances)
        _, idx = torch.max(min_distances.squeeze(1), dim=0)
        min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
        selected.append(idx)
    return torch.stack(selected).tolist()


def test_reproduces_anomalib_picks_on_the_same_features():
    x = clustered(3000, 64, seed=15)
    want = anomalib_select(x, 150, start=1234)
    for backend in ["reference"] + (["cpu"] if fastad.backends()["cpu"].available else []):
        assert kcenter_greedy(x, 150, init=1234, backend=backend).indices.tolist() == want


def test_reproduces_the_installed_anomalib_class():
    sampling = pytest.importorskip("anomalib.models.components.sampling")
    x = clustered(2000, 48, seed=16)
    sampler = sampling.KCenterGreedy(embedding=x.unsqueeze(1), sampling_ratio=0.05)  # 3-D: no projection
    torch.manual_seed(3)
    want = sampler.select_coreset_idxs()
    torch.manual_seed(3)
    start = int(torch.randint(high=2000, size=(1,)).squeeze())
    assert kcenter_greedy(x, 100, init=start).indices.tolist() == want


@requires_triton
def test_triton_path_choice(monkeypatch):
    """One program per problem only while the problems fill the GPU (or are tiny): a single
    large problem takes the multi-block path (every SM works on each step)."""
    import types

    from fastad.kernels import kcenter as kk

    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: props)
    cuda = torch.device("cuda")
    assert kk._use_persistent(32, 1369, cuda, interp=False)  # iCAS batch
    assert kk._use_persistent(1, 1000, cuda, interp=False)  # tiny
    assert kk._use_persistent(40, 10000, cuda, interp=False)  # fills the GPU
    assert not kk._use_persistent(1, 10000, cuda, interp=False)  # one large problem
    assert not kk._use_persistent(200, 20000, cuda, interp=False)  # beyond on-chip sizes
    assert kk._use_persistent(1, 10000, cuda, interp=True)  # the interpreter: fewest launches
