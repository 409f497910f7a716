"""``fastad evaluate``: every method end to end on tiny models and synthetic MVTec / VisA
folders, the files it writes, checkpoints and the errors that name the culprit."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastad import cli
from fastad.data import synthetic
from fastad.evaluate import (EvaluationError, SAAPlusRunner, build_runner, evaluate, parse_overrides)

TINY_CLIP = ["--config", "backbone=fastad-tiny", "--config", "image_size=64", "--config", "layers=(1, 2, 3, 4)"]
TINY_ICAS = ["--config", "encoder=vit_small_patch14_dinov2",
             "--config", "encoder_kwargs={'depth': 2, 'num_heads': 2, 'embed_dim': 32}",
             "--config", "image_size=70", "--config", "dim=32", "--config", "num_queries=12",
             "--config", "num_layers=2", "--config", "num_heads=4", "--config", "ffn_dim=48"]
TINY_CLIP_KW = dict(backbone="fastad-tiny", image_size=64, layers=(1, 2, 3, 4))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    synthetic.make_demo_dataset(root, categories=("brick",), size=48, n_train=4, n_test_good=3, n_test_defect=1)
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(["evaluate", "--no-progress", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_parse_overrides():
    assert parse_overrides(["a=1", "b=(1, 2)", "c=fastad-tiny", "d={'x': 2}"]) == \
        {"a": 1, "b": (1, 2), "c": "fastad-tiny", "d": {"x": 2}}
    with pytest.raises(EvaluationError, match="KEY=VALUE"):
        parse_overrides(["image_size"])


@pytest.mark.parametrize("method,tiny", [("inctrlv2", TINY_CLIP), ("dictas", TINY_CLIP), ("icas", TINY_ICAS)])
def test_cli_writes_metrics_scores_and_overlays(data, tmp_path, capsys, method, tiny):
    torch.manual_seed(0)
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["--method", method, "--data", str(data), "--category", "brick", "--shots", "2",
                               "--out", str(out), *tiny], capsys)
    assert rc == 0, err
    assert "pixel_auroc" in stdout and "| stage | seconds | peak MiB |" in stdout
    report = json.loads((out / "metrics.json").read_text())
    n_test = 3 + len(synthetic.DEFECTS)
    assert report["method"] == method and report["shots"] == 2 and len(report["references"]) == 2
    assert report["test_images"] == n_test and report["anomalous_images"] == len(synthetic.DEFECTS)
    for key in ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupro_200", "region_f1"):
        assert 0.0 <= report["metrics"][key] <= 1.0
    assert report["stages"]["metrics (fastad.metrics)"]["seconds"] > 0
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_test and {r["defect"] for r in rows} == {"good", *synthetic.DEFECTS}
    with open(out / "metrics.csv") as f:
        assert {r["metric"] for r in csv.DictReader(f)} == set(report["metrics"])
    pngs = sorted(out.glob("maps/*/*.png"))
    assert len(pngs) == n_test
    size = report["map_size"]
    assert Image.open(pngs[0]).size == (size, size)
    # the ground-truth outline is drawn in pure green on a defect overlay
    defect_png = np.asarray(Image.open(next(out.glob(f"maps/{synthetic.DEFECTS[0]}/*.png"))))
    assert ((defect_png == (0, 255, 0)).all(-1)).any()


def test_backends_agree_and_seed_fixes_the_references(data):
    results = {}
    for backend in ("reference", "fastad"):
        torch.manual_seed(3)
        runner = build_runner("inctrlv2", "brick", config=TINY_CLIP_KW, backend=backend)
        results[backend] = evaluate(runner, data, "brick", shots=2, seed=5, progress=False)
    ref, fast = results["reference"], results["fastad"]
    assert ref.info["references"] == fast.info["references"]
    torch.testing.assert_close(fast.maps, ref.maps, rtol=1e-4, atol=1e-5)
    for key, value in ref.metrics.items():
        assert fast.metrics[key] == pytest.approx(value, abs=1e-3), key


def test_reference_list_file(data, tmp_path):
    listing = tmp_path / "refs.txt"
    listing.write_text("# two normal images\nbrick/train/good/000.png\ntrain/good/003.png\n")
    torch.manual_seed(0)
    runner = build_runner("dictas", "brick", config=TINY_CLIP_KW)
    res = evaluate(runner, data, "brick", references=listing, progress=False)
    assert [Path(p).name for p in res.info["references"]] == ["000.png", "003.png"]
    assert res.info["shots"] == 2 and res.info["seed"] is None
    listing.write_text("train/good/999.png\n")
    with pytest.raises(EvaluationError, match="999.png"):
        evaluate(runner, data, "brick", references=listing, progress=False)


def test_checkpoint_is_loaded_and_a_foreign_one_is_refused(data, tmp_path, capsys):
    torch.manual_seed(7)
    trained = build_runner("inctrlv2", "brick", config=TINY_CLIP_KW)
    ckpt = tmp_path / "inctrl.pt"
    torch.save({"model_state": trained.model.state_dict()}, ckpt)
    want = evaluate(trained, data, "brick", shots=2, progress=False)
    torch.manual_seed(8)  # different random init: the checkpoint must override it
    loaded = build_runner("inctrlv2", "brick", config=TINY_CLIP_KW, checkpoint=str(ckpt))
    got = evaluate(loaded, data, "brick", shots=2, progress=False)
    torch.testing.assert_close(got.maps, want.maps)

    foreign = tmp_path / "dictas.pt"
    torch.save(build_runner("dictas", "brick", config=TINY_CLIP_KW).model.state_dict(), foreign)
    rc, _, err = run_cli(["--method", "inctrlv2", "--data", str(data), "--category", "brick",
                          "--checkpoint", str(foreign), "--out", str(tmp_path / "o"), *TINY_CLIP], capsys)
    assert rc == 2 and str(foreign) in err and "not a checkpoint of inctrlv2" in err and "unexpected keys" in err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluationError, match="garbage.pt"):
        build_runner("dictas", "brick", config=TINY_CLIP_KW, checkpoint=str(garbage))
    with pytest.raises(EvaluationError, match="missing.pt does not exist"):
        build_runner("dictas", "brick", config=TINY_CLIP_KW, checkpoint=str(tmp_path / "missing.pt"))


def test_errors_name_the_folder_category_or_file(data, tmp_path, capsys):
    common = ["--method", "dictas", "--out", str(tmp_path / "o"), *TINY_CLIP]
    rc, _, err = run_cli([*common, "--data", str(tmp_path / "nowhere"), "--category", "brick"], capsys)
    assert rc == 2 and "nowhere does not exist" in err
    rc, _, err = run_cli([*common, "--data", str(data), "--category", "carpet"], capsys)
    assert rc == 2 and "unknown category 'carpet'" in err and "brick" in err
    rc, _, err = run_cli([*common, "--data", str(data), "--category", "brick", "--shots", "9"], capsys)
    assert rc == 2 and "only 4 normal training images" in err
    rc, _, err = run_cli([*common, "--data", str(data), "--category", "brick", "--config", "image_sise=64"], capsys)
    assert rc == 2 and "image_sise" in err

    bad = tmp_path / "bad"
    synthetic.make_demo_dataset(bad, categories=("brick",), size=48, n_train=2, n_test_good=1, n_test_defect=1)
    mask = next((bad / "brick" / "ground_truth").glob("*/*_mask.png"))
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(mask)
    rc, _, err = run_cli([*common, "--data", str(bad), "--category", "brick", "--shots", "1"], capsys)
    assert rc == 2 and str(mask) in err and "20x30" in err
    synthetic.make_demo_dataset(bad, categories=("brick",), size=48, n_train=2, n_test_good=1, n_test_defect=1)
    broken = bad / "brick" / "test" / "good" / "000.png"
    broken.write_bytes(b"\x89PNG broken")
    rc, _, err = run_cli([*common, "--data", str(bad), "--category", "brick", "--shots", "1"], capsys)
    assert rc == 2 and str(broken) in err


def test_visa_split_csv_layout(data, tmp_path):
    root = tmp_path / "visa"
    (root / "split_csv").mkdir(parents=True)
    rows = []
    for p in sorted((data / "brick").rglob("*.png")):
        rel = p.relative_to(data / "brick")
        if rel.parts[0] == "ground_truth":
            continue
        dst = root / "brick" / "Data" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
        split = "train" if rel.parts[0] == "train" else "test"
        defect = rel.parts[1]
        mask = ""
        if defect != "good":
            src = data / "brick" / "ground_truth" / defect / f"{p.stem}_mask.png"
            mdst = root / "brick" / "Masks" / defect / src.name
            mdst.parent.mkdir(parents=True, exist_ok=True)
            mdst.write_bytes(src.read_bytes())
            mask = str(mdst.relative_to(root))
        rows.append(["brick", split, "normal" if defect == "good" else "anomaly", str(dst.relative_to(root)), mask])
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    torch.manual_seed(0)
    runner = build_runner("dictas", "brick", config=TINY_CLIP_KW)
    visa = evaluate(runner, root, "brick", shots=2, progress=False)
    mvtec = evaluate(runner, data, "brick", shots=2, progress=False)
    assert visa.info["layout"] == "visa" and mvtec.info["layout"] == "mvtec"
    assert visa.info["test_images"] == mvtec.info["test_images"]
    # the same images in both layouts (sorted the same way): the same metrics
    for key, value in mvtec.metrics.items():
        assert visa.metrics[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_saa_plus_zero_shot_normalises_over_the_category(data, tmp_path, capsys):
    from fastad.models import SAAPlus
    from fastad.models.saa_plus import BoxMaskRefiner, Proposals, SaliencyFeatures, StaticProposer
    from fastad.models.saa_tables import category_config

    cfg = category_config("mvtec", "carpet", text_prompts=[("defect", "brick")], object_prompt="brick", k_mask=1)
    proposer = StaticProposer({"defect": Proposals(torch.tensor([[0.4, 0.4, 0.3, 0.3]]), torch.tensor([0.5]),
                                                   ["defect"])})
    torch.manual_seed(0)
    model = SAAPlus(cfg, proposer, BoxMaskRefiner(), feature_extractor=SaliencyFeatures("resnet18"),
                    saliency_k=8, single_size=64, out_size=48)
    res = evaluate(SAAPlusRunner(model), data, "brick", tmp_path / "saa", progress=False, method="saa_plus")
    assert res.info["shots"] == 0 and res.info["references"] == []
    assert float(res.maps.min()) == 0.0 and float(res.maps.max()) == 1.0
    torch.testing.assert_close(res.scores, res.maps.flatten(1).amax(1))
    stages = json.loads((tmp_path / "saa" / "metrics.json").read_text())["stages"]
    assert "model: saliency" in stages and "model: proposals" in stages
    # the CLI needs GroundingDINO for the proposals and says so
    rc, _, err = run_cli(["--method", "saa_plus", "--data", str(data), "--category", "carpet",
                          "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--proposer-config" in err


def test_icas_checkpoint_round_trip_and_refusal(tmp_path):
    kw = parse_overrides(TINY_ICAS[1::2])
    torch.manual_seed(1)
    trained = build_runner("icas", "brick", config=kw).model
    ckpt = tmp_path / "icas.pt"
    torch.save({k: v for k, v in trained.state_dict().items() if not k.startswith("encoder.")}, ckpt)
    torch.manual_seed(2)
    loaded = build_runner("icas", "brick", config=kw, checkpoint=str(ckpt)).model
    torch.testing.assert_close(loaded.fg_bg, trained.fg_bg)
    assert not torch.equal(loaded.encoder.patch_embed.proj.weight, trained.encoder.patch_embed.proj.weight)
    foreign = tmp_path / "clip.pt"
    torch.save(build_runner("dictas", "brick", config=TINY_CLIP_KW).model.state_dict(), foreign)
    with pytest.raises(EvaluationError, match="clip.pt is not a checkpoint of icas"):
        build_runner("icas", "brick", config=kw, checkpoint=str(foreign))
