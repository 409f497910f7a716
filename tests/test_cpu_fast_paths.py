"""C++ CPU fast paths added for speed, against the float64 / sort-based references:
512-bit tiles (bit-identical to the 8-wide ones), the mean of the k largest without a
sorted top-k, small problems, and the widening candidate lists of the sparsemax lookup."""
import importlib
import os

import pytest
import torch

import fastad
from fastad.ops.nn_distance import NNResult, _cpu_call

from conftest import requires_cpu_ext
from nn_testing import assert_matches_reference, pair_values

pytestmark = requires_cpu_ext

smx = importlib.import_module("fastad.ops.sparsemax")


def has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f " in f.read()
    except OSError:
        return False


def nn(q, b, k, metric, reduce, path, need_indices=True):
    v, i, stats = _cpu_call(q[None].contiguous(), b[None].contiguous(), k, metric, 0.5, reduce, None, None, "other",
                            need_indices, path)
    assert stats["status"] == "ok"
    return v[0], None if i is None else i[0], stats


@pytest.mark.skipif(not has_avx512f(), reason="the CPU has no AVX-512F: only the 8-wide tiles exist")
@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_wide_tiles_are_bit_identical_to_8_wide(cpu_isa, metric, monkeypatch):
    """Odd panel counts (a single 6-row panel left over), two k-slices (C > 256), exact
    duplicates (ties) and every algorithm: values and indices equal bit for bit."""
    if cpu_isa == "generic":
        pytest.skip("the generic build has no wide tiles")
    g = torch.Generator().manual_seed(21)
    q, b = torch.randn(133, 300, generator=g), torch.randn(1100, 300, generator=g)
    b[700] = b[5]
    q[3] = b[5]
    paths = ("fp32", "int8", "l2_direct") if metric == "l2" else ("fp32", "int8")
    for path in paths:
        for k, reduce in ((1, "topk"), (5, "topk"), (300, "mean_largest"), (7, "mean_smallest")):
            out = {}
            for wide in ("0", "1"):
                monkeypatch.setenv("FASTAD_CPU_WIDE_TILES", wide)
                out[wide] = nn(q, b, k, metric, reduce, path)
            assert torch.equal(out["0"][0], out["1"][0]), (path, k, reduce)
            assert torch.equal(out["0"][1], out["1"][1]), (path, k, reduce)


@pytest.mark.skipif(not has_avx512f(), reason="the CPU has no AVX-512F: only the 8-wide tiles exist")
def test_wide_tile_lookup_logits_equal_8_wide(cpu_isa, monkeypatch):
    if cpu_isa == "generic":
        pytest.skip("the generic build has no wide tiles")
    g = torch.Generator().manual_seed(22)
    q, k = torch.randn(1, 77, 300, generator=g), torch.randn(500, 300, generator=g)
    out = {}
    for wide in ("0", "1"):
        monkeypatch.setenv("FASTAD_CPU_WIDE_TILES", wide)
        out[wide] = smx._topk_logits(q, k[None], None, 0.05, 40, "cpu")
    assert torch.equal(out["0"][0], out["1"][0]) and torch.equal(out["0"][1], out["1"][1])


# ---------------------------------------------------------------------------
# sparsemax lookup: supports from a few keys to most of the dictionary

def lookup_check(q, k, v, mask=None, scale=None):
    out, lw = fastad.ops.dict_lookup(q, k, v, scale, "sparsemax", mask, return_weights=True, backend="cpu")
    ref, rlw = smx.dict_lookup_reference(q.double(), k.double(), v.double(), scale, "sparsemax", mask,
                                         return_weights=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    M = k.shape[-2]

    def dense(lw):
        w = torch.zeros(*lw.indices.shape[:-1], M + 1, dtype=torch.float64)
        return w.scatter_add(-1, torch.where(lw.indices < 0, M, lw.indices), lw.weights.double())[..., :M]

    torch.testing.assert_close(dense(lw), dense(rlw), atol=1e-5, rtol=0)
    assert bool(((lw.indices >= 0) == (lw.weights > 0)).all())
    assert bool((lw.weights[..., :-1] >= lw.weights[..., 1:]).all())
    return (lw.indices >= 0).sum(-1)


def test_lookup_support_at_every_spread(cpu_isa, monkeypatch):
    """Logit spreads whose supports end inside the first 32 candidates, inside the
    widened 256, and past them (full logits), in one call and one batch item each;
    a masked dictionary shifts which keys count."""
    g = torch.Generator().manual_seed(23)
    M, C = 2200, 16
    k = torch.randn(M, C, generator=g)
    v = torch.randn(M, 3, generator=g)
    q = torch.randn(2, 12, C, generator=g)
    spread = torch.tensor([1.0, 0.05, 0.02, 0.004]).repeat_interleave(3)
    q = q * spread[None, :, None]
    widths = []
    topk = smx._topk_logits
    monkeypatch.setattr(smx, "_topk_logits", lambda *a: widths.append((a[0].shape[1], a[4])) or topk(*a))
    support = lookup_check(q, k, v)
    # the first pass over every row, then (per batch item) most middle-spread rows widened to 256
    assert widths[0] == (12, smx.TOPK) and sum(n for n, K in widths[1:] if K == 8 * smx.TOPK) >= 6
    lo, mid, wide = support[:, :3], support[:, 3:9], support[:, 9:]
    assert int(lo.max()) <= smx.TOPK < int(mid.min())
    assert int(mid.max()) <= 8 * smx.TOPK < int(wide.min())
    mask = torch.rand(2, M, generator=g) > 0.3
    lookup_check(q, k[None].expand(2, -1, -1), v, mask)


def test_lookup_ties_at_the_widened_cut(cpu_isa):
    """Integer logits: 100 copies of the best key and 400 of the second best, so the
    32- and 256-candidate cuts fall inside runs of equal logits."""
    g = torch.Generator().manual_seed(24)
    M = 2200
    k = torch.randint(-2, 2, (M, 4), generator=g).float()
    best, second = torch.tensor([2.0, 2, 2, 2]), torch.tensor([2.0, 2, 2, 1])
    perm = torch.randperm(M, generator=g)
    k[perm[:100]] = best
    k[perm[100:500]] = second
    q = torch.ones(1, 3, 4)
    q[0, 1] *= 0.5
    q[0, 2] *= 0.001  # near-uniform: full logits
    v = torch.randn(M, 2, generator=g)
    support = lookup_check(q, k, v, scale=0.01)
    assert int(support[0, 0]) > smx.TOPK


# ---------------------------------------------------------------------------
# the mean of the k largest / smallest from a tile row, without a sorted top-k

@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_mean_modes_from_tiles_with_ties_at_the_kth_value(cpu_isa, metric):
    """k a large part of M (the tile path): runs of bit-equal values straddle the k-th
    value, a constant row (one histogram bin), a row with no eligible entry; the
    means, and the kept indices the gradients use, match the float64 reference."""
    g = torch.Generator().manual_seed(25)
    M, C = 300, 24
    b = torch.randn(M, C, generator=g)
    b[100:160] = b[7]  # 61 bit-equal rows
    q = torch.randn(9, C, generator=g)
    q[0] = b[7]
    q[1] = 0.0  # cosine: every value 1; ip: every value 0
    for k in (40, 61, 100, 299):
        for reduce in ("mean_largest", "mean_smallest"):
            for need in (False, True):
                v, i, _ = nn(q, b, k, metric, reduce, "fp32", need_indices=need)
                assert_matches_reference(NNResult(v, None), q, b, k=k, metric=metric, scale=0.5, reduce=reduce)
                if need:  # the kept set: k distinct rows whose exact values average to the mean
                    assert bool((i >= 0).all()) and all(len(set(r.tolist())) == k for r in i)
                    kept = pair_values(q[None], b[None], i[None], metric, 0.5)[0].mean(-1)
                    torch.testing.assert_close(kept, v.double(), atol=1e-5, rtol=1e-5)
    qg = torch.tensor([0, 1, 1, 2, 0, 1, 2, 0, 3])
    bg = torch.randint(0, 3, (M,), generator=g)
    v, i, _ = _cpu_call(q[None], b[None], 150, metric, 0.5, "mean_largest", qg[None], bg[None], "other", False, "fp32")
    assert_matches_reference(NNResult(v[0], None), q, b, k=150, metric=metric, scale=0.5, reduce="mean_largest",
                             query_groups=qg, bank_groups=bg)
