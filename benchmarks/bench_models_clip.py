"""InCTRLv2 and DictAS on the real architecture (open_clip ViT-L-14-336, random
weights, fp32), 4-shot: backbone time, AD-head time per backend, the head's parts
(residual / lookup / upsampling + smoothing) and, in --bench-size full, end-to-end.

The backbone is the same for both backends (the fastad backend changes only the
head), so the end-to-end time per image is backbone + head; the "end-to-end"
groups (full size only) measure it directly.

quick: 1 query image; the 4 reference shots are the query's features shifted on
the patch grid (the head's cost does not depend on the pixels). full: 4 encoded
reference images, end-to-end on 1 image and the head on a batch of 8.
Peers: the "reference" backend (the authors' computation, references cached) and,
for the smoothing, scipy.ndimage.gaussian_filter on the CPU as the authors run it.
--bench-device cuda runs the models on the GPU (DictAS publishes 73.5 ms / image,
4-shot, RTX 3090).

FASTAD_BENCH_THREADS=n sets torch's intra-op threads for this module (on a shared,
loaded machine one thread avoids OpenMP barrier stalls); default: torch's choice.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.nn.functional as F

from fastad.models import DictAS, ImageFeatures, InCTRLv2
from fastad.models import dictas as dictas_mod
from fastad.models import inctrlv2 as inctrl_mod

SHOTS = 4


@pytest.fixture(autouse=True, scope="module")
def intra_op_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FASTAD_BENCH_THREADS", before)))
    yield
    torch.set_num_threads(before)


class State:
    """Lazily built model, query features and references, shared by one class's benchmarks."""

    def __init__(self, make, size: str, device: torch.device) -> None:
        self.make, self.size, self.device = make, size, device
        self.model = None
        self.feats: ImageFeatures | None = None
        self.images: torch.Tensor | None = None
        self._g = torch.Generator().manual_seed(0)

    def build(self):
        if self.model is None:
            torch.manual_seed(0)
            self.model = self.make().eval().to(self.device)
            s = self.model.backbone.image_size
            self.images = torch.randn(1, 3, s, s, generator=self._g).to(self.device)
        return self.model

    def encode(self) -> ImageFeatures:
        with torch.no_grad():
            self.feats = self.build().encode(self.images)
        return self.feats

    def ready(self) -> tuple:
        """Model with references set, and the query features."""
        model = self.build()
        if self.feats is None:
            self.encode()
        if not model.references:
            text = F.normalize(torch.randn(2, model.backbone.embed_dim, generator=self._g), dim=-1)
            if self.size == "full":
                s = model.backbone.image_size
                refs = torch.randn(SHOTS, 3, s, s, generator=self._g).to(self.device)
            else:
                gh, gw = self.feats.grid
                shift = lambda t, k: t.reshape(1, gh, gw, -1).roll((k, 2 * k), (1, 2)).reshape(1, gh * gw, -1)  # noqa: E731
                noise = 0.01 * torch.randn(SHOTS, 1, generator=self._g).to(self.device)
                refs = ImageFeatures(self.feats.embeds.repeat(SHOTS, 1) + noise,
                                     [torch.cat([shift(t, k + 1) for k in range(SHOTS)]) for t in self.feats.tokens],
                                     self.feats.grid)
            with torch.no_grad():
                model.set_references(refs, category="bench", text_features=text)
        return model, self.feats

    def close(self) -> None:
        self.model = self.feats = None
        gc.collect()


def _head(model, feats, backend):
    model.backend = backend

    def run():
        with torch.no_grad():
            return model.head(feats)

    return run


def _forward(model, images, backend):
    model.backend = backend

    def run():
        with torch.no_grad():
            return model(images)

    return run


def _rounds(bench_size: str) -> int:
    return 3 if bench_size == "quick" else 5


# --------------------------------------------------------------------------- DictAS


@pytest.fixture(scope="class")
def dictas_state(bench_size, bench_device):
    st = State(lambda: DictAS(), bench_size, bench_device)
    yield st
    st.close()


class TestDictAS:
    NAME = "DictAS ViT-L-14-336@336 4-shot"

    def test_backbone(self, bench, dictas_state):
        dictas_state.build()
        bench(dictas_state.encode, group=f"{self.NAME}: backbone, 1 image",
              impl="open_clip fp32 (same for both backends)", role="peer", rounds=1)

    @pytest.mark.parametrize("backend", ["reference", "fastad"])
    def test_head(self, bench, bench_size, dictas_state, backend):
        model, feats = dictas_state.ready()
        bench(_head(model, feats, backend), group=f"{self.NAME}: AD head (8 lookups + maps), 1 image",
              impl=f"DictAS backend={backend}", role="peer" if backend == "reference" else "fastad",
              rounds=_rounds(bench_size))

    @pytest.mark.parametrize("backend", ["reference", "fastad"])
    def test_lookup(self, bench, dictas_state, backend):
        model, feats = dictas_state.ready()
        refs = model.references["bench"]
        with torch.no_grad():
            q = model.query_generator(model.value_generator(feats.tokens[0]))
        keys, values = refs.keys[0, 1], refs.values[0, 1]
        scale = model.lookup_scale

        def run():
            with torch.no_grad():
                return dictas_mod.dictionary_lookup(q, keys, values, scale, "sparsemax", backend)

        n, m, c = q.shape[1], keys.shape[0], keys.shape[1]
        bench(run, group=f"{self.NAME}: lookup {n}x{m}x{c} sparsemax (1 of 8 per image)",
              impl=("dense logits + sort sparsemax (authors)" if backend == "reference"
                    else "fastad.ops.dict_lookup"), role="peer" if backend == "reference" else "fastad", rounds=3)

    @pytest.mark.parametrize("impl", ["scipy", "reference", "fastad"])
    def test_maps(self, bench, dictas_state, impl):
        model = dictas_state.build()
        cfg = model.config
        maps = torch.rand(1, 8, 24, 24, generator=torch.Generator().manual_seed(1)).to(dictas_state.device)
        size = (cfg.image_size, cfg.image_size)
        if impl == "scipy":
            from scipy.ndimage import gaussian_filter

            def run():
                ups = [F.interpolate(maps[:, i:i + 1], size=size, mode="bilinear", align_corners=True)[:, 0]
                       for i in range(8)]
                return gaussian_filter(torch.stack(ups).mean(0).cpu().numpy(), sigma=cfg.sigma, axes=(1, 2))
            label = "8 x interpolate + scipy gaussian_filter (authors)"
        else:
            def run():
                return dictas_mod.pixel_map(cfg, impl, maps, size)
            label = f"pixel_map backend={impl}"
        bench(run, group=f"{self.NAME}: 8 maps 24x24 -> 336x336 + blur sigma 6",
              impl=label, role="fastad" if impl == "fastad" else "peer", rounds=5)

    @pytest.mark.parametrize("backend", ["reference", "fastad"])
    def test_end_to_end(self, bench, bench_size, dictas_state, backend):
        if bench_size != "full":
            pytest.skip("end-to-end runs with --bench-size full (quick: backbone + head)")
        model, _ = dictas_state.ready()
        bench(_forward(model, dictas_state.images, backend), group=f"{self.NAME}: end-to-end, 1 image",
              impl=f"DictAS backend={backend}", role="peer" if backend == "reference" else "fastad", rounds=2)

    @pytest.mark.parametrize("backend", ["reference", "fastad"])
    def test_head_batch(self, bench, bench_size, dictas_state, backend):
        if bench_size != "full":
            pytest.skip("batched head runs with --bench-size full")
        model, feats = dictas_state.ready()
        batch = ImageFeatures(feats.embeds.repeat(8, 1), [t.repeat(8, 1, 1) for t in feats.tokens], feats.grid)
        bench(_head(model, batch, backend), group=f"{self.NAME}: AD head, batch of 8 images",
              impl=f"DictAS backend={backend}", role="peer" if backend == "reference" else "fastad", rounds=2)


# --------------------------------------------------------------------------- InCTRLv2


@pytest.fixture(scope="class")
def inctrl_state(bench_size, bench_device):
    st = State(lambda: InCTRLv2("v2"), bench_size, bench_device)
    yield st
    st.close()


class TestInCTRLv2:
    NAME = "InCTRLv2 ViT-L-14-336@518 4-shot"

    def test_backbone(self, bench, inctrl_state):
        inctrl_state.build()
        bench(inctrl_state.encode, group=f"{self.NAME}: backbone, 1 image",
              impl="open_clip fp32 (same for both backends)", role="peer", rounds=1)

    @pytest.mark.parametrize("backend", ["reference", "fastad"])
    def test_head(self, bench, bench_size, inctrl_state, backend):
        model, feats = inctrl_state.ready()
        bench(_head(model, feats, backend), group=f"{self.NAME}: AD head (residual + DASL/OASL + maps), 1 image",
              impl=f"InCTRLv2 backend={backend}", role="peer" if backend == "reference" else "fastad",
              rounds=_rounds(bench_size))

    @pytest.mark.parametrize("backend", ["reference", "fastad"])
    def test_residual(self, bench, inctrl_state, backend):
        model, feats = inctrl_state.ready()
        banks = model.references["bench"].banks

        def run():
            with torch.no_grad():
                return inctrl_mod.patch_residual(feats.tokens, banks, 0.5, backend)

        n, (m, c) = feats.tokens[0].shape[1], banks[0].shape
        bench(run, group=f"{self.NAME}: patch residual {n}x{m}x{c} x {len(banks)} layers",
              impl=("normalise + GEMM + row-min per image (authors)" if backend == "reference"
                    else "fastad.ops.nn_distance"), role="peer" if backend == "reference" else "fastad", rounds=2)

    @pytest.mark.parametrize("impl", ["scipy", "reference", "fastad"])
    def test_maps(self, bench, inctrl_state, impl):
        model = inctrl_state.build()
        cfg = model.config
        g = torch.Generator().manual_seed(2)
        Mx, Sa, Sh = (torch.rand(1, 37, 37, generator=g).to(inctrl_state.device) for _ in range(3))
        size = (cfg.image_size, cfg.image_size)
        if impl == "scipy":
            from scipy.ndimage import gaussian_filter

            def run():
                up = lambda m: F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]  # noqa: E731
                fused = (1 - cfg.beta) * up(0.5 * (Mx + Sa)) + cfg.beta * up(0.5 * (Mx + Sh))
                return gaussian_filter(fused.cpu().numpy(), sigma=cfg.sigma, axes=(1, 2))
            label = "2 x interpolate + scipy gaussian_filter (sibling code)"
        else:
            def run():
                return inctrl_mod.pixel_map(cfg, impl, Mx, Sa, Sh, size)
            label = f"pixel_map backend={impl}"
        bench(run, group=f"{self.NAME}: maps 37x37 -> 518x518 + blur sigma 4",
              impl=label, role="fastad" if impl == "fastad" else "peer", rounds=5)

    @pytest.mark.parametrize("backend", ["reference", "fastad"])
    def test_end_to_end(self, bench, bench_size, inctrl_state, backend):
        if bench_size != "full":
            pytest.skip("end-to-end runs with --bench-size full (quick: backbone + head)")
        model, _ = inctrl_state.ready()
        bench(_forward(model, inctrl_state.images, backend), group=f"{self.NAME}: end-to-end, 1 image",
              impl=f"InCTRLv2 backend={backend}", role="peer" if backend == "reference" else "fastad", rounds=2)

    @pytest.mark.parametrize("backend", ["reference", "fastad"])
    def test_head_batch(self, bench, bench_size, inctrl_state, backend):
        if bench_size != "full":
            pytest.skip("batched head runs with --bench-size full")
        model, feats = inctrl_state.ready()
        batch = ImageFeatures(feats.embeds.repeat(8, 1), [t.repeat(8, 1, 1) for t in feats.tokens], feats.grid)
        bench(_head(model, batch, backend), group=f"{self.NAME}: AD head, batch of 8 images",
              impl=f"InCTRLv2 backend={backend}", role="peer" if backend == "reference" else "fastad", rounds=2)

