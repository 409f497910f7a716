"""DictAS reference model on a tiny random open_clip config: the reference backend
against a transcription of the authors' test code, the fastad backend (dict_lookup)
against the reference, the Gaussian blur against scipy, checkpoints, training."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastad.models import CheckpointKeyError, DictAS, DictASConfig, gaussian_blur, upsample_blur, upsample_maps  # noqa: E402
from fastad.models.dictas import _pool, category_scores, dictas_prompts, dictionary_lookup, sparsemax_sort  # noqa: E402

TINY = dict(backbone="fastad-tiny", image_size=64, layers=(1, 2, 3, 4))
D = 48  # tiny embedding width


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads; on a loaded machine they only add waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(seed: int = 0, **overrides) -> DictAS:
    torch.manual_seed(seed)
    return DictAS(**{**TINY, **overrides}).eval()


def text_protos(seed: int = 1) -> torch.Tensor:
    t = torch.randn(2, D, generator=torch.Generator().manual_seed(seed))
    return t / t.norm(dim=-1, keepdim=True)


def images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the authors' code, transcribed


def authors_spm(inp: torch.Tensor, adim: int) -> torch.Tensor:
    """xiaozhen228/DictAS models/SPM.py Sparse_Lookup.forward."""
    inp = inp.transpose(0, adim)
    original_size = inp.size()
    inp = inp.reshape(inp.size(0), -1).transpose(0, 1)
    n = inp.size(1)
    inp = inp - torch.max(inp, dim=1, keepdim=True)[0].expand_as(inp)
    zs = torch.sort(input=inp, dim=1, descending=True)[0]
    rng = torch.arange(start=1, end=n + 1, step=1, device=inp.device, dtype=inp.dtype).view(1, -1).expand_as(zs)
    bound = 1 + rng * zs
    is_gt = torch.gt(bound, torch.cumsum(zs, 1)).type(inp.type())
    k = torch.max(is_gt * rng, 1, keepdim=True)[0]
    taus = ((torch.sum(is_gt * zs, 1, keepdim=True) - 1) / k).expand_as(inp)
    out = torch.max(torch.zeros_like(inp), inp - taus)
    return out.transpose(0, 1).reshape(original_size).transpose(0, adim)


def authors_test_forward(model: DictAS, q_img: torch.Tensor, ref_imgs: torch.Tensor, text: torch.Tensor):
    """test.py + MyDictionary.forward(mode="test") + Lookup at batch size 1: returns the
    smoothed map (scipy, as calcuate_metric_pixel) and the text probability."""
    from scipy.ndimage import gaussian_filter

    cfg = model.config
    qf, rf = model.encode(q_img), model.encode(ref_imgs)
    ano_tokens = [model.value_generator(t) for t in qf.tokens]
    B, L, C = ano_tokens[0].shape
    B1 = rf.tokens[0].shape[0]
    H = int(np.sqrt(L))

    def padding_same(x, k):
        x = F.pad(x, pad=((k - 1) // 2, k // 2, (k - 1) // 2, k // 2), mode="constant")
        return F.avg_pool2d(x, kernel_size=k, stride=1, padding=0)

    def lookup(query, support):
        b, n, c = query.shape
        b, m, c = support.shape
        f_q = model.query_generator(query).reshape(b, n, 1, c)
        f_k = model.key_generator(support).reshape(b, m, 1, c)
        f_v = model.value_generator(support).reshape(b, m, 1, c)
        attn = torch.einsum("bnkc,bmkc->bknm", f_q, f_k) * (c ** -0.5)
        attn = authors_spm(attn, adim=-1)
        return torch.einsum("bknm,bmkc->bnkc", attn, f_v).reshape(b, n, c)

    maps = []
    for i in range(len(ano_tokens)):
        ano = ano_tokens[i].permute(0, 2, 1).reshape(B, -1, H, H)
        good = rf.tokens[i].permute(0, 2, 1).reshape(B1, -1, H, H)
        for k in cfg.scales:
            ano_p = padding_same(ano, k) if k != 1 else ano.clone()
            good_p = padding_same(good, k) if k != 1 else good.clone()
            good_p = good_p.reshape(B1, -1, L).permute(0, 2, 1).reshape(-1, C).unsqueeze(0)
            got = lookup(ano_p.reshape(B, -1, L).permute(0, 2, 1), good_p)
            got = got.permute(0, 2, 1).reshape(B, -1, H, H)
            maps.append(1 - (F.cosine_similarity(ano_p, got, dim=1) + 1) * 0.5)
    size = cfg.image_size
    ups = [F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=True).squeeze() for m in maps]
    amap = torch.mean(torch.stack(ups, dim=0), dim=0).numpy()
    smoothed = gaussian_filter(amap, sigma=cfg.sigma)
    feat = qf.embeds / qf.embeds.norm(dim=-1, keepdim=True)
    p_text = (100.0 * feat.unsqueeze(1) @ text.T[None]).softmax(dim=-1).squeeze()[1]
    return torch.from_numpy(smoothed), p_text


# ------------------------------------------------------------------ Gaussian blur = scipy


@pytest.mark.parametrize("shape,sigma", [((336, 336), 6.0), ((3, 24, 24), 6.0), ((2, 5, 7), 4.0),
                                         ((37, 41), 1.3), ((1, 1), 2.0), ((2, 1, 9, 9), 0.7), ((1030, 3), 2.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_blur_matches_scipy(shape, sigma, dtype):
    from scipy.ndimage import gaussian_filter

    x = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape) * 7 + int(sigma)), dtype=dtype)
    axes = tuple(range(len(shape) - 2, len(shape)))
    want = torch.from_numpy(gaussian_filter(x.numpy(), sigma=sigma, mode="reflect", truncate=4.0, axes=axes))
    exact = gaussian_blur(x, sigma)
    fast = gaussian_blur(x, sigma, precision="float32")
    assert exact.dtype == dtype and fast.dtype == dtype
    torch.testing.assert_close(exact, want, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-7)
    torch.testing.assert_close(fast, want, rtol=0, atol=1e-5)


def test_gaussian_blur_reflects_half_sample_symmetric():
    x = torch.zeros(1, 9)
    x[0, 0] = 1.0
    y = gaussian_blur(x, 1.0)
    # mass that leaves on the left comes back mirrored (d c b a | a b c d): the total is kept
    torch.testing.assert_close(y.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        gaussian_blur(x, 0.0)
    with pytest.raises(ValueError, match="precision"):
        gaussian_blur(x, 1.0, precision="float16")


@pytest.mark.parametrize("mode,align_corners", [("bilinear", True), ("bilinear", False), ("bicubic", False),
                                                ("nearest", None)])
@pytest.mark.parametrize("h,w,size,sigma", [(24, 24, (336, 336), 6.0), (37, 29, (518, 400), 4.0),
                                            (5, 3, (64, 16), 6.0), (7, 7, (56, 56), None), (1, 4, (8, 32), 1.0)])
def test_upsample_blur_is_upsampling_then_blur(mode, align_corners, h, w, size, sigma):
    maps = torch.rand(2, h, w, generator=torch.Generator().manual_seed(h * w))
    want = upsample_maps(maps.double(), size, mode, align_corners)
    if sigma is not None:
        want = gaussian_blur(want, sigma)
    got = upsample_blur(maps, size, mode, align_corners, sigma)
    assert got.shape == (2, *size) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ lookup pieces


def test_sparsemax_sort_matches_entmax_and_the_authors_module():
    entmax = pytest.importorskip("entmax")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 37, generator=g, dtype=torch.float64) * 3
    z[0, 0, :5] = 2.0  # ties
    got = sparsemax_sort(z)
    torch.testing.assert_close(got, entmax.sparsemax(z, dim=-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, authors_spm(z, -1), rtol=0, atol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    torch.testing.assert_close(sparsemax_sort(z.transpose(0, 2), dim=0), got.transpose(0, 2))


def test_pooling_is_the_authors_padding_same():
    x = torch.randn(2, 36, 5)
    got = _pool(x, (6, 6), 3)
    img = x.transpose(1, 2).reshape(2, 5, 6, 6)
    want = F.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=True).reshape(2, 5, 36).transpose(1, 2)
    torch.testing.assert_close(got, want)
    assert _pool(x, (6, 6), 1) is x


def test_prompts_match_the_authors_ensemble():
    normal, abnormal = dictas_prompts("metal_nut")
    assert (len(normal), len(abnormal)) == (7 * 35, 5 * 35)
    assert "a bad photo of a flawless metal_nut." in normal
    assert "this is one broken metal_nut in the scene." in abnormal
    assert "a jpeg \\ photo of the metal_nut." in normal


# ------------------------------------------------------------------ reference = authors


@pytest.mark.parametrize("shots", [1, 2, 4])
def test_reference_matches_the_authors_test_code_per_image(shots):
    model = make_model(lookup_scale=None)
    text = text_protos()
    refs = images(shots, 10 + shots)
    model.set_references(refs, category="bottle", text_features=text)
    q = images(2, 20)
    with torch.no_grad():
        out = model.head(model.encode(q))
        for b in range(2):
            amap, p_text = authors_test_forward(model, q[b:b + 1], refs, text)
            torch.testing.assert_close(out["anomaly_maps"][b], amap, rtol=0, atol=1e-6)
            torch.testing.assert_close(out["text_probs"][b], p_text, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["map_max"], out["anomaly_maps"].amax(dim=(-2, -1)))
    torch.testing.assert_close(out["image_scores"], 0.2 * out["text_probs"] + 0.8 * out["map_max"])


def test_category_scores_follow_the_authors_metric_code():
    g = torch.Generator().manual_seed(3)
    text, mx = torch.rand(9, generator=g), torch.rand(9, generator=g)
    t, m = text.numpy().astype(np.float64), mx.numpy().astype(np.float64)
    m = (m - m.min()) / (m.max() - m.min() + 1e-6)
    t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    want = 0.2 * t + 0.8 * m
    torch.testing.assert_close(category_scores(text, mx, 0.2).double(), torch.from_numpy(want), rtol=0, atol=1e-6)


def test_batched_forward_equals_one_image_at_a_time():
    model = make_model(lookup_scale=8.0)
    model.set_references(images(2, 30), category="bottle", text_features=text_protos())
    q = images(3, 31)
    with torch.no_grad():
        scores, maps = model(q)
        for b in range(3):
            s1, m1 = model(q[b:b + 1])
            torch.testing.assert_close(s1, scores[b:b + 1], rtol=0, atol=1e-6)
            torch.testing.assert_close(m1, maps[b:b + 1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ fastad = reference


@pytest.mark.parametrize("shots", [1, 2, 4])
@pytest.mark.parametrize("lookup,scale", [("sparsemax", None), ("sparsemax", 30.0), ("softmax", None),
                                          ("argmax", 5.0)])
def test_fastad_backend_equals_reference(shots, lookup, scale):
    model = make_model(lookup=lookup, lookup_scale=scale)
    model.set_references(images(shots, 40 + shots), category="bottle", text_features=text_protos())
    q = images(3, 50)
    with torch.no_grad():
        feats = model.encode(q)
        model.backend = "reference"
        ref = model.head(feats)
        model.backend = "fastad"
        fast = model.head(feats)
    for key in ref:
        torch.testing.assert_close(fast[key], ref[key], rtol=0, atol=1e-4, msg=f"{shots}-shot {lookup} {key}")


@pytest.mark.parametrize("mode", ["sparsemax", "softmax"])
def test_lookup_backends_agree_with_per_image_dictionaries(mode):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 17, 16, generator=g), torch.randn(2, 40, 16, generator=g),
               torch.randn(2, 40, 16, generator=g))
    ref = dictionary_lookup(q, k, v, 2.0, mode, "reference")
    fast = dictionary_lookup(q, k, v, 2.0, mode, "fastad")
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    for b in range(2):
        torch.testing.assert_close(dictionary_lookup(q[b:b + 1], k[b], v[b], 2.0, mode, "reference"), ref[b:b + 1])


def test_lookup_rejects_unknown_modes_and_backends():
    q = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        dictionary_lookup(q, q[0], q[0], 1.0, "max")
    with pytest.raises(ValueError, match="backend must be"):
        dictionary_lookup(q, q[0], q[0], 1.0, "softmax", "cuda")
    with pytest.raises(ValueError, match="lookup must be one of"):
        DictASConfig(lookup="hard")


# ------------------------------------------------------------------ references


def test_references_hold_one_dictionary_per_layer_and_scale():
    model = make_model()
    refs = model.set_references(images(3, 60), category="bottle", text_features=text_protos())
    assert sorted(refs.keys) == [(li, s) for li in range(4) for s in (1, 3)]
    assert all(t.shape == (3 * 64, 64) for t in refs.keys.values())
    # the key generator attends over all shots jointly: dictionaries of 1 shot differ from slices of 3
    one = model.set_references(images(3, 60)[:1], category="one", text_features=text_protos())
    assert not torch.allclose(one.keys[0, 1], refs.keys[0, 1][:64])
    with pytest.raises(KeyError, match="no references"):
        model(images(1, 0), category="nothing")


def test_set_references_runs_the_generators_in_eval_mode():
    model = make_model()
    model.train()
    a = model.set_references(images(2, 61), category="x", text_features=text_protos())
    b = model.set_references(images(2, 61), category="x", text_features=text_protos())
    torch.testing.assert_close(a.values[2, 3], b.values[2, 3], rtol=0, atol=0)  # no dropout
    assert model.training and not model.backbone.training


def test_set_references_encodes_the_prompt_ensemble_when_no_text_is_given():
    model = make_model()
    refs = model.set_references(images(1, 62), category="metal_nut")
    torch.testing.assert_close(refs.text, model.backbone.text_prototypes(*dictas_prompts("metal_nut")))


def test_preprocess_squashes_to_the_model_size():
    from PIL import Image

    model = make_model()
    pixels = torch.zeros(80, 120, 3, dtype=torch.uint8)
    pixels[:, :10] = 255  # a white left border: cropped away by a shorter-side resize + centre crop
    x = model.preprocess()(Image.fromarray(pixels.numpy()))
    assert x.shape == (3, 64, 64)
    assert x[:, :, 0].mean() > 1.0 and x[:, :, -1].mean() < -1.0


# ------------------------------------------------------------------ checkpoints


def authors_state(seed: int = 4, C: int = 64, n_layers: int = 4) -> dict:
    """A ``{"Mymodel": ...}`` checkpoint with the names of xiaozhen228/DictAS MyDictionary."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix in ("Query_Generator.", "Key_Generator.", "Value_Generator.AttnBlock."):
        for name in ("q_proj", "k_proj", "v_proj", "TwoLayerMLP.linear1", "TwoLayerMLP.linear2", "TwoLayerMLP.linear3"):
            state[f"{prefix}{name}.weight"] = torch.randn(C, C, generator=g)
        for name in ("TwoLayerMLP.linear1", "TwoLayerMLP.linear2"):
            state[f"{prefix}{name}.bias"] = torch.randn(C, generator=g)
        for name in ("norm1", "TwoLayerMLP.norm"):
            state[f"{prefix}{name}.weight"] = torch.rand(C, generator=g)
            state[f"{prefix}{name}.bias"] = torch.randn(C, generator=g)
    for name, (o, i) in (("fuse_modules", (C // 2, C * n_layers)), ("compress", (1, C // 2)),
                         ("post_process", (D, C // 2))):
        state[f"Fuse_Feature.{name}.weight"] = torch.randn(o, i, generator=g)
        state[f"Fuse_Feature.{name}.bias"] = torch.randn(o, generator=g)
    return state


def test_authors_checkpoint_maps_onto_the_model(tmp_path):
    model = make_model()
    state = authors_state()
    path = tmp_path / "train_visa.pth"
    torch.save({"Mymodel": state}, path)
    backbone_before = model.backbone.clip.visual.proj.clone()
    model.load_checkpoint(str(path))
    sd = model.state_dict()
    torch.testing.assert_close(sd["query_generator.q_proj.weight"], state["Query_Generator.q_proj.weight"])
    torch.testing.assert_close(sd["key_generator.norm.bias"], state["Key_Generator.norm1.bias"])
    torch.testing.assert_close(sd["value_generator.block.mlp.fc3.weight"],
                               state["Value_Generator.AttnBlock.TwoLayerMLP.linear3.weight"])
    torch.testing.assert_close(sd["value_generator.block.mlp.norm.weight"],
                               state["Value_Generator.AttnBlock.TwoLayerMLP.norm.weight"])
    torch.testing.assert_close(sd["global_feature.score.weight"], state["Fuse_Feature.compress.weight"])
    assert torch.equal(model.backbone.clip.visual.proj, backbone_before)
    other = make_model(seed=9)
    other.load_checkpoint(model.state_dict())
    torch.testing.assert_close(other.state_dict()["global_feature.proj.bias"], sd["global_feature.proj.bias"])


def test_checkpoint_errors_list_missing_unexpected_and_mismatched_keys():
    model = make_model()
    state = authors_state()
    del state["Key_Generator.TwoLayerMLP.linear2.bias"]
    state["Query_Generator.extra.weight"] = torch.zeros(2)
    state["Fuse_Feature.compress.weight"] = torch.zeros(1, 5)
    with pytest.raises(CheckpointKeyError) as err:
        model.load_checkpoint({"Mymodel": state})
    msg = str(err.value)
    assert err.value.missing == ["key_generator.mlp.fc2.bias"]
    assert "Query_Generator.extra.weight" in msg and "Fuse_Feature.compress.weight" in msg and "(1, 5)" in msg
    # Fuse_Feature follows fuse_layers (the authors' k = 4), not the layers used at test time
    with pytest.raises(CheckpointKeyError, match="fuse_modules"):
        make_model(fuse_layers=2).load_checkpoint(authors_state())


# The authors' test settings (models/utils.py BESTSEGMENTATION) on the 4-block tiny backbone
# (their ViT-L block l -> block l / 6): (layers, scales, sigma, dataset, category).
AUTHORS_SETTINGS = {
    "visa": ((1, 2, 3, 4), (1, 3), 6.0, "visa", "candle"),
    "mvtec": ((1, 2), (1, 3), 6.0, "mvtec", "bottle"),
    "btad": ((1, 2), (1,), 6.0, "btad", "01"),
    "mpdd": ((1, 2, 3, 4), (1,), 6.0, "mpdd", "bracket_brown"),
    "classification-first": ((1, 2), (1, 3), 2.0, "mvtec", "bottle"),
}


@pytest.mark.parametrize("setting", sorted(AUTHORS_SETTINGS))
def test_authors_checkpoint_loads_and_scores_in_every_dataset_setting(setting):
    """A checkpoint in the authors' layout (their names, Fuse_Feature for 4 layers) loads
    whatever layers the setting tests with, and scores as the authors' test code."""
    layers, scales, sigma, dataset, category = AUTHORS_SETTINGS[setting]
    model = make_model(layers=layers, scales=scales, sigma=sigma)
    model.load_checkpoint({"Mymodel": authors_state()})
    model.apply_dataset_rules(dataset, category)
    assert model.config.alpha == {"visa": 0.2, "mvtec": 0.2, "btad": 0.5, "mpdd": 0.0,
                                  "classification-first": 0.2}[setting]
    refs, q = images(2, 30), images(3, 31)
    model.set_references(refs, category=category, text_features=text_protos())
    with torch.no_grad():
        scores, maps = model(q, category=category)
        for b in range(3):
            want_map, p_text = authors_test_forward(model, q[b:b + 1], refs, text_protos())
            torch.testing.assert_close(maps[b], want_map.float(), atol=2e-6, rtol=0)
            want = model.config.alpha * p_text + (1 - model.config.alpha) * want_map.max()
            torch.testing.assert_close(scores[b], want.float(), atol=2e-6, rtol=0)


def test_dataset_alpha_is_the_authors_metric_rule():
    cfg = DictASConfig()
    assert cfg.dataset_alpha("mvtec", "bottle") == cfg.dataset_alpha("VisA", "candle") == 0.2
    assert cfg.dataset_alpha("mvtec", "wood") == 0.2  # MVTec AD's wood keeps the MVTec AD alpha
    for cat in ("bracket_brown", "metal1", "metal2", "wood"):
        assert cfg.dataset_alpha("MPDD", cat) == 0.0
    assert cfg.dataset_alpha("mpdd", "bracket_black") == cfg.dataset_alpha("btad", "01") == 0.5
    assert DictASConfig(other_alpha=0.3, zero_alpha_categories=()).dataset_alpha("mpdd", "bracket_brown") == 0.3


# The authors' dataset.py Roate_support (albumentations 1.3.1) on a 7 x 9 image pair drawn
# below: per output image, the pixel sum and the sum of pixel * (flat index + 1).
ROTATED_SUMS = [24998, 24998, 25608, 25097, 24963, 24998, 25608, 25097, 24963, 24998, 24201, 24201, 25330, 25283,
                24048, 24201, 25330, 25283, 24048, 24201]
ROTATED_WEIGHTED = [2300644, 2447998, 2455005, 2302034, 2333157, 2300644, 2408337, 2464862, 2408787, 2447998,
                    2339239, 2258899, 2412994, 2525666, 2377687, 2339239, 2400700, 2277446, 2191873, 2258899]


def test_rotate_references_matches_the_authors_augmentation():
    from fastad.models.dictas import rotate_references

    imgs = torch.randint(0, 256, (2, 3, 7, 9), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    cfg = DictASConfig()
    out = rotate_references(imgs, cfg.rotate_angles)
    assert out.shape == (20, 3, 7, 9) and out.dtype == torch.uint8
    hwc = out.permute(0, 2, 3, 1).to(torch.int64)
    w = torch.arange(1, 7 * 9 * 3 + 1).reshape(7, 9, 3)
    assert hwc.sum(dim=(1, 2, 3)).tolist() == ROTATED_SUMS
    assert (hwc * w).sum(dim=(1, 2, 3)).tolist() == ROTATED_WEIGHTED
    assert torch.equal(out[0], imgs[0]) and torch.equal(out[10], imgs[1])
    floats = rotate_references(imgs.float() / 255, cfg.rotate_angles)
    assert floats.dtype == torch.float32 and torch.equal((floats * 255).round().to(torch.uint8), out)
    with pytest.raises(ValueError, match="images must be"):
        rotate_references(imgs[0], cfg.rotate_angles)


def test_prepare_references_rotates_screw_up_to_four_shots():
    model = make_model()
    refs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert model.prepare_references(refs, "screw").shape[0] == 20
    assert model.prepare_references(refs, "bottle") is refs
    five = torch.rand(5, 3, 16, 16)
    assert model.prepare_references(five, "screw") is five  # more than rotate_max_shots: unchanged


def test_evaluate_applies_the_dataset_rules():
    from fastad.evaluate import StageMeter, build_runner

    cfg = dict(TINY)
    runner = build_runner("dictas", "bracket_brown", config=cfg, dataset="mpdd")
    assert runner.model.config.alpha == 0.0
    assert build_runner("dictas", "bracket_brown", config=cfg, dataset="mvtec").model.config.alpha == 0.2
    runner = build_runner("dictas", "screw", config=cfg, dataset="mvtec")
    runner.model.backbone.text_prototypes = lambda *a: text_protos()  # no tokenizer download
    runner.set_references(torch.rand(1, 3, 64, 64), StageMeter())
    refs = runner.model.references["screw"]
    assert refs.shots == 10 and refs.keys[0, 1].shape[0] == 10 * 64


# ------------------------------------------------------------------ training


def train_batch():
    q, refs = images(3, 70), images(3, 71)
    masks = torch.zeros(3, 64, 64)
    masks[1, 8:40, 8:40] = 1
    masks[2, 30:60, 20:50] = 1
    return q, refs, masks, torch.tensor([0, 1, 1])


def test_training_needs_fuse_layers_layers():
    q, refs, masks, labels = train_batch()
    with pytest.raises(ValueError, match="fuse_layers=4"):
        make_model(layers=(2, 4)).compute_losses(q, refs, masks, labels, text_features=text_protos())
    losses = make_model(layers=(2, 4), fuse_layers=2).compute_losses(q, refs, masks, labels,
                                                                     text_features=text_protos())
    assert bool(torch.isfinite(losses["loss"]))


@pytest.mark.parametrize("backend", ["reference", "fastad"])
def test_training_step_decreases_the_loss(backend):
    model = make_model(backend=backend, lookup_scale=4.0, generator_dropout=0.0, lr=1e-3)
    q, refs, masks, labels = train_batch()
    with torch.no_grad():
        qf, rf = model.encode(q), model.encode(refs)
    opt = model.make_optimizer()
    first = model.training_step(opt, qf, rf, masks, labels, text_features=text_protos())
    assert set(first) == {"loss", "query", "cqc", "tac"} and all(np.isfinite(list(first.values())))
    for _ in range(5):
        last = model.training_step(opt, qf, rf, masks, labels, text_features=text_protos())
    assert last["loss"] < first["loss"]
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_training_gradients_agree_between_backends():
    q, refs, masks, labels = train_batch()
    grads = {}
    for backend in ("reference", "fastad"):
        model = make_model(backend=backend, lookup_scale=6.0, generator_dropout=0.0).train()
        losses = model.compute_losses(q, refs, masks, labels, text_features=text_protos())
        losses["loss"].backward()
        grads[backend] = (float(losses["loss"].detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None})
    assert grads["reference"][0] == pytest.approx(grads["fastad"][0], abs=1e-4)
    ref_g, fast_g = grads["reference"][1], grads["fastad"][1]
    assert set(ref_g) == set(fast_g) and "key_generator.q_proj.weight" in ref_g
    for name in ref_g:
        torch.testing.assert_close(fast_g[name], ref_g[name], rtol=1e-3, atol=1e-4, msg=name)
