"""``fastad score`` (Ray Data over an actor pool) == an in-process loop, and the Ray-sharded
reference bank == one ReferenceBank over the same rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from fastad import ReferenceBank, cli  # noqa: E402
from fastad.data import synthetic  # noqa: E402
from fastad.data.mvtec import read_image  # noqa: E402
from fastad.distributed.bank import ShardedBank  # noqa: E402
from fastad.evaluate import StageMeter, build_runner  # noqa: E402

TINY = dict(backbone="fastad-tiny", image_size=32, layers=(1, 2, 3, 4))


def test_score_equals_an_in_process_loop(ray_local, tmp_path, capsys):
    root = tmp_path / "demo"
    synthetic.make_demo_dataset(root, categories=("brick",), size=32, n_train=2, n_test_good=2, n_test_defect=1)
    out = tmp_path / "out"
    rc = cli.main(["score", "--method", "dictas", "--references", str(root / "brick/train/good"),
                   "--images", str(root / "brick/test/*/*.png"), "--out", str(out), "--category", "brick",
                   "--batch-size", "2", "--threshold", "0.3", "--no-progress", "--config", "backbone=fastad-tiny",
                   "--config", "image_size=32", "--config", "layers=(1, 2, 3, 4)"])
    assert rc == 0, capsys.readouterr().err
    table = pq.read_table(out / "scores.parquet").to_pydict()
    images = sorted(str(p.resolve()) for p in root.glob("brick/test/*/*.png"))
    assert table["path"] == images and len(images) == 2 + len(synthetic.DEFECTS)

    torch.manual_seed(0)  # the same model, scored image by image in this process
    runner = build_runner("dictas", "brick", config=TINY)
    refs = sorted((root / "brick/train/good").glob("*.png"))
    runner.set_references(torch.stack([read_image(p, runner.size) for p in refs]), StageMeter())
    for i, path in enumerate(images):
        score, amap = runner.predict(read_image(path, runner.size)[None], StageMeter())
        # Ray Data batches the images differently: equal up to the backbone's batch-size rounding
        assert table["score"][i] == pytest.approx(float(score[0]), rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(np.load(table["map"][i]), amap[0].numpy(), rtol=1e-5, atol=1e-6)
        assert table["anomalous"][i] == (table["score"][i] >= 0.3)
        assert Path(table["overlay"][i]).stat().st_size > 0
    assert not list(out.rglob(".*tmp*"))

    rc = cli.main(["score", "--method", "dictas", "--references", str(tmp_path / "none"), "--images", "x",
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.splitlines()[-1].startswith("fastad score: error: --images: x does not exist")


@pytest.mark.parametrize("index,metric,params", [("exact", "cosine", {}), ("ivf", "l2", {"nlist": 4, "nprobe": 4})])
def test_sharded_bank_equals_one_bank(ray_local, tmp_path, index, metric, params):
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(5, 24, 8, generator=g), torch.randn(30, 8, generator=g)
    query = torch.randn(2, 9, 8, generator=g)
    if index == "exact":  # equal rows: ties go to the lowest row, as in one bank
        first[3, 5] = first[0, 2]
        query[0, 0] = first[0, 2]
    single = ReferenceBank(8, metric=metric, index=index, **params)
    sharded = ShardedBank(8, metric=metric, index=index, shards=3 if index == "exact" else 2, **params)
    for bank in (single, sharded):
        bank.add(first, category="a", image_ids=[f"img{i}" for i in range(5)])
        bank.add(second, category="a", image_ids="one-more")
        bank.add(first[:2], category="b")
        bank.build(progress=False)
    assert len(sharded) == len(single) == 5 * 24 + 30 + 2 * 24
    want = single.search(query, k=4, category="a")
    got = sharded.search(query, k=4, category="a")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    if index == "exact":
        assert got.indices[0, 0, 0] == 2 and got.indices[0, 0, 1] == 3 * 24 + 5
    assert sharded.locate(got.indices, "a")[0] == single.locate(want.indices, "a")[0]
    assert torch.equal(sharded.locate(got.indices, "a")[1], single.locate(want.indices, "a")[1])
    assert torch.equal(sharded.search(query[0], k=2, category="b").indices, single.search(query[0], k=2,
                                                                                          category="b").indices)

    if index != "exact":
        return
    sharded.save(tmp_path / "bank")
    loaded = ShardedBank.load(tmp_path / "bank")
    again = loaded.search(query, k=4, category="a")
    assert torch.equal(again.indices, want.indices) and torch.equal(again.values, want.values)
    assert loaded.locate(again.indices, "a")[0] == single.locate(want.indices, "a")[0]
    with pytest.raises(ValueError, match="`k` must be in"):
        loaded.search(query, k=1000, category="a")
    with pytest.raises(ValueError, match="shards"):
        ShardedBank(8, shards=0)


def test_sharded_bank_load_names_a_bad_meta_file(tmp_path):
    from fastad.bank import BankFormatError

    (tmp_path / "sharded.json").write_text("[1, 2]")
    with pytest.raises(BankFormatError, match=r"ShardedBank.load: .*sharded.json must hold a JSON object, got a list"):
        ShardedBank.load(tmp_path)
    (tmp_path / "sharded.json").write_text("{oops")
    with pytest.raises(BankFormatError, match=r"ShardedBank.load: .*sharded.json is corrupt"):
        ShardedBank.load(tmp_path)
