"""``fastad train``: seconds per training epoch with the frozen-feature cache (each image
encoded once, later epochs read memory-mapped tokens) and without it (every step reads and
re-encodes its images), side by side, per method.

quick: tiny random backbones (the tests' configs) on 48 px demo images, 4 steps x batch 8;
full: open_clip ViT-B-16 at 224 (InCTRLv2, DictAS) and DINOv2 ViT-S/14 at 224 (iCAS), random
weights, same schedule. The cached run's warm-up call encodes every image once (the first
epoch of a real run); the timed rounds are the epochs after it. The "no cache" peer is the
same loop with ``use_cache=False``.

FASTAD_BENCH_THREADS=n sets torch's intra-op threads (one thread avoids OpenMP barrier
stalls on a loaded machine); default: torch's choice.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from bench_models_clip import intra_op_threads  # noqa: F401  (autouse: FASTAD_BENCH_THREADS)

from fastad.data import synthetic
from fastad.data.training import load_training_set
from fastad.evaluate import build_runner
from fastad.feature_cache import FeatureCache
from fastad.train import FeatureSource, _batch, _loss_fn, _optimizer, _text_prototypes, make_plan, protocol_defaults

CATS = ("brick", "grass")
SIZES = {
    "quick": {"inctrlv2": {"backbone": "fastad-tiny", "image_size": 64, "layers": (1, 2, 3, 4)},
              "dictas": {"backbone": "fastad-tiny", "image_size": 64, "layers": (1, 2, 3, 4)},
              "icas": {"encoder": "vit_small_patch14_dinov2",
                       "encoder_kwargs": {"depth": 2, "num_heads": 2, "embed_dim": 32}, "image_size": 70, "dim": 32,
                       "num_queries": 12, "num_layers": 2, "num_heads": 4, "ffn_dim": 48}},
    "full": {"inctrlv2": {"backbone": "ViT-B-16", "image_size": 224, "layers": (3, 6, 9, 12), "quick_gelu": False},
             "dictas": {"backbone": "ViT-B-16", "image_size": 224, "layers": (3, 6, 9, 12)},
             "icas": {"encoder": "vit_small_patch14_dinov2", "image_size": 224, "num_queries": 100}},
}
STEPS, BATCH = 4, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    synthetic.make_demo_dataset(root, categories=CATS, size=48, n_train=6, n_test_good=3, n_test_defect=2)
    return load_training_set(root)


def _epoch(method: str, cfg: dict, ts, cache_root, device: torch.device):
    """One epoch of ``fastad.train``'s step (features, loss, backward, optimiser step) as a callable."""
    torch.manual_seed(0)
    runner = build_runner(method, CATS[0], config=cfg, device=str(device))
    model = runner.model
    proto = dataclasses.replace(protocol_defaults(method, model), batch_size=BATCH, steps_per_epoch=STEPS)
    enc = model.encode if method == "icas" else (lambda im: model.encode(runner._norm(im)))
    cache = FeatureCache(cache_root, {"bench": method, "cfg": repr(cfg)}) if cache_root is not None else None
    src = FeatureSource(ts, runner.size, enc, cache, device)
    text = _text_prototypes(method, model, ts.categories)
    loss_fn = _loss_fn(method, proto, 1)
    opt = _optimizer(method, model, proto)
    plan = make_plan(proto, ts, 0, 0)

    def run() -> None:
        model.train()
        for items in plan:
            batch = _batch(method, items, src, ts, text)
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch)["loss"].backward()
            opt.step()

    return run


@pytest.mark.parametrize("method", ("inctrlv2", "dictas", "icas"))
def test_epoch_with_and_without_feature_cache(bench, bench_size, bench_device, data, tmp_path, method):
    cfg = SIZES[bench_size][method]
    group = f"train epoch {method} ({STEPS} steps x batch {BATCH}, {bench_size})"
    bench(_epoch(method, cfg, data, tmp_path / "cache", bench_device), group=group,
          impl="fastad train, feature cache", role="fastad", rounds=3)


@pytest.mark.parametrize("method", ("inctrlv2", "dictas", "icas"))
def test_epoch_reencoding_every_step(bench, bench_size, bench_device, data, method):
    cfg = SIZES[bench_size][method]
    group = f"train epoch {method} ({STEPS} steps x batch {BATCH}, {bench_size})"
    bench(_epoch(method, cfg, data, None, bench_device), group=group, impl="no cache (re-encode every step)",
          role="peer", rounds=3)
