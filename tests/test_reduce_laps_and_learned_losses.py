"""LAPS (similarity vs the naive per-pair reference, training path vs physical selection, gradients, save/load)
and the losses of DynamicViT, TiP and LAPS against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vlprune
from conftest import make_batch
from reference import naive_merge_learned as naive_b
from vlprune import ReduceConfig as RC
from vlprune.objectives import dynamicvit as dvl
from vlprune.objectives import laps as lapl
from vlprune.objectives import tip as tipl
from vlprune.reduce import functional as Fn
from vlprune.reduce.laps import laps_similarity


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _features(model, batch):
    images, ids, mask = batch
    return model.encode_image(images), model.encode_text(ids, mask), mask


@pytest.mark.parametrize("official", [False, True])
def test_laps_similarity_matches_naive(official, tiny_cfg, batch):
    m = vlprune.build_model(tiny_cfg, method=RC("laps", keep=0.5, options={"official": official})).eval()
    image, text, mask = _features(m, batch)
    with torch.no_grad():
        S = laps_similarity(m, image, text, mask)
    S_chunked = laps_similarity(m, image, text, mask, chunk=2)
    torch.testing.assert_close(S, S_chunked)
    assert S.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            n = int(mask[j].sum())
            ref = naive_b.laps_pair_eval(m.laps, image.x[i], text[j, :n])
            assert abs(float(S[i, j]) - ref) < 1e-5, (i, j)
    # padding never changes the similarity
    text_pad = torch.cat([text, torch.randn(3, 4, text.shape[-1])], dim=1)
    mask_pad = torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)], dim=1)
    torch.testing.assert_close(laps_similarity(m, image, text_pad, mask_pad), S, atol=1e-6, rtol=1e-6)


def test_laps_training_path_equals_physical_for_same_decision(tiny_cfg, batch):
    m = vlprune.build_model(tiny_cfg, method=RC("laps", keep=0.5)).train()
    head = m.laps
    image, text, mask = _features(m, batch)
    vi, tt = head.image_proj(image.x), head.text_proj(text)
    a = head.scores(vi[:, 1:], tt, mask)
    tokens_train, D = head.slim(vi[:, :1], vi[:, 1:], a, gen(2))
    assert set(D.unique().tolist()) <= {0.0, 1.0}
    for b in range(3):
        keep = D[b].nonzero().flatten()
        drop = (D[b] == 0).nonzero().flatten()
        vs = vi[b, 1:][keep]
        W = head.aggr(vs).t().softmax(-1)
        parts = [vi[b, :1], W @ vs]
        wf = a[b, drop].softmax(-1)
        parts.append((wf[:, None] * vi[b, 1:][drop]).sum(0, keepdim=True))
        ref = F.normalize(torch.cat(parts), dim=-1)
        torch.testing.assert_close(tokens_train[b], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("official", [False, True])
def test_laps_gradients_and_determinism(official, tiny_cfg, batch):
    m = vlprune.build_model(tiny_cfg, method=RC("laps", options={"official": official})).train()
    image, text, mask = _features(m, batch)
    S, D = laps_similarity(m, image, text, mask, generator=gen(1), return_decisions=True)
    S2, _ = laps_similarity(m, image, text, mask, generator=gen(1), return_decisions=True)
    assert torch.equal(S, S2)
    assert D.shape == (3, 3, tiny_cfg.vision.num_patches)
    loss = lapl.laps_loss(S, D, rho=0.5, hardest=not official)["total"]
    loss.backward()
    for name, p in m.laps.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    m.eval()
    assert torch.equal(laps_similarity(m, image, text, mask), laps_similarity(m, image, text, mask))


def test_laps_head_saved_cleared_and_errors(tiny_cfg, batch, tmp_path):
    m = vlprune.build_model(tiny_cfg, method="laps").eval()
    image, text, mask = _features(m, batch)
    vlprune.save_pretrained(m, tmp_path / "ck")
    m2 = vlprune.load_pretrained(tmp_path / "ck").eval()
    assert torch.equal(laps_similarity(m, image, text, mask), laps_similarity(m2, image, text, mask))
    m3 = vlprune.load_pretrained(tmp_path / "ck", method=None)
    assert not hasattr(m3, "laps")
    vlprune.attach(m, None)
    assert "laps" not in dict(m.named_children())
    with pytest.raises(ValueError, match="no LAPS head"):
        laps_similarity(m, image, text, mask)
    with pytest.raises(ValueError, match="takes no layers"):
        vlprune.build_model(tiny_cfg, method=RC("laps", layers=(2,)))
    with pytest.raises(ValueError, match="N_c"):
        vlprune.build_model(tiny_cfg, method=RC("laps", keep=0.1))


def test_laps_bf16_no_nan(tiny_cfg, batch):
    m = vlprune.build_model(tiny_cfg, method="laps").to(torch.bfloat16)
    images, ids, mask = batch
    image, text = m.encode_image(images.bfloat16()), m.encode_text(ids, mask)
    for train in (True, False):
        m.train(train)
        assert torch.isfinite(laps_similarity(m, image, text, mask, generator=gen(0)).float()).all()


# ---- losses against hand computations -----------------------------------------------------------------------


def test_triplet_and_ratio_losses():
    S = torch.randn(4, 4, generator=gen(1))
    for hardest in (True, False):
        assert abs(float(lapl.triplet_loss(S, 0.2, hardest)) - naive_b.triplet_naive(S, 0.2, hardest)) < 1e-5
    D = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    assert abs(float(lapl.ratio_loss(D, 0.5)) - 0.0625) < 1e-7
    ids = torch.tensor([0, 0, 1, 2])  # captions 0 and 1 belong to the same image: not negatives of each other
    cost = lapl.triplet_loss(S, 0.2, False, ids)
    S2 = S.clone()
    S2[0, 1] = S2[1, 0] = -10.0
    torch.testing.assert_close(cost, lapl.triplet_loss(S2, 0.2, False, ids))


def test_dynamicvit_losses():
    masks = [torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])]
    expect = (((0.75 - 0.7) ** 2 + (0.25 - 0.7) ** 2) / 2 + ((0.5 - 0.49) ** 2 + (0.0 - 0.49) ** 2) / 2) / 2
    assert abs(float(dvl.ratio_loss(masks, [0.7, 0.49])) - expect) < 1e-6
    s, t = torch.randn(3, 5, generator=gen(2)), torch.randn(3, 5, generator=gen(3))
    ps, pt = s.softmax(-1), t.softmax(-1)
    kl = sum(float((pt[b] * (pt[b].log() - ps[b].log())).sum()) for b in range(3)) / 3
    assert abs(float(dvl.cls_distill_loss(s, t)) - kl) < 1e-5
    st_, tt = torch.randn(2, 4, 3, generator=gen(4)), torch.randn(2, 4, 3, generator=gen(5))
    m = masks[0]
    rows = [(st_[b, i] - tt[b, i]).pow(2) for b in range(2) for i in range(4) if m[b, i] > 0]
    assert abs(float(dvl.token_distill_loss(st_, tt, m)) - float(torch.cat(rows).mean())) < 1e-6


def test_tip_losses():
    p1 = torch.rand(2, 9, generator=gen(1))
    p2 = torch.rand(2, 9, generator=gen(2))
    expect = (float(((p1 - 0.5) ** 2).mean()) + float(((p2 - 0.25) ** 2).mean())) / 2
    assert abs(float(tipl.sparsity_loss([p1, p2], [0.5, 0.25])) - expect) < 1e-6
    pos_full = torch.arange(9).expand(2, 9)
    assert abs(float(tipl.continuity_loss_layer(p1, pos_full, 3)) - naive_b.continuity_one_layer(p1, pos_full, 3)) < 1e-6
    pos_part = torch.tensor([[0, 2, 4, 8, -1, 5, 6, 1, 3], [8, 7, 6, -1, -1, 0, 1, 2, 4]])
    assert abs(float(tipl.continuity_loss_layer(p1, pos_part, 3)) - naive_b.continuity_one_layer(p1, pos_part, 3)) < 1e-6
    t, v = torch.randn(4, 6, generator=gen(3)), torch.randn(4, 6, generator=gen(4))
    assert abs(float(tipl.contrast_loss(t, v, torch.tensor(0.07))) - naive_b.info_nce(t, v, 0.07)) < 1e-4
    s, te = torch.randn(3, 2, generator=gen(5)), torch.randn(3, 2, generator=gen(6))
    assert abs(float(tipl.distill_loss(s, te)) - float(dvl.cls_distill_loss(s, te))) < 1e-7


def test_tip_aux_records_and_positions(tiny_cfg, batch):
    m = vlprune.build_model(tiny_cfg, method=RC("tip", layers=(1, 2), keep=0.5)).train()
    out = m(*batch, generator=gen(0))
    recs = [a for a in out.fused_image.aux if a.method == "tip"]
    assert [r.layer for r in recs] == [1, 2]
    N = tiny_cfg.vision.num_patches
    for r, tgt in zip(recs, (0.5, 0.25)):
        assert r.values["target"] == tgt and r.values["keep_prob"].shape == (3, N)
        assert torch.equal(r.values["positions"], torch.arange(N).expand(3, N))
    torch.testing.assert_close(recs[1].values["cum_prob"], recs[1].values["keep_prob"] * recs[0].values["mask"])
    # after a physical reduction, grid positions come from provenance (trace=True)
    m2 = vlprune.build_model(tiny_cfg, method=RC("tip", layers=(1, 2)))
    m2.vision.layers[1].reducer = vlprune.reduce.tome.ToMeReducer(3)
    m2.train()
    out2 = m2(*batch, generator=gen(0), trace=True)
    pos = [a for a in out2.fused_image.aux if a.method == "tip"][0].values["positions"]
    src = out2.image.source[:, 1:, 1:]
    for b in range(3):
        for i in range(pos.shape[1]):
            cover = src[b, i].nonzero().flatten().tolist()
            assert pos[b, i] == (cover[0] if len(cover) == 1 else -1)
    out3 = m2(*batch, generator=gen(0))
    with pytest.raises(ValueError, match="trace=True"):
        tipl.tip_loss(out3.itm_logits.sum(), out3.fused_image.aux, grid=4)


def test_tip_training_stages(tiny_cfg):
    from vlprune.models.heads import add_task_head
    from vlprune.tasks.finetune import set_stage

    m = vlprune.build_model(tiny_cfg, method=RC("tip", layers=(1, 2)))
    add_task_head(m, "ve")
    set_stage(m, 1)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".reducer." in n or n.startswith("task_heads.") for n in trainable)
    set_stage(m, 2)
    trainable2 = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "fusion.layers.0.cross.q.weight" in trainable2 and not any(n.startswith("vision.") for n in trainable2)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        set_stage(m, 3)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(deadline=None, max_examples=50, derandomize=True)
@given(B=st.integers(1, 3), g=st.integers(2, 5), seed=st.integers(0, 10**6), drop=st.floats(0.0, 0.7))
def test_continuity_matches_naive_on_random_layouts(B, g, seed, drop):
    gen_ = gen(seed)
    N = g * g
    M = N + 1  # one extra non-patch token (e.g. a fused one)
    pos = torch.stack([torch.cat([torch.randperm(N, generator=gen_), torch.tensor([-1])]) for _ in range(B)])
    gone = torch.rand(B, M, generator=gen_) < drop
    pos = pos.masked_fill(gone, -1)
    p = torch.rand(B, M, generator=gen_)
    if not any(naive_has_pair(pos[b], g) for b in range(B)):
        assert float(tipl.continuity_loss_layer(p, pos, g)) == 0.0
        return
    assert abs(float(tipl.continuity_loss_layer(p, pos, g)) - naive_b.continuity_one_layer(p, pos, g)) < 1e-6


def naive_has_pair(pos, g):
    cells = {int(c) for c in pos if int(c) >= 0}
    return any(abs(a // g - b // g) <= 1 and abs(a % g - b % g) <= 1 and a != b for a in cells for b in cells)


@settings(deadline=None, max_examples=50, derandomize=True)
@given(B=st.integers(1, 4), M=st.integers(1, 20), seed=st.integers(0, 10**6))
def test_st_keep_mask_is_hard_and_nested(B, M, seed):
    gen_ = gen(seed)
    logp = torch.randn(B, M, 2, generator=gen_).log_softmax(-1)
    prev = (torch.rand(B, M, generator=gen_) < 0.5).float()
    hard = Fn.st_keep_mask(logp, gen(seed), prev)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert (hard <= prev).all()
    assert torch.equal(hard, Fn.st_keep_mask(logp, gen(seed), prev))
