"""TRIPS ``placement="pre"``: selection before layer j's attention with its own LN1 / W_q / W_k on the incoming
tokens, against a naive float64 reference; identity at keep 1; counted FLOPs = the analytic count, with layer
j's attention on the kept tokens; the default placement unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch
from reference.naive_select import (_record, attention_by_hand, ceil_count, prune, query_row_by_hand,
                                    run_vit)

import vlprune
from vlprune import ReduceConfig as RC
from vlprune.bench.flops import analytic_flops, count_flops, layer_tokens

PRE = RC("trips", layers=(1, 3), keep=(0.7, 0.5), options={"placement": "pre"})


def naive_trips_pre(vision, image, guide, layers, keeps):
    """Per sample, float64: at layer j, before its attention, keys W_k(LN1(x)) of the incoming tokens and the
    guide's head-mean softmax over the candidates; keep ceil(r M), fuse the rest with the raw weights."""
    guide = guide.double()

    def make(keep):
        def hook(stage, c):
            if stage != "pre":
                return None
            M = c["x"].shape[0] - 1
            k = ceil_count(keep, M)
            if k == M:
                return None
            _, _, _, keys = attention_by_hand(c["layer"].attn, c["layer"].ln1(c["x"]))
            a = query_row_by_hand(c["layer"].attn, c["layer"].ln1, guide, keys, slice(1, None)).tolist()
            x, prov, kept, fused = prune(c["x"], c["prov"], a, k, "raw")
            return x, prov, _record(c["index"], prov, kept, fused)
        return hook

    return run_vit(vision, image, {l - 1: make(kp) for l, kp in zip(layers, keeps)})


def _model(method, seed=0):
    torch.manual_seed(seed)
    return vlprune.build_model("tiny", method=method).eval()


def test_pre_matches_the_naive_reference():
    model = _model(PRE)
    images, ids, mask = make_batch(model.cfg)
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        image = model.encode_image(images, text, mask, trace=True)
    for i in range(images.shape[0]):
        ref_x, records = naive_trips_pre(model.vision, images[i], text[i, 0], PRE.layers, PRE.keep)
        torch.testing.assert_close(image.x[i].double(), ref_x, atol=1e-5, rtol=0)
        assert [r["layer"] for r in records] == [t.layer for t in image.trace] == [1, 3]
        for rec, tr in zip(records, image.trace):
            kept = [frozenset(torch.nonzero(r).flatten().tolist()) for r in tr.source[i]]
            assert kept == rec["prov"]


def test_pre_differs_from_mid_and_default_is_mid():
    images, ids, mask = make_batch(vlprune.load_preset("tiny"))
    mid = _model(RC("trips", layers=(1, 3), keep=(0.7, 0.5)))
    pre = _model(PRE)
    assert mid.vision.layers[0].reducer.where == "mid" and pre.vision.layers[0].reducer.where == "pre"
    default = [layer.reducer for layer in _model("trips").vision.layers if layer.reducer is not None]
    assert default and all(r.where == "mid" for r in default)  # no option: the placement is unchanged
    with torch.no_grad():
        assert not torch.allclose(mid(images, ids, mask).itm_logits, pre(images, ids, mask).itm_logits)


def test_keep_one_is_the_unpruned_model():
    images, ids, mask = make_batch(vlprune.load_preset("tiny"))
    base = _model(None)
    same = _model(RC("trips", layers=(1, 2, 3, 4), keep=1.0, options={"placement": "pre"}))
    with torch.no_grad():
        a, b = base(images, ids, mask), same(images, ids, mask)
    assert torch.equal(a.itm_logits, b.itm_logits)


def test_counted_flops_equal_the_analytic_count_with_attention_on_the_kept_tokens():
    cfg = vlprune.config.override(vlprune.load_preset("tiny"), use_momentum=False, queue_size=0)
    torch.manual_seed(0)
    model = vlprune.build_model(cfg, PRE).eval()
    images, ids, mask = make_batch(cfg, lengths=(5, 5))
    counted = count_flops(model, images, ids, mask)
    lt = layer_tokens(model, images, ids, mask)
    analytic = analytic_flops(cfg, ids.shape[1], lt, batch=2)
    assert counted.total - counted.select == analytic["total"]
    rows = lt.layers["vision"]
    n = cfg.vision.num_patches  # 16 patches: layer 1 keeps ceil(0.7 * 16) = 12 + 1 fused; layer 3 ceil(0.5 * 13) + 1
    assert [(r.attn, r.mlp) for r in rows] == [(1 + 12 + 1,) * 2, (14, 14), (1 + 7 + 1,) * 2, (9, 9)]
    assert rows[0].attn < 1 + n  # layer 1's attention already runs on the kept tokens
    assert counted.select > 0  # the selection's own key projection is counted apart


def test_pre_is_refused_in_a_single_stream_model(tiny_vilt_cfg):
    with pytest.raises(ValueError, match="placement='pre' reduces before a ViT layer's attention"):
        vlprune.build_model(tiny_vilt_cfg, RC("trips", layers=(2,), keep=0.5, options={"placement": "pre"}))
    with pytest.raises(ValueError, match="placement"):
        vlprune.build_model("tiny", RC("trips", options={"placement": "post"}))
