"""The vision-tower methods (EViT, ToMe, random, TRIPS-style tower selection) on every LVLM family of
tests/hf_tiny_lvlm.py: LLaVA-NeXT runs EViT / ToMe / random per crop (identity at keep 1.0, a hand-packed
reference, batch = one by one); every family either runs a method or refuses it with the reason."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import vlprune  # noqa: E402
from vlprune.patch import get_patch  # noqa: E402

import hf_tiny_lvlm as H  # noqa: E402
from test_patch_lvlm_families import assert_keep_one_is_unpatched, patched_batch_and_alone  # noqa: E402

TOWER = {"evit": (dict(layers=(1,), keep=1.0), dict(layers=(1,), keep=0.5), 9),
         "tome": (dict(layers=(1,), r=0), dict(layers=(1, 2), r=4), 8),
         "random": (dict(layers=(1,), keep=1.0), dict(layers=(2,), keep=0.5), 8)}


@pytest.fixture(scope="module")
def nxt():
    return H.llava_next(), H.next_prompts()


@pytest.mark.parametrize("method", list(TOWER))
def test_llava_next_tower_methods_at_keep_one_are_the_unpatched_model(nxt, method):
    model, data = nxt
    assert_keep_one_is_unpatched(model, data, method, TOWER[method][0])


def _hand_packed_logits(model, one, per_crop):
    """One unpadded sample: the patched tower on its 3 crops, [CLS] dropped, projected, flattened in crop order
    (base, tiles), written into a prompt with exactly that many placeholders; the language model run on it."""
    inner = model.model
    with torch.no_grad():
        hs = inner.vision_tower(one["pixel_values"][0], output_hidden_states=True).hidden_states
        feats = inner.multi_modal_projector(hs[-2][:, 1:]).flatten(0, 1)
        assert feats.shape[0] == 3 * per_crop
        ids = one["input_ids"][0]
        img = (ids == H.IMAGE_ID).nonzero()[:, 0]
        ids = torch.cat([ids[:img[0]], ids[img[:3 * per_crop]], ids[img[-1] + 1:]])[None]
        emb = inner.language_model.embed_tokens(ids)
        emb[ids == H.IMAGE_ID] = feats
        h = inner.language_model(inputs_embeds=emb, attention_mask=torch.ones_like(ids)).last_hidden_state
        return model.lm_head(h)[0]


@pytest.mark.parametrize("method", ["evit", "tome"])  # random draws per call: no two runs pick the same patches
def test_llava_next_tower_methods_pack_the_reduced_crops_and_batch_equals_one_by_one(nxt, method):
    model, data = nxt
    how, per_crop = TOWER[method][1], TOWER[method][2]
    logits, _, gen = patched_batch_and_alone(model, data, H.next_one, method, **how)
    L = data["input_ids"].shape[1]
    assert logits.shape[1] == L - H.NEXT_N + 3 * per_crop
    assert torch.equal(gen[:, :L], data["input_ids"])  # the caller's prompt comes back
    vlprune.patch(model, method, **how)
    try:
        for i in range(data["input_ids"].shape[0]):
            one = H.next_one(data, i)
            n = one["input_ids"].shape[1] - H.NEXT_N + 3 * per_crop
            torch.testing.assert_close(logits[i, -n:], _hand_packed_logits(model, one, per_crop), atol=1e-4, rtol=1e-4)
    finally:
        vlprune.unpatch(model)


def test_llava_next_crop_count_needs_one_image_size_per_batch():
    from types import SimpleNamespace as NS

    from vlprune.patch.llava_next import crops_per_image

    fake = NS(config=NS(image_grid_pinpoints=[[32, 32], [32, 64]], vision_config=NS(image_size=32)))
    assert crops_per_image(fake, torch.tensor([[32, 64], [30, 60]])) == 3
    with pytest.raises(ValueError, match=r"images of one size in a batch.*\[3, 2\] crops"):
        crops_per_image(fake, torch.tensor([[32, 64], [32, 32]]))


# every tower method on every family: runs, or the error says why
REFUSED = {
    ("llava", "trips"): "no text encoder in the vision tower.s space.*use trips_llm",
    ("llava_next", "trips"): "no text encoder in the vision tower.s space.*use trips_llm",
    ("qwen2_vl", "trips"): "no text encoder in the vision tower.s space.*use trips_llm",
    ("llava_next", "visionzip"): "per-crop token order",
    ("qwen2_vl", "evit"): "has no \\[CLS\\]", ("qwen2_vl", "visionzip"): "does not have",
    ("qwen2_vl", "tome"): "2 x 2 group", ("qwen2_vl", "random"): "2 x 2 group",
}
BUILD = {"llava": (H.llava, lambda: dict(zip(("input_ids", "attention_mask", "pixel_values"), H.prompts()))),
         "llava_next": (H.llava_next, H.next_prompts), "qwen2_vl": (H.qwen2_vl, H.qwen_prompts)}


@pytest.mark.parametrize("family", list(BUILD))
def test_every_family_runs_each_tower_method_or_says_why(family):
    model, data = BUILD[family][0](), BUILD[family][1]()
    L = data["input_ids"].shape[1]
    for method in ("evit", "tome", "random", "trips", "visionzip"):
        how = TOWER[method][1] if method in TOWER else dict(keep=0.5)
        why = REFUSED.get((family, method))
        if why is not None:
            with pytest.raises(ValueError, match=f"'{method}' is not supported on {type(model).__name__}.*{why}"):
                vlprune.patch(model, method, **how)
            assert get_patch(model) is None
            continue
        vlprune.patch(model, method, **how)
        try:
            with torch.no_grad():
                assert model(**data).logits.shape[1] < L, (family, method)
        finally:
            vlprune.unpatch(model)
