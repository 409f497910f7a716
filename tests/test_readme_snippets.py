"""The README's "Use fastad in your codebase" snippets: each "after" (fastad's public ops)
runs on small random tensors and gives what the "before" (the authors' computation,
written out in plain torch) gives."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastad


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- InCTRL patch residual
def inctrl_before(Fp_list: torch.Tensor, Fp_list_n: torch.Tensor):
    """InCTRL open_clip/model.py: per image, per layer, per query patch, one normalised
    1 x (shot*N) GEMM and a min; mean over layers, max over patches."""
    patch_ref_map, max_diff_score = [], []
    for i in range(Fp_list.shape[0]):
        per_layer = []
        for j in range(Fp_list.shape[1]):
            bank = Fp_list_n[i, j] / Fp_list_n[i, j].norm(dim=-1, keepdim=True)
            rows = []
            for p in range(Fp_list.shape[2]):
                q = Fp_list[i, j, p].unsqueeze(0)
                q = q / q.norm(dim=-1, keepdim=True)
                rows.append((0.5 * (1 - (q @ bank.T))).min(dim=1).values)
            per_layer.append(torch.stack(rows))
        m = torch.stack(per_layer).squeeze(2).mean(dim=0)
        patch_ref_map.append(m)
        max_diff_score.append(m.max(dim=0).values)
    return torch.stack(patch_ref_map), torch.stack(max_diff_score)


def inctrl_after(Fp_list: torch.Tensor, Fp_list_n: torch.Tensor):
    b, L, N, C = Fp_list.shape  # Fp_list_n: [b, L, shot * N, C]
    d = fastad.ops.nn_distance(Fp_list.reshape(b * L, N, C), Fp_list_n.reshape(b * L, -1, C),
                               k=1, metric="cosine", scale=0.5).values      # [b*L, N, 1]
    patch_ref_map = d.reshape(b, L, N).mean(dim=1)                           # [b, N]
    return patch_ref_map, patch_ref_map.max(dim=1).values                    # and s_p [b]


def test_inctrl_residual():
    b, L, N, shot, C = 2, 3, 25, 4, 48
    Fp_list = torch.randn(b, L, N, C, generator=gen(0))
    Fp_list_n = torch.randn(b, L, shot * N, C, generator=gen(1))
    Fp_list_n[:, :, :N] += Fp_list  # references that resemble the query: small residuals
    want_map, want_score = inctrl_before(Fp_list, Fp_list_n)
    got_map, got_score = inctrl_after(Fp_list, Fp_list_n)
    torch.testing.assert_close(got_map, want_map, rtol=0, atol=2e-6)
    torch.testing.assert_close(got_score, want_score, rtol=0, atol=2e-6)


# ---------------------------------------------------------------- DictAS sparse lookup
def sparsemax_sort(z: torch.Tensor) -> torch.Tensor:
    """Sparsemax over the last dim as DictAS's SPM computes it: shift by the max, sort,
    support where 1 + j z_(j) > cumsum, tau = (sum over the support - 1) / k."""
    z = z - z.max(dim=-1, keepdim=True).values
    zs = z.sort(dim=-1, descending=True).values
    j = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    support = (1 + j * zs > zs.cumsum(-1)).to(z.dtype)
    k = (support * j).max(dim=-1, keepdim=True).values
    tau = ((support * zs).sum(-1, keepdim=True) - 1) / k
    return torch.clamp(z - tau, min=0)


def dictas_before(F_Q: torch.Tensor, F_K: torch.Tensor, F_V: torch.Tensor) -> torch.Tensor:
    """DictAS Lookup (one head): dense logits [B, N, M], sparsemax, weighted sum of values."""
    attn = torch.einsum("bnc,bmc->bnm", F_Q, F_K) * F_Q.shape[-1] ** -0.5
    return torch.einsum("bnm,bmc->bnc", sparsemax_sort(attn), F_V)


def dictas_after(F_Q: torch.Tensor, F_K: torch.Tensor, F_V: torch.Tensor) -> torch.Tensor:
    return fastad.ops.dict_lookup(F_Q, F_K, F_V)  # scale C ** -0.5, mode="sparsemax"


@pytest.mark.parametrize("keys_batch", [1, 2])  # test time: one dictionary for the batch
def test_dictas_lookup(keys_batch):
    B, N, M, C = 2, 30, 200, 64
    F_Q = torch.randn(B, N, C, generator=gen(2)) * 3
    F_K = torch.randn(keys_batch, M, C, generator=gen(3)) * 3
    F_V = torch.randn(keys_batch, M, C, generator=gen(4))
    want = dictas_before(F_Q, F_K.expand(B, -1, -1), F_V.expand(B, -1, -1))
    got = dictas_after(F_Q, F_K, F_V)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- iCAS greedy query selection
def gqs_before(F_t: torch.Tensor, K: int) -> torch.Tensor:
    """k-center greedy per image from patch 0: L2 distances to the selected set, argmax."""
    out = []
    for f in F_t:
        idx, sel = 0, [0]
        mind = torch.full((f.shape[0],), math.inf)
        for _ in range(K - 1):
            mind = torch.minimum(mind, torch.linalg.norm(f - f[idx], dim=1))
            mind[sel] = -math.inf
            idx = int(mind.argmax())
            sel.append(idx)
        out.append(torch.tensor(sel))
    return torch.stack(out)


def gqs_after(F_t: torch.Tensor, K: int):
    idx = fastad.ops.kcenter_greedy(F_t, K).indices                           # [B, K]
    Q_c0 = torch.gather(F_t, 1, idx[..., None].expand(-1, -1, F_t.shape[-1]))  # [B, K, C]
    return idx, Q_c0


def test_icas_query_selection():
    F_t = torch.randn(3, 169, 32, generator=gen(5))
    want = gqs_before(F_t, 20)
    idx, Q_c0 = gqs_after(F_t, 20)
    assert torch.equal(idx, want)
    assert torch.equal(Q_c0[1], F_t[1, want[1]])


# ---------------------------------------------------------------- iCAS / SINE mask pooling
def maskpool_before(F_r: torch.Tensor, M_r: torch.Tensor, size) -> torch.Tensor:
    """SINE MaskPooling: features and masks bilinearly resized to the mask grid, masks
    binarised > 0, mean of the features inside each mask."""
    x = F.interpolate(F_r, size=size, mode="bilinear", align_corners=False)
    m = (F.interpolate(M_r, size=size, mode="bilinear", align_corners=False) > 0).to(x.dtype)
    return torch.einsum("bchw,bqhw->bqc", x, m / (m.sum(dim=(-1, -2), keepdim=True) + 1e-8))


def maskpool_after(F_r: torch.Tensor, M_r: torch.Tensor, size) -> torch.Tensor:
    return fastad.ops.mask_pool(F_r, M_r, size=size, threshold=0.0)  # [B, R, C]


def test_icas_mask_pooling():
    F_r = torch.randn(2, 16, 9, 9, generator=gen(6))
    M_r = (torch.rand(2, 3, 50, 50, generator=gen(7)) > 0.7).float()
    M_r[0, 2] = 0  # an empty mask pools to zeros
    torch.testing.assert_close(maskpool_after(F_r, M_r, (36, 36)), maskpool_before(F_r, M_r, (36, 36)),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- SAA+ saliency and rescoring
def saliency_before(features: torch.Tensor, k: int) -> torch.Tensor:
    """SAA+ single-object saliency: the full [hw, hw] distance matrix, sorted, top-k mean."""
    C, H, W = features.shape
    X = features.reshape(C, H * W)
    D = 0.5 * (1 - X.T @ X)
    return D.sort(dim=1, descending=True).values[:, :k].mean(dim=1).reshape(H, W)


def saliency_after(features: torch.Tensor, k: int) -> torch.Tensor:
    C, H, W = features.shape
    X = features.reshape(C, H * W).T
    return fastad.ops.nn_distance(X, X, k=k, metric="cosine", scale=0.5,
                                  reduce="mean_largest").values.reshape(H, W)


def multi_instance_before(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SAA+ multi-instance saliency (disjoint instances): each instance's positions against
    every other instance's positions, 0.5 * (1 - max cosine)."""
    C, H, W = features.shape
    X = features.reshape(C, H * W).T
    lab = labels.reshape(-1)
    out = torch.zeros(H * W)
    for i in lab[lab >= 0].unique():
        mine, others = lab == i, (lab >= 0) & (lab != i)
        out[mine] = 0.5 * (1 - (X[mine] @ X[others].T).max(dim=1).values)
    return out.reshape(H, W)


def multi_instance_after(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    C, H, W = features.shape
    X = features.reshape(C, H * W).T
    inside = (labels.reshape(-1) >= 0).nonzero()[:, 0]
    g = labels.reshape(-1)[inside]
    d = fastad.ops.nn_distance(X[inside], X[inside], k=1, metric="cosine", scale=0.5,
                               query_groups=g, bank_groups=g, group_match="other").values[:, 0]
    return torch.zeros(H * W).index_put((inside,), d).reshape(H, W)


def rescore_before(saliency: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """SAA+ rescoring: saliency resized to the image, per mask score * exp(3 * mean inside)."""
    up = F.interpolate(saliency[None, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return torch.stack([logit * (torch.exp(3 * up[m].mean()) if m.any() else torch.tensor(1.0))
                        for m, logit in zip(masks, logits)])


def rescore_after(saliency: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    means = fastad.ops.mask_pool(saliency[None, None], masks[None], size=masks.shape[-2:],
                                 threshold=0.5)[0, :, 0]                     # [R]; empty mask -> 0
    return logits * torch.exp(3 * means)


def test_saa_plus_saliency_and_rescoring():
    features = F.normalize(torch.randn(64, 16, 16, generator=gen(8)), dim=0)
    want = saliency_before(features, 40)
    got = saliency_after(features, 40)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)

    labels = torch.full((16, 16), -1)
    labels[1:7, 1:7], labels[9:15, 2:8], labels[4:12, 10:15] = 0, 1, 2
    torch.testing.assert_close(multi_instance_after(features, labels), multi_instance_before(features, labels),
                               rtol=0, atol=2e-6)

    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    masks[0, 5:20, 5:30], masks[1, 40:60, 10:20], masks[2, 0:64, 50:64] = True, True, True  # masks[3] empty
    logits = torch.rand(4, generator=gen(9))
    torch.testing.assert_close(rescore_after(got, masks, logits), rescore_before(got, masks, logits),
                               rtol=1e-5, atol=1e-6)
