"""What a reducer receives in each kind of slot (SlotInput) and the one function applying its plan."""

import torch

import vlprune
from vlprune.reduce import functional as Fn
from vlprune.reduce.registry import Reducer
from vlprune.reduce.slots import Plan, apply_plan
from vlprune.reduce.state import FUSED, KEPT, TokenState

from conftest import make_batch


class Spy(Reducer):
    """Records the slot input and passes the state through."""

    def __init__(self, where="mid"):
        super().__init__()
        self.where, self.seen = where, []

    def forward(self, state, slot, ctx):
        self.seen.append((slot, ctx, state.num_tokens))
        return state


def _spy(model, group, layer, where="mid"):
    spy = Spy(where)
    model.reduction_slots()[group][layer].reducer = spy
    return spy


def test_vision_joint_and_fusion_slots(tiny_cfg, tiny_vilt_cfg):
    torch.manual_seed(0)
    model = vlprune.build_model(tiny_cfg).eval()
    vis, fus, pre = _spy(model, "vision", 1), _spy(model, "fusion", 0), _spy(model, "vision", 0, where="pre")
    images, ids, mask = make_batch(tiny_cfg)
    with torch.no_grad():
        model(images, ids, mask)
    slot, _, T = vis.seen[0]
    assert slot.kind == "vision" and slot.queries.shape[2] == slot.keys.shape[2] == T
    h = torch.randn(3, 2, 32)
    layer = model.vision.layers[1]
    assert torch.equal(slot.project_query(h), layer.attn.project_query(layer.ln1(h)))
    slot, ctx, T = fus.seen[0]
    assert slot.kind == "fusion" and slot.queries.shape[2] == ids.shape[1] and slot.keys.shape[2] == T
    assert torch.equal(slot.text_mask, mask) and slot.text_queries is slot.queries
    assert torch.equal(slot.project_query(h), model.fusion.layers[0].cross.project_query(h))
    slot, _, _ = pre.seen[0]
    assert slot.queries is None and slot.keys is None
    vilt = vlprune.build_model(tiny_vilt_cfg).eval()
    joint = _spy(vilt, "joint", 1)
    images, ids, mask = make_batch(tiny_vilt_cfg)
    with torch.no_grad():
        vilt(images, ids, mask)
    slot, ctx, T = joint.seen[0]
    assert slot.kind == "joint" and slot.queries.shape[2] == slot.keys.shape[2] == T  # the image rows only
    assert slot.text_queries.shape[2] == ids.shape[1] and torch.equal(slot.text_mask, mask)
    assert ctx.guide.shape == (3, 32)


def test_plain_layer_and_lookahead_projections_equal_the_layer(tiny_cfg):
    torch.manual_seed(0)
    model = vlprune.build_model(tiny_cfg).eval()
    layer = model.vision.layers[0]
    x = torch.randn(2, 17, 32)
    want = layer(TokenState.start(x), vlprune.reduce.ReduceContext()).x
    assert torch.equal(layer.plain(x), want)
    q_cls, k = layer.cls_query_and_keys(x)
    _, q, k_full = layer.attn(layer.ln1(x))
    torch.testing.assert_close(q_cls, q[:, :, :1])  # a slice of the weights: equal up to GEMM rounding
    torch.testing.assert_close(k, k_full)


def test_apply_plan_keep_fuse_merge_and_mask():
    g = torch.Generator().manual_seed(0)
    state = TokenState.start(torch.randn(2, 9, 4, generator=g), trace=True)
    scores = torch.rand(2, 8, generator=g)
    out = apply_plan(state, Plan(scores=scores, k=3, fuse="raw"), 0, "t")
    want = Fn.keep_and_fuse(state.x, state.size, state.source, scores, 3, "raw")
    assert torch.equal(out.x, want[0]) and torch.equal(out.size, want[1]) and torch.equal(out.source, want[2])
    assert out.trace[-1].kind[0].tolist() == [0, KEPT, KEPT, KEPT, FUSED]
    assert apply_plan(state, Plan(scores=scores, k=8), 0, "t").x is state.x  # keep all: untouched
    merged = apply_plan(state, Plan(merge=Fn.bipartite_soft_matching(state.x, 2), prop_attn=True), 0, "t")
    assert merged.num_tokens == 7 and merged.prop_attn and merged.size.sum().item() == 18
    masked = apply_plan(state, Plan(mask=(scores > 0.5).float()), 0, "t")
    assert masked.x is state.x and masked.mask.shape == (2, 9) and masked.mask[:, 0].eq(1).all()


def test_fastv_example_keeps_what_the_real_text_attends_to(tiny_cfg):
    """The example method of docs/methods.md against a per-sample loop over heads and real text tokens."""
    import math

    torch.manual_seed(0)
    model = vlprune.build_model(tiny_cfg, method=vlprune.ReduceConfig("fastv", layers=(1,), keep=0.5)).eval()
    seen = {}
    model.fusion.layers[0].cross.register_forward_hook(lambda m, a, out: seen.update(q=out[1], k=out[2]))
    images, ids, mask = make_batch(tiny_cfg)
    with torch.no_grad():
        out = model(images, ids, mask, trace=True)
    rec = out.fused_image.trace[-1]
    assert rec.method == "fastv" and rec.layer == 1 and rec.tokens == 1 + 8
    q, k = seen["q"].double(), seen["k"].double()
    B, H, L, d = q.shape
    for b in range(B):
        real = [i for i in range(L) if mask[b, i]]
        score = [0.0] * (k.shape[2] - 1)
        for h in range(H):
            for i in real:
                row = torch.softmax(q[b, h, i] @ k[b, h].T / math.sqrt(d), dim=0)
                for j in range(1, k.shape[2]):
                    score[j - 1] += float(row[j]) / (H * len(real))
        want = sorted(sorted(range(len(score)), key=lambda j: (-score[j], j))[:8])
        kept = [int(rec.source[b, t, 1:].nonzero()[0]) for t in range(1, rec.tokens)]
        assert kept == want


def test_fastv_example_runs_in_joint_slots_too(tiny_vilt_cfg):
    torch.manual_seed(0)
    model = vlprune.build_model(tiny_vilt_cfg, method=vlprune.ReduceConfig("fastv", layers=(2,), keep=0.5)).eval()
    images, ids, mask = make_batch(tiny_vilt_cfg)
    with torch.no_grad():
        out = model(images, ids, mask, trace=True)
        padded = model(images, torch.nn.functional.pad(ids, (0, 5)), torch.nn.functional.pad(mask, (0, 5)), trace=True)
    assert [(r.layer, r.tokens) for r in out.image.trace] == [(2, 9)]
    assert torch.equal(out.image.trace[0].source, padded.image.trace[0].source)  # padding does not vote
