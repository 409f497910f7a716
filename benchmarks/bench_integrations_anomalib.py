"""fastad.patch_anomalib: anomalib 2.7 with and without the patch, side by side.

* coreset: ``KCenterGreedy(embedding, sampling_ratio).sample_coreset()`` as PatchCore's
  ``subsample_embedding`` calls it (anomalib's sparse projection included in both runs);
  the patched run records whether it selected exactly the unpatched run's coreset
  ("same_picks").
* scoring: the nearest-neighbour part of ``PatchcoreModel.forward`` on a batch of
  embeddings: ``nearest_neighbors(embedding, 1)`` against the memory bank, then
  ``compute_anomaly_score`` with ``num_neighbors=9`` (its support-sample search goes
  through ``nearest_neighbors`` too). The patched run records whether it found the same
  nearest bank rows ("same_locations") and the largest score difference.

Features are synthetic "patch-like" rows (bench_kcenter.patch_like: blobs in a 32-d
latent space mapped to C dims, ReLU'd, plus noise); memory bank and queries come from
the same distribution, as in PatchCore.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import fastad
from bench_kcenter import patch_like

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_PEER: dict[str, object] = {}

CORESET = {"quick": (20_000, 1024, 0.01), "full": (200_000, 1024, 0.01)}
# (images, patches per image, memory bank rows, channels): PatchCore wide_resnet50_2 layer2+3 at 224
SCORING = {"quick": [(8, 784, 16_384, 1536)], "full": [(8, 784, 65_536, 1536), (32, 784, 16_384, 1536)]}


def _scoring_case(bench_size, case):
    if case >= len(SCORING[bench_size]):
        pytest.skip("size not in this mode")
    return SCORING[bench_size][case]


@pytest.mark.parametrize("impl", ["anomalib", "patched"])
def test_coreset(bench, benchmark, bench_size, impl):
    sampling = pytest.importorskip("anomalib.models.components.sampling")
    n, c, ratio = CORESET[bench_size]
    x = patch_like(n, c)
    group = f"anomalib KCenterGreedy.sample_coreset {n:,}x{c:,}, ratio {ratio} -> {int(n * ratio):,} picks"

    def run():
        torch.manual_seed(0)
        np.random.seed(0)
        return sampling.KCenterGreedy(embedding=x, sampling_ratio=ratio).select_coreset_idxs()

    if impl == "anomalib":
        _PEER[group] = bench(run, group=group, impl="anomalib 2.7", role="peer", rounds=1)
        return
    with fastad.patch_anomalib(nearest_neighbors=False):
        picks = bench(run, group=group, impl="anomalib + fastad.patch_anomalib()", role="fastad",
                      rounds=1 if bench_size == "full" else 3)
    if group in _PEER:
        benchmark.extra_info["same_picks"] = picks == _PEER[group]
        print(f"\n{group}: same coreset as unpatched anomalib: {picks == _PEER[group]}")


def _scoring_model(bank: torch.Tensor):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    # the backbone is not used here: the smallest one, random weights, nothing downloaded
    model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False, num_neighbors=9)
    model.memory_bank = bank
    return model.eval()


def _score(model, embedding: torch.Tensor, batch: int):
    """PatchcoreModel.forward after the backbone (anomalib 2.7, lines for lines)."""
    with torch.no_grad():
        patch_scores, locations = model.nearest_neighbors(embedding=embedding, n_neighbors=1)
        patch_scores = patch_scores.reshape((batch, -1))
        locations = locations.reshape((batch, -1))
        return model.compute_anomaly_score(patch_scores, locations, embedding), patch_scores, locations


@pytest.mark.parametrize("impl", ["anomalib", "patched"])
@pytest.mark.parametrize("case", range(2))
def test_patchcore_scoring(bench, benchmark, bench_size, case, impl):
    pytest.importorskip("anomalib")
    b, p, m, c = _scoring_case(bench_size, case)
    rows = patch_like(m + b * p, c, seed=2)
    bank, embedding = rows[:m].contiguous(), rows[m:].contiguous()
    model = _scoring_model(bank)
    group = f"PatchCore scoring {b}x{p} patches vs bank {m:,}x{c:,} (1-NN + support 9-NN)"
    if impl == "anomalib":
        _PEER[group] = bench(lambda: _score(model, embedding, b), group=group, impl="anomalib 2.7", role="peer",
                             rounds=1)
        return
    with fastad.patch_anomalib(coreset=False):
        score, patch_scores, locations = bench(lambda: _score(model, embedding, b), group=group,
                                               impl="anomalib + fastad.patch_anomalib()", role="fastad")
    if group in _PEER:
        want = _PEER[group]
        same = torch.equal(locations, want[2])
        diff = float((score - want[0]).abs().max())
        benchmark.extra_info.update(same_locations=same, max_score_diff=diff)
        print(f"\n{group}: same nearest rows as unpatched anomalib: {same}, max score difference {diff:.2e}")
