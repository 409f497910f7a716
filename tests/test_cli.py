"""The CLI's failures: every user error is one line ``fastad <cmd>: error: <msg>`` naming the
option or file, exit code 2, no traceback; plus --version, help on every option, deprecated
aliases, --overwrite and what ``evaluate`` records about its weights."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from fastad import cli
from fastad.data import synthetic

TINY_CLIP = ["--config", "backbone=fastad-tiny", "--config", "image_size=64", "--config", "layers=(1, 2, 3, 4)"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def fails(args: list[str], capsys, *needles: str, command: str | None = None) -> str:
    """Assert a one-line user error naming every needle; return stderr."""
    rc, _, err = run(args, capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if ": error: " in line)
    assert line.startswith(f"fastad {command or args[0]}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    synthetic.make_demo_dataset(root, categories=("brick",), size=48, n_train=4, n_test_good=2, n_test_defect=1)
    return root


def test_version_and_help_on_every_option(capsys):
    from fastad import __version__

    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"fastad {__version__}"
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"fastad {name} {action.option_strings or action.dest} has no help text"


def test_evaluate_errors(data, tmp_path, capsys):
    common = ["evaluate", "--method", "inctrlv2", "--data", str(data), "--category", "brick", "--no-progress",
              *TINY_CLIP]
    foreign = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    fails([*common, "--backbone-weights", str(foreign), "--out", str(tmp_path / "a")], capsys,
          "--backbone-weights", str(foreign), "inctrlv2")
    if not torch.cuda.is_available():
        fails([*common, "--device", "cuda", "--out", str(tmp_path / "b")], capsys, "--device cuda", "--device cpu")
    err = fails([*common, "--config", "image_sise=64", "--out", str(tmp_path / "c")], capsys,
                "image_sise", "valid --config keys", "image_size")
    assert not (tmp_path / "c").exists()
    fails(["evaluate", "--method", "dictas", "--data", str(data), "--category", "brick", "--config", "image_size",
           "--out", str(tmp_path / "d")], capsys, "KEY=VALUE")


def test_evaluate_records_weights_warns_on_random_ones_and_refuses_a_used_out(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["evaluate", "--method", "dictas", "--data", str(data), "--category", "brick", "--shots", "1",
            "--no-progress", "--no-overlays", "--out", str(out), *TINY_CLIP]
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    assert "RANDOM weights" in err and err.index("building dictas") < err.index("RANDOM") + 200
    report = json.loads((out / "metrics.json").read_text())
    assert report["random_weights"] is True and report["checkpoint"] is None and report["backbone_weights"] is None
    assert report["config"]["backbone"] == "fastad-tiny"
    fails(args, capsys, f"--out {out} is not empty", "--overwrite")
    stale = out / "maps" / "old_defect" / "x.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    rc, _, err = run([*args, "--overwrite"], capsys)
    assert rc == 0, err
    assert not stale.exists() and not (out / "maps").exists()  # no previous maps beside the new metrics
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    fails([*args[:-len(TINY_CLIP) - 2], "--out", str(foreign), "--overwrite", *TINY_CLIP], capsys,
          "not a previous fastad run")
    assert (foreign / "notes.txt").is_file()


def test_deprecated_backbone_alias_warns(data, tmp_path, capsys):
    with pytest.warns(DeprecationWarning, match="--backbone-weights"):
        fails(["evaluate", "--method", "dictas", "--data", str(data), "--category", "brick",
               "--backbone", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o"), *TINY_CLIP], capsys,
              "none.pt does not exist")


def test_demo_errors(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # argparse refuses a backend the demo does not have
    rc, _, err = run(["demo", "--backend", "fastad"], capsys)
    assert rc == 2 and "invalid choice: 'fastad'" in err and "Traceback" not in err
    fails(["demo", "--data", str(data), "--shots", "0"], capsys, "--shots must be >= 1")
    fails(["demo", "--data", str(data), "--shots", "20", "--no-progress"], capsys, "20 shots", "only 4")
    fails(["demo", "--data", "nonexist"], capsys, "--data nonexist does not exist", "fastad demo-data")
    assert not Path("nonexist").exists()  # no synthetic data made behind the user's back
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        fails(["demo", "--data", str(data), "--ops-backend", "triton", "--no-progress"], capsys,
              "backend 'triton' is unavailable")
    (Path("afile")).write_text("x")
    fails(["demo-data", "afile"], capsys, "afile is a file")


def test_demo_over_an_empty_image(tmp_path, capsys):
    synthetic.make_demo_dataset(tmp_path, categories=("grass",), size=32, n_train=2, n_test_good=1,
                                n_test_defect=1)
    empty = tmp_path / "grass" / "train" / "good" / "001.png"
    empty.write_bytes(b"")
    fails(["demo", "--data", str(tmp_path), "--shots", "2", "--no-progress"], capsys, "cannot read image",
          str(empty))


def test_fit_predict_export_errors(tmp_path, capsys):
    synthetic.make_demo_dataset(tmp_path / "d", categories=("brick",), size=32, n_train=2, n_test_good=1,
                                n_test_defect=1)
    good = tmp_path / "d" / "brick" / "train" / "good"
    fails(["fit", "--normal", str(tmp_path / "none"), "--out", str(tmp_path / "det")], capsys,
          "--normal", "none does not exist")
    fails(["fit", "--normal", str(tmp_path / "*.jpg"), "--out", str(tmp_path / "det")], capsys,
          "--normal: no images")
    fails(["fit", "--normal", str(good), "--calibrate", str(good), "--out", str(tmp_path / "det")], capsys,
          "--calibrate", "held out")
    fails(["fit", "--normal", str(good), "--fpr", "2", "--out", str(tmp_path / "det")], capsys, "--fpr")
    fails(["fit", "--normal", str(good), "--config", "sigmaa=2", "--out", str(tmp_path / "det")], capsys,
          "sigmaa", "valid keys", "coreset")
    fails(["fit", "--normal", str(good), "--checkpoint", str(good / "000.png"), "--out", str(tmp_path / "det")],
          capsys, "--checkpoint", "patchnn")
    foreign = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    fails(["fit", "--normal", str(good), "--backbone-weights", str(foreign), "--out", str(tmp_path / "det")],
          capsys, "--backbone-weights", "resnet.pth is not EfficientNet-Lite0 weights")
    fails(["fit", "--method", "saa_plus", "--normal", str(good), "--out", str(tmp_path / "det")], capsys,
          "--proposer-config")
    (tmp_path / "used").mkdir()
    fails(["fit", "--normal", str(good), "--out", str(tmp_path / "used")], capsys, "already exists", "--overwrite")
    fails(["predict", str(tmp_path / "used"), "--images", str(good), "--out", str(tmp_path / "r")], capsys,
          "not a fastad detector", "fastad fit")
    fails(["export", str(tmp_path / "used"), "--out", str(tmp_path / "m.onnx")], capsys, "not a fastad detector")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_bench_suite_and_out_outside_the_checkout(tmp_path, capsys, monkeypatch):
    fails(["bench", "--suite", "no_such_suite"], capsys, "--suite", "bench_")
    seen = []

    def fake_call(cmd, cwd):
        json_arg = next(a for a in cmd if a.startswith("--benchmark-json="))
        seen.append((json_arg.split("=", 1)[1], cwd))
        return 5  # nothing selected

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.subprocess, "call", fake_call)
    rc, _, err = run(["bench", "--suite", "mask_pool", "--out", "rel-out"], capsys)
    assert rc == 1 and "no benchmark results" in err
    path, cwd = seen[0]
    assert Path(path).is_absolute() and Path(path).parent == (tmp_path / "rel-out" / "json")
    assert Path(cwd) != tmp_path  # the suites run in the checkout, and still write under the user's cwd


def test_a_bug_still_shows_its_traceback(monkeypatch):
    """Only user errors are turned into one line: a programming error keeps its traceback."""
    def boom(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "_cmd_demo_data", boom)
    with pytest.raises(KeyError):
        cli.main(["demo-data", "x"])


def test_models_take_backbone_weights_and_the_old_names_warn(tmp_path):
    from fastad.models import InCTRLv2
    from fastad.models.checkpoint import backbone_weights_arg

    tiny = dict(backbone="fastad-tiny", image_size=64, layers=(1, 2, 3, 4))
    torch.manual_seed(0)
    weights = tmp_path / "clip.pt"
    torch.save(InCTRLv2("v2", **tiny).backbone.clip.state_dict(), weights)
    torch.manual_seed(1)
    new = InCTRLv2("v2", backbone_weights=str(weights), **tiny)
    with pytest.warns(DeprecationWarning, match="backbone_weights"):
        old = InCTRLv2("v2", pretrained=str(weights), **tiny)
    torch.testing.assert_close(new.backbone.clip.visual.proj, old.backbone.clip.visual.proj)
    with pytest.raises(TypeError, match="backbone_weights only"):
        backbone_weights_arg("ICAS", "a.pt", "checkpoint_path", "b.pt")


def test_metrics_evaluate_progress_bar_advances(capsys):
    from fastad import metrics

    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:2, :4, :4] = True
    metrics.evaluate(torch.rand(4), torch.rand(4, 16, 16), None, masks, progress=True)
    err = capsys.readouterr().err
    steps = 6  # image, pixel, components, aupro, aupro_200, region_f1
    assert all(f"{i}/{steps}" in err for i in range(1, steps + 1)), err


def test_evaluate_warns_when_the_test_split_leaves_metrics_undefined(tmp_path, capsys):
    import shutil

    synthetic.make_demo_dataset(tmp_path / "d", categories=("brick",), size=48, n_train=2, n_test_good=2,
                                n_test_defect=1)
    for defect in synthetic.DEFECTS:  # test/good only
        shutil.rmtree(tmp_path / "d" / "brick" / "test" / defect)
    shutil.rmtree(tmp_path / "d" / "brick" / "ground_truth")
    rc, _, err = run(["evaluate", "--method", "dictas", "--data", str(tmp_path / "d"), "--category", "brick",
                      "--shots", "1", "--no-progress", "--no-overlays", "--out", str(tmp_path / "o"), *TINY_CLIP],
                     capsys)
    assert rc == 0, err
    assert "image_auroc" in err and "undefined (NaN)" in err and "0 anomalous and 2 normal" in err
