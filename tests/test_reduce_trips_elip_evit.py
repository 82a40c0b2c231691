"""TRIPS, ELIP, EViT and random against naive references, and the invariants of score-and-select methods: keep
counts, provenance, fusion weights, permutation, batch independence, padding, missing guides, identity at keep 1,
determinism, bad schedules, gradients and default layers."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as TF
from conftest import make_batch
from reference import naive_select as naive

import vlprune
from vlprune import ReduceConfig as RC
from vlprune.reduce import functional as F
from vlprune.reduce.elip import ElipReducer
from vlprune.reduce.evit import EViTReducer
from vlprune.reduce.state import CLS, FUSED, KEPT, ReduceContext, TokenState
from vlprune.reduce.slots import SlotInput
from vlprune.reduce.trips import TripsReducer, text_relevant_scores

N = 16  # tiny: 32 / 8 = 4 x 4 patches

# name -> (config, naive reference call)
VARIANTS = {
    "trips": RC("trips", layers=(1, 3), keep=(0.7, 0.5)),
    "evit": RC("evit", layers=(2, 4), keep=0.6),
    "elip": RC("elip", layers=(2, 3), keep=(0.7, 0.4)),
    "elip-nola": RC("elip", layers=(2, 4), keep=(0.8, 0.5), options={"lookahead": False, "spans": [1, 1]}),
    "random": RC("random", layers=(2, 3), keep=0.6),
    "random-fuse": RC("random", layers=(1, 4), keep=(0.5, 0.7), options={"fuse": True, "seed": 3}),
}


def model_with(method, seed=0, **over):
    torch.manual_seed(seed)
    return vlprune.build_model("tiny", method=method, **over).eval()


def reference(name, model, images, text, i, gen_seed=None):
    rc, v = VARIANTS[name], model.vision
    if name == "trips":
        return naive.trips(v, images[i], text[i, 0], rc.layers, rc.keep)
    if name == "evit":
        return naive.evit(v, images[i], rc.layers, (rc.keep,) * 2)
    if name == "elip":
        return naive.elip(v, images[i], text[i, 0], rc.layers, (1, 2), rc.keep)
    if name == "elip-nola":
        return naive.elip(v, images[i], text[i, 0], rc.layers, (1, 1), rc.keep, lookahead=False)
    keeps = rc.keep if isinstance(rc.keep, tuple) else (rc.keep,) * len(rc.layers)
    return naive.random_drop(v, images[i], i, images.shape[0], rc.layers, keeps, gen_seed,
                             rc.options.get("seed", 0), rc.options.get("fuse", False))


def prov_sets(source_row):
    return [frozenset(torch.nonzero(r).flatten().tolist()) for r in source_row]


def run_traced(model, images, ids, mask, generator=None):
    """Image state of a traced pass and the tokens each reducer returned (to read fused tokens)."""
    outs = []
    def keep(m, args, o):
        assert torch.equal(o.x[:, 0], args[0].x[:, 0])  # [CLS] unchanged by the reduction itself
        outs.append(o.x.detach())

    hooks = [r.register_forward_hook(keep) for r in model.reducers().values()]
    try:
        with torch.no_grad():
            text = model.encode_text(ids, mask)
            image = model.encode_image(images, text, mask, generator=generator, trace=True)
    finally:
        for h in hooks:
            h.remove()
    return text, image, outs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_parity(name, batch):
    images, ids, mask = batch
    model = model_with(VARIANTS[name])
    gen_seed = 11 if name == "random" else None
    g = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
    text, image, outs = run_traced(model, images, ids, mask, g)
    assert len(image.trace) == len(outs) and len(outs) > 0
    for i in range(images.shape[0]):
        ref_x, records = reference(name, model, images, text, i, gen_seed)
        torch.testing.assert_close(image.x[i].double(), ref_x, atol=1e-5, rtol=0)
        assert [r["layer"] for r in records] == [t.layer for t in image.trace]
        for rec, tr, out in zip(records, image.trace, outs):
            assert prov_sets(tr.source[i]) == rec["prov"]  # kept index sets (as original patches), in order
            if rec["fused"] is not None:
                assert tr.kind[i, -1] == FUSED
                torch.testing.assert_close(out[i, -1].double(), rec["fused"], atol=1e-5, rtol=0)
            else:
                assert (tr.kind[i] != FUSED).all()


def _count(name, keep, m, n=N):
    if name in ("elip",):
        return max(1, min(m, math.floor(Fraction(repr(keep)) * n)))
    return max(1, min(m, math.ceil(Fraction(repr(keep)) * m)))


@pytest.mark.parametrize(
    "rc,fuses",
    [
        (RC("trips", layers=(1, 2, 3, 4), keep=(0.7, 0.7, 0.55, 0.3)), True),
        (RC("evit", layers=(1, 2, 4), keep=(0.9, 0.35, 0.7)), True),
        (RC("elip", layers=(1, 2, 4), keep=(0.95, 0.6, 0.3)), True),
        (RC("random", layers=(2, 3), keep=(0.45, 0.8)), False),
    ],
)
def test_kept_counts_follow_the_formula(rc, fuses, batch):
    images, ids, mask = batch
    out = model_with(rc)(images, ids, mask, trace=True)
    T = 1 + N
    for tr, keep in zip(out.image.trace, rc.keep):
        m = T - 1
        k = _count(rc.name, keep, m)
        T = 1 + k + (1 if fuses and k < m else 0)
        assert tr.tokens == T, (tr.layer, keep)
        kind = tr.kind
        assert (kind[:, 0] == CLS).all() and (kind[:, 1 : 1 + k] == KEPT).all()
    assert out.image.x.shape[1] == T


@pytest.mark.parametrize("name", list(VARIANTS))
def test_provenance_and_sizes_add_up(name, batch):
    images, ids, mask = batch
    out = model_with(VARIANTS[name])(images, ids, mask, trace=True)
    img = out.image
    eye0 = torch.zeros(1 + N, dtype=torch.bool)
    eye0[0] = True
    for tr in img.trace:
        cover = tr.source.sum(dim=1)  # (B, 1 + N): how many surviving tokens cover each original token
        assert (cover <= 1).all()  # every original patch in at most one token
        if "random" not in name or VARIANTS[name].options.get("fuse"):
            assert (cover == 1).all()  # ... and exactly one when nothing is dropped
        assert torch.equal(tr.source[:, 0], eye0.expand(images.shape[0], -1))  # [CLS] is only itself
    torch.testing.assert_close(img.size, img.source.sum(-1).to(img.size.dtype))


def vit_slot(layer, q=None, k=None):
    """The slot input a ViT layer hands its reducer (q, k None before the attention)."""
    return SlotInput.pre_norm("vision", layer, q, k)


def _layer_state(model, seed=0, T=1 + N):
    """A state after layer 1's attention residual, with that layer's q, k (for unit tests of reducers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 32, generator=g)
    layer = model.vision.layers[1]
    a, q, k = layer.attn(layer.ln1(x))
    state = TokenState.start(x + a, trace=True)
    guide = torch.randn(2, 32, generator=g)
    return layer, state, q, k, guide


def test_fusion_weights_raw_for_trips_and_evit_renormalised_for_elip():
    model = model_with(None)
    layer, state, q, k, guide = _layer_state(model)
    ctx = ReduceContext(guide=guide, layer=1, encoder=model.vision, num_patches=N)
    kk = F.keep_count(0.5, N)
    cases = [
        (TripsReducer(0.5), text_relevant_scores(vit_slot(layer).project_query, k, guide), "raw"),
        (EViTReducer(0.5), F.head_mean_attention(q[:, :, :1], k)[:, 0, 1:], "raw"),
        (ElipReducer(0.5, 1, 0.8, False),
         F.head_mean_attention(layer.attn.project_query(layer.ln1((0.8 * state.x[:, 0] + 0.2 * guide)[:, None])), k)[:, 0, 1:],
         "renorm"),
    ]
    for red, a, mode in cases:
        out = red(state, vit_slot(layer, q, k), ctx)
        _, drop = F.topk_keep(a, kk)
        for b in range(2):
            w = a[b, drop[b]]
            v = state.x[b, 1 + drop[b]]
            assert w.sum() < 0.99  # so that raw and renormalised weights differ
            raw, ren = (w[:, None] * v).sum(0), (w[:, None] * v).sum(0) / (w.sum() + 1e-6)
            want, other = (raw, ren) if mode == "raw" else (ren, raw)
            torch.testing.assert_close(out.x[b, -1], want, atol=1e-6, rtol=0)
            assert not torch.allclose(out.x[b, -1], other, atol=1e-4)


@pytest.mark.parametrize("which", ["trips", "evit", "elip", "elip-nola"])
def test_permuting_candidates_permutes_the_kept_set(which):
    model = model_with(None)
    layer, _, _, _, guide = _layer_state(model)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1 + N, 32, generator=g)
    perm = torch.randperm(N, generator=g)
    xp = torch.cat([x[:, :1], x[:, 1 + perm]], dim=1)
    red = {"trips": TripsReducer(0.6), "evit": EViTReducer(0.6), "elip": ElipReducer(0.6, 2, 0.8, True),
           "elip-nola": ElipReducer(0.6, 1, 0.8, False)}[which]
    results = []
    for inp in (x, xp):
        ctx = ReduceContext(guide=guide, layer=1, encoder=model.vision, num_patches=N)
        if red.where == "pre":
            results.append(red(TokenState.start(inp, trace=True), vit_slot(layer), ctx))
        else:
            a, q, k = layer.attn(layer.ln1(inp))
            results.append(red(TokenState.start(inp + a, trace=True), vit_slot(layer, q, k), ctx))
    base, permuted = results
    for b in range(2):
        kept = set(torch.nonzero(base.source[b, 1:-1, 1:])[:, 1].tolist())
        kept_p = set(perm[torch.nonzero(permuted.source[b, 1:-1, 1:])[:, 1]].tolist())
        assert kept == kept_p
        torch.testing.assert_close(base.x[b, -1], permuted.x[b, -1], atol=1e-5, rtol=0)  # the same fused token


@pytest.mark.parametrize("name", list(VARIANTS))
def test_batch_independence(name, batch):
    images, ids, mask = batch
    model = model_with(VARIANTS[name])
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    with torch.no_grad():
        out = model(images, ids, mask, generator=g(), trace=True)
        images2 = images.clone()
        images2[2] += torch.randn_like(images2[2])
        out2 = model(images2, ids, mask, generator=g(), trace=True)
        for i in (0, 1):
            assert torch.equal(out.image.x[i], out2.image.x[i])
            assert torch.equal(out.itm_logits[i], out2.itm_logits[i])
        if name.startswith("random"):
            return  # random draws depend on the batch position by design (see reduce/random.py)
        for i in range(3):
            one = model(images[i : i + 1], ids[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())],
                        trace=True)
            torch.testing.assert_close(one.image.x[0], out.image.x[i], atol=1e-5, rtol=0)
            for a, b in zip(one.image.trace, out.image.trace):
                assert torch.equal(a.source[0], b.source[i])


@pytest.mark.parametrize("name", ["trips", "elip", "elip-nola"])
def test_padding_leaves_text_guided_selection_unchanged(name, tiny_cfg):
    model = model_with(VARIANTS[name])
    short = make_batch(tiny_cfg)
    images, ids, mask = short
    extra = 30 - ids.shape[1]  # the same captions with more pad tokens (mask only)
    long = (images, TF.pad(ids, (0, extra), value=tiny_cfg.text.pad_token_id), TF.pad(mask, (0, extra), value=0))
    with torch.no_grad():
        a = model(*short, trace=True)
        b = model(*long, trace=True)
    torch.testing.assert_close(a.text[:, 0], b.text[:, 0], atol=1e-6, rtol=0)  # the guide
    for ta, tb in zip(a.image.trace, b.image.trace):
        assert torch.equal(ta.source, tb.source)
    torch.testing.assert_close(a.image.x, b.image.x, atol=1e-5, rtol=0)
    # the scores themselves, with each guide
    layer, _, _, k, _ = _layer_state(model)
    proj = vit_slot(layer).project_query
    torch.testing.assert_close(text_relevant_scores(proj, k[:1].expand(3, -1, -1, -1), a.text[:, 0]),
                               text_relevant_scores(proj, k[:1].expand(3, -1, -1, -1), b.text[:, 0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["trips", "elip", "elip-nola"])
def test_one_token_caption_no_nan_and_fully_padded_raises(name, tiny_cfg):
    model = model_with(VARIANTS[name])
    images, ids, mask = make_batch(tiny_cfg, lengths=(1, 3, 12))
    out = model(images, ids, mask)
    assert torch.isfinite(out.image.x).all() and torch.isfinite(out.itm_logits).all()
    mask[1] = 0
    with pytest.raises(ValueError, match="fully padded"):
        model(images, ids, mask)


def test_missing_guide_raises(batch):
    images, ids, mask = batch
    for rc in (VARIANTS["trips"], VARIANTS["elip"], VARIANTS["elip-nola"]):
        with pytest.raises(ValueError, match="text-guided"):
            model_with(rc).encode_image(images)


@pytest.mark.parametrize(
    "rc",
    [RC("trips", layers=(1, 3), keep=1.0), RC("evit", layers=(1, 2, 3, 4), keep=1.0), RC("elip", layers=(2, 3), keep=1.0),
     RC("elip", layers=(2, 3), keep=1.0, options={"lookahead": False}), RC("random", layers=(2,), keep=1.0),
     RC("lowres", options={"image_size": 32})],
)
def test_keep_one_is_the_unpruned_model(rc, batch):
    images, ids, mask = batch
    base = model_with(None)
    with torch.no_grad():
        want = base(images, ids, mask)
        vlprune.attach(base, rc)
        got = base(images, ids, mask)
    for a, b in ((want.image.x, got.image.x), (want.fused, got.fused), (want.itm_logits, got.itm_logits)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eval_is_deterministic(name, batch):
    model = model_with(VARIANTS[name])
    with torch.no_grad():
        a, b = model(*batch), model(*batch)
    assert torch.equal(a.image.x, b.image.x) and torch.equal(a.itm_logits, b.itm_logits)


@pytest.mark.parametrize(
    "rc,match",
    [
        (RC("trips", layers=(2,), keep=float("nan")), r"keep.*\(0, 1\]"),
        (RC("trips", layers=(2,), keep=0.0), r"keep.*\(0, 1\]"),
        (RC("evit", layers=(2,), keep=1.5), r"keep.*\(0, 1\]"),
        (RC("evit", layers=(2,), keep=-0.1), r"keep.*\(0, 1\]"),
        (RC("trips", layers=(2, 5)), r"layer 5 out of range.*\[1, 4\]"),
        (RC("evit", layers=(0, 2)), r"layer 0 out of range"),
        (RC("trips", layers=(2, 3), keep=(0.5, 0.5, 0.5)), "3 values but there are 2 layers"),
        (RC("elip", layers=(1, 3), options={"lookahead": False}), "no block can start at layer 1"),
        (RC("elip", layers=(2, 3), options={"spans": [2, 1]}), "span 2 ends at layer 3, past the next block start 3"),
        (RC("elip", layers=(2, 4), options={"spans": [1, 2]}), "span 2 ends at layer 5, past the last layer 4"),
        (RC("elip", layers=(2, 3), keep=(0.5, 0.7)), "must not increase"),
        (RC("elip", layers=(2, 3), keep=(0.5, 0.4, 0.3)), "3 keep ratios"),
        (RC("elip", layers=(2,), options={"lam": 1.5}), r"lam must be in \[0, 1\], got 1.5"),
        (RC("trips", layers=(2,), options={"r": 3}), r"unknown option.*\['r'\]"),
        (RC("random", layers=(2,), options={"like": "tome"}), "like must be one of"),
        (RC("lowres", options={"image_size": 20}), r"multiple of the patch size 8 in \[8, 32\], got 20"),
        (RC("lowres", layers=(2,)), "takes no layers"),
    ],
)
def test_bad_schedules_raise(rc, match):
    with pytest.raises(ValueError, match=match):
        model_with(rc)


@pytest.mark.parametrize("layers", [(3, 2), (2, 2)])
def test_unsorted_or_duplicate_layers_raise(layers):
    with pytest.raises(ValueError, match="sorted and unique"):
        model_with(RC("trips", layers=layers))


def test_text_and_vision_width_mismatch_raises():
    with pytest.raises(ValueError, match="text.width=48, vision.width=32"):
        model_with(RC("trips", layers=(2,)), **{"text.width": 48})


def test_trips_gradients_flow_through_scores_and_tokens(batch):
    images, ids, mask = batch
    model = model_with(RC("trips", layers=(2, 3), keep=0.5))
    text = model.encode_text(ids, mask).detach().requires_grad_(True)
    model.encode_image(images, text, mask).x.pow(2).sum().backward()
    assert text.grad is not None and text.grad[:, 0].abs().sum() > 0  # only through a (the guide's only use)
    assert text.grad[:, 1:].abs().sum() == 0
    first = model.vision.layers[0]
    assert first.attn.qkv.weight.grad.abs().sum() > 0 and first.mlp.fc1.weight.grad.abs().sum() > 0  # through v
    sel = model.vision.layers[1]
    assert sel.ln1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("lookahead", [True, False])
def test_elip_selection_weights_carry_no_gradient(lookahead, batch):
    images, ids, mask = batch
    model = model_with(RC("elip", layers=(2, 3), keep=(0.6, 0.4), options={"lookahead": lookahead}))
    text = model.encode_text(ids, mask).detach().requires_grad_(True)
    out = model.encode_image(images, text, mask)
    out.x.pow(2).sum().backward()
    assert text.grad is None or text.grad.abs().sum() == 0  # the guide only enters the (stopped) weights
    assert model.vision.layers[0].mlp.fc1.weight.grad.abs().sum() > 0  # the token values carry gradients


def test_vilt_trips_s_runs_with_the_multimodal_guide(tiny_vilt_cfg):
    images, ids, mask = make_batch(tiny_vilt_cfg)
    torch.manual_seed(0)
    model = vlprune.build_model(tiny_vilt_cfg, method=RC("trips", layers=(2, 3), keep=0.5)).eval()
    assert sorted(model.reducers()) == ["joint.2", "joint.3"]
    out = model(images, ids, mask, trace=True)
    assert [t.tokens for t in out.image.trace] == [1 + 8 + 1, 1 + 5 + 1]
    assert torch.isfinite(out.itm_logits).all()
    seen = []
    h = model.layers[1].reducer.register_forward_pre_hook(lambda m, args: seen.append(args[2].guide))
    model(images, ids, mask)
    h.remove()
    assert seen[0].shape == (3, 32)
    with pytest.raises(ValueError, match="two-stream"):
        vlprune.attach(model, RC("elip", layers=(2,)))


def test_scores_use_the_states_attention_bias():
    """Under proportional attention (log size on the keys) the EViT row equals the layer's own attention row and
    the TRIPS row carries the same log(size) term (softmax over the candidates)."""
    from vlprune.models.attention import full_attention_map

    model = model_with(None)
    layer, state, _, _, guide = _layer_state(model)
    size = torch.randint(1, 5, state.size.shape, generator=torch.Generator().manual_seed(2)).float()
    size[:, 0] = 1
    state = TokenState.start(state.x, trace=True).replace(size=size, prop_attn=True)
    bias = state.attn_bias(torch.float32)
    _, q, k = layer.attn(layer.ln1(state.x), bias=bias)
    ctx = ReduceContext(guide=guide, layer=1)
    outs = []
    for red in (EViTReducer(0.5), TripsReducer(0.5)):
        h = red.register_forward_hook(lambda m, a, o: outs.append(o))
        red(state, vit_slot(layer, q, k), ctx)
        h.remove()
    evit_row = full_attention_map(q[:, :, :1], k, bias)[:, :, 0, 1:].mean(1)
    qt = layer.attn.project_query(layer.ln1(guide[:, None]))
    trips_row = full_attention_map(qt, k[:, :, 1:], bias[..., 1:])[:, :, 0].mean(1)
    kk = F.keep_count(0.5, N)
    for out, row in zip(outs, (evit_row, trips_row)):
        _, drop = F.topk_keep(row, kk)
        for b in range(2):
            want = (row[b, drop[b], None] * state.x[b, 1 + drop[b]]).sum(0)
            torch.testing.assert_close(out.x[b, -1], want, atol=1e-6, rtol=0)
            torch.testing.assert_close(out.size[b, -1], size[b, 1 + drop[b]].sum())


def test_default_layers_on_another_depth_are_spread_evenly(caplog):
    for rc, want in ((RC("trips"), ["vision.2", "vision.3"]), (RC("evit"), ["vision.2", "vision.3", "vision.4"]),
                     (RC("elip", options={"lookahead": False}), ["vision.1", "vision.2", "vision.3"]),
                     (RC("random", options={"like": "evit"}), ["vision.2", "vision.3", "vision.4"])):
        with caplog.at_level("WARNING"):
            assert sorted(model_with(rc).reducers()) == want
        assert "uniform_layers" in caplog.text
    assert [r.span for r in model_with("elip").reducers().values()] == [1, 1, 1]
    with pytest.raises(ValueError, match=r"default schedule has 2 layers \(5, 10\).*this model has 2 layers"):
        model_with(RC("trips"), **{"vision.layers": 2})
