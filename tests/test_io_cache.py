"""fastad._io (atomic files and folders) and fastad.feature_cache."""
from __future__ import annotations

import os

import pytest
import torch

from fastad._io import atomic_dir, atomic_save, atomic_write
from fastad.feature_cache import FeatureCache, weights_digest
from fastad.models.clip_backbone import ImageFeatures


def test_atomic_write_replaces_only_on_success(tmp_path):
    f = tmp_path / "a.txt"
    with atomic_write(f, "w") as fh:
        fh.write("old")
    with pytest.raises(RuntimeError):
        with atomic_write(f, "w") as fh:
            fh.write("half")
            raise RuntimeError("crash")
    assert f.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]  # no temporary left behind
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(f, "r"):
            pass


def test_atomic_save_and_dir(tmp_path):
    atomic_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt")["w"], torch.arange(3))
    with atomic_dir(tmp_path / "job") as d:
        (d / "metrics.json").write_text("{}")
    assert (tmp_path / "job" / "metrics.json").is_file()
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "job"):
            pass
    with pytest.raises(KeyError):
        with atomic_dir(tmp_path / "job2") as d:
            (d / "x").write_text("1")
            raise KeyError("crash")
    assert not (tmp_path / "job2").exists()
    with atomic_dir(tmp_path / "job", replace=True) as d:
        (d / "new").write_text("1")
    assert sorted(os.listdir(tmp_path / "job")) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "job"]


def test_feature_cache_tensor_outputs(tmp_path):
    calls = []

    def encoder(x):
        calls.append(x.shape[0])
        return x.flatten(1) * 2

    cache = FeatureCache(tmp_path, {"backbone": "toy", "size": 4})
    images = torch.randn(3, 2, 2)
    first = cache.encode(encoder, images)
    again = cache.encode(encoder, torch.cat([images[1:], torch.randn(1, 2, 2)]))
    assert calls == [3, 1]
    assert torch.equal(first, encoder(images))
    assert torch.equal(again[:2], first[1:])
    assert (cache.hits, cache.misses) == (2, 4)
    other = FeatureCache(tmp_path, {"backbone": "toy", "size": 8})  # another key never hits
    other.encode(encoder, images)
    assert calls[-1] == 3
    with pytest.raises(ValueError, match="ids"):
        cache.encode(encoder, images, ids=["a"])


def test_feature_cache_image_features_and_corrupt_entry(tmp_path):
    def encoder(x):
        b = x.shape[0]
        return ImageFeatures(x.sum((1, 2))[:, None].repeat(1, 3), [x.reshape(b, 4, 1), x.reshape(b, 4, 1) + 1], (2, 2))

    cache = FeatureCache(tmp_path, {"k": 1})
    images = torch.randn(2, 2, 2)
    ref = encoder(images)
    cache.encode(encoder, images, ids=["a", "b"])
    entry = next(p for p in cache.dir.rglob("*.pt"))
    entry.write_bytes(b"garbage")  # a damaged entry is recomputed, never returned
    out = cache.encode(encoder, images, ids=["a", "b"])
    assert out.grid == (2, 2) and torch.equal(out.embeds, ref.embeds)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, ref.tokens))
    assert cache.misses == 3
    with pytest.raises(TypeError, match="ImageFeatures"):
        FeatureCache(tmp_path, {"k": 2}).encode(lambda x: [x], images)


def test_weights_digest_tells_weights_apart():
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    b = torch.nn.Linear(3, 2)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.bias[1] += 1e-6
    assert weights_digest(a) != weights_digest(b)
    c = torch.nn.BatchNorm1d(2)  # 0-dim buffer (num_batches_tracked)
    assert weights_digest(c) != weights_digest(torch.nn.BatchNorm1d(3))
