"""nn_distance, C++ CPU backend: every algorithm (fp32 blocked kernel, l2 Gram screen,
l2 direct, int8 screen + exact re-rank) against the float64 reference, under every
compiled ISA variant; argument checks of the direct fastad._C entry point."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastad
from fastad import _ext
from fastad.ops import nn_distance
from fastad.ops.nn_distance import NNResult, _cpu_call, nn_distance_reference

from conftest import requires_cpu_ext
from nn_testing import assert_matches_reference

pytestmark = requires_cpu_ext

METRICS = ("cosine", "l2", "ip")
REDUCES = ("topk", "mean_largest", "mean_smallest")


def paths_for(metric):
    return ("fp32", "int8", "l2_direct") if metric == "l2" else ("fp32", "int8")


def run(q, b, k=1, metric="cosine", scale=1.0, reduce="topk", qg=None, bg=None, group_match="other",
        path="auto", need_indices=False):
    """The kernel on 2-D / 3-D inputs like the public function; returns (NNResult, stats)."""
    q3 = q[None] if q.dim() == 2 else q
    b3 = b[None] if b.dim() == 2 else b
    if qg is not None:
        qg = (qg if qg.dim() == 2 else qg[None].expand(q3.shape[0], -1)).long().contiguous()
        bg = (bg if bg.dim() == 2 else bg[None]).long().contiguous()
    v, i, stats = _cpu_call(q3.contiguous(), b3.contiguous(), k, metric, scale, reduce, qg, bg, group_match,
                            need_indices, path)
    assert stats["status"] == "ok"
    if q.dim() == 2:
        v, i = v[0], (None if i is None else i[0])
    return NNResult(v, i if reduce == "topk" else None), stats


def check(q, b, path, **kw):
    res, stats = run(q, b, path=path, **kw)
    kw.pop("need_indices", None)
    kw["query_groups"], kw["bank_groups"] = kw.pop("qg", None), kw.pop("bg", None)
    assert_matches_reference(res, q, b, **kw)
    return res, stats


SHAPES = [  # (N, M, C, k): N, M in {1, 7, 513, 1025}, C in {1, 3, 17, 64, 300}, k up to M
    (1, 1, 1, 1),
    (7, 7, 3, 7),
    (513, 7, 17, 4),
    (7, 513, 64, 5),
    (1025, 7, 300, 2),
    (7, 1025, 300, 3),
    (1, 1025, 17, 1),
]


@pytest.mark.parametrize("metric,reduce", list(itertools.product(METRICS, REDUCES)))
def test_every_path_matches_reference_at_odd_sizes(cpu_isa, metric, reduce):
    g = torch.Generator().manual_seed(1)
    for (N, M, C, k) in SHAPES:
        q, b = torch.randn(N, C, generator=g), torch.randn(M, C, generator=g)
        for path in paths_for(metric):
            check(q, b, path, k=k, metric=metric, scale=0.5, reduce=reduce)


def same_sums(metric):
    """Paths whose reported values are the same float32 sums: the screened ones (int8,
    and fp32 for l2) re-rank with one summation order."""
    return ("int8", "fp32") if metric == "l2" else ("int8",)


@pytest.mark.parametrize("metric", METRICS)
def test_large_square_problem_screened_paths_agree_bitwise(cpu_isa, metric):
    g = torch.Generator().manual_seed(2)
    q, b = torch.randn(1025, 64, generator=g), torch.randn(1025, 64, generator=g)
    results = {path: check(q, b, path, k=3, metric=metric)[0] for path in paths_for(metric)}
    first = results[same_sums(metric)[0]]
    for path in same_sums(metric)[1:]:
        assert torch.equal(results[path].values, first.values)
        assert torch.equal(results[path].indices, first.indices)


@pytest.mark.parametrize("metric", METRICS)
def test_many_query_rows_span_several_chunks_and_bank_splits(cpu_isa, metric):
    """More query rows than one task holds (1,026 for int8), each chunk against a bank
    split in ranges whose partial top-k lists are merged."""
    g = torch.Generator().manual_seed(15)
    q, b = torch.randn(2, 1100, 24, generator=g), torch.randn(700, 24, generator=g)
    for path in paths_for(metric):
        check(q, b, path, k=2, metric=metric)


def test_int8_screen_rerank_is_exercised_and_counted(cpu_isa):
    g = torch.Generator().manual_seed(3)
    q, b = torch.randn(300, 128, generator=g), torch.randn(2000, 128, generator=g)
    _, stats = check(q, b, "int8", k=2, metric="cosine")
    assert stats["path"] == "int8" and stats["int8_tasks"] > 0
    # the screen prunes most pairs, and the survivors are re-ranked exactly
    assert 0 < stats["exact_evals"] < 0.2 * q.shape[0] * b.shape[0]
    assert stats["screened_pairs"] == q.shape[0] * b.shape[0]


@pytest.mark.parametrize("metric", METRICS)
def test_clustered_data_switches_from_int8_to_fp32(cpu_isa, metric):
    """Bank rows closer together than the int8 screening margin: every pair survives the
    screen, the re-rank rate triggers the switch to the fp32 kernel, results stay exact."""
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(3, 64, generator=g)
    b = centres[torch.arange(6000) % 3] + 1e-3 * torch.randn(6000, 64, generator=g)
    q = centres[torch.arange(30) % 3] + 1e-3 * torch.randn(30, 64, generator=g)
    res, stats = check(q, b, "int8", k=3, metric=metric)
    assert stats["switched_tasks"] > 0 and stats["exact_evals"] > 0
    if metric == "l2":  # the same re-rank sums as the screened fp32 path
        ref, _ = run(q, b, k=3, metric=metric, path="fp32")
        assert torch.equal(res.values, ref.values) and torch.equal(res.indices, ref.indices)


@pytest.mark.parametrize("metric", METRICS)
def test_exact_duplicates_tie_to_the_lowest_index(cpu_isa, metric):
    g = torch.Generator().manual_seed(5)
    b = torch.randn(2000, 40, generator=g)
    # copies of row 1500 spread over panels, int8 blocks and bank splits
    dup = [3, 30, 97, 500, 1023, 1500, 1999]
    b[dup] = b[1500].clone()
    q = torch.cat([b[1500:1501] * 2.0, torch.randn(4, 40, generator=g)])
    for path in paths_for(metric):
        for reduce in REDUCES:
            k = 9 if reduce == "topk" else 5
            res, _ = check(q, b, path, k=k, metric=metric, reduce=reduce, need_indices=True)
            ref = nn_distance_reference(q[None], b[None], k, metric, 1.0, reduce)
            if reduce == "topk" and metric != "ip":  # the nearest of row 0 are the copies, in index order
                assert res.indices[0, :7].tolist() == dup
            if reduce == "topk":
                assert torch.equal(res.indices, ref.indices[0])


@pytest.mark.parametrize("reduce", REDUCES)
def test_l2_near_duplicates_are_exact(cpu_isa, reduce):
    """Points 1e-4 apart on vectors of norm ~30: the Gram form |q|^2 + |b|^2 - 2 q.b
    cancels in float32; the kernels report the difference form."""
    g = torch.Generator().manual_seed(6)
    base = 3 * torch.randn(8, 100, generator=g)
    b = base[torch.arange(1200) % 8] + 1e-4 * torch.randn(1200, 100, generator=g)
    q = base[torch.arange(40) % 8] + 1e-4 * torch.randn(40, 100, generator=g)
    for path in paths_for("l2"):
        res, _ = check(q, b, path, k=4, metric="l2", reduce=reduce)
        if reduce != "mean_largest":
            assert float(res.values.max()) < 1e-2  # tiny distances, not cancellation noise


@pytest.mark.parametrize("metric", METRICS)
def test_zero_vectors(cpu_isa, metric):
    g = torch.Generator().manual_seed(7)
    q, b = torch.randn(9, 24, generator=g), torch.randn(700, 24, generator=g)
    q[[0, 5]] = 0
    b[[2, 50, 300, 301]] = 0
    for path in paths_for(metric):
        for reduce in REDUCES:
            res, _ = check(q, b, path, k=6, metric=metric, reduce=reduce)
            if metric == "cosine" and reduce == "topk":  # cosine 0 to everything: distance 1, index order
                assert torch.equal(res.values[0], torch.ones(6))
                assert res.indices[0].tolist() == list(range(6))


@pytest.mark.parametrize("group_match", ["other", "same"])
@pytest.mark.parametrize("reduce", REDUCES)
def test_groups_with_rows_short_of_eligible_entries(cpu_isa, group_match, reduce):
    g = torch.Generator().manual_seed(8)
    M = 900
    q, b = torch.randn(40, 32, generator=g), torch.randn(M, 32, generator=g)
    big = 10 ** 12  # labels far outside int32: the kernel compares remapped ids
    bg = torch.full((M,), big, dtype=torch.int64)
    bg[:3] = 5         # group 5: three members
    bg[3:500] = -7
    qg = torch.tensor([5, -7, big, 99] * 10, dtype=torch.int64)  # 99: no bank row
    for metric in METRICS:
        for path in paths_for(metric):
            check(q, b, path, k=4, metric=metric, reduce=reduce, qg=qg, bg=bg, group_match=group_match)


def test_groups_exclude_everything_gives_padding_and_nan(cpu_isa):
    q, b = torch.randn(3, 8), torch.randn(5, 8)
    qg, bg = torch.zeros(3, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    res, _ = run(q, b, k=2, qg=qg, bg=bg, group_match="other")
    assert torch.equal(res.indices, torch.full((3, 2), -1)) and bool(torch.isinf(res.values).all())
    res, _ = run(q, b, k=2, reduce="mean_smallest", qg=qg, bg=bg, group_match="other")
    assert bool(torch.isnan(res.values).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_half_precision_inputs(cpu_isa, dtype, metric):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 37, 77, generator=g).to(dtype)
    b = torch.randn(601, 77, generator=g).to(dtype)
    outs = {}
    for path in paths_for(metric):
        for reduce in ("topk", "mean_largest"):
            res, _ = check(q, b, path, k=5, metric=metric, reduce=reduce)
            if reduce == "topk":
                outs[path] = res
    for path in same_sums(metric)[1:]:  # converted exactly, summed alike: bitwise equal
        assert torch.equal(outs[path].values, outs["int8"].values)
        assert torch.equal(outs[path].indices, outs["int8"].indices)


def test_large_k_top_and_means(cpu_isa):
    g = torch.Generator().manual_seed(10)
    q, b = torch.randn(20, 48, generator=g), torch.randn(1025, 48, generator=g)
    for metric in METRICS:
        for reduce in REDUCES:
            check(q, b, "auto", k=1000, metric=metric, reduce=reduce)
    # SAA+-style: mean of the top-400 of 4,096, with the indices used for gradients
    b = F.normalize(torch.randn(4096, 32, generator=g), dim=-1)
    q = b[:24]
    res, _ = check(q, b, "auto", k=400, metric="cosine", scale=0.5, reduce="mean_largest", need_indices=True)


@pytest.mark.parametrize("metric", METRICS)
def test_k_a_large_part_of_the_bank_with_groups_and_duplicates(cpu_isa, metric):
    """k near M selects from each task's tile of values: ties at the k-th value, groups
    (ineligible pairs) and rows short of eligible entries."""
    g = torch.Generator().manual_seed(16)
    b = torch.randn(1000, 20, generator=g)
    b[500:700] = b[100]  # 201 copies: the k-th value is a tie
    q = torch.cat([b[100:101], torch.randn(11, 20, generator=g)])
    qg = torch.tensor([0, 1, 2] * 4)
    bg = (torch.arange(1000) % 7 == 0).long() + 2 * (torch.arange(1000) >= 990).long()  # group 2: 10 rows
    for reduce in REDUCES:
        for path in ("fp32", "l2_direct") if metric == "l2" else ("fp32",):
            res, _ = check(q, b, path, k=300, metric=metric, reduce=reduce, need_indices=True)
            if reduce == "topk":
                ref = nn_distance_reference(q[None], b[None], 300, metric, 1.0, reduce)
                assert torch.equal(res.indices, ref.indices[0])
            check(q, b, path, k=300, metric=metric, reduce=reduce, qg=qg, bg=bg, group_match="same")


def test_batched_banks_and_groups(cpu_isa):
    g = torch.Generator().manual_seed(11)
    q, b = torch.randn(3, 50, 20, generator=g), torch.randn(3, 300, 20, generator=g)
    qg = torch.randint(0, 3, (3, 50), generator=g)
    bg = torch.randint(0, 3, (3, 300), generator=g)
    for path in ("fp32", "int8"):
        check(q, b, path, k=3, metric="l2")
        check(q, b, path, k=3, metric="cosine", reduce="mean_smallest", qg=qg, bg=bg, group_match="same")
        check(q, b, path, k=3, metric="ip", qg=qg, bg=bg[:1], group_match="other")  # one labelling of every bank
    check(q, b[0], "auto", k=2, metric="cosine")  # one bank shared by the batch


def test_results_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(12)
    q, b = torch.randn(40, 96, generator=g), torch.randn(5000, 96, generator=g)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append([run(q, b, k=4, metric=m, path=p)[0] for m in METRICS for p in paths_for(m)])
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for r0, r1 in zip(outs[0], other):
            assert torch.equal(r0.values, r1.values) and torch.equal(r0.indices, r1.indices)


def test_public_function_uses_the_cpu_backend():
    assert "cpu" in fastad.ops.nn_distance.__globals__["BACKENDS"]
    g = torch.Generator().manual_seed(13)
    q, b = torch.randn(2, 30, 16, generator=g), torch.randn(70, 16, generator=g)
    r = nn_distance(q, b, k=3, metric="l2", scale=2.0, backend="cpu")
    assert_matches_reference(r, q, b, k=3, metric="l2", scale=2.0)
    r = nn_distance(q[0], b, k=2, reduce="mean_largest", backend="cpu")
    assert_matches_reference(r, q[0], b, k=2, reduce="mean_largest")
    r = nn_distance(torch.randn(0, 16), b, k=2, backend="cpu")
    assert r.values.shape == (0, 2) and r.indices.shape == (0, 2)


def test_values_outside_float32_range_fall_back_to_the_reference():
    q, b = torch.randn(4, 8), torch.randn(20, 8)
    b[3] *= 1e35  # |b|^2 overflows float32 accumulation
    _, _, stats = _cpu_call(q[None], b[None], 2, "l2", 1.0, "topk", None, None, "other", False, "auto")
    assert stats["status"] == "out_of_range"
    r = nn_distance(q, b, k=2, metric="ip", backend="cpu")
    ref = nn_distance(q, b, k=2, metric="ip", backend="reference")
    assert torch.equal(r.indices, ref.indices) and torch.equal(r.values, ref.values)


def test_gradients_through_cpu_backend():
    g = torch.Generator().manual_seed(14)
    q = torch.randn(6, 10, generator=g, requires_grad=True)
    b = torch.randn(30, 10, generator=g, requires_grad=True)
    nn_distance(q, b, k=3, metric="cosine", reduce="mean_smallest", backend="cpu").values.sum().backward()
    gq, gb = q.grad.clone(), b.grad.clone()
    q.grad = b.grad = None
    nn_distance(q, b, k=3, metric="cosine", reduce="mean_smallest", backend="reference").values.sum().backward()
    torch.testing.assert_close(gq, q.grad)
    torch.testing.assert_close(gb, b.grad)


# --------------------------------------------------------------------------- direct calls


def _args(**over):
    q = np.zeros((1, 4, 8), np.float32)
    b = np.zeros((1, 6, 8), np.float32)
    a = dict(query=q, bank=b, dtype=0, k=2, metric=0, reduce=0, scale=1.0, query_groups=None, bank_groups=None,
             group_same=False, values=np.zeros((1, 4, 2), np.float32), indices=np.zeros((1, 4, 2), np.int64),
             path=0, nthreads=1)
    a.update(over)
    return a


BAD_CALLS = [
    (dict(query=np.zeros((1, 4, 8), np.float64)), "must hold float32"),
    (dict(dtype=1), "must hold float16"),
    (dict(dtype=7), "unknown dtype"),
    (dict(query=np.zeros((4, 8), np.float32)), "3 dimensions"),
    (dict(query=np.zeros((1, 8, 4), np.float32)[:, :, ::2].copy()[:, ::2]), "C-contiguous"),
    (dict(bank=np.zeros((1, 6, 9), np.float32)), "same channel count"),
    (dict(bank=np.zeros((2, 6, 8), np.float32)), "bank batch"),
    (dict(bank=np.zeros((1, 0, 8), np.float32)), "empty"),
    (dict(k=0), "k must be"),
    (dict(k=7), "k must be"),
    (dict(metric=3), "unknown metric"),
    (dict(reduce=-1), "unknown reduce"),
    (dict(scale=float("nan")), "scale"),
    (dict(values=np.zeros((1, 4, 3), np.float32)), "'values' must have shape"),
    (dict(values=np.zeros((1, 4, 2), np.float64)), "'values' must be float32"),
    (dict(indices=None), "needs an indices output"),
    (dict(indices=np.zeros((1, 4, 2), np.int32)), "must be int64"),
    (dict(query_groups=np.zeros((1, 4), np.int32)), "pass both"),
    (dict(query_groups=np.zeros((1, 4), np.int32), bank_groups=np.zeros((1, 5), np.int32)), "bank_groups"),
    (dict(query_groups=np.zeros((1, 4), np.int64), bank_groups=np.zeros((1, 6), np.int32)), "must be int32"),
    (dict(query_groups=np.zeros((1, 4), np.int32), bank_groups=np.zeros((6,), np.int32)), "bank_groups must have"),
    (dict(path=9), "unknown path"),
]


@pytest.mark.parametrize("over,match", BAD_CALLS)
def test_bad_direct_calls_raise_value_error(over, match):
    with pytest.raises(ValueError, match=match) as info:
        _ext._C.nn_distance(**_args(**over))
    assert "fastad._C.nn_distance" in str(info.value)


def test_read_only_output_is_rejected():
    a = _args()
    a["values"].setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        _ext._C.nn_distance(**a)


def test_direct_call_runs_and_reports_statistics():
    a = _args(query=np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32),
              bank=np.random.default_rng(1).standard_normal((1, 6, 8)).astype(np.float32))
    stats = _ext._C.nn_distance(**a)
    assert stats["status"] == "ok" and stats["path"] in ("fp32", "int8", "l2_direct")
    assert (a["indices"] >= 0).all() and (a["indices"] < 6).all()
