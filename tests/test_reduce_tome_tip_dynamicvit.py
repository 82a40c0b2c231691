"""ToMe, DynamicViT, TiP and LAPS: reference parity, counts, merge semantics, identity, masked = physical paths,
gradients, determinism, losses against hand computations, batch independence and precision (tiny configs)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vlprune
from conftest import make_batch
from reference import naive_merge_learned as naive_b
from vlprune import ReduceConfig as RC
from vlprune.objectives import dynamicvit as dvl
from vlprune.objectives import laps as lapl
from vlprune.objectives import tip as tipl
from vlprune.reduce import functional as Fn
from vlprune.reduce.laps import laps_similarity
from vlprune.reduce.registry import Reducer
from vlprune.reduce.state import KEPT, MERGED, TokenState, policy_bias
from vlprune.reduce.tome import ToMeReducer

SETTINGS = settings(deadline=None, max_examples=50, derandomize=True)


def vilt_cfg():
    return vlprune.ModelConfig(
        arch="vilt",
        vision=vlprune.VisionConfig(image_size=32, patch_size=8, width=32, layers=4, heads=4, mlp_dim=37),
        text=vlprune.TextConfig(vocab_size=101, width=32, layers=0, heads=4, mlp_dim=37, max_len=40),
        fusion_layers=0,
    )


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- ToMe ---------------------------------------------------------------------------------------------------


def _rand_state(B, T, D, seed, trace=True):
    g = gen(seed)
    x = torch.randn(B, T, D, generator=g)
    state = TokenState.start(x, trace=trace)
    size = torch.randint(1, 4, (B, T), generator=g).float()
    size[:, 0] = 1.0  # [CLS] always stands for itself
    return state.replace(size=size), torch.randn(B, T, 5, generator=g)


@SETTINGS
@given(B=st.integers(1, 3), M=st.integers(3, 32), D=st.integers(1, 8), seed=st.integers(0, 10**6), data=st.data())
def test_tome_merge_matches_naive(B, M, D, seed, data):
    r = data.draw(st.integers(0, (M - 1) // 2))
    state, metric = _rand_state(B, 1 + M, D, seed)
    unm, src, dst = Fn.bipartite_soft_matching(metric, r)
    x, size = Fn.merge_wavg(state.x, state.size, unm, src, dst)
    source = Fn.merge_source(state.source, unm, src, dst)
    assert x.shape == (B, 1 + M - r, D) and size.shape == (B, 1 + M - r)
    for b in range(B):
        rx, rs, rsrc = naive_b.tome_merge_one(state.x[b], state.size[b], state.source[b], metric[b], r)
        torch.testing.assert_close(x[b], rx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(size[b], rs)
        assert torch.equal(source[b], rsrc)
    # sizes add up, every original token in exactly one surviving token, [CLS] first and untouched
    torch.testing.assert_close(size.sum(1), state.size.sum(1))
    assert torch.equal(source.sum(1), torch.ones(B, 1 + M, dtype=torch.long))
    assert torch.equal(x[:, 0], state.x[:, 0])


@SETTINGS
@given(B=st.integers(1, 3), M=st.integers(3, 20), seed=st.integers(0, 10**6))
def test_merged_token_is_size_weighted_mean_of_members(B, M, seed):
    state, metric = _rand_state(B, 1 + M, 4, seed)
    r = (M - 1) // 2
    unm, src, dst = Fn.bipartite_soft_matching(metric, r)
    x, size = Fn.merge_wavg(state.x, state.size, unm, src, dst)
    source = Fn.merge_source(state.source, unm, src, dst)
    for b in range(B):
        for t in range(x.shape[1]):
            members = source[b, t].nonzero().flatten()
            w = state.size[b, members]
            expect = (state.x[b, members] * w[:, None]).sum(0) / w.sum()
            torch.testing.assert_close(x[b, t], expect, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(size[b, t], w.sum())


def test_tome_r_too_large_raises(tiny_cfg):
    with pytest.raises(ValueError, match=r"r=8 .* must be in \[0, 7\]"):
        vlprune.build_model(tiny_cfg, method=RC("tome", layers=(1,), options={"r": 8}))
    with pytest.raises(ValueError, match="layer 3"):
        vlprune.build_model(tiny_cfg, method=RC("tome", layers=(1, 2, 3), options={"r": [5, 4, 4]}))
    with pytest.raises(ValueError, match="must be in"):
        Fn.bipartite_soft_matching(torch.randn(1, 9, 4), 4)
    with pytest.raises(ValueError, match="keep must be None"):
        vlprune.build_model(tiny_cfg, method=RC("tome", keep=0.5))
    with pytest.raises(ValueError, match="schedule"):
        vlprune.build_model(tiny_cfg, method=RC("tome", options={"schedule": "up"}))


def test_tome_r0_is_identity(tiny_cfg, batch):
    base = vlprune.build_model(tiny_cfg).eval()
    m = vlprune.attach(copy.deepcopy(base), RC("tome", options={"r": 0})).eval()
    a, b = base(*batch), m(*batch)
    assert torch.equal(a.itm_logits, b.itm_logits) and torch.equal(a.image.x, b.image.x)


def test_tome_counts_provenance_and_prop_attn(tiny_cfg, batch):
    m = vlprune.build_model(tiny_cfg, method=RC("tome", options={"r": 3})).eval()
    out = m(*batch, trace=True)
    N = tiny_cfg.vision.num_patches
    assert [t.tokens for t in out.image.trace] == [1 + N - 3 * i for i in range(1, 5)]
    assert out.image.prop_attn
    last = out.image.trace[-1]
    assert torch.equal(last.source.sum(1), torch.ones(3, 1 + N, dtype=torch.long))
    torch.testing.assert_close(out.image.size.sum(1), torch.full((3,), 1.0 + N))
    assert ((last.kind == MERGED) | (last.kind == KEPT))[:, 1:].all()
    # decreasing schedule: 2r ... 0, same total
    m2 = vlprune.build_model(tiny_cfg, method=RC("tome", layers=(1, 2, 3), options={"r": 2, "schedule": "decreasing"}))
    assert [r.r for r in m2.reducers().values()] == [4, 2, 0]


class NaiveToMe(Reducer):
    """ToMe through the per-sample reference (same prop_attn handling)."""

    where = "mid"

    def __init__(self, r):
        super().__init__()
        self.r = r

    def forward(self, state, slot, ctx):
        metric = slot.keys.mean(1)
        outs = [naive_b.tome_merge_one(state.x[b], state.size[b], state.source[b], metric[b], self.r)
                for b in range(state.x.shape[0])]
        x, size, src = (torch.stack(t) for t in zip(*outs))
        return state.replace(x=x, size=size, source=src, prop_attn=True)


@pytest.mark.parametrize("arch", ["albef", "vilt"])
def test_tome_model_matches_naive_reducer(arch, tiny_cfg, batch):
    cfg = tiny_cfg if arch == "albef" else vilt_cfg()
    m = vlprune.build_model(cfg, method=RC("tome", layers=(1, 3), options={"r": [4, 2]})).eval()
    naive = copy.deepcopy(m)
    slots = naive.reduction_slots()["vision" if arch == "albef" else "joint"]
    slots[0].reducer, slots[2].reducer = NaiveToMe(4), NaiveToMe(2)
    a, b = m(*batch, trace=True), naive(*batch, trace=True)
    torch.testing.assert_close(a.itm_logits, b.itm_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.image.x, b.image.x, atol=1e-5, rtol=1e-5)


# ---- inference selection parity (DynamicViT, TiP) -----------------------------------------------------------


@pytest.mark.parametrize("method", ["dynamicvit", "tip"])
def test_inference_selection_matches_naive(method, tiny_cfg, batch):
    cfg_m = RC("dynamicvit", layers=(2, 3), keep=0.6) if method == "dynamicvit" else RC("tip", layers=(1, 2), keep=0.6)
    m = vlprune.build_model(tiny_cfg, method=cfg_m).eval()
    out = m(*batch, trace=True)
    state = out.fused_image
    traces = [t for t in state.trace if t.method == method]
    N = tiny_cfg.vision.num_patches
    prev_src = torch.eye(1 + N, dtype=torch.bool).expand(3, -1, -1)
    for rec, tr in zip([a for a in state.aux if a.method == method], traces):
        p = rec.values["keep_prob"]
        M = p.shape[1]
        k = (max(1, min(M, math.floor(rec.values["target"] * N + 1e-9))) if method == "dynamicvit"
             else max(1, min(M, math.ceil(0.6 * M - 1e-9))))
        assert tr.tokens == 1 + k
        for b in range(3):
            idx = naive_b.topk_indices_one(p[b], k)
            expect = prev_src[b][[0] + [i + 1 for i in idx]]
            assert torch.equal(tr.source[b], expect)
        prev_src = tr.source


# ---- masked training path == physically pruned path ------------------------------------------------------


class Forced(Reducer):
    """Keeps the given current-candidate indices (one sample) physically."""

    def __init__(self, where, idx):
        super().__init__()
        self.where, self.idx = where, idx

    def forward(self, state, slot, ctx):
        i = torch.tensor([[0] + [j + 1 for j in self.idx]])
        return state.replace(x=Fn.gather_tokens(state.x, i), size=Fn.gather_tokens(state.size, i))


def _forced_model(model, group, layers, masks, b, where):
    fm = copy.deepcopy(model).eval()
    slots = fm.reduction_slots()[group]
    cur = list(range(masks[0].shape[1]))  # original candidate index of each current candidate
    for layer, mask in zip(layers, masks):
        keep = [i for i in cur if mask[b, i] > 0]
        slots[layer - 1].reducer = Forced(where, [cur.index(i) for i in keep])
        cur = keep
    return fm, cur


@pytest.mark.parametrize("case", ["dynamicvit", "tip-albef", "tip-vilt"])
def test_masked_training_path_equals_physical(case, tiny_cfg, batch):
    if case == "dynamicvit":
        cfg, method, group, layers, where = tiny_cfg, RC("dynamicvit", layers=(2, 3), keep=0.6), "vision", (2, 3), "pre"
    elif case == "tip-albef":
        cfg, method, group, layers, where = tiny_cfg, RC("tip", layers=(1, 2), keep=0.5), "fusion", (1, 2), "mid"
    else:
        cfg, method, group, layers, where = vilt_cfg(), RC("tip", layers=(1, 3), keep=0.5), "joint", (1, 3), "mid"
    m = vlprune.build_model(cfg, method=method).train()
    out = m(*batch, generator=gen(3))
    masks = [a.values["mask"].detach() for a in out.fused_image.aux] if cfg.arch == "albef" else \
        [a.values["mask"].detach() for a in out.image.aux]
    for mk in masks:
        assert set(mk.unique().tolist()) <= {0.0, 1.0}
    assert all((b <= a).all() for a, b in zip(masks, masks[1:]))  # multiplied by the previous mask
    for b in range(3):
        fm, kept = _forced_model(m, group, layers, masks, b, where)
        one = fm(*(t[b:b + 1] for t in batch))
        torch.testing.assert_close(one.itm_logits, out.itm_logits[b:b + 1], atol=1e-5, rtol=1e-5)
        if cfg.arch == "vilt" or case == "dynamicvit":
            full = out.image.x[b, [0] + [i + 1 for i in kept]]
            torch.testing.assert_close(one.image.x[0], full, atol=1e-5, rtol=1e-5)


# ---- gradients, determinism, identity, batch independence, precision ------------------------------------


LEARNED = {
    "dynamicvit": (None, RC("dynamicvit", layers=(2, 3), keep=0.6)),
    "tip-albef": (None, RC("tip", layers=(1, 2))),
    "tip-vilt": ("vilt", RC("tip", layers=(1, 3))),
}


def _build(arch, method, tiny_cfg):
    return vlprune.build_model(vilt_cfg() if arch == "vilt" else tiny_cfg, method=method)


def _method_loss(model, out, name):
    aux = out.fused_image.aux if hasattr(out, "fused_image") else out.image.aux
    task = out.itm_logits.pow(2).mean()
    if name == "dynamicvit":
        return dvl.dynamicvit_loss(task, aux)["total"]
    return tipl.tip_loss(task, aux, grid=4, student_logits=out.itm_logits, teacher_logits=out.itm_logits.detach() * 0.5)["total"]


@pytest.mark.parametrize("name", list(LEARNED))
def test_gradients_reach_every_method_parameter(name, tiny_cfg, batch):
    arch, method = LEARNED[name]
    m = _build(arch, method, tiny_cfg).train()
    out = m(*batch, generator=gen(1))
    _method_loss(m, out, name).backward()
    allow = set()  # no reducer parameter is expected to get no gradient
    for slot, r in m.reducers().items():
        for pname, p in r.named_parameters():
            if f"{slot}.{pname}" in allow:
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{slot}.{pname} got no gradient"


def test_task_gradient_reaches_predictor_through_masked_attention(tiny_cfg, batch):
    """The straight-through mask carries the task loss into the predictors (no auxiliary loss)."""
    m = _build(None, RC("dynamicvit", layers=(2, 3), keep=0.6), tiny_cfg).train()
    out = m(*batch, generator=gen(1))
    out.itm_logits.pow(2).mean().backward()
    for slot, r in m.reducers().items():
        assert r.predictor.in_conv[1].weight.grad.abs().sum() > 0, slot


@pytest.mark.parametrize("name", list(LEARNED))
def test_seeded_train_reproduces_and_eval_deterministic(name, tiny_cfg, batch):
    arch, method = LEARNED[name]
    m = _build(arch, method, tiny_cfg).train()
    a, b = m(*batch, generator=gen(5)), m(*batch, generator=gen(5))
    assert torch.equal(a.itm_logits, b.itm_logits)
    m.eval()
    assert torch.equal(m(*batch).itm_logits, m(*batch).itm_logits)


@pytest.mark.parametrize("arch,method", [(None, RC("dynamicvit", layers=(2, 3), keep=1.0)),
                                         (None, RC("tip", layers=(1, 2), keep=1.0)),
                                         ("vilt", RC("tip", layers=(1, 3), keep=1.0)),
                                         ("vilt", RC("tome", options={"r": 0}))])
def test_keep_one_is_identity(arch, method, tiny_cfg, batch):
    base = (vlprune.build_model(vilt_cfg()) if arch == "vilt" else vlprune.build_model(tiny_cfg)).eval()
    m = vlprune.attach(copy.deepcopy(base), method).eval()
    assert torch.equal(base(*batch).itm_logits, m(*batch).itm_logits)


@pytest.mark.parametrize("name", ["tome", "dynamicvit", "tip-albef", "tip-vilt"])
def test_batch_independence(name, tiny_cfg, batch):
    arch, method = LEARNED.get(name, (None, RC("tome", options={"r": 3})))
    m = _build(arch, method, tiny_cfg).eval()
    images, ids, mask = batch
    out = m(images, ids, mask).itm_logits
    images2 = images.clone()
    images2[2] += torch.randn(images2[2].shape, generator=gen(9))
    out2 = m(images2, ids, mask).itm_logits
    assert torch.equal(out[:2], out2[:2])
    for b in range(3):
        torch.testing.assert_close(m(images[b:b + 1], ids[b:b + 1, : int(mask[b].sum())], mask[b:b + 1, : int(mask[b].sum())]).itm_logits[0], out[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tome", "dynamicvit", "tip-albef", "tip-vilt"])
def test_bf16_cpu_no_nan(name, tiny_cfg, batch):
    arch, method = LEARNED.get(name, (None, RC("tome", options={"r": 3})))
    m = _build(arch, method, tiny_cfg).to(torch.bfloat16)
    images, ids, mask = batch
    m.train()
    assert torch.isfinite(m(images.bfloat16(), ids, mask, generator=gen(0)).itm_logits.float()).all()
    m.eval()
    assert torch.isfinite(m(images.bfloat16(), ids, mask).itm_logits.float()).all()


def test_dynamicvit_and_tip_config_errors(tiny_cfg):
    with pytest.raises(ValueError, match="non-increasing"):
        vlprune.build_model(tiny_cfg, method=RC("dynamicvit", layers=(2, 3), keep=(0.5, 0.7)))
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        vlprune.build_model(tiny_cfg, method=RC("tip", layers=(1,), keep=1.5))
    with pytest.raises(ValueError, match="out of range"):
        vlprune.build_model(tiny_cfg, method=RC("dynamicvit", layers=(2, 9)))
    with pytest.raises(ValueError, match="no ViT|none"):
        vlprune.build_model(vilt_cfg(), method="dynamicvit")


# ---- straight-through path: gradchecks ----------------------------------------------------------------------


def test_st_backward_equals_soft_gumbel_gradient():
    logits = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    hard = Fn.st_keep_mask(logits, gen(4))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    w = torch.randn(2, 5, dtype=torch.float64)
    (g_st,) = torch.autograd.grad((hard * w).sum(), logits)
    noise = Fn.gumbel_noise(logits.shape, gen(4), logits.device, logits.dtype)
    soft = (logits + noise).softmax(-1)[..., 0]
    (g_soft,) = torch.autograd.grad((soft * w).sum(), logits)
    torch.testing.assert_close(g_st, g_soft)


def test_gradcheck_policy_masked_attention_and_softmax():
    g = gen(0)
    q, k, v = (torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    p = (torch.rand(1, 4, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    eye = torch.eye(4, dtype=torch.bool)

    def attn(q, k, v, p):
        pp = p[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=policy_bias(pp + (1 - pp) * eye, torch.float64))

    assert torch.autograd.gradcheck(attn, (q, k, v, p))
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pol = (torch.rand(2, 1, 5, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: Fn.policy_softmax(a, b), (logits, pol))
    # with a hard policy the forward is a softmax over the kept entries only
    hard = torch.tensor([[[1.0, 0.0, 1.0, 1.0, 0.0]]], dtype=torch.float64)
    out = Fn.policy_softmax(logits.detach(), hard)
    torch.testing.assert_close(out[..., [0, 2, 3]], logits.detach()[..., [0, 2, 3]].softmax(-1))
    assert (out[..., [1, 4]] == 0).all()
