"""SAA+ and iCAS end to end: ms per image, reference backend (plain torch, the authors' way) vs
fastad backend (fastad ops), random weights, with each stage's share of the time.

Sizes (``--bench-size``):
  quick  SAA+: 256 px images, saliency grid 32 x 32 (single object) / 64 x 64 (4 instances), 60
         proposals; iCAS: DINOv2 ViT-S/14 at 224 px (16 x 16 patches), K = 100, d = 256, 6 layers.
  full   the papers' sizes: SAA+: 1024 px images, WideResNet-50-2 at 256 px (64 x 64 = 4096
         positions, top-400 mean), 300 proposals (masks of 1024 x 1024); multi-instance at 512 px
         (128 x 128 grid; the authors' 1024 px, a 256 x 256 grid, takes minutes per image for the
         reference on a 2-core CPU); iCAS: DINOv2 ViT-L/14 at 518 px (37 x 37 patches), K = 200,
         d = 256, 6 layers.
GroundingDINO and SAM are replaced by deterministic stand-ins (fixed boxes, box-filling masks):
their cost does not depend on the backend.
"""
from __future__ import annotations

import pytest
import torch

import fastad
from fastad.models import ICAS, SAAPlus
from fastad.models.saa_plus import BoxMaskRefiner, Proposals, SaliencyFeatures, StaticProposer, prepare_caption
from fastad.models.saa_tables import category_config

ROLES = {"reference": ("peer", "reference backend (plain torch)"), "fastad": ("fastad", "fastad backend")}


def _report(capsys, label: str, per_image_ms: float, times: dict) -> None:
    total = sum(times.values()) or 1.0
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in times.items())
    with capsys.disabled():
        print(f"\n  {label}: {per_image_ms:.1f} ms/image; stages: {shares}")


def _static_proposer(cfg, n_boxes: int, seed: int) -> StaticProposer:
    """Boxes spread over the defect prompts, all under the area cap and above the threshold."""
    g = torch.Generator().manual_seed(seed)
    table = {}
    n_obj = cfg.object_number
    if n_obj == 1:
        table[cfg.object_prompt] = Proposals(torch.tensor([[0.5, 0.5, 0.9, 0.9]]), torch.tensor([0.9]), ["object"])
    else:
        side = int(torch.tensor(float(n_obj)).sqrt().ceil())
        boxes = [[(i % side + 0.5) / side, (i // side + 0.5) / side, 0.9 / side, 0.9 / side] for i in range(n_obj)]
        table[cfg.object_prompt] = Proposals(torch.tensor(boxes), torch.full((n_obj,), 0.8), ["object"] * n_obj)
    per = -(-n_boxes // len(cfg.text_prompts))
    for caption, _ in cfg.text_prompts:
        centre = torch.rand(per, 2, generator=g) * 0.8 + 0.1
        size = torch.rand(per, 2, generator=g) * 0.15 + 0.02
        scores = torch.rand(per, generator=g) * 0.8 + 0.15
        table[prepare_caption(caption)] = Proposals(torch.cat([centre, size], 1), scores, ["defect"] * per)
    return StaticProposer(table)


SAA_SIZES = {
    # name: (category, dataset, image side, single_size, multi_size, proposals)
    "quick": [("bottle", "mvtec", 256, 128, 256, 60), ("candle", "visa", 256, 128, 256, 60)],
    "full": [("bottle", "mvtec", 1024, 256, 512, 300), ("candle", "visa", 1024, 256, 512, 300)],
}


@pytest.fixture(scope="module")
def wrn(bench_device):
    torch.manual_seed(0)
    return SaliencyFeatures("wide_resnet50_2").to(bench_device)


@pytest.mark.parametrize("backend", ["reference", "fastad"])
@pytest.mark.parametrize("case", [0, 1])
def test_saa_plus(bench, bench_size, bench_device, wrn, capsys, backend, case):
    category, dataset, side, single, multi, n_boxes = SAA_SIZES[bench_size][case]
    cfg = category_config(dataset, category)
    model = SAAPlus(cfg, _static_proposer(cfg, n_boxes, case), BoxMaskRefiner(), feature_extractor=wrn,
                    single_size=single, multi_size=multi, backend=backend).to(bench_device)
    images = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1)).to(bench_device)
    grid = (single if cfg.object_number == 1 else multi) // 4
    kind = "single-object" if cfg.object_number == 1 else f"{cfg.object_number}-instance"
    group = f"SAA+ {kind} {side}px, saliency {grid}x{grid}, {n_boxes} masks"
    role, impl = ROLES[backend]
    rounds = 1 if bench_size == "full" else 3
    result = bench(lambda: model(images), group=group, impl=impl, role=role, rounds=rounds)
    assert result.anomaly_maps.shape == (1, 400, 400)
    _report(capsys, f"{group} [{impl}]", 1e3 * sum(model.last_stage_times.values()), model.last_stage_times)


ICAS_SIZES = {
    "quick": dict(encoder="vit_small_patch14_dinov2", image_size=224, num_queries=100, batch=1),
    "full": dict(encoder="vit_large_patch14_dinov2", image_size=518, num_queries=200, batch=1),
}


@pytest.fixture(scope="module")
def icas_model(bench_size, bench_device):
    size = ICAS_SIZES[bench_size]
    torch.manual_seed(0)
    return ICAS(size["encoder"], image_size=size["image_size"], num_queries=size["num_queries"]).to(bench_device).eval()


@pytest.mark.parametrize("backend", ["reference", "fastad"])
@pytest.mark.parametrize("prompting", ["anomaly", "normal"])
def test_icas(bench, bench_size, bench_device, icas_model, capsys, backend, prompting):
    if backend == "fastad" and not hasattr(fastad.ops, "kcenter_greedy"):
        pytest.skip("the fastad backend's GQS needs fastad.ops.kcenter_greedy (issue 5), not in this tree yet")
    size = ICAS_SIZES[bench_size]
    S, B = size["image_size"], size["batch"]
    g = torch.Generator().manual_seed(2)
    model = icas_model
    model.backend = backend
    refs = torch.rand(1, 3, S, S, generator=g).to(bench_device)
    masks = None
    if prompting == "anomaly":
        masks = torch.zeros(1, 1, S, S, device=bench_device)
        masks[..., S // 4: S // 2, S // 3: 2 * S // 3] = 1
    model.set_references(refs, masks)
    targets = torch.rand(B, 3, S, S, generator=g).to(bench_device)
    grid = S // model.patch
    group = f"iCAS {prompting} prompting {size['encoder']} {S}px ({grid}x{grid}), K={model.num_queries}, batch {B}"
    role, impl = ROLES[backend]
    rounds = 1 if bench_size == "full" else 3
    out = bench(lambda: model(targets), group=group, impl=impl, role=role, rounds=rounds)
    assert out.anomaly_map.shape == (B, S, S)
    _report(capsys, f"{group} [{impl}]", 1e3 * sum(out.stage_times.values()) / B, out.stage_times)
