"""The captioner: cached decoding equals the full-sequence pass, beam 1 equals greedy, the LM loss masks the prompt,
the reduction runs during generation (once per image, before beam expansion), text-guided methods need a guide."""

from __future__ import annotations

import pytest
import torch

import vlprune
from vlprune.models.captioner import (GenerateConfig, beam_search, causal_bias, decode, greedy, image_kv, lm_loss,
                                      repetition_penalty, strip_generated)

torch.set_num_threads(1)


def _model(method=None, seed=0):
    torch.manual_seed(seed)
    return vlprune.build_model("tiny", method).eval()


def _image(model, seed=1, B=3):
    g = torch.Generator().manual_seed(seed)
    S = model.cfg.vision.image_size
    return torch.randn(B, 3, S, S, generator=g)


def test_causal_bias_masks_future_and_padding():
    mask = torch.tensor([[1, 1, 0]])
    b = causal_bias(mask, torch.float32)[0, 0]
    allowed = b == 0
    assert allowed.tolist() == [[True, False, False], [True, True, False], [True, True, False]]


def test_cached_decoding_equals_full_pass():
    model = _model()
    image = model.encode_image(_image(model))
    cache0 = image_kv(model, image)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 101, (3, 9), generator=g)
    full, _ = decode(model, ids, torch.ones_like(ids), cache0)
    # the same logits token by token, and in two chunks
    cache, steps = cache0, []
    for t in range(ids.shape[1]):
        lg, cache = decode(model, ids[:, t:t + 1], torch.ones_like(ids[:, :1]), cache, use_cache=True)
        steps.append(lg)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    a, c = decode(model, ids[:, :4], torch.ones_like(ids[:, :4]), cache0, use_cache=True)
    b, _ = decode(model, ids[:, 4:], torch.ones_like(ids[:, 4:]), c, use_cache=True)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)
    # causality: changing a later token leaves earlier logits alone
    ids2 = ids.clone()
    ids2[:, 6] = 7
    full2, _ = decode(model, ids2, torch.ones_like(ids2), cache0)
    torch.testing.assert_close(full2[:, :6], full[:, :6])
    assert not torch.allclose(full2[:, 6:], full[:, 6:])


def test_decoder_matches_the_fusion_stack_without_causality():
    """With a single token (no future to hide) the decoder is the text encoder + fusion encoder + MLM head."""
    model = _model()
    images = _image(model)
    image = model.encode_image(images)
    ids = torch.full((3, 1), 2)
    mask = torch.ones_like(ids)
    logits, _ = decode(model, ids, mask, image_kv(model, image))
    fused, _ = model.fuse(model.encode_text(ids, mask), mask, image)
    torch.testing.assert_close(logits, model.mlm_head(fused), atol=1e-5, rtol=1e-5)


def test_greedy_cached_equals_uncached_and_beam1_equals_greedy():
    model = _model()
    cache = image_kv(model, model.encode_image(_image(model)))
    prompt = torch.tensor([[2, 10, 11]]).expand(3, -1)
    gc = GenerateConfig(num_beams=1, max_length=12, min_length=5, eos=3, pad=0, forbid=(0, 1, 2, 4))
    a = greedy(model, cache, prompt, gc, use_cache=True)
    b = greedy(model, cache, prompt, gc, use_cache=False)
    assert torch.equal(a, b)
    c = beam_search(model, cache, prompt, gc)
    L = max(a.shape[1], c.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, L - t.shape[1]))  # noqa: E731
    assert torch.equal(pad(a), pad(c))
    assert a.shape[1] <= 12 and torch.equal(a[:, :3], prompt)


def test_beam_search_not_worse_than_greedy_and_respects_lengths():
    model = _model()
    cache = image_kv(model, model.encode_image(_image(model)))
    prompt = torch.tensor([[2, 10]]).expand(3, -1)
    forbid = (0, 1, 2, 4)
    g = greedy(model, cache, prompt, GenerateConfig(num_beams=1, max_length=8, min_length=8, eos=3, forbid=forbid))
    bs = beam_search(model, cache, prompt, GenerateConfig(num_beams=3, max_length=8, min_length=8, eos=3, forbid=forbid))
    assert g.shape[1] == 8 and bs.shape[1] == 8  # min_length = max_length: no early eos

    def score(seq):  # sum of log-probs of the generated tokens, with the bans (forbidden ids, eos) applied
        logits, _ = decode(model, seq, torch.ones_like(seq), cache)
        logits = logits[:, :-1].float()
        logits[..., list(forbid) + [3]] = float("-inf")
        return logits.log_softmax(-1).gather(-1, seq[:, 1:, None])[:, 1:, 0].sum(1)

    assert (score(bs) >= score(g) - 1e-4).all()


def test_repetition_penalty_and_strip():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    assert strip_generated(torch.tensor([[2, 9, 5, 6, 3, 0], [2, 9, 7, 7, 7, 7]]), 2, 3) == [[5, 6], [7, 7, 7, 7]]


def test_lm_loss_ignores_prompt_and_padding():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 4, 5, 3], [-100, -100, 6, 3, -100]])
    loss = lm_loss(logits, labels, smoothing=0.0)
    pred = torch.cat([logits[0, 1:4], logits[1, 1:3]])
    ref = torch.nn.functional.cross_entropy(pred, torch.tensor([4, 5, 3, 6, 3]))
    torch.testing.assert_close(loss, ref)
    with pytest.raises(ValueError, match="no labelled token"):
        lm_loss(logits, torch.full((2, 5), -100), 0.1)


def test_reduction_runs_once_before_beams_and_guided_methods_need_a_guide():
    from vlprune.data.tokenizer import TextTokenizer
    from vlprune.tasks.caption import generate_captions

    tok = TextTokenizer.train(["a picture of a red circle", "a blue square left of a green triangle"], 101)
    model = _model(vlprune.ReduceConfig("evit", layers=(2,), keep=0.5))
    calls = []
    red = model.reducers()["vision.2"]
    red.register_forward_hook(lambda m, i, o: calls.append(o.num_tokens))
    gc = GenerateConfig(num_beams=3, max_length=10, min_length=4, eos=tok.sep_id, pad=tok.pad_id)
    caps, image, _ = generate_captions(model, _image(model, B=2), tok, gc=gc)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    assert calls == [1 + 8 + 1] and image.num_tokens == 10  # [CLS] + 8 kept + 1 fused, once for the batch of 2
    # the decoder cross-attends to the reduced tokens only
    cache = image_kv(model, image)
    assert cache.cross_kv[-1][0].shape[2] == 10
    guided = _model("trips")
    with pytest.raises(ValueError, match="text-guided"):
        generate_captions(guided, _image(guided, B=1), tok, gc=gc)
    caps, image, _ = generate_captions(guided, _image(guided, B=1), tok, gc=gc, guide="prompt")
    assert image.num_tokens < 17


def test_masked_image_tokens_are_not_attended():
    """A masked training path (learned methods) keeps every token with a keep mask: the decoder must ignore the
    masked ones exactly as if they were removed."""
    model = _model()
    image = model.encode_image(_image(model, B=1))
    keep = torch.ones(1, 17)
    keep[0, 3:9] = 0
    ids = torch.tensor([[2, 7, 8, 9]])
    masked, _ = decode(model, ids, torch.ones_like(ids), image_kv(model, image.replace(mask=keep)))
    removed, _ = decode(model, ids, torch.ones_like(ids), image_kv(model, image.replace(x=image.x[:, keep[0] > 0])))
    torch.testing.assert_close(masked, removed, atol=1e-5, rtol=1e-5)
