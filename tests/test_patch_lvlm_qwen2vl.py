"""vlprune.patch on a tiny random Qwen2-VL (M-RoPE, tests/hf_tiny_lvlm.py): identity at keep 1.0, FastV and
TRIPS-LVLM against the naive layer-by-layer reference with the model's own M-RoPE ids (selection, logits, cached
greedy steps), batch = one by one, and the methods it does not take."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import vlprune  # noqa: E402
from vlprune.patch import get_patch  # noqa: E402

import hf_tiny_lvlm as H  # noqa: E402

GEN = dict(max_new_tokens=3, do_sample=False)


@pytest.fixture(scope="module")
def qwen():
    return H.qwen2_vl()


@pytest.fixture(scope="module")
def data():
    return H.qwen_prompts()


@pytest.mark.parametrize("method", ["fastv_llm", "trips_llm"])
def test_keep_one_is_the_unpatched_model(qwen, data, method):
    with torch.no_grad():
        ref, gen = qwen(**data).logits, qwen.generate(**data, **GEN)
        vlprune.patch(qwen, method, keep=1.0)
        try:
            logits, out = qwen(**data).logits, qwen.generate(**data, **GEN)
        finally:
            vlprune.unpatch(qwen)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(out, gen)


@pytest.mark.parametrize("method,keep", [("fastv_llm", 0.5), ("trips_llm", 0.25)])
def test_equals_the_naive_reference_and_one_by_one(qwen, data, method, keep):
    vlprune.patch(qwen, method, layers=(1,), keep=keep)
    try:
        with torch.no_grad():
            logits = qwen(**data).logits
            chosen = get_patch(qwen).lvlm.last_kept[0][1]
            gen = qwen.generate(**data, **GEN)
            L = data["input_ids"].shape[1]
            for i in range(gen.shape[0]):
                one = H.qwen_one(data, i)
                alone = qwen.generate(**one, **GEN)
                assert torch.equal(gen[i, L:], alone[0, one["input_ids"].shape[1]:])
    finally:
        vlprune.unpatch(qwen)
    for i in range(gen.shape[0]):
        one = H.qwen_one(data, i)
        with torch.no_grad():
            ref, ref_chosen = H.naive_llm_logits(qwen, one, one["input_ids"][:, :0], method, 1, keep, H.Q_IMAGE)
            assert torch.equal(chosen[i], ref_chosen)
            torch.testing.assert_close(logits[i, -1], ref[-1], atol=1e-4, rtol=1e-4)
            new = gen[i:i + 1, L:]
            for t in range(1, GEN["max_new_tokens"]):
                step, _ = H.naive_llm_logits(qwen, one, new[:, :t], method, 1, keep, H.Q_IMAGE)
                assert int(step[-1].argmax()) == int(new[0, t]), (i, t)


def test_vision_methods_are_refused_with_the_reason(qwen):
    with pytest.raises(ValueError, match="not supported on Qwen2VLForConditionalGeneration.*use fastv_llm or trips_llm"):
        vlprune.patch(qwen, "visionzip")
    assert "Qwen2VLForConditionalGeneration" in vlprune.patch.supported_classes()
