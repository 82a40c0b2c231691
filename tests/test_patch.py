"""vlprune.patch on tiny random Hugging Face models (BLIP, CLIP, ViLT) built by the tests: identity at keep 1.0,
exact unpatch, save/reload, token counts, a naive per-sample reference, batch independence, padding, learned
methods' gradients and the errors."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import vlprune  # noqa: E402
from vlprune.patch import get_patch  # noqa: E402

import hf_tiny  # noqa: E402
from hf_tiny import B, N, inputs  # noqa: E402
from reference.naive_hf_patch import bridgetower_elip, vision_tower  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


def _tensor(out):
    """The output tensors a caller reads, by class (logits / scores / embeddings)."""
    for name in ("itm_score", "logits", "logits_per_image", "pooler_output", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out


def _call(model, px, ids, mask, **kw):
    torch.manual_seed(0)  # ViLT's image embedding shuffles the patches with the global generator
    name = type(model).__name__
    if name in ("CLIPVisionModel",):
        return model(pixel_values=px, **kw)
    if name == "BlipForQuestionAnswering":
        kw = dict(kw, decoder_input_ids=ids)
    if name == "BlipForConditionalGeneration":
        return model(pixel_values=px, input_ids=ids, attention_mask=mask, **kw)
    return model(input_ids=ids, pixel_values=px, attention_mask=mask, **kw)


CASES = [  # (builder, class, method, options) with keep 1.0 (ToMe: r = 0)
    (hf_tiny.blip, "BlipForImageTextRetrieval", "trips", dict(layers=(2, 3), keep=1.0)),
    (hf_tiny.blip, "BlipForQuestionAnswering", "elip", dict(layers=(2, 3), keep=1.0)),
    (hf_tiny.blip, "BlipForConditionalGeneration", "evit", dict(layers=(2,), keep=1.0)),
    (hf_tiny.clip, "CLIPModel", "tome", dict(r=0)),
    (hf_tiny.clip, "CLIPVisionModel", "evit", dict(layers=(1, 3), keep=1.0)),
    (hf_tiny.vilt, "ViltForQuestionAnswering", "trips", dict(layers=(2,), keep=1.0)),
    (hf_tiny.vilt, "ViltForImageAndTextRetrieval", "tip", dict(layers=(2, 3), keep=1.0)),
    (hf_tiny.bridgetower, "BridgeTowerForImageAndTextRetrieval", "tip", dict(layers=(1, 2), keep=1.0)),
    (hf_tiny.bridgetower, "BridgeTowerForMaskedLM", "tip", dict(layers=(2,), keep=1.0)),
    (hf_tiny.bridgetower_elip, "BridgeTowerForImageAndTextRetrieval", "elip", dict(layers=(2, 4), keep=1.0)),
    (hf_tiny.bridgetower_elip, "BridgeTowerForMaskedLM", "elip", dict(layers=(1, 3), keep=1.0)),
]


@pytest.mark.parametrize("build,cls,method,opts", CASES, ids=[c[1] + "-" + c[2] for c in CASES])
def test_keep_one_is_the_unpatched_model_and_unpatch_is_exact(build, cls, method, opts):
    model = build(cls)
    px, ids, mask = inputs()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    own = dict(model.__dict__)
    with torch.no_grad():
        ref = _call(model, px, ids, mask)
        vlprune.patch(model, method, **opts)
        assert get_patch(model) is not None
        out = _call(model, px, ids, mask)
        torch.testing.assert_close(_tensor(out), _tensor(ref), **TOL)
        assert get_patch(model).last_tokens == 1 + N  # nothing removed
        vlprune.unpatch(model)
        again = _call(model, px, ids, mask)
    assert torch.equal(_tensor(again), _tensor(ref))
    assert model.__dict__.keys() == own.keys() and all(model.__dict__[k] is own[k] for k in own)
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_blip_trips_equals_the_naive_reference_with_the_text_cls_guide():
    model = hf_tiny.blip("BlipForImageTextRetrieval")
    px, ids, mask = inputs()
    vm = model.vision_model
    with torch.no_grad():
        guide = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        ref = vision_tower(vm.encoder.layers, vm.embeddings(px), 4, "trips", where=(1, 2), keep=0.5, guide=guide)
        vlprune.patch(model, "trips", layers=(2, 3), keep=0.5)
        out = model(input_ids=ids, pixel_values=px, attention_mask=mask).last_hidden_state
    # counts: 16 -> 1 + ceil(8) + 1 fused = 10 -> 1 + ceil(0.5 * 9) + 1 = 7
    assert out.shape == (B, 7, 32) and get_patch(model).last_tokens == 7
    for b in range(B):
        torch.testing.assert_close(out[b], vm.post_layernorm(ref[b]), **TOL)


def test_clip_evit_equals_the_naive_reference():
    model = hf_tiny.clip("CLIPModel")
    px, _, _ = inputs()
    vm = model.vision_model
    with torch.no_grad():
        emb = vm.pre_layrnorm(vm.embeddings(px))
        ref = vision_tower(vm.encoder.layers, emb, 4, "evit", where=(0, 2), keep=0.7)
        vlprune.patch(model, "evit", layers=(1, 3), keep=0.7)
        feats = model.get_image_features(pixel_values=px)
    feats = getattr(feats, "pooler_output", feats)
    expect = model.visual_projection(vm.post_layernorm(torch.stack([r[0] for r in ref])))
    torch.testing.assert_close(feats, expect, **TOL)
    m = math.ceil(0.7 * N) + 1  # candidates after layer 1: kept + the fused token
    assert get_patch(model).last_tokens == 1 + math.ceil(0.7 * m) + 1


@pytest.mark.parametrize("cls", ["BlipForImageTextRetrieval", "ViltForQuestionAnswering"])
def test_batch_independence_and_caption_padding(cls):
    build = hf_tiny.blip if cls.startswith("Blip") else hf_tiny.vilt
    model = build(cls)
    px, ids, mask = inputs()
    vlprune.patch(model, "trips", layers=(2, 3), keep=0.5)
    with torch.no_grad():
        full = _tensor(model(input_ids=ids, pixel_values=px, attention_mask=mask))
        one = _tensor(model(input_ids=ids[2:], pixel_values=px[2:], attention_mask=mask[2:]))
        torch.testing.assert_close(full[2:], one, **TOL)
        # more padding on every caption (mask only) changes nothing
        pad = torch.zeros(B, 3, dtype=ids.dtype)
        padded = _tensor(model(input_ids=torch.cat([ids, pad], 1), pixel_values=px,
                               attention_mask=torch.cat([mask, pad], 1)))
    torch.testing.assert_close(padded, full, **TOL)


def test_blip_itc_stays_text_free_and_vqa_generate_runs():
    model = hf_tiny.blip("BlipForImageTextRetrieval")
    px, ids, mask = inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        vlprune.patch(model, "trips", layers=(2,), keep=0.5)
        itc = model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        assert get_patch(model).last_tokens == 1 + N  # the ITC stage is not text-guided
        torch.testing.assert_close(itc, ref, **TOL)
        vqa = vlprune.patch(hf_tiny.blip("BlipForQuestionAnswering"), "trips", layers=(2,), keep=0.5)
        gen = vqa.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=3)
        assert gen.shape[0] == B and get_patch(vqa).last_tokens == 1 + N // 2 + 1
        cap = vlprune.patch(hf_tiny.blip("BlipForConditionalGeneration"), "tome", r=3)
        assert cap.generate(pixel_values=px, max_new_tokens=3).shape[0] == B
        assert get_patch(cap).last_tokens == 1 + N - 3 * 4


def test_clip_text_guided_needs_a_guide_of_the_vision_width():
    model = vlprune.patch(hf_tiny.clip("CLIPVisionModel"), "trips", layers=(2,), keep=0.5)
    px, _, _ = inputs()
    with pytest.raises(ValueError, match="no guide"):
        model(pixel_values=px)
    with pytest.raises(ValueError, match=r"shape \(B=3, D=32\)"):
        with vlprune.patch.guidance(model, torch.zeros(B, 16)):
            model(pixel_values=px)
    g = torch.randn(B, 32)
    with torch.no_grad(), vlprune.patch.guidance(model, g):
        a = model(pixel_values=px).pooler_output
    assert a.shape == (B, 32) and get_patch(model).last_tokens == 1 + N // 2 + 1


def test_save_pretrained_writes_the_original_weights_and_the_patch_beside(tmp_path):
    import transformers

    model = hf_tiny.clip("CLIPVisionModel")
    px, _, _ = inputs()
    vlprune.patch(model, "dynamicvit", layers=(2, 3), keep=0.7)
    with torch.no_grad():
        for p in get_patch(model).reducers.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        want = model(pixel_values=px).pooler_output
    model.save_pretrained(tmp_path)
    assert (tmp_path / "vlprune_patch.json").is_file() and (tmp_path / "vlprune_patch.pt").is_file()
    fresh = transformers.CLIPVisionModel.from_pretrained(tmp_path).eval()
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    vlprune.patch.load_patch(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixel_values=px).pooler_output, want, **TOL)


@pytest.mark.parametrize("build,cls,method", [(hf_tiny.clip, "CLIPVisionModel", "dynamicvit"),
                                              (hf_tiny.vilt, "ViltForQuestionAnswering", "tip")])
def test_learned_methods_get_gradients_through_a_patched_model(build, cls, method):
    model = build(cls).train()
    px, ids, mask = inputs()
    vlprune.patch(model, method, layers=(2, 3), keep=0.5, generator=torch.Generator().manual_seed(0))
    out = _tensor(_call(model, px, ids, mask))
    out.float().pow(2).sum().backward()
    grads = [p.grad for p in get_patch(model).reducers.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_errors_name_what_is_supported():
    blip = hf_tiny.blip("BlipForImageTextRetrieval")
    with pytest.raises(ValueError, match=r"'tip' is not supported on BlipForImageTextRetrieval.*supported methods: \['none', 'trips'"):
        vlprune.patch(blip, "tip")
    with pytest.raises(ValueError, match="unknown reduction method"):
        vlprune.patch(blip, "nope")
    with pytest.raises(ValueError, match="captioning"):
        vlprune.patch(hf_tiny.blip("BlipForConditionalGeneration"), "trips")
    with pytest.raises(TypeError, match="supported classes"):
        vlprune.patch(torch.nn.Linear(2, 2), "evit")
    with pytest.raises(ValueError, match=r"keep at layer 2 must be in \(0, 1\], got 1.5"):
        vlprune.patch(blip, "evit", layers=(2,), keep=1.5)
    assert get_patch(blip) is None and "forward" not in blip.vision_model.encoder.__dict__  # a failed patch leaves nothing
    px, ids, mask = inputs()
    vlprune.patch(blip, "evit", layers=(2,), keep=0.5)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        blip(input_ids=ids, pixel_values=px, attention_mask=mask, output_attentions=True)
    with pytest.raises(ValueError, match="output_hidden_states=True is not supported"):
        blip(input_ids=ids, pixel_values=px, attention_mask=mask, output_hidden_states=True)


def test_a_patched_model_refuses_deepcopy_and_repatching_replaces_the_patch():
    import copy

    model = vlprune.patch(hf_tiny.clip("CLIPVisionModel"), "evit", layers=(2,), keep=0.5)
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        copy.deepcopy(model)
    px, _, _ = inputs()
    vlprune.patch(model, "tome", r=2)  # a second patch replaces the first
    with torch.no_grad():
        model(pixel_values=px)
    assert get_patch(model).config.name == "tome" and get_patch(model).last_tokens == 1 + N - 2 * 4
    copy.deepcopy(vlprune.unpatch(model))


def _bridgetower_reference(model, px, ids, mask, b, kept_of):
    """The unpatched BridgeTower on sample b alone, with forward hooks that keep the image tokens ``kept_of(x)``
    (1-based candidate positions; [CLS] always) after cross-modal image layer 1 and feed the later image link towers
    the uni-modal tokens at those positions (transformers 4.x: its all-zero image masks cut to match)."""
    bt = model.bridgetower
    kept = {}

    def after_layer(mod, args, out):
        kept["idx"] = torch.tensor([0] + [1 + j for j in kept_of(out[0])])
        return (out[0][:, kept["idx"]],) + tuple(out[1:])

    def before_tower(mod, args):
        h, c, m = args
        return (h[:, kept["idx"]], c, m) if h.shape[1] != c.shape[1] else None

    def cut_image_masks(mod, args, kwargs):
        name = "encoder_attention_mask" if any(mod is t for t in bt.cross_modal_text_layers) else "attention_mask"
        m = kwargs.get(name)
        if "idx" in kept and m is not None and m.shape[-1] == 1 + N:
            kwargs[name] = m[..., kept["idx"]]
        return args, kwargs

    hooks = [bt.cross_modal_image_layers[0].register_forward_hook(after_layer)]
    hooks += [t.register_forward_pre_hook(before_tower) for t in bt.cross_modal_image_link_tower]
    hooks += [m.register_forward_pre_hook(cut_image_masks, with_kwargs=True)
              for m in list(bt.cross_modal_text_layers) + list(bt.cross_modal_image_layers[1:])]
    try:
        with torch.no_grad():
            return model(input_ids=ids[b:b + 1], pixel_values=px[b:b + 1], attention_mask=mask[b:b + 1]).logits
    finally:
        for h in hooks:
            h.remove()


def test_bridgetower_tip_equals_a_per_sample_reference_with_gathered_bridges():
    """Inference: the top ceil(keep * M) by the pruner's keep log-probability (argsort, per sample)."""
    model = hf_tiny.bridgetower()
    px, ids, mask = inputs()
    vlprune.patch(model, "tip", layers=(1,), keep=0.5)
    pruner = get_patch(model).reducers["fusion_1"].pruner
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    assert get_patch(model).last_tokens == 1 + N // 2
    vlprune.unpatch(model)

    def top(x):
        logp = pruner(x[:, 1:])[..., 0][0]
        return sorted(sorted(range(N), key=lambda j: (-float(logp[j]), j))[: math.ceil(0.5 * N)])

    for b in range(B):
        torch.testing.assert_close(got[b:b + 1], _bridgetower_reference(model, px, ids, mask, b, top), **TOL)


def test_bridgetower_tip_training_path_masks_as_the_pruned_path_and_gets_gradients():
    """Train mode (dropout off): TiP's hard Gumbel mask keeps every token in the tensor but out of the later
    attention; the ITM logits equal the physically pruned model's with the same kept set, and the pruner learns."""
    model = hf_tiny.bridgetower()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    px, ids, mask = inputs()
    vlprune.patch(model, "tip", layers=(1,), keep=0.5, generator=torch.Generator().manual_seed(0)).train()
    logits = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    p = get_patch(model)
    assert p.last_tokens == 1 + N  # nothing removed in training
    hard = p.last_aux[0].values["mask"]
    assert hard.shape == (B, N) and set(hard.unique().tolist()) <= {0.0, 1.0} and 0 < hard.sum() < B * N
    logits.sum().backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in p.reducers.parameters())
    vlprune.unpatch(model).eval()
    for b in range(B):
        keep = [j for j in range(N) if hard[b, j] > 0]
        ref = _bridgetower_reference(model, px, ids, mask, b, lambda x: keep)
        torch.testing.assert_close(logits[b:b + 1].detach(), ref, **TOL)


def test_vilt_image_padding_raises_and_text_only_calls_of_the_encoder_are_refused():
    model = vlprune.patch(hf_tiny.vilt(), "evit", layers=(2,), keep=0.5)
    px, ids, mask = inputs()
    pixel_mask = torch.ones(B, 32, 32, dtype=torch.long)
    pixel_mask[0, :, 16:] = 0
    with pytest.raises(ValueError, match="ViLT image padding"):
        model(input_ids=ids, pixel_values=px, attention_mask=mask, pixel_mask=pixel_mask)
    with pytest.raises(ValueError, match="runs inside its ViltModel's forward"):
        model.vilt.encoder(torch.zeros(B, 10, 32))


@pytest.mark.parametrize("lookahead", [True, False])
def test_blip_elip_counts_follow_the_original_patch_count(lookahead):
    model = hf_tiny.blip("BlipForImageTextRetrieval")
    px, ids, mask = inputs()
    vlprune.patch(model, "elip", layers=(2, 3), keep=(0.8, 0.5), lookahead=lookahead)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, attention_mask=mask).last_hidden_state
    # k_b = floor(ratio_b * N) of the original N = 16, plus [CLS] and the fused token: 1 + 8 + 1 after the second block
    assert out.shape[1] == get_patch(model).last_tokens == 1 + math.floor(0.5 * N) + 1
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("build,cls,method,opts", [
    (hf_tiny.blip, "BlipForImageTextRetrieval", "trips", dict(layers=(2, 3), keep=0.5)),
    (hf_tiny.clip, "CLIPVisionModel", "dynamicvit", dict(layers=(2, 3))),
    (hf_tiny.vilt, "ViltForQuestionAnswering", "tip", dict(layers=(2, 3))),
    (hf_tiny.bridgetower, "BridgeTowerForImageAndTextRetrieval", "tip", dict(layers=(1, 2))),
    (hf_tiny.bridgetower_elip, "BridgeTowerForImageAndTextRetrieval", "elip", dict(layers=(2, 4), keep=(0.8, 0.5))),
], ids=["blip-trips", "clip-dynamicvit", "vilt-tip", "bridgetower-tip", "bridgetower-elip"])
def test_bf16_on_cpu_runs_without_nan_and_reducers_follow_the_dtype(build, cls, method, opts):
    model = vlprune.patch(build(cls).to(torch.bfloat16), method, **opts)
    px, ids, mask = inputs()
    with torch.no_grad():
        out = _tensor(_call(model, px.bfloat16(), ids, mask))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert get_patch(model).last_tokens < 1 + N
    assert all(p.dtype == torch.bfloat16 for p in get_patch(model).reducers.parameters())


@pytest.mark.parametrize("cls", ["BridgeTowerForImageAndTextRetrieval", "BridgeTowerForMaskedLM"])
def test_bridgetower_elip_equals_a_naive_per_sample_reference_with_the_caption_unpadded(cls):
    """ELIP in the uni-modal vision layers, one block before the split (layer 2 of the cross-modal start at 2) and
    one after it (layer 4: the cross-modal image stream is gathered to match); batch with a padded caption against
    each sample alone, its caption cut to its length."""
    model = hf_tiny.bridgetower_elip(cls)
    px, ids, mask = inputs()
    vlprune.patch(model, "elip", layers=(2, 4), keep=(0.8, 0.5))
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    # k_b = floor(ratio_b * N) of the original N = 16, plus [CLS] and the fused token
    assert get_patch(model).last_tokens == 1 + math.floor(0.5 * N) + 1
    vlprune.unpatch(model)
    for b in range(B):
        n = int(mask[b].sum())
        ref = bridgetower_elip(model, px[b:b + 1], ids[b:b + 1, :n], (2, 4), (0.8, 0.5)).logits
        torch.testing.assert_close(got[b:b + 1, :n], ref, **TOL)


@pytest.mark.parametrize("lookahead", [True, False])
def test_bridgetower_elip_counts_follow_the_schedule_and_widths_are_checked(lookahead):
    model = hf_tiny.bridgetower_elip("BridgeTowerModel")
    px, ids, mask = inputs()
    vlprune.patch(model, "elip", layers=(2, 3, 4), keep=(0.9, 0.6, 0.3), lookahead=lookahead)
    counts = []
    hooks = [blk.register_forward_hook(lambda m, a, out: counts.append(out.shape[0]))
             for blk in model.vision_model.visual.transformer.resblocks]
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, attention_mask=mask)
    for h in hooks:
        h.remove()
    full, fused = 1 + N, 1 + 1
    want = [fused + math.floor(r * N) for r in (0.9, 0.6, 0.3)]
    # look-ahead prunes before the block's first layer; without it, in the layer before (before its MLP)
    want = [full] + want if lookahead else want + [want[-1]]
    assert counts == want
    assert out.image_features.shape[1] == get_patch(model).last_tokens == want[-1]
    assert torch.isfinite(out.pooler_output).all()
    with pytest.raises(ValueError, match="text width 32 must equal the vision width 64"):
        vlprune.patch(hf_tiny.bridgetower(), "elip")


@pytest.mark.parametrize("method,opts,kept", [
    ("evit", dict(layers=(2, 4), keep=0.5), 1 + 5 + 1),  # 8 of 16 + fused, then ceil(0.5 * 9) = 5 + fused
    ("tome", dict(r=3), 1 + N - 4 * 3),
    ("trips", dict(layers=(2,), keep=0.5), 1 + 8 + 1),
    ("random", dict(layers=(1, 4), keep=0.5), None),
])
def test_bridgetower_vision_methods_are_batch_independent(method, opts, kept):
    """Image-only methods (and TRIPS with the text guide) in the uni-modal vision layers: the batch, with a padded
    caption, equals each sample alone with its caption cut to its length; the cross-modal stream follows."""
    model = hf_tiny.bridgetower_elip("BridgeTowerModel")
    px, ids, mask = inputs()
    vlprune.patch(model, method, generator=torch.Generator().manual_seed(0), **opts)
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=px, attention_mask=mask).image_features
        if kept is not None:
            assert got.shape[1] == get_patch(model).last_tokens == kept
            for b in range(B):
                n = int(mask[b].sum())
                one = model(input_ids=ids[b:b + 1, :n], pixel_values=px[b:b + 1]).image_features
                torch.testing.assert_close(got[b:b + 1], one, **TOL)
    assert torch.isfinite(got).all() and got.shape[1] < 1 + N
