"""iCAS: GQS and MaskPool against hand computations, the fastad backend against the reference
backend (maps, scores, losses, gradients), prompting modes, batching and a few training steps."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastad
from fastad.models import ICAS
from fastad.models.icas import greedy_query_selection, greedy_query_selection_reference, mask_pool_features

# The fastad backend selects queries with fastad.ops.kcenter_greedy (issue 5), merged separately.
needs_kcenter = pytest.mark.skipif(not hasattr(fastad.ops, "kcenter_greedy"),
                                   reason="fastad.ops.kcenter_greedy (issue 5) is not in this tree yet")

TINY = dict(encoder_kwargs=dict(depth=2, num_heads=2, embed_dim=32), image_size=70, dim=32, num_queries=12,
            num_layers=2, num_heads=4, ffn_dim=48)


def tiny_icas(backend="reference", **kw):
    torch.manual_seed(0)
    return ICAS("vit_small_patch14_dinov2", backend=backend, **{**TINY, **kw})


def both_backends(**kw):
    ref = tiny_icas(**kw)
    fast = copy.deepcopy(ref)
    fast.backend = "fastad"
    return ref, fast


def images(n, seed, size=70):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def box_masks(n, boxes, size=70):
    m = torch.zeros(n, len(boxes), size, size)
    for j, (y0, y1, x0, x1) in enumerate(boxes):
        m[:, j, y0:y1, x0:x1] = 1
    return m


# --------------------------------------------------------------------------- GQS


def test_gqs_reference_picks_are_valid_in_float64():
    x = torch.randn(41, 5, generator=torch.Generator().manual_seed(0))
    sel = greedy_query_selection_reference(x, 9)
    assert sel[0] == 0 and len(set(sel.tolist())) == 9
    x64 = x.double()
    for t in range(1, 9):
        d = torch.cdist(x64, x64[sel[:t]]).min(1).values
        d[sel[:t]] = -1
        assert float(d.max()) - float(d[sel[t]]) <= 1e-6 * float(d.max())  # float32 rounding of the distances


def test_gqs_duplicates_give_distinct_indices_and_ties_go_low():
    x = torch.zeros(6, 3)
    x[4] = 1.0
    sel = greedy_query_selection_reference(x, 4)
    assert sel.tolist() == [0, 4, 1, 2]
    assert greedy_query_selection_reference(x, 2, init=3).tolist() == [3, 4]


@needs_kcenter
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("B,N,C,k", [(1, 1, 3, 1), (2, 37, 7, 11), (3, 49, 32, 49)])
def test_gqs_fastad_equals_reference(metric, B, N, C, k):
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(N + k))
    ref = greedy_query_selection(x, k, metric, 0, "reference")
    fast = greedy_query_selection(x, k, metric, 0, "fastad")
    assert torch.equal(fast, ref)


# --------------------------------------------------------------------------- MaskPool


def test_mask_pool_reference_by_hand():
    feats = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    masks = torch.zeros(1, 2, 3, 4)
    masks[0, 0, 1, 1:3] = 1.0
    out = mask_pool_features(feats, masks, (3, 4), "reference")
    torch.testing.assert_close(out[0, 0], feats[0, :, 1, 1:3].mean(1))
    assert bool((out[0, 1] == 0).all())  # empty mask -> zero vector


@pytest.mark.parametrize("B,R,C,h,H,size", [(1, 1, 4, 3, 3, (12, 12)), (2, 5, 8, 5, 37, (20, 20)),
                                            (1, 3, 16, 7, 28, (28, 28))])
def test_mask_pool_fastad_equals_reference(B, R, C, h, H, size):
    g = torch.Generator().manual_seed(R * h)
    feats = torch.randn(B, C, h, h, generator=g)
    masks = torch.randn(B, R, H, H, generator=g)  # logits: binarised > 0
    ref = mask_pool_features(feats, masks, size, "reference")
    fast = mask_pool_features(feats, masks, size, "fastad")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_prompt_pooling_and_mfm_matching_fastad_equal_reference():
    """The iCAS pieces on fastad ops that need no GQS: Q_p^0 / Q_ntp^0 through mask_pool's
    complement and the normal-prompting MFM nearest neighbour through nn_distance."""
    ref, fast = both_backends()
    g = torch.Generator().manual_seed(12)
    feats = torch.randn(2, 32, 5, 5, generator=g)
    masks = box_masks(2, [(10, 31, 10, 47), (0, 0, 0, 0)])
    a, b = ref._prompts(feats, masks), fast._prompts(feats, masks)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    assert bool((a[0][:, 1] == 0).all())  # empty prompt mask -> zero vector
    refs = {"normal": torch.tensor(True), "bank": torch.randn(24, 32, generator=g)}
    q_m = torch.randn(2, 12, 32, generator=g)
    torch.testing.assert_close(fast._mfm_weights(q_m, refs), ref._mfm_weights(q_m, refs), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the model


def test_errors():
    with pytest.raises(ValueError, match="backend"):
        tiny_icas(backend="cuda")
    with pytest.raises(ValueError, match="num_queries=30"):
        tiny_icas(num_queries=30)
    with pytest.raises(ValueError, match="gqs_metric"):
        tiny_icas(gqs_metric="ip")
    model = tiny_icas()
    with pytest.raises(RuntimeError, match="set_references"):
        model(images(1, 0))
    with pytest.raises(ValueError, match="masks must be"):
        model.set_references(images(2, 0), torch.zeros(3, 1, 70, 70))


def test_encoder_uses_prenorm_patch_tokens():
    model = tiny_icas()
    x = images(1, 3)
    vit = model.encoder
    tokens = vit.forward_features(model._prepare(x))  # timm applies the final norm
    pre = model.encode(x)
    assert pre.shape == (1, 32, 5, 5)
    torch.testing.assert_close(vit.norm(pre.flatten(2).transpose(1, 2)), tokens[:, 1:], atol=1e-5, rtol=1e-5)


@needs_kcenter
@pytest.mark.parametrize("prompting", ["anomaly", "normal"])
def test_forward_fastad_equals_reference(prompting):
    ref, fast = both_backends()
    refs = images(2, 1)
    masks = box_masks(2, [(10, 30, 10, 30), (40, 60, 35, 55)]) if prompting == "anomaly" else None
    tgt = images(3, 2)
    outs = []
    for model in (ref, fast):
        model.set_references(refs, masks)
        outs.append(model(tgt))
    a, b = outs
    assert torch.equal(a.query_indices, b.query_indices)
    for name in ("anomaly_map", "image_score", "weights", "mfm_weights", "mask_logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-4, rtol=0)
    assert a.anomaly_map.shape == (3, 70, 70)
    torch.testing.assert_close(a.image_score, a.anomaly_map.flatten(1).amax(1))
    assert torch.equal(a.mask, a.anomaly_map > ref.mask_threshold)
    if prompting == "anomaly":
        assert a.semantic_maps.shape == (3, 4, 70, 70)  # 2 references x 2 prompt masks
        torch.testing.assert_close(a.semantic_maps.sum(1), a.anomaly_map)
        assert a.weights.shape == (3, 12, 4)
    else:
        assert a.semantic_maps is None and a.weights.shape == (3, 12, 1)
        assert ref._refs["bank"].shape == (2 * 12, 32)
        assert bool((a.mfm_weights >= 0).all()) and bool((a.mfm_weights <= 2).all())


def test_map_is_upsampled_logits_then_sigmoid_weighted_sum():
    model = tiny_icas(use_mfm=False)
    model.set_references(images(1, 4), box_masks(1, [(5, 40, 5, 40)]))
    out = model(images(1, 5))
    up = F.interpolate(out.mask_logits, size=(70, 70), mode="bilinear", align_corners=False).sigmoid()
    want = torch.einsum("bkhw,bkj->bjhw", up, out.weights).sum(1)
    torch.testing.assert_close(out.anomaly_map, want, atol=1e-5, rtol=1e-5)
    assert bool((out.mfm_weights == 0).all())


def test_batch_equals_single_images():
    model = tiny_icas()
    model.set_references(images(1, 6), box_masks(1, [(10, 50, 20, 60)]))
    tgt = images(2, 7)
    both = model(tgt)
    for i in range(2):
        one = model(tgt[i:i + 1])
        torch.testing.assert_close(one.anomaly_map[0], both.anomaly_map[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(one.query_indices[0], both.query_indices[i])


def test_training_steps_reduce_the_loss_and_keep_the_encoder_frozen():
    model = tiny_icas()
    model.train()
    enc_before = copy.deepcopy(model.encoder.state_dict())
    opt = model.configure_optimizer(lr=1e-3)
    assert opt.param_groups[0]["weight_decay"] == 0.05
    refs, tgt = images(2, 8), images(2, 9)
    ref_masks = box_masks(2, [(10, 30, 10, 30)])
    tgt_masks = box_masks(2, [(30, 50, 20, 45)])
    tgt_masks[1] = 0  # second target: the anomaly is absent, only the normal segment
    losses = []
    for _ in range(4):
        out = model.loss(tgt, tgt_masks, refs, ref_masks)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in enc_before.items())
    assert not model.encoder.training
    assert model.neck[0].weight.grad is not None and model.fg_bg.grad is not None


@needs_kcenter
def test_loss_fastad_equals_reference():
    ref, fast = both_backends()
    refs, tgt = images(2, 10), images(2, 11)
    ref_masks = box_masks(2, [(10, 30, 10, 30), (40, 60, 40, 65)])
    tgt_masks = box_masks(2, [(35, 55, 20, 40), (0, 0, 0, 0)])
    grads = []
    for model in (ref, fast):
        out = model.loss(tgt, tgt_masks, refs, ref_masks)
        out["loss"].backward()
        grads.append((out, model.neck[0].weight.grad.clone()))
    (a, ga), (b, gb) = grads
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gb, ga, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="correspond"):
        ref.loss(tgt, tgt_masks[:, :1], refs, ref_masks)
