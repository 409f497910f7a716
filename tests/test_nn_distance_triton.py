"""nn_distance, Triton backend, against the float64 reference.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py): small shapes, fixed tiles (32 x 64 x 32) so that sizes such as 7, 33 and
130 leave partial tiles. Each path of the kernel (fused running bound, histogram
threshold with refinement, bank splits, row chunks, candidate overflow and the exact
fallback, float16 screen of float32 / bfloat16 inputs) is forced at least once and
checked to have been taken (the ``stats`` dict of nn_distance_triton).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda, requires_triton
from nn_testing import assert_matches_reference

from fastad.ops import NNResult, nn_distance

pytestmark = requires_triton

METRICS = ["cosine", "l2", "ip"]
REDUCES = ["topk", "mean_largest", "mean_smallest"]


def kern():
    import fastad.kernels.nn_distance as K

    return K


def run(query, bank, k=1, metric="cosine", scale=1.0, reduce="topk", qg=None, bg=None, group_match="other",
        **knobs):
    """nn_distance_triton on 3-D arguments; returns (NNResult shaped like the public API, stats)."""
    stats = {}
    q3 = query if query.dim() == 3 else query[None]
    b3 = bank if bank.dim() == 3 else bank[None]
    if qg is not None:
        qg = (qg if qg.dim() == 2 else qg[None].expand(q3.shape[0], -1)).long().contiguous()
        bg = (bg if bg.dim() == 2 else bg[None]).long().contiguous()
    v, i = kern().nn_distance_triton(q3.contiguous(), b3.contiguous(), k, metric, scale, reduce, qg, bg,
                                     group_match, True, stats=stats, **knobs)
    if query.dim() == 2:
        v, i = v[0], i[0]
    return NNResult(v, i if reduce == "topk" else None), stats


def check(query, bank, k=1, metric="cosine", scale=1.0, reduce="topk", qg=None, bg=None, group_match="other",
          **knobs):
    res, stats = run(query, bank, k, metric, scale, reduce, qg, bg, group_match, **knobs)
    assert_matches_reference(res, query, bank, k=k, metric=metric, scale=scale, reduce=reduce, query_groups=qg,
                             bank_groups=bg, group_match=group_match)
    return res, stats


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("metric,reduce", list(itertools.product(METRICS, REDUCES)))
def test_every_metric_and_reduce(metric, reduce):
    g = gen(1)
    q, b = torch.randn(31, 17, generator=g), torch.randn(130, 17, generator=g)
    _, stats = check(q, b, k=3, metric=metric, scale=0.5, reduce=reduce)
    assert stats["path"] == "fused" and stats["overflow_rows"] == 0


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("N,M,C,k", [(1, 1, 1, 1), (7, 7, 7, 7), (33, 130, 33, 1), (1, 130, 5, 2)])
def test_odd_sizes(metric, N, M, C, k):
    g = gen(N * 1000 + M + C)
    check(torch.randn(N, C, generator=g), torch.randn(M, C, generator=g), k=k, metric=metric)


@pytest.mark.parametrize("metric,reduce", [("cosine", "mean_largest"), ("l2", "topk"), ("ip", "mean_smallest"),
                                           ("cosine", "topk")])
def test_large_k_histogram_threshold(metric, reduce):
    """k > 16 with a buffer smaller than the bank: range pass, histogram passes (refined
    around the k-th key), then collection below the threshold."""
    g = gen(2)
    q, b = torch.randn(20, 24, generator=g), torch.randn(130, 24, generator=g)
    _, stats = check(q, b, k=20, metric=metric, scale=2.0, reduce=reduce, cap=30)
    assert stats["path"] == "histogram" and stats["hist_levels"] >= 2 and stats["overflow_rows"] == 0


def test_k_larger_than_a_tile_and_k_equal_m():
    g = gen(3)
    q, b = torch.randn(9, 8, generator=g), torch.randn(130, 8, generator=g)
    _, stats = check(q, b, k=70, metric="l2", reduce="topk")  # 70 > BLOCK_M = 64
    assert stats["path"] == "histogram"
    check(q, b, k=130, metric="cosine", reduce="mean_smallest")
    _, stats = check(q, b, k=16, metric="ip", config=dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=16))  # fused, k = tile
    assert stats["path"] == "fused"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_half_precision_inputs(dtype, metric):
    g = gen(4)
    q, b = torch.randn(2, 15, 40, generator=g).to(dtype), torch.randn(70, 40, generator=g).to(dtype)
    _, stats = check(q, b, k=4, metric=metric, reduce="topk")
    assert stats["screen_dtype"] == torch.float16  # bf16 inputs: float16 screen in the interpreter


def test_float32_inputs_use_a_scaled_float16_screen():
    """Rows of very different magnitudes and dynamic ranges (float16 would overflow or
    flush them without the per-row power-of-two scaling)."""
    g = gen(5)
    q = torch.randn(12, 16, generator=g) * torch.logspace(-25, 25, 12)[:, None]
    b = torch.randn(60, 16, generator=g) * torch.logspace(-30, 30, 60)[:, None]
    b[3, :8] *= 1e-30
    check(q, b, k=3, metric="cosine")
    # ip / l2 values must stay inside the float32 range
    q, b = q.clamp(-1e9, 1e9), b.clamp(-1e9, 1e9)
    check(q, b, k=3, metric="ip")
    # l2 on the kernel itself only for rows inside its float32 range (rows below 2^-50
    # give 0 distances there; nn_distance routes them to the reference: test_robustness.py)
    inside = lambda t: t[t.abs().amax(1) >= 2.0 ** -50]  # noqa: E731
    check(inside(q), inside(b), k=3, metric="l2")


def test_exact_ties_go_to_the_lowest_index():
    g = gen(6)
    base = torch.randn(10, 12, generator=g)
    cls = torch.tensor([3, 1, 3, 7, 1, 3, 0, 9, 7, 3] * 4)
    b = base[cls]  # every row repeated: exact ties
    q = base[torch.tensor([3, 1, 7, 5])] * torch.tensor([[1.0], [2.0], [0.5], [1.0]])
    for metric, k in (("cosine", 6), ("l2", 4), ("ip", 4)):
        res, _ = check(q, b, k=k, metric=metric)
        for row, c in enumerate([3, 1, 7]):
            if metric == "cosine" or row == 0:  # nearest = the copies of the query's own row
                assert res.indices[row].tolist() == torch.nonzero(cls == c).flatten()[:k].tolist()
        same = res.values[:, 1:] == res.values[:, :-1]
        assert bool((res.indices[:, 1:] > res.indices[:, :-1])[same].all())


def test_zero_vectors_and_mass_ties_use_the_exact_fallback():
    """A zero query has cosine distance exactly 1 to every bank row: all rows tie, the
    candidate buffer overflows and the row is recomputed exactly (lowest indices win)."""
    g = gen(7)
    q, b = torch.randn(6, 10, generator=g), torch.randn(120, 10, generator=g)
    q[[1, 4]] = 0.0
    b[[0, 5, 77]] = 0.0
    res, stats = check(q, b, k=3, metric="cosine")
    assert stats["overflow_rows"] == 2
    assert res.indices[1].tolist() == [0, 1, 2] and torch.equal(res.values[1], torch.ones(3))
    res, stats = check(q, b, k=20, metric="cosine", reduce="mean_largest", cap=40)
    assert stats["overflow_rows"] >= 2


def test_clustered_bank_forces_rerank_and_overflow():
    """Near-duplicate bank rows: many candidates lie within the float16 screen margin of
    the best one; the exact re-rank orders them, a small buffer overflows to the fallback."""
    g = gen(8)
    centers = torch.randn(3, 32, generator=g)
    b = centers[torch.arange(128) % 3] + 1e-4 * torch.randn(128, 32, generator=g)
    q = centers[torch.tensor([0, 1, 2, 0, 1])] + 1e-4 * torch.randn(5, 32, generator=g)
    for metric in METRICS:
        _, stats = check(q, b, k=2, metric=metric)
        assert stats["max_candidates"] > 2 and stats["overflow_rows"] == 0
        _, stats = check(q, b, k=2, metric=metric, cap=8)
        assert stats["overflow_rows"] == 5


def test_fallback_blocks_merge(monkeypatch):
    """Fallback in several row and column blocks (running top k merged across blocks)."""
    K = kern()
    monkeypatch.setattr(K, "_FALLBACK_WIDTH", 48)
    monkeypatch.setattr(K, "_FALLBACK_ENTRIES", 96)
    g = gen(9)
    q, b = torch.randn(2, 5, 6, generator=g), torch.randn(2, 130, 6, generator=g)
    qg, bg = torch.randint(0, 3, (2, 5), generator=g), torch.randint(0, 3, (2, 130), generator=g)
    _, stats = check(q, b, k=4, metric="l2", qg=qg, bg=bg, cap=4)
    assert stats["overflow_rows"] >= 6  # several blocks of 2 rows (a row may have just k candidates)


def test_l2_is_exact_for_near_duplicates():
    """Gram-form L2 in float32 has an absolute error of about sqrt(eps) |q|; the re-rank
    sums (q - b)^2 directly, so tiny distances keep their relative precision."""
    g = gen(10)
    q = torch.randn(8, 64, generator=g) * 10
    b = torch.cat([q + 1e-5 * torch.randn(8, 64, generator=g), q, torch.randn(40, 64, generator=g) * 10])
    res, _ = check(q, b, k=2, metric="l2")
    assert res.indices[:, 0].tolist() == list(range(8, 16))  # the exact copies, distance 0
    assert torch.equal(res.values[:, 0], torch.zeros(8))
    assert res.indices[:, 1].tolist() == list(range(8))
    direct = (q.double() - b[:8].double()).norm(dim=-1)  # (the reference's float64 Gram form is less exact here)
    torch.testing.assert_close(res.values[:, 1].double(), direct, rtol=1e-6, atol=0)


@pytest.mark.parametrize("group_match", ["other", "same"])
@pytest.mark.parametrize("k,reduce", [(3, "topk"), (3, "mean_smallest"), (20, "topk"), (20, "mean_largest")])
def test_groups(group_match, k, reduce):
    """Groups with fewer than k eligible rows (padding with -1 / inf, or the mean of the
    eligible ones, NaN when none)."""
    g = gen(11)
    q, b = torch.randn(13, 9, generator=g), torch.randn(100, 9, generator=g)
    qg = torch.randint(0, 4, (13,), generator=g)
    qg[0], qg[1] = 7, 8  # group 7: 2 bank rows, group 8: none
    bg = torch.randint(0, 4, (100,), generator=g)
    bg[[10, 60]] = 7
    res, _ = check(q, b, k=k, metric="l2", reduce=reduce, qg=qg, bg=bg, group_match=group_match,
                   cap=None if k < 16 else 40)
    if group_match == "same":
        if reduce == "topk":
            assert res.indices[0, :2].tolist() in ([10, 60], [60, 10]) and (res.indices[0, 2:] == -1).all()
        else:
            assert torch.isnan(res.values[1])


def test_batched_banks_and_batched_groups():
    g = gen(12)
    q, b = torch.randn(3, 11, 7, generator=g), torch.randn(3, 40, 7, generator=g)
    for metric in METRICS:
        check(q, b, k=2, metric=metric)
    qg, bg = torch.randint(0, 3, (3, 11), generator=g), torch.randint(0, 3, (3, 40), generator=g)
    check(q, b, k=5, metric="cosine", reduce="mean_largest", qg=qg, bg=bg)
    check(q, b[:1], k=20, metric="ip", reduce="topk", qg=qg, bg=bg[:1], cap=30)  # shared bank, large k
    check(q, b, k=3, metric="l2", qg=qg[0], bg=bg[0])  # per-image banks, groups shared by every image


@pytest.mark.parametrize("k", [1, 3])
def test_bank_splits(k):
    """Several programs per row block, each over one split of the bank with its own bound."""
    g = gen(13)
    q, b = torch.randn(16, 16, generator=g), torch.randn(130, 16, generator=g)
    cfg = dict(BLOCK_N=16, BLOCK_M=32, BLOCK_K=16)
    _, stats = check(q, b, k=k, metric="cosine", splits=4, config=cfg)
    assert stats["splits"] == 3
    if k == 3:
        _, stats = check(q, b, k=20, metric="l2", reduce="mean_smallest", splits=4, config=cfg, cap=40)
        assert stats["splits"] == 3 and stats["hist_levels"] >= 1


def test_row_chunks(monkeypatch):
    monkeypatch.setattr(kern(), "_CHUNK_ENTRIES", 2 * 2 * 60)  # B * rows * cap
    g = gen(14)
    q, b = torch.randn(2, 13, 8, generator=g), torch.randn(60, 8, generator=g)
    _, stats = check(q, b, k=2, metric="l2", reduce="mean_smallest")
    assert stats["row_chunk"] == 2


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("sdt", [torch.float16, torch.bfloat16])
def test_screen_margin_bounds_the_screen_error(metric, sdt):
    """The proven bound itself: emulate the screen (half-precision rows, float32 dot and
    epilogue) and compare with the exact float64 values, on adversarial rows."""
    K = kern()
    g = gen(15)
    C = 48
    q = torch.randn(40, C, generator=g) * torch.logspace(-6, 6, 40)[:, None]
    b = torch.randn(50, C, generator=g) * torch.logspace(-6, 6, 50)[:, None]
    b[:10] = q[:10] * (1 + 1e-3 * torch.randn(10, C, generator=g))  # near-duplicates
    b[10, 5:] = 0.0
    q[11] = 0.0
    b[12] = 0.0
    q[13, ::2] *= 1e-9  # wide dynamic range within a row
    qs, qn, qh, qr, qu = K._prep(q[None], sdt)
    bs, bn, bh, br, bu = K._prep(b[None], sdt)
    iq, ib = 1 / qn.clamp_min(1e-12), 1 / bn.clamp_min(1e-12)
    m = K._margins(metric, C, qn, qh, qr, iq, bn, bh, br, ib, 1)[0]
    wq = {"cosine": iq * qu, "ip": qu, "l2": 2 * qu}[metric][0].float()
    wb = (ib * bu if metric == "cosine" else bu)[0].float()
    s = (qs[0].float() @ bs[0].float().T) * wq[:, None] * wb[None, :]
    q64, b64 = q.double(), b.double()
    exact = q64 @ b64.T
    if metric == "cosine":
        exact = exact * iq[0][:, None] * ib[0][None, :]
    if metric == "l2":
        s = s + (-(bn * bn)).float()[0][None, :]
        exact = 2 * exact - (b64 * b64).sum(-1)[None, :]
    err = (s.double() - exact).abs()
    assert bool((err <= m[:, None]).all())
    ratio = err[m > 0] / m[m > 0, None]
    assert float(ratio.max()) > 1e-3  # the bound is not vacuous


def test_public_api_backend_triton():
    g = gen(16)
    q, b = torch.randn(9, 12, generator=g), torch.randn(33, 12, generator=g)
    r = nn_distance(q, b, k=2, metric="cosine", scale=0.5, backend="triton")
    assert_matches_reference(r, q, b, k=2, metric="cosine", scale=0.5)
    r = nn_distance(q[None].expand(2, -1, -1), b[None].expand(2, -1, -1), k=1, reduce="mean_largest",
                    backend="triton")
    assert r.values.shape == (2, 9) and r.indices is None
    e = nn_distance(torch.randn(0, 12), b, k=3, backend="triton")
    assert e.values.shape == (0, 3) and e.indices.shape == (0, 3)


@pytest.mark.parametrize("reduce", ["topk", "mean_smallest"])
def test_gradients_through_triton_indices(reduce):
    g = gen(17)
    q = torch.randn(6, 5, generator=g, requires_grad=True)
    b = torch.randn(20, 5, generator=g, requires_grad=True)
    grads = []
    for backend in ("triton", "reference"):
        r = nn_distance(q, b, k=3, metric="l2", reduce=reduce, backend=backend)
        r.values.sum().backward()
        grads.append((q.grad.clone(), b.grad.clone()))
        q.grad = b.grad = None
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_knobs_raise():
    K = kern()
    q, b = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    with pytest.raises(ValueError, match="cap=2 is smaller than k=3"):
        K.nn_distance_triton(q, b, 3, "l2", 1.0, "topk", cap=2)
    with pytest.raises(ValueError, match="screen_dtype"):
        K.nn_distance_triton(q, b, 1, "l2", 1.0, "topk", screen_dtype=torch.float32)


# --------------------------------------------------------------------------- GPU only


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric,reduce,k", [("cosine", "topk", 1), ("l2", "topk", 5), ("ip", "topk", 16),
                                             ("cosine", "mean_largest", 400), ("l2", "mean_smallest", 40)])
def test_cuda_autotuned(dtype, metric, reduce, k):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 1000, 256, device="cuda", generator=g).to(dtype)
    b = torch.randn(4096, 256, device="cuda", generator=g).to(dtype)
    res, stats = run(q, b, k=k, metric=metric, reduce=reduce)
    assert stats["screen_dtype"] == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    assert_matches_reference(res, q, b, k=k, metric=metric, reduce=reduce)


@requires_cuda
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_bfloat16_screen_of_float32_inputs(metric):
    g = torch.Generator(device="cuda").manual_seed(1)
    q = F.normalize(torch.randn(3000, 384, device="cuda", generator=g), dim=-1)
    b = F.normalize(torch.randn(20000, 384, device="cuda", generator=g), dim=-1)
    res, stats = run(q, b, k=3, metric=metric, screen_dtype=torch.bfloat16)
    assert stats["screen_dtype"] == torch.bfloat16
    assert_matches_reference(res, q, b, k=3, metric=metric)


@requires_cuda
def test_cuda_groups_splits_and_fallback():
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(300, 128, device="cuda", generator=g)
    b = torch.randn(30000, 128, device="cuda", generator=g)
    q[:3] = 0.0
    qg = torch.randint(0, 5, (300,), device="cuda", generator=g)
    bg = torch.randint(0, 5, (30000,), device="cuda", generator=g)
    res, stats = run(q, b, k=4, metric="cosine", qg=qg, bg=bg, splits=8)
    assert stats["splits"] > 1 and stats["overflow_rows"] >= 3
    assert_matches_reference(res, q, b, k=4, metric="cosine", query_groups=qg, bank_groups=bg)
