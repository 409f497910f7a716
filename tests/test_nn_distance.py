"""nn_distance: the reference against a brute-force oracle, the public API, errors."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastad
from fastad.ops import nn_distance
from fastad.ops.nn_distance import nn_distance_reference


def oracle(query, bank, k, metric, scale, reduce, qg=None, bg=None, group_match="other"):
    """Per-row Python loop over float64 values, for tiny inputs."""
    out_v, out_i = [], []
    for q_row, g in zip(query.double(), qg if qg is not None else [None] * len(query)):
        vals = []
        for j, b_row in enumerate(bank.double()):
            if g is not None:
                same = int(g) == int(bg[j])
                if (group_match == "other") == same:
                    continue
            if metric == "cosine":
                den = max(q_row.norm(), 1e-12) * max(b_row.norm(), 1e-12)
                v = 1 - float(q_row @ b_row) / float(den)
            elif metric == "ip":
                v = float(q_row @ b_row)
            else:
                v = float((q_row - b_row).norm())
            vals.append((v * scale, j))
        largest = metric == "ip" if reduce == "topk" else reduce == "mean_largest"
        vals.sort(key=lambda t: (-t[0], t[1]) if largest else (t[0], t[1]))
        top = vals[:k]
        if reduce == "topk":
            fill = float("-inf") if largest else float("inf")
            out_v.append([v for v, _ in top] + [fill] * (k - len(top)))
            out_i.append([j for _, j in top] + [-1] * (k - len(top)))
        else:
            out_v.append(sum(v for v, _ in top) / len(top) if top else float("nan"))
    return torch.tensor(out_v, dtype=torch.float64), (torch.tensor(out_i) if reduce == "topk" else None)


@pytest.mark.parametrize("metric,reduce", list(itertools.product(["cosine", "l2", "ip"],
                                                                  ["topk", "mean_largest", "mean_smallest"])))
@pytest.mark.parametrize("shape", [(1, 1, 3, 1), (7, 13, 5, 3), (5, 9, 1, 9)])
def test_reference_matches_oracle(metric, reduce, shape):
    N, M, C, k = shape
    g = torch.Generator().manual_seed(N * 100 + M)
    q, b = torch.randn(N, C, generator=g), torch.randn(M, C, generator=g)
    v, i = oracle(q, b, k, metric, 0.5, reduce)
    r = nn_distance_reference(q[None], b[None], k, metric, 0.5, reduce)
    torch.testing.assert_close(r.values[0].double(), v, atol=1e-6, rtol=0)
    if reduce == "topk":
        assert torch.equal(r.indices[0], i)


@pytest.mark.parametrize("group_match", ["other", "same"])
@pytest.mark.parametrize("reduce", ["topk", "mean_largest", "mean_smallest"])
def test_reference_groups_match_oracle(group_match, reduce):
    g = torch.Generator().manual_seed(3)
    q, b = torch.randn(11, 4, generator=g), torch.randn(10, 4, generator=g)
    qg = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4])
    bg = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 3])  # group 3 has one member, 4 none
    v, i = oracle(q, b, 3, "l2", 1.0, reduce, qg, bg, group_match)
    r = nn_distance_reference(q[None], b[None], 3, "l2", 1.0, reduce, qg[None], bg[None], group_match)
    torch.testing.assert_close(r.values[0].double(), v, atol=1e-6, rtol=0, equal_nan=True)
    if reduce == "topk":
        assert torch.equal(r.indices[0], i)


def test_ties_go_to_lowest_index():
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    q = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    r = nn_distance(q, b, k=3, metric="cosine", backend="reference")
    assert r.indices.tolist() == [[0, 2, 4], [1, 3, 0]]
    r = nn_distance(q, b, k=2, metric="ip", backend="reference")
    assert r.indices.tolist() == [[0, 2], [1, 3]]


def test_zero_vectors_have_cosine_distance_one():
    q = torch.zeros(2, 4)
    b = torch.randn(5, 4)
    r = nn_distance(q, b, k=5, backend="reference")
    assert torch.equal(r.values, torch.ones(2, 5))
    assert r.indices.tolist() == [[0, 1, 2, 3, 4]] * 2


def test_shapes_shared_and_per_image_banks():
    q = torch.randn(3, 6, 8)
    shared = torch.randn(10, 8)
    per_image = torch.randn(3, 10, 8)
    r = nn_distance(q, shared, k=2)
    assert r.values.shape == (3, 6, 2) and r.indices.shape == (3, 6, 2)
    r2 = nn_distance(q, shared[None].expand(3, -1, -1), k=2)
    torch.testing.assert_close(r.values, r2.values)
    r3 = nn_distance(q, per_image, k=1, reduce="mean_smallest")
    assert r3.values.shape == (3, 6) and r3.indices is None
    for i in range(3):
        torch.testing.assert_close(r3.values[i], nn_distance(q[i], per_image[i], k=1).values[:, 0])


def test_empty_query_gives_empty_result():
    r = nn_distance(torch.randn(0, 4), torch.randn(3, 4), k=2)
    assert r.values.shape == (0, 2) and r.indices.shape == (0, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32(dtype):
    q, b = torch.randn(5, 8).to(dtype), torch.randn(7, 8).to(dtype)
    r = nn_distance(q, b, k=2, metric="l2", backend="reference")
    assert r.values.dtype == torch.float32
    ref = nn_distance(q.float(), b.float(), k=2, metric="l2", backend="reference")
    torch.testing.assert_close(r.values, ref.values)


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
@pytest.mark.parametrize("reduce", ["topk", "mean_largest"])
def test_gradients_match_autograd_of_dense_computation(metric, reduce):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    r = nn_distance(q, b, k=3, metric=metric, scale=0.5, reduce=reduce)
    w = torch.randn(r.values.shape, generator=g, dtype=torch.float64)
    (r.values * w).sum().backward()
    gq, gb = q.grad.clone(), b.grad.clone()
    q.grad = b.grad = None
    # dense: all distances, then the same selection
    if metric == "cosine":
        d = 1 - F.normalize(q, dim=-1) @ F.normalize(b, dim=-1).T
    elif metric == "ip":
        d = q @ b.T
    else:
        d = torch.cdist(q, b[None].expand(2, -1, -1))
    d = 0.5 * d
    largest = metric == "ip" if reduce == "topk" else True
    top = d.topk(3, dim=-1, largest=largest).values
    dense = top if reduce == "topk" else top.mean(-1)
    (dense * w).sum().backward()
    torch.testing.assert_close(gq, q.grad)
    torch.testing.assert_close(gb, b.grad)


def test_gradcheck_float64_reference():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for metric in ("cosine", "l2", "ip"):
        torch.autograd.gradcheck(lambda q, b: nn_distance(q, b, k=2, metric=metric).values, (q, b))


def test_torch_compile_fullgraph():
    q, b = torch.randn(2, 5, 4), torch.randn(7, 4)
    f = torch.compile(lambda q, b: nn_distance(q, b, k=2, metric="l2").values * 2, fullgraph=True)
    torch.testing.assert_close(f(q, b), nn_distance(q, b, k=2, metric="l2").values * 2)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(query=torch.randn(3), bank=torch.randn(4, 3)), ValueError, "`query` must have 2 or 3 dimensions"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 5)), ValueError, "same channel count"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(0, 3)), ValueError, "`bank` is empty"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 3), k=5), ValueError, "larger than the bank"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 3), k=0), ValueError, "`k` must be an integer"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 3).double()), TypeError, "one dtype"),
    (dict(query=torch.randn(2, 3).int(), bank=torch.randn(4, 3)), TypeError, "`query` must have dtype"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(2, 4, 3)), ValueError, "needs a batched `query`"),
    (dict(query=torch.randn(3, 2, 3), bank=torch.randn(2, 4, 3)), ValueError, "batch 2 must equal"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 3), metric="dot"), ValueError, "`metric` must be one of"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 3), reduce="max"), ValueError, "`reduce` must be one of"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 3), scale=-1.0), ValueError, "`scale` must be a positive"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 3), query_groups=torch.zeros(2, dtype=torch.long)),
     ValueError, "pass both"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 3), query_groups=torch.zeros(3, dtype=torch.long),
          bank_groups=torch.zeros(4, dtype=torch.long)), ValueError, "`query_groups` must have shape"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 3), query_groups=torch.zeros(2),
          bank_groups=torch.zeros(4)), TypeError, "`query_groups` must have dtype"),
    (dict(query=torch.randn(2, 3), bank=torch.randn(4, 3), backend="gpu"), ValueError, "unknown backend"),
])
def test_bad_input_errors_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nn_distance(**kwargs)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_nan_inputs_raise(backend):
    b = torch.randn(4, 3)
    b[2, 1] = float("nan")
    with pytest.raises(ValueError, match="`bank` contains NaN"):
        nn_distance(torch.randn(2, 3), b, backend=backend)


def test_float64_only_on_reference():
    q = torch.randn(2, 3, dtype=torch.float64)
    assert nn_distance(q, q, k=1).values.dtype == torch.float64
    if fastad.backends()["cpu"].available and "cpu" in fastad.ops.nn_distance.__globals__["BACKENDS"]:
        with pytest.raises(TypeError, match="float64 inputs run only"):
            nn_distance(q, q, backend="cpu")


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_backend_checker_accepts_reference_and_catches_wrong_answers(metric):
    from nn_testing import assert_matches_reference

    g = torch.Generator().manual_seed(5)
    q, b = torch.randn(2, 9, 6, generator=g), torch.randn(13, 6, generator=g)
    r = nn_distance(q, b, k=3, metric=metric, backend="reference")
    assert_matches_reference(r, q, b, k=3, metric=metric)
    wrong = r.indices.clone()
    wrong[1, 4] = wrong[1, 4].flip(0)  # same set, wrong order
    with pytest.raises(AssertionError):
        assert_matches_reference(fastad.ops.NNResult(r.values, wrong), q, b, k=3, metric=metric)
    off = r.values.clone()
    off[0, 0, 0] += 1e-3
    with pytest.raises(AssertionError):
        assert_matches_reference(fastad.ops.NNResult(off, r.indices), q, b, k=3, metric=metric)
