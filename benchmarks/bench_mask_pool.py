"""mask_pool: fastad (adjoint-projected weights + one GEMM per image) side by side
with the plain path users write (F.interpolate of features and masks, > threshold,
einsum), on the iCAS and SAA+ problem sizes.

    pytest benchmarks/bench_mask_pool.py --benchmark-only                     # quick
    pytest benchmarks/bench_mask_pool.py --benchmark-only --bench-size full   # papers' sizes
"""
import pytest
import torch
import torch.nn.functional as F

from fastad.ops import mask_pool, mask_pool_reference

# name: (quick sizes, full sizes, fixed parameters)
CASES = {
    # iCAS MFM: the target's K = 200 predicted mask logits on the 4x grid, 37x37 neck features
    "icas-mfm": ({"B": 4, "C": 256, "R": 200}, {"B": 32, "C": 256, "R": 200},
                 {"H": 37, "Hm": 148, "grid": 148, "kind": "logits", "threshold": 0.0, "complement": False}),
    "icas-mfm-c1024": ({"B": 2, "C": 1024, "R": 200}, {"B": 32, "C": 1024, "R": 200},
                       {"H": 37, "Hm": 148, "grid": 148, "kind": "logits", "threshold": 0.0, "complement": False}),
    # iCAS prompts: binary reference masks at 518 px, pooled with their complement (1 - M_r)
    "icas-prompt": ({"B": 4, "C": 256, "R": 4}, {"B": 32, "C": 256, "R": 4},
                    {"H": 37, "Hm": 518, "grid": 148, "kind": "binary", "threshold": 0.0, "complement": True}),
    # SAA+ rescoring: mean saliency (64x64, upsampled) inside each SAM mask
    "saa-1024": ({"B": 1, "C": 1, "R": 30}, {"B": 1, "C": 1, "R": 300},
                 {"H": 64, "Hm": 1024, "grid": 1024, "kind": "sam", "threshold": 0.5, "complement": False}),
    "saa-256": ({"B": 1, "C": 1, "R": 300}, {"B": 1, "C": 1, "R": 300},
                {"H": 64, "Hm": 256, "grid": 256, "kind": "sam", "threshold": 0.5, "complement": False}),
}


def make_inputs(name: str, size: str, device: torch.device):
    quick, full, p = CASES[name]
    s = {**(quick if size == "quick" else full), **p}
    g = torch.Generator().manual_seed(0)
    B, C, R, H, Hm = s["B"], s["C"], s["R"], s["H"], s["Hm"]
    features = torch.randn(B, C, H, H, generator=g)
    if s["kind"] == "logits":  # smooth logits: blobs of positive pixels
        masks = F.interpolate(torch.randn(B, R, Hm // 8, Hm // 8, generator=g), size=(Hm, Hm), mode="bilinear")
    elif s["kind"] == "binary":
        masks = F.interpolate(torch.rand(B, R, 8, 8, generator=g), size=(Hm, Hm), mode="bilinear") > 0.7
    else:  # SAM-like boxes covering 1-25 % of the image, as bool
        masks = torch.zeros(B, R, Hm, Hm, dtype=torch.bool)
        for b in range(B):
            for r in range(R):
                h, w = (torch.randint(Hm // 10, Hm // 2, (2,), generator=g)).tolist()
                y, x = torch.randint(0, Hm - h, (1,), generator=g).item(), torch.randint(0, Hm - w, (1,), generator=g).item()
                masks[b, r, y:y + h, x:x + w] = True
    label = (f"mask_pool {name}: B={B} C={C} feat {H}x{H} R={R} masks {Hm}x{Hm} {masks.dtype} "
             f"grid {s['grid']} comp={s['complement']}")
    return features.to(device), masks.to(device), s, label


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", ["fastad", "reference"])
def test_mask_pool(bench, bench_size, bench_device, name, impl):
    features, masks, s, group = make_inputs(name, bench_size, bench_device)
    kw = {"size": s["grid"], "threshold": s["threshold"], "complement": s["complement"]}
    if impl == "fastad":
        backend = "triton" if bench_device.type == "cuda" else "cpu"
        bench(lambda: mask_pool(features, masks, backend=backend, **kw), group=group, impl=f"fastad {backend}",
              role="fastad")
    else:
        bench(lambda: mask_pool_reference(features, masks, **kw), group=group, impl="F.interpolate + einsum",
              role="peer")
