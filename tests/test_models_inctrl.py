"""InCTRL (v1) / InCTRLv2 reference model on a tiny random open_clip config: the
reference backend against a transcription of the authors' forward, the fastad
backend against the reference, batching, caching, checkpoints, training."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastad.models import CheckpointKeyError, ImageFeatures, InCTRLConfig, InCTRLv2  # noqa: E402
from fastad.models.inctrlv2 import inctrl_prompts, patch_residual  # noqa: E402

TINY = dict(backbone="fastad-tiny", image_size=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads; on a loaded machine they only add waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
LAYERS = {"v1": (1, 2, 3), "v2": (1, 2, 3, 4)}


def make_model(version: str, seed: int = 0, **overrides) -> InCTRLv2:
    torch.manual_seed(seed)
    model = InCTRLv2(version, **{**TINY, "layers": LAYERS[version], **overrides}).eval()
    # random BatchNorm statistics, so that the heads' eval path is not the identity
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model


def text_protos(dim: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(2, dim, generator=g)
    return t / t.norm(dim=-1, keepdim=True)


def images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def authors_v1_forward(model: InCTRLv2, q: ImageFeatures, r: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
    """mala-lab/InCTRL open_clip/model.py InCTRL.forward at batch size 1, transcribed
    (the per-patch loop, the re-normalised bank, prototype minus query), with the
    cached text prototypes in place of the per-query text encoding."""
    token = q.embeds
    token_n = r.embeds
    Fp = torch.stack(q.tokens)[:, 0]                        # [3, N, C]
    Fp_n = torch.stack([t.reshape(-1, t.shape[-1]) for t in r.tokens])  # [3, K*N, C]
    token_ad = model.image_adapter(token)
    token_n = model.image_adapter(token_n[None]).mean(dim=1)
    token_ref = token_n - token_ad
    Fp_map = []
    for j in range(len(Fp)):
        tmp_x, tmp_n = Fp[j], Fp_n[j]
        am_fp = []
        for k in range(len(tmp_x)):
            tmp = tmp_x[k].unsqueeze(0)
            tmp_n = tmp_n / tmp_n.norm(dim=-1, keepdim=True)
            tmp = tmp / tmp.norm(dim=-1, keepdim=True)
            am_fp.append((0.5 * (1 - (tmp @ tmp_n.T))).min(dim=1).values)
        Fp_map.append(torch.stack(am_fp))
    Fp_map = torch.mean(torch.stack(Fp_map).squeeze(2), dim=0)
    fg_score = Fp_map.max(dim=0).values
    image_feature = token / token.norm(dim=-1, keepdim=True)
    text_score = (100 * image_feature @ text.T).softmax(dim=-1)[0, 1]
    img_ref_score = model.image_head(token_ref)
    holistic = text_score + img_ref_score[:, None] + Fp_map[None]
    hl_score = model.holistic_head(holistic)
    return (hl_score + fg_score) / 2


# ------------------------------------------------------------------ configuration


def test_presets_hold_the_spec_choices():
    v1, v2 = InCTRLConfig.preset("v1"), InCTRLConfig.preset("v2")
    assert (v1.backbone, v1.image_size, v1.layers, v1.quick_gelu) == ("ViT-B-16-plus-240", 240, (7, 9, 11), False)
    assert v1.image_residual == "prototype_minus_query" and v1.sigma is None and v1.image_focal_on_logits
    assert (v2.backbone, v2.image_size, v2.layers, v2.quick_gelu) == ("ViT-L-14-336", 518, (6, 12, 18, 24), True)
    assert (v2.alpha, v2.beta, v2.residual_scale, v2.tau_img) == (0.5, 0.75, 0.5, 100.0)
    assert InCTRLConfig.preset("v1", sigma=4.0).sigma == 4.0
    with pytest.raises(ValueError, match="unknown preset"):
        InCTRLConfig.preset("v3")
    with pytest.raises(ValueError, match="image_residual"):
        InCTRLConfig(image_residual="sideways")


def test_prompts_match_the_authors_ensemble():
    normal, abnormal = inctrl_prompts("metal nut")
    assert (len(normal), len(abnormal)) == (7 * 22, 4 * 22)
    assert "a photo of a flawless metal nut for visual inspection." in normal
    assert "a cropped photo of the metal nut with defect." in abnormal
    assert inctrl_prompts("dog") == (["a photo of dog for anomaly detection."],
                                     ["a photo without dog for anomaly detection."])


def test_backbone_features_match_open_clip():
    model = make_model("v2")
    x = images(2, 3)
    feats = model.encode(x)
    assert feats.grid == (8, 8) and len(feats.tokens) == 4
    assert all(t.shape == (2, 64, 64) for t in feats.tokens)
    torch.testing.assert_close(feats.embeds, model.backbone.clip.encode_image(x), rtol=0, atol=1e-6)
    # the last requested block's tokens give the CLS embedding path's input: check one block by hand
    visual = model.backbone.clip.visual
    with torch.no_grad():
        _, inter = visual.transformer.forward_intermediates(
            visual.ln_pre(torch.cat([visual.class_embedding.expand(2, 1, -1),
                                     visual.conv1(x).flatten(2).transpose(1, 2)], 1) + visual.positional_embedding),
            indices=[1])
    torch.testing.assert_close(feats.tokens[1], inter[0][:, 1:], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ reference = authors


@pytest.mark.parametrize("shots", [1, 2, 4])
def test_reference_v1_matches_the_authors_forward_per_image(shots):
    model = make_model("v1")
    text = text_protos(48)
    refs = images(shots, 10 + shots)
    model.set_references(refs, category="candle", text_features=text)
    q = images(3, 20)
    with torch.no_grad():
        scores, maps = model(q)
        rf = model.encode(refs)
        for b in range(3):
            qf = model.encode(q[b:b + 1])
            want = authors_v1_forward(model, qf, rf, text)
            torch.testing.assert_close(scores[b:b + 1], want, rtol=0, atol=1e-6)
    assert maps.shape == (3, 64, 64)


def test_patch_residual_is_the_min_over_all_shots_then_the_layer_mean():
    g = torch.Generator().manual_seed(0)
    q = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    banks = [torch.randn(12, 8, generator=g) for _ in range(3)]
    got = patch_residual(q, banks, scale=0.5)
    want = torch.zeros(2, 5, dtype=torch.float64)
    for ql, bl in zip(q, banks):
        for b in range(2):
            for p in range(5):
                cos = torch.nn.functional.cosine_similarity(ql[b, p].double()[None], bl.double(), dim=-1)
                want[b, p] += (0.5 * (1 - cos)).min() / 3
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    # per-image banks [B, M, C] (training) score image b against bank b only
    per = patch_residual([t[:1] for t in q], [b[None] for b in banks], scale=0.5)
    torch.testing.assert_close(per, got[:1], rtol=0, atol=1e-7)


# ------------------------------------------------------------------ fastad = reference


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("shots", [1, 2, 4])
def test_fastad_backend_equals_reference(version, shots):
    model = make_model(version, sigma=2.0 if version == "v2" else None)
    model.set_references(images(shots, 30 + shots), category="pcb", text_features=text_protos(48))
    q = images(3, 40)
    with torch.no_grad():
        feats = model.encode(q)
        model.backend = "reference"
        ref = model.head(feats)
        model.backend = "fastad"
        fast = model.head(feats)
    for key in ref:
        torch.testing.assert_close(fast[key], ref[key], rtol=0, atol=1e-4, msg=f"{version} {shots}-shot {key}")
    assert float((ref["anomaly_maps"] - fast["anomaly_maps"]).abs().max()) < 1e-5


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_batched_forward_equals_one_image_at_a_time(version):
    model = make_model(version, backend="fastad")
    model.set_references(images(2, 50), category="pcb", text_features=text_protos(48))
    q = images(4, 51)
    with torch.no_grad():
        scores, maps = model(q)
        for b in range(4):
            s1, m1 = model(q[b:b + 1])
            torch.testing.assert_close(s1, scores[b:b + 1], rtol=0, atol=1e-6)
            torch.testing.assert_close(m1, maps[b:b + 1], rtol=0, atol=1e-6)


def test_v2_fusion_follows_equations_9_and_17():
    model = make_model("v2", sigma=None)
    model.set_references(images(2, 60), category="pcb", text_features=text_protos(48))
    with torch.no_grad():
        out = model.head(model.encode(images(2, 61)))
    s = 0.25 * (out["s_i"] + out["s_a"]) + 0.5 * out["patch_residual"].flatten(1).max(-1).values
    torch.testing.assert_close(out["image_scores"], s, rtol=0, atol=1e-6)
    fused = 0.5 * out["patch_residual"] + 0.5 * (0.25 * out["S_a"] + 0.75 * out["S_a_hat"])
    up = torch.nn.functional.interpolate(fused[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out["anomaly_maps"], up, rtol=0, atol=1e-6)
    assert ((out["S_a"] > 0) & (out["S_a"] < 1)).all()


def test_autocast_runs_the_head_in_fp32():
    model = make_model("v2")
    model.set_references(images(2, 70), category="pcb", text_features=text_protos(48))
    q = images(2, 71)
    with torch.no_grad():
        s32, m32 = model(q)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s16, m16 = model(q)
    assert s16.dtype == torch.float32 and m16.dtype == torch.float32
    assert torch.isfinite(m16).all()
    torch.testing.assert_close(s16, s32, rtol=0, atol=0.05)


# ------------------------------------------------------------------ references and errors


def test_references_are_cached_per_category_and_selected_by_name():
    model = make_model("v1")
    t = text_protos(48)
    model.set_references(images(2, 80), category="a", text_features=t)
    model.set_references(images(3, 81), category="b", text_features=t)
    refs = model.references["b"]
    assert refs.shots == 3 and all(b.shape == (3 * 64, 64) for b in refs.banks)
    q = images(2, 82)
    with torch.no_grad():
        sa, _ = model(q, category="a")
        sb, _ = model(q)  # the last category set
        sb2, _ = model(q, category="b")
    torch.testing.assert_close(sb, sb2)
    assert not torch.equal(sa, sb)
    with pytest.raises(KeyError, match="no references for category 'c'"):
        model(q, category="c")
    # precomputed features work in place of images
    with torch.no_grad():
        model.set_references(model.encode(images(3, 81)), category="b2", text_features=t)
        torch.testing.assert_close(model(q, category="b2")[0], sb, rtol=0, atol=1e-6)


def test_set_references_encodes_the_prompt_ensemble_when_no_text_is_given():
    model = make_model("v1")
    refs = model.set_references(images(1, 90), category="metal_nut")
    assert refs.text.shape == (2, 48)
    torch.testing.assert_close(refs.text.norm(dim=-1), torch.ones(2))
    want = model.backbone.text_prototypes(*inctrl_prompts("metal nut"))
    torch.testing.assert_close(refs.text, want)


def test_bad_inputs_raise_clear_errors():
    model = make_model("v1")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.set_references(torch.randn(3, 64, 64), category="x", text_features=text_protos(48))
    with pytest.raises(ValueError, match="text_features must be"):
        model.set_references(images(1, 0), category="x", text_features=torch.randn(3, 48))
    with pytest.raises(ValueError, match=r"text_features must be \[2, 48\] \(normal"):
        model.set_references(images(1, 0), category="x", text_features=torch.randn(1, 2, 48))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.encode(torch.randn(1, 3, 60, 60))
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "fast"
    with pytest.raises(ValueError, match="block indices"):
        InCTRLv2("v1", **TINY, layers=(1, 9))
    model.set_references(images(1, 0), category="x", text_features=text_protos(48))
    with pytest.raises(ValueError, match="grid"):
        model(torch.randn(1, 3, 48, 48))


def test_preprocess_resizes_the_shorter_side_and_centre_crops():
    from PIL import Image

    model = make_model("v1")
    img = Image.fromarray((torch.rand(80, 120, 3) * 255).byte().numpy())
    x = model.preprocess()(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    with torch.no_grad():
        assert model.encode(x[None]).grid == (8, 8)


# ------------------------------------------------------------------ checkpoints


def authors_v1_state(model: InCTRLv2, seed: int = 5) -> dict:
    """A state dict with the names of mala-lab/InCTRL (open_clip/model.py class InCTRL):
    CLIP weights at the top level, ``adapter.fc.{0,2}``, ``diff_head{,_ref}.projection{1,2,3}``
    and ``.bn{1,2,3}`` (bn1 unused), random values."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) for k, v in model.backbone.clip.state_dict().items()
             if k != "logit_scale"}
    D, h1, h2 = 48, 128, 64
    state["adapter.fc.0.weight"] = torch.randn(D // 4, D, generator=g)
    state["adapter.fc.2.weight"] = torch.randn(D, D // 4, generator=g)
    for name, din in (("diff_head", 64), ("diff_head_ref", D)):
        for i, (o, n) in enumerate(((h1, din), (h2, h1), (1, h2)), start=1):
            state[f"{name}.projection{i}.weight"] = torch.randn(o, n, generator=g)
            state[f"{name}.projection{i}.bias"] = torch.randn(o, generator=g)
        for i, n in ((1, din), (2, h1), (3, h2)):
            state[f"{name}.bn{i}.weight"] = torch.rand(n, generator=g)
            state[f"{name}.bn{i}.bias"] = torch.randn(n, generator=g)
            state[f"{name}.bn{i}.running_mean"] = torch.randn(n, generator=g)
            state[f"{name}.bn{i}.running_var"] = torch.rand(n, generator=g) + 0.5
            state[f"{name}.bn{i}.num_batches_tracked"] = torch.tensor(100)
    return state


def test_authors_checkpoint_maps_onto_the_model(tmp_path):
    model = make_model("v1")
    state = authors_v1_state(model)
    path = tmp_path / "checkpoint_epoch_00006.pyth"
    torch.save({"epoch": 6, "model_state": state, "cfg": ""}, path)
    model.load_checkpoint(str(path))
    sd = model.state_dict()
    torch.testing.assert_close(sd["image_adapter.down.weight"], state["adapter.fc.0.weight"])
    torch.testing.assert_close(sd["image_adapter.up.weight"], state["adapter.fc.2.weight"])
    torch.testing.assert_close(sd["holistic_head.fc3.bias"], state["diff_head.projection3.bias"])
    torch.testing.assert_close(sd["image_head.bn1.running_var"], state["diff_head_ref.bn2.running_var"])
    torch.testing.assert_close(sd["image_head.bn2.weight"], state["diff_head_ref.bn3.weight"])
    torch.testing.assert_close(sd["backbone.clip.visual.proj"], state["visual.proj"])
    torch.testing.assert_close(sd["backbone.clip.token_embedding.weight"], state["token_embedding.weight"])
    # a fastad state dict round-trips through the same loader
    other = make_model("v1", seed=3)
    other.load_checkpoint(model.state_dict())
    torch.testing.assert_close(other.state_dict()["image_head.fc1.weight"], sd["image_head.fc1.weight"])


def test_checkpoint_errors_list_missing_unexpected_and_mismatched_keys():
    model = make_model("v1")
    state = authors_v1_state(model)
    del state["diff_head.projection2.weight"]
    state["adapter.extra.weight"] = torch.zeros(3)
    state["diff_head_ref.projection1.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointKeyError) as err:
        model.load_checkpoint(state)
    msg = str(err.value)
    assert "holistic_head.fc2.weight" in msg and "missing" in msg
    assert "adapter.extra.weight" in msg and "unexpected" in msg
    assert "diff_head_ref.projection1.bias" in msg and "(7,)" in msg
    assert err.value.missing == ["holistic_head.fc2.weight"]
    # the v2 model needs its DASL / OASL adapters: a v1 checkpoint leaves them missing
    with pytest.raises(CheckpointKeyError, match="dasl_adapter.proj.0.weight"):
        make_model("v2").load_checkpoint(authors_v1_state(make_model("v2")))


def test_head_only_checkpoint_keeps_the_backbone():
    model = make_model("v1")
    before = model.backbone.clip.visual.proj.clone()
    state = {k: v for k, v in authors_v1_state(model).items() if k.startswith(("adapter", "diff_head"))}
    model.load_checkpoint(state)
    assert torch.equal(model.backbone.clip.visual.proj, before)


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("backend", ["reference", "fastad"])
def test_training_step_decreases_the_loss(version, backend):
    model = make_model(version, backend=backend, lr=3e-3)
    frozen = model.backbone.clip.visual.proj.clone()
    q, refs = images(4, 100), images(8, 101).reshape(4, 2, 3, 64, 64)
    labels = torch.tensor([0, 1, 0, 1])
    masks = torch.zeros(4, 64, 64)
    masks[1, 10:30, 10:30] = 1
    masks[3, 40:60, 5:20] = 1
    with torch.no_grad():
        qf, rf = model.encode(q), model.encode(refs.flatten(0, 1))
    opt = model.make_optimizer()
    text = text_protos(48)
    first = model.training_step(opt, qf, rf, labels, masks if version == "v2" else None, text_features=text)
    assert set(first) >= {"loss", "image"} and all(torch.isfinite(torch.tensor(v)) for v in first.values())
    for _ in range(6):
        last = model.training_step(opt, qf, rf, labels, masks if version == "v2" else None, text_features=text)
    assert last["loss"] < first["loss"]
    assert torch.equal(model.backbone.clip.visual.proj, frozen)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    if version == "v2":
        assert first["oasl"] > 0 and first["dasl"] > 0
