"""k-center greedy: fastad against anomalib's KCenterGreedy (PatchCore coresets) and
the plain torch loop (what iCAS-style code writes), side by side.

Data: no backbone weights can be downloaded here, so the features are synthetic
"patch-like" rows: a mixture of blobs in a 32-d latent space mapped to C dims by a
random matrix, ReLU'd (as CNN features are), plus noise. Real patch features are
similarly low-dimensional and redundant, which is what the exact pruning exploits;
the "gaussian" group shows the worst case (no structure, nothing to prune).

Peers run first in each group; the fastad run then records in extra_info whether
it picked exactly what the peer picked on the same (projected) features
("same_picks") and prints it.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from fastad.ops import kcenter_greedy

_PICKS: dict[str, list] = {}


@functools.lru_cache(maxsize=2)
def patch_like(n: int, c: int, seed: int = 0, latent: int = 32, blobs: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(blobs, latent, generator=g) * 3
    lab = torch.randint(0, blobs, (n,), generator=g)
    spread = torch.rand(blobs, generator=g) + 0.3
    w = torch.randn(latent, c, generator=g) / latent ** 0.5
    out = torch.empty(n, c)
    for i in range(0, n, 65536):  # bounded temporaries
        j = slice(i, min(n, i + 65536))
        z = centers[lab[j]] + torch.randn(j.stop - j.start, latent, generator=g) * spread[lab[j], None]
        out[j] = torch.relu(z @ w) + 0.05 * torch.randn(j.stop - j.start, c, generator=g)
    return out


@functools.lru_cache(maxsize=1)
def gaussian(n: int, c: int) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(0))


def torch_loop(x: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """The plain loop: float32 difference-form distances, argmax, one step at a time
    ([B, N, C]: B problems at once)."""
    xb = x if x.dim() == 3 else x.unsqueeze(0)
    rows = torch.arange(xb.shape[0], device=xb.device)
    s = torch.full((xb.shape[0],), start, dtype=torch.long, device=xb.device)
    picks = [s]
    mind = torch.full(xb.shape[:2], math.inf, device=xb.device)
    for _ in range(k - 1):
        mind = torch.minimum(mind, torch.linalg.norm(xb - xb[rows, s].unsqueeze(1), dim=2))
        mind[rows, s] = -math.inf
        s = mind.argmax(dim=1)
        picks.append(s)
    out = torch.stack(picks, dim=1)
    return out if x.dim() == 3 else out[0]


def jl_dim(n: int, eps: float = 0.9) -> int:
    """anomalib's SparseRandomProjection(eps=0.9) output size for n rows."""
    return int(4 * np.log(n) / (eps ** 2 / 2 - eps ** 3 / 3))


def record(benchmark, group: str, impl: str, picks: list) -> None:
    """Peers store their picks; fastad compares with the group's peer."""
    if impl.startswith("fastad"):
        want = _PICKS.get(group)
        if want is not None:
            same = picks == want
            first = next((i for i, (a, b) in enumerate(zip(picks, want)) if a != b), None)
            benchmark.extra_info["same_picks"] = same
            print(f"\n{group}: fastad picks == peer picks: {same}" + ("" if same else f" (first difference at {first})"))
    else:
        _PICKS[group] = picks


CORESET = {"quick": [(50_000, 1024, 0.01)], "full": [(200_000, 1024, 0.01), (200_000, 1024, 0.10)]}


def _coreset_case(bench_size, case):
    if case >= len(CORESET[bench_size]):
        pytest.skip("size not in this mode")
    return CORESET[bench_size][case]


@pytest.mark.parametrize("impl", ["anomalib", "fastad"])
@pytest.mark.parametrize("case", range(2))
def test_coreset_like_anomalib(bench, benchmark, bench_size, case, impl):
    """The whole anomalib coreset call (its sparse projection included) vs fastad
    with a sparse projection to the same size (the two projections differ)."""
    n, c, ratio = _coreset_case(bench_size, case)
    k, p = int(n * ratio), jl_dim(n)
    x = patch_like(n, c)
    group = f"coreset {n:,}x{c:,} -> {k:,} picks incl. projection to {p}"
    if impl == "anomalib":
        sampling = pytest.importorskip("anomalib.models.components.sampling")
        bench(lambda: sampling.KCenterGreedy(embedding=x, sampling_ratio=ratio).select_coreset_idxs(),
              group=group, impl="anomalib KCenterGreedy", role="peer", rounds=1)
    else:
        bench(lambda: kcenter_greedy(x, k, init="random", projection_dim=p, seed=0),
              group=group, impl="fastad cpu (projection_dim)", role="fastad")


@functools.lru_cache(maxsize=1)
def anomalib_features(n: int, c: int) -> torch.Tensor:
    from anomalib.models.components.dimensionality_reduction import SparseRandomProjection

    x = patch_like(n, c)
    torch.manual_seed(0)
    np.random.seed(0)
    return SparseRandomProjection(eps=0.9).fit(x).transform(x).contiguous()


@pytest.mark.parametrize("impl", ["anomalib", "fastad"])
@pytest.mark.parametrize("case", range(2))
def test_coreset_selection_same_features(bench, benchmark, bench_size, case, impl):
    """The selection alone on anomalib's projected features from anomalib's start."""
    n, c, ratio = _coreset_case(bench_size, case)
    sampling = pytest.importorskip("anomalib.models.components.sampling")
    feats = anomalib_features(n, c)
    k = int(n * ratio)
    torch.manual_seed(1)
    start = int(torch.randint(high=n, size=(1,)).squeeze())
    group = f"coreset selection {n:,}x{feats.shape[1]} (anomalib's projection) -> {k:,} picks"
    if impl == "anomalib":
        sampler = sampling.KCenterGreedy(embedding=feats.unsqueeze(1), sampling_ratio=ratio)  # 3-D: no projection

        def run():
            torch.manual_seed(1)  # the same start
            return sampler.select_coreset_idxs()

        picks = bench(run, group=group, impl="anomalib KCenterGreedy", role="peer", rounds=1)
    else:
        picks = bench(lambda: kcenter_greedy(feats, k, init=start).indices.tolist(),
                      group=group, impl="fastad cpu", role="fastad")
    record(benchmark, group, impl, picks)


PLAIN = {"quick": [("patch-like", 50_000, 1024, 500), ("gaussian", 50_000, 128, 500)],
         "full": [("patch-like", 200_000, 1024, 2000), ("gaussian", 200_000, 128, 2000)]}


@pytest.mark.parametrize("impl", ["torch", "fastad"])
@pytest.mark.parametrize("case", range(2))
def test_coreset_plain_loop(bench, benchmark, bench_size, case, impl):
    """No projection: fastad vs the plain torch loop on the full rows."""
    kind, n, c, k = PLAIN[bench_size][case]
    x = patch_like(n, c) if kind == "patch-like" else gaussian(n, c)
    group = f"coreset {kind} {n:,}x{c:,} -> {k:,} picks, no projection"
    if impl == "torch":
        picks = bench(lambda: torch_loop(x, k).tolist(), group=group, impl="torch loop (fp32)", role="peer",
                      rounds=1)
    else:
        picks = bench(lambda: kcenter_greedy(x, k).indices.tolist(), group=group, impl="fastad cpu", role="fastad")
    record(benchmark, group, impl, picks)


ICAS = {"quick": [(8, 256), (8, 1024)], "full": [(32, 256), (32, 1024)]}


@pytest.mark.parametrize("impl", ["torch", "fastad"])
@pytest.mark.parametrize("case", range(2))
def test_icas_query_selection(bench, benchmark, bench_size, case, impl):
    """iCAS greedy query selection: B images x 1,369 patches (37 x 37), K = 200."""
    b, c = ICAS[bench_size][case]
    x = patch_like(b * 1369, c, seed=1).reshape(b, 1369, c)
    group = f"iCAS GQS {b}x1,369x{c:,} -> 200 queries"
    if impl == "torch":
        picks = bench(lambda: torch_loop(x, 200).tolist(), group=group, impl="torch loop (fp32, batched)",
                      role="peer")
    else:
        picks = bench(lambda: kcenter_greedy(x, 200).indices.tolist(), group=group, impl="fastad cpu",
                      role="fastad")
    record(benchmark, group, impl, picks)
