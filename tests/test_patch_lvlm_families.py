"""vlprune.patch on tiny random Qwen2-VL (M-RoPE) and LLaVA-NeXT (any-resolution tiles) from tests/hf_tiny_lvlm.py:
identity at keep 1.0, FastV and TRIPS-LVLM against the naive layer-by-layer reference with the model's own
position ids (selection, logits, cached greedy steps), batch = one by one (the tower methods and the ones they
do not take: test_patch_lvlm_towers.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import vlprune  # noqa: E402
from vlprune.patch import get_patch  # noqa: E402

import hf_tiny_lvlm as H  # noqa: E402
from test_patch_lvlm import assert_same_new_tokens  # noqa: E402

GEN = dict(max_new_tokens=3, do_sample=False)


FAMILIES = {"qwen2_vl": (H.qwen2_vl, H.qwen_prompts, H.qwen_one, H.Q_IMAGE),
            "llava_next": (H.llava_next, H.next_prompts, H.next_one, H.IMAGE_ID)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, prompts, one, image_id = FAMILIES[request.param]
    return build(), prompts(), one, image_id


@pytest.mark.parametrize("method,how", [("fastv_llm", dict(keep=1.0)), ("trips_llm", dict(keep=1.0)),
                                        ("sparsevlm", dict(layers=(1, 2), keep=(1.0, 1.0)))])
def test_keep_one_is_the_unpatched_model(family, method, how):
    assert_keep_one_is_unpatched(family[0], family[1], method, how)


def assert_keep_one_is_unpatched(model, data, method, how):
    """Logits and generated tokens under the patch equal the unpatched model's."""
    with torch.no_grad():
        ref, gen = model(**data).logits, model.generate(**data, **GEN)
        vlprune.patch(model, method, **how)
        try:
            logits, out = model(**data).logits, model.generate(**data, **GEN)
        finally:
            vlprune.unpatch(model)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(out, gen)


@pytest.mark.parametrize("method,keep", [("fastv_llm", 0.5), ("trips_llm", 0.25)])
def test_equals_the_naive_reference_and_one_by_one(family, method, keep):
    model, data, one_of, image_id = family
    logits, kept, gen = patched_batch_and_alone(model, data, one_of, method, layers=(1,), keep=keep)
    chosen, L = kept[0][1], data["input_ids"].shape[1]
    for i in range(gen.shape[0]):
        one = one_of(data, i)
        with torch.no_grad():
            ref, ref_chosen = H.naive_llm_logits(model, one, one["input_ids"][:, :0], method, 1, keep, image_id)
            assert torch.equal(chosen[i], ref_chosen)
            torch.testing.assert_close(logits[i, -1], ref[-1], atol=1e-4, rtol=1e-4)
            new = gen[i:i + 1, L:]
            for t in range(1, GEN["max_new_tokens"]):
                step, _ = H.naive_llm_logits(model, one, new[:, :t], method, 1, keep, image_id)
                assert int(step[-1].argmax()) == int(new[0, t]), (i, t)


def patched_batch_and_alone(model, data, one_of, method, **how):
    """Under the patch: (logits, the kept records, generated batch); each row's new tokens equal its prompt alone's."""
    vlprune.patch(model, method, **how)
    try:
        with torch.no_grad():
            logits = model(**data).logits
            st = getattr(get_patch(model), "lvlm", None)
            kept = st.last_kept if st is not None else None
            gen = model.generate(**data, **GEN)
            L = data["input_ids"].shape[1]
            for i in range(gen.shape[0]):
                one = one_of(data, i)
                alone = model.generate(**one, **GEN)
                assert_same_new_tokens(gen[i, L:], alone[0, one["input_ids"].shape[1]:], i)
    finally:
        vlprune.unpatch(model)
    return logits, kept, gen
