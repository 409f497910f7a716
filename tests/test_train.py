"""``fastad train``: every method on tiny random models and the synthetic demo data — the
loss goes down, the checkpoint loads in ``fastad evaluate``, an interrupted run resumes
bit-identically, 2 gloo processes under torchrun equal one process, bad data is named, and
training improves the heads' image AUROC on a held-out category."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastad
from fastad import cli
from fastad.data import synthetic
from fastad.data.training import load_training_set
from fastad.evaluate import build_runner, evaluate
from fastad.train import (FeatureSource, Protocol, _batch, _loss_fn, _text_prototypes, make_plan,
                          protocol_defaults, train)

CATS = ("brick", "grass")
TINY_CLIP = {"backbone": "fastad-tiny", "image_size": 64, "layers": (1, 2, 3, 4)}
TINY_ICAS = {"encoder": "vit_small_patch14_dinov2", "encoder_kwargs": {"depth": 2, "num_heads": 2, "embed_dim": 32},
             "image_size": 70, "dim": 32, "num_queries": 12, "num_layers": 2, "num_heads": 4, "ffn_dim": 48}
# DictAS's generator dropout is off so that 2 processes can equal 1 (each process draws its own masks)
CONFIGS = {"inctrlv2": TINY_CLIP, "dictas": {**TINY_CLIP, "generator_dropout": 0.0}, "icas": TINY_ICAS}
SCHEDULE = {"epochs": 2, "batch_size": 4, "steps_per_epoch": 1, "lr": 1e-3, "seed": 0}
METHODS = tuple(CONFIGS)


def _cli_config(cfg: dict) -> list[str]:
    return [a for k, v in cfg.items() for a in ("--config", f"{k}={v!r}" if not isinstance(v, str) else f"{k}={v}")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine OpenMP barriers
    stall them (30x slower at a load of 10 on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    synthetic.make_demo_dataset(root, categories=CATS, size=48, n_train=4, n_test_good=2, n_test_defect=1)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def trained(data, cache, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted 2-epoch run per method (shared by the tests below)."""
    outs = {}
    for method, cfg in CONFIGS.items():
        out = tmp_path_factory.mktemp(f"train-{method}")
        outs[method] = train(method, data, out, config=cfg, cache_dir=cache, progress=False, verbose=False,
                             **SCHEDULE)
    return outs


def _fixed_batch_loss(method: str, data: Path, ckpt: Path) -> tuple[float, float]:
    """The training loss of epoch 0's first batch with the initial weights and the trained ones."""
    cfg = CONFIGS[method]
    ts = load_training_set(data, CATS)
    torch.manual_seed(SCHEDULE["seed"])  # train() builds the model right after this seed
    runner = build_runner(method, CATS[0], config=cfg)
    model = runner.model
    proto = dataclasses.replace(protocol_defaults(method, model), epochs=2, batch_size=4, steps_per_epoch=1)
    enc = model.encode if method == "icas" else (lambda im: model.encode(runner._norm(im)))
    src = FeatureSource(ts, runner.size, enc, None, torch.device("cpu"))
    batch = _batch(method, make_plan(proto, ts, 0, 0)[0], src, ts, _text_prototypes(method, model, ts.categories))
    loss = _loss_fn(method, proto, 1)
    model.train()
    with torch.no_grad():
        before = float(loss(model, batch)["loss"])
        model.load_state_dict(torch.load(ckpt, weights_only=False)["model"])
        after = float(loss(model, batch)["loss"])
    return before, after


@pytest.mark.parametrize("method", METHODS)
def test_training_reduces_the_loss_and_writes_its_outputs(trained, data, method):
    out = trained[method].parent
    for name in ("checkpoint.pt", "epoch-1.pt", "epoch-2.pt", "config.json", "losses.csv", "losses.png"):
        assert (out / name).is_file(), name
    with open(out / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "loss" in rows[0] and len(rows[0]) > 3  # epoch, step, loss and its terms
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"]["batch_size"] == 4 and config["versions"]["torch"] == torch.__version__
    assert config["split"]["summary"]["brick"] == {"train_normal": 4, "test_normal": 2, "test_anomalous": 3}
    before, after = _fixed_batch_loss(method, data, trained[method])
    print(f"{method}: loss of the first batch {before:.4f} -> {after:.4f} after 2 steps")
    assert after < before, (before, after)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_loads_unchanged_in_evaluate(trained, method):
    state = torch.load(trained[method], weights_only=False)["model"]
    torch.manual_seed(123)  # another random init: every weight must come from the checkpoint
    model = build_runner(method, "brick", checkpoint=str(trained[method]), config=CONFIGS[method]).model
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("method", METHODS)
def test_resume_after_an_interruption_is_bit_identical(trained, data, cache, tmp_path, method):
    class Interrupted(Exception):
        pass

    def stop(epoch: int) -> None:
        if epoch == 1:
            raise Interrupted

    out = tmp_path / "run"
    kwargs = dict(config=CONFIGS[method], cache_dir=cache, progress=False, verbose=False, **SCHEDULE)
    with pytest.raises(Interrupted):
        train(method, data, out, on_epoch_end=stop, **kwargs)
    assert (out / "epoch-1.pt").is_file() and not (out / "epoch-2.pt").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train(method, data, out, **kwargs)
    train(method, data, out, resume=True, **kwargs)
    got = torch.load(out / "checkpoint.pt", weights_only=False)
    want = torch.load(trained[method], weights_only=False)
    assert got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    assert [r["loss"] for r in got["history"]] == [r["loss"] for r in want["history"]]


def test_two_gloo_processes_equal_one(trained, data, cache, tmp_path):
    root = Path(fastad.__file__).resolve().parent.parent
    runs = []
    for method, cfg in CONFIGS.items():
        runs.append(["train", "--method", method, "--data", str(data), "--out", str(tmp_path / method),
                     "--epochs", "2", "--batch-size", "4", "--steps-per-epoch", "1", "--lr", "1e-3",
                     "--cache-dir", str(cache), "--no-progress", *_cli_config(cfg)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "2", str(root / "tests" / "train_ddp_main.py"), json.dumps(runs)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    for method in CONFIGS:
        got = torch.load(tmp_path / method / "checkpoint.pt", weights_only=False)
        want = torch.load(trained[method], weights_only=False)
        # the same batches from the same weights: the first step's global loss is the same
        # (BatchNorm over the global batch, global loss normalisers) ...
        losses = lambda c: torch.tensor([r["loss"] for r in c["history"]])  # noqa: E731
        assert abs(losses(got)[0] - losses(want)[0]) < 1e-5, method
        torch.testing.assert_close(losses(got), losses(want), rtol=1e-3, atol=1e-4, msg=method)
        # ... so is its gradient: Adam's first moment after one step is (1 - beta1) * gradient
        got1 = torch.load(tmp_path / method / "epoch-1.pt", weights_only=False)["optimizer"]["state"]
        want1 = torch.load(trained[method].parent / "epoch-1.pt", weights_only=False)["optimizer"]["state"]
        assert got1.keys() == want1.keys()
        scale = max(float(st["exp_avg"].abs().max()) for st in want1.values())  # zero-gradient tensors: noise
        for i, st in want1.items():
            torch.testing.assert_close(got1[i]["exp_avg"], st["exp_avg"], rtol=1e-4, atol=1e-4 * scale,
                                       msg=f"{method} gradient of parameter {i}")
        # ... and the weights agree to float summation order, which Adam (first update
        # lr * sign(g)) turns into up to ~lr per step where the true gradient is 0 (a bias
        # before a softmax or a BatchNorm, which are shift-invariant): allow 2 lr per step
        steps = len(want["history"])
        for k, v in want["model"].items():
            if v.is_floating_point():
                torch.testing.assert_close(got["model"][k], v, rtol=0, atol=2 * SCHEDULE["lr"] * steps,
                                           msg=f"{method} {k}")
            else:
                assert torch.equal(got["model"][k], v), (method, k)


def test_plans_follow_the_protocols(data):
    """Who is in a batch, per protocol (pure functions of the data, the epoch and the seed)."""
    ts = load_training_set(data, CATS)
    proto = lambda name, **kw: Protocol(name, epochs=1, lr=1e-3, **kw)  # noqa: E731
    # InCTRL v1: balanced normal / anomalous, `shots` other normals of the query's category
    for items in make_plan(proto("inctrl-v1", batch_size=8, steps_per_epoch=3), ts, 0, 0):
        assert [ts.images[it.q].label for it in items] == [0] * 4 + [1] * 4
        for it in items:
            assert len(it.refs) == 2 and all(ts.images[r].label == 0 and r != it.q and
                                             ts.images[r].category == ts.images[it.q].category for r, _ in it.refs)
    # InCTRLv2: half DASL from the test split, half OASL from the train split (normal)
    plan = make_plan(proto("inctrlv2", batch_size=4), ts, 0, 0)
    assert len(plan) == len(ts.select(split="test")) // 2
    for items in plan:
        assert [it.group for it in items] == ["dasl", "dasl", "oasl", "oasl"]
        assert all(ts.images[it.q].split == ("test" if it.group == "dasl" else "train") for it in items)
    # DictAS: every image once per epoch, its dictionary built from a view of itself
    plan = make_plan(proto("dictas", batch_size=2, shots=1), ts, 1, 0)
    assert sorted(it.q for items in plan for it in items) == list(range(len(ts.images)))
    assert all(r == it.q for items in plan for it in items for r, _ in it.refs)
    # iCAS: anomaly prompting (a view >= 1 of the target itself) only for anomalous targets
    items = [it for items in make_plan(proto("icas", batch_size=2), ts, 0, 0) for it in items]
    assert {it.prompt for it in items} == {"anomaly", "normal"}
    for it in items:
        (r, v), = it.refs
        if it.prompt == "anomaly":
            assert r == it.q and v >= 1 and ts.images[it.q].label == 1
        else:
            assert ts.images[r].split == "train" and ts.images[r].category == ts.images[it.q].category
    assert make_plan(proto("icas", batch_size=2), ts, 3, 0)[0][0].q == make_plan(proto("icas", batch_size=2), ts, 3,
                                                                                 0)[0][0].q


def test_inctrl_v1_trains_and_evaluates(data, cache, tmp_path, capsys):
    cfg = ["--config", "preset=v1", *_cli_config(TINY_CLIP)]
    rc = cli.main(["train", "--method", "inctrlv2", "--data", str(data), "--out", str(tmp_path / "v1"), "--epochs",
                   "1", "--batch-size", "4", "--steps-per-epoch", "2", "--cache-dir", str(cache), "--no-progress", *cfg])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "| epoch | loss | image | image_residual | seconds |" in out.out and "inctrl-v1" in out.out
    config = json.loads((tmp_path / "v1" / "config.json").read_text())
    assert config["protocol"]["name"] == "inctrl-v1" and config["model_config"]["version"] == "v1"
    rc = cli.main(["evaluate", "--method", "inctrlv2", "--data", str(data), "--category", "grass", "--shots", "2",
                   "--checkpoint", str(tmp_path / "v1" / "checkpoint.pt"), "--out", str(tmp_path / "ev"),
                   "--no-overlays", "--no-progress", *cfg])
    assert rc == 0, capsys.readouterr().err


def test_bad_data_is_named(data, tmp_path, capsys):
    def run(*args: str) -> tuple[int, str]:
        rc = cli.main(["train", "--no-progress", "--out", str(tmp_path / "o"), *args])
        return rc, capsys.readouterr().err

    rc, err = run("--method", "dictas", "--data", str(tmp_path / "missing"))
    assert rc == 2 and f"dataset folder {tmp_path / 'missing'} does not exist" in err
    (tmp_path / "empty").mkdir()
    rc, err = run("--method", "dictas", "--data", str(tmp_path / "empty"))
    assert rc == 2 and "holds no category" in err and str(tmp_path / "empty") in err
    rc, err = run("--method", "icas", "--data", str(data), "--categories", "brick,cable")
    assert rc == 2 and "'cable'" in err and str(data) in err
    broken = tmp_path / "broken"
    synthetic.make_demo_dataset(broken, categories=("brick",), size=16, n_train=2, n_test_good=1, n_test_defect=1)
    mask = broken / "brick" / "ground_truth" / "hole" / "000_mask.png"
    mask.unlink()
    rc, err = run("--method", "icas", "--data", str(broken))
    assert rc == 2 and str(mask) in err
    synthetic.make_demo_dataset(broken, categories=("brick",), size=16, n_train=2, n_test_good=1, n_test_defect=1)
    bad = broken / "brick" / "train" / "good" / "001.png"
    bad.write_bytes(b"not a png")
    rc, err = run("--method", "inctrlv2", "--data", str(broken))
    assert rc == 2 and f"cannot read image {bad}" in err
    rc, err = run("--method", "inctrlv2", "--data", str(data), "--resume")
    assert rc == 2 and "nothing to resume" in err


def test_training_improves_the_image_auroc_on_a_held_out_category(tmp_path):
    """DictAS's generators trained on brick + grass, evaluated 2-shot on gravel (never seen),
    against the same run's initial weights (tiny random CLIP: 0.44 -> 0.89 when written)."""
    root = tmp_path / "demo"
    synthetic.make_demo_dataset(root, categories=("brick", "grass", "gravel"), size=48, n_train=6, n_test_good=6,
                                n_test_defect=3)
    ckpt = train("dictas", root, tmp_path / "out", categories=["brick", "grass"], config=TINY_CLIP,
                 cache_dir=tmp_path / "cache", progress=False, verbose=False, epochs=2, batch_size=8,
                 steps_per_epoch=5, lr=1e-3)
    auroc = {}
    for name, checkpoint in (("untrained", None), ("trained", str(ckpt))):
        torch.manual_seed(0)  # the untrained generators are the trained run's initial weights
        runner = build_runner("dictas", "gravel", checkpoint=checkpoint, config=TINY_CLIP)
        auroc[name] = evaluate(runner, root, "gravel", shots=2, progress=False).metrics["image_auroc"]
    print(f"gravel image AUROC, untrained {auroc['untrained']:.3f} -> trained {auroc['trained']:.3f}")
    assert auroc["trained"] > auroc["untrained"] + 0.15, auroc


def test_the_models_take_cached_features_and_split_dasl_from_oasl():
    """The additive model hooks training uses: iCAS's loss on encoder outputs equals its loss
    on the images; InCTRLv2's OASL images must be normal."""
    from fastad.models import ICAS, InCTRLv2

    torch.manual_seed(0)
    icas = ICAS(**TINY_ICAS).train()
    g = torch.Generator().manual_seed(1)
    images, refs = torch.rand(2, 3, 70, 70, generator=g), torch.rand(2, 3, 70, 70, generator=g)
    masks = (torch.rand(2, 1, 70, 70, generator=g) > 0.8).float()
    direct = icas.loss(images, masks, refs, masks)
    cached = icas.loss(icas.encode(images), masks, icas.encode(refs), masks, encoded=True)
    assert torch.equal(direct["loss"], cached["loss"])
    model = InCTRLv2("v2", **TINY_CLIP)
    feats = model.encode(torch.rand(2, 3, 64, 64, generator=g))
    ref_feats = model.encode(torch.rand(4, 3, 64, 64, generator=g))
    text = torch.nn.functional.normalize(torch.randn(2, 48, generator=g), dim=-1)
    with pytest.raises(ValueError, match="OASL images"):
        model.compute_losses(feats, ref_feats, torch.tensor([0, 1]), torch.zeros(2, 64, 64), text_features=text,
                             oasl=torch.tensor([False, True]))
    out = model.compute_losses(feats, ref_feats, torch.tensor([1, 0]), torch.zeros(2, 64, 64), text_features=text,
                               oasl=torch.tensor([False, True]))
    assert set(out) == {"loss", "dasl", "image", "oasl"} and torch.isfinite(out["loss"])
