"""vlprune.patch on a tiny random LLaVA-1.5 (tests/hf_tiny_lvlm.py): identity at keep 1.0 for every method,
FastV and TRIPS-LVLM against a naive layer-by-layer reference (selection, logits, cached greedy decoding),
batch = one by one with left-padded prompts, reduced token counts, VisionZip's maths, and the errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import vlprune  # noqa: E402
from vlprune.patch import get_patch  # noqa: E402
from vlprune.reduce.visionzip import visionzip  # noqa: E402

import hf_tiny_lvlm as H  # noqa: E402

GEN = dict(max_new_tokens=4, do_sample=False)
# (method, options at keep 1.0, options that reduce); tiny tower: 3 layers, feature layer 2
CASES = {
    "fastv_llm": (dict(keep=1.0), dict(keep=0.5)),
    "trips_llm": (dict(keep=1.0), dict(keep=0.5)),
    "sparsevlm": (dict(layers=(1, 2), keep=(1.0, 1.0)), dict(layers=(1, 2), keep=(0.5, 0.25))),
    "visionzip": (dict(keep=1.0), dict(keep=0.5)),
    "evit": (dict(layers=(1,), keep=1.0), dict(layers=(1,), keep=0.5)),
    "tome": (dict(layers=(1,), options={"r": 0}), dict(layers=(1, 2), options={"r": 4})),
    "random": (dict(layers=(1,), keep=1.0), dict(layers=(2,), keep=0.5)),
}


@pytest.fixture(scope="module")
def llava():
    return H.llava()


@pytest.fixture(scope="module")
def data():
    return H.prompts()


@pytest.fixture(scope="module")
def unpatched(llava, data):
    ids, mask, px = data
    with torch.no_grad():
        return (llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits,
                llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **GEN))


def assert_same_new_tokens(batch_row, alone, what):
    """A batch row's new tokens equal the sample's alone (which may stop at EOS earlier; the row is then padded)."""
    n = alone.shape[0]
    assert torch.equal(batch_row[:n], alone), what
    rest = batch_row[n:]
    assert ((rest == H.PAD_ID) | (rest == H.LLAMA["eos_token_id"])).all(), what  # 4.x beam search pads with EOS


def _patch(model, method, opts):
    opts = dict(opts)
    return vlprune.patch(model, method, layers=opts.pop("layers", None), keep=opts.pop("keep", None),
                         **opts.pop("options", {}))


@pytest.mark.parametrize("method", list(CASES))
def test_keep_one_is_the_unpatched_model(llava, data, unpatched, method):
    ids, mask, px = data
    _patch(llava, method, CASES[method][0])
    try:
        with torch.no_grad():
            logits = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
            gen = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **GEN)
    finally:
        vlprune.unpatch(llava)
    torch.testing.assert_close(logits, unpatched[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, unpatched[1])


# random draws per batch position (reduce/random.py), so a sample alone gets other patches: not batch-invariant
@pytest.mark.parametrize("method", [m for m in CASES if m != "random"])
def test_batch_equals_one_by_one_greedy_and_beam(llava, data, method):
    ids, mask, px = data
    _patch(llava, method, CASES[method][1])
    try:
        with torch.no_grad():
            for extra in ({}, {"num_beams": 2}):
                batch = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **GEN, **extra)
                assert batch.shape[1] == ids.shape[1] + GEN["max_new_tokens"]
                assert torch.equal(batch[:, :ids.shape[1]], ids)  # the caller's prompt comes back
                for i in range(ids.shape[0]):
                    a, am, p = H.one(ids, mask, px, i)
                    new = llava.generate(input_ids=a, attention_mask=am, pixel_values=p, **GEN, **extra)[0, a.shape[1]:]
                    assert_same_new_tokens(batch[i, ids.shape[1]:], new, (i, extra))
    finally:
        vlprune.unpatch(llava)


@pytest.mark.parametrize("method,keep", [("fastv_llm", 0.5), ("fastv_llm", 0.25), ("trips_llm", 0.5), ("trips_llm", 0.3)])
def test_llm_methods_equal_the_naive_reference(llava, data, method, keep):
    """Per sample: the chosen image tokens, the prompt's last logits and three cached greedy steps equal a
    layer-by-layer reference with full attention maps, one unpadded sample at a time, without a cache."""
    ids, mask, px = data
    vlprune.patch(llava, method, layers=(1,), keep=keep)  # layer 2 then runs on the reduced sequence
    try:
        with torch.no_grad():
            logits = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
            chosen = get_patch(llava).lvlm.last_kept[0][1]
            gen = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3, do_sample=False)
    finally:
        vlprune.unpatch(llava)
    layer = 1
    k = round(H.N * keep) if method == "fastv_llm" else -(-H.N * keep // 1)
    assert chosen.shape == (ids.shape[0], H.N) and (chosen.sum(1) == k).all()
    for i in range(ids.shape[0]):
        pid, pmask, p = H.one(ids, mask, px, i)
        one = dict(input_ids=pid, attention_mask=pmask, pixel_values=p)
        with torch.no_grad():
            ref, ref_chosen = H.naive_llm_logits(llava, one, pid[:, :0], method, layer, keep)
            assert torch.equal(chosen[i], ref_chosen)
            torch.testing.assert_close(logits[i, -1], ref[-1], atol=1e-4, rtol=1e-4)
            new = gen[i:i + 1, ids.shape[1]:]
            for t in range(1, 3):
                step, _ = H.naive_llm_logits(llava, one, new[:, :t], method, layer, keep)
                assert int(step[-1].argmax()) == int(new[0, t]), (i, t)


@pytest.mark.parametrize("method,tokens", [("visionzip", 8), ("evit", 9), ("random", 8)])
def test_before_llm_methods_shorten_the_prompt(llava, data, method, tokens):
    ids, mask, px = data
    _patch(llava, method, CASES[method][1])
    seen = {}
    lm = llava.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            out = llava(input_ids=ids, attention_mask=mask, pixel_values=px)
    finally:
        hook.remove()
        vlprune.unpatch(llava)
    assert get_patch(llava) is None
    assert seen["inputs_embeds"].shape[1] == ids.shape[1] - (H.N - tokens) == out.logits.shape[1]
    assert (seen["attention_mask"].sum(1) == mask.sum(1) - (H.N - tokens)).all()


def test_llm_methods_shorten_the_sequence_after_their_layer(llava, data):
    ids, mask, px = data
    vlprune.patch(llava, "fastv_llm", layers=(1,), keep=0.25)
    try:
        with torch.no_grad():
            out = llava(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
    finally:
        vlprune.unpatch(llava)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    lengths = [cache.layers[i].keys.shape[2] if hasattr(cache, "layers") else cache.key_cache[i].shape[2] for i in (0, 1)]
    assert lengths == [ids.shape[1], ids.shape[1] - (H.N - 4)] == [ids.shape[1], out.logits.shape[1]]


def _visionzip_naive(h, cls_attn, keys, d, c):
    """One sample at a time, loops."""
    outs = []
    for b in range(h.shape[0]):
        N = h.shape[1] - 1
        dom = sorted(sorted(range(N), key=lambda i: (-float(cls_attn[b, i]), i))[:d - 1])
        rest = [i + 1 for i in range(N) if i not in dom]
        step = len(rest) // c
        targets = [rest[j * step] for j in range(c)]
        others = [t for t in rest if t not in targets]
        groups = {t: [] for t in targets}
        for o in others:
            sims = [float(torch.nn.functional.cosine_similarity(keys[b, o], keys[b, t], dim=0)) for t in targets]
            groups[targets[max(range(c), key=lambda j: (sims[j], -j))]].append(o)
        ctx = [h[b, t] + (torch.stack([h[b, o] for o in groups[t]]).mean(0) if groups[t] else 0) for t in targets]
        outs.append(torch.stack([h[b, 0]] + [h[b, i + 1] for i in dom] + ctx))
    return torch.stack(outs)


def test_visionzip_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    h, a, k = torch.randn(3, 17, 8, generator=g), torch.rand(3, 16, generator=g), torch.randn(3, 17, 4, generator=g)
    torch.testing.assert_close(visionzip(h, a, k, 5, 3), _visionzip_naive(h, a, k, 5, 3))
    with pytest.raises(ValueError, match="dominant=12, contextual=6 do not fit 16 patches"):
        visionzip(h, a, k, 12, 6)


def test_errors_name_what_is_supported(llava, data):
    import transformers

    ids, mask, px = data
    lm = transformers.LlamaForCausalLM(llava.config.text_config)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        vlprune.patch(lm, "fastv_llm")
    with pytest.raises(ValueError, match=r"'trips' is not supported on LlavaForConditionalGeneration.*trips_llm"):
        vlprune.patch(llava, "trips")
    vlprune.patch(llava, "fastv_llm", layers=(1,), keep=0.5)
    try:
        with pytest.raises(ValueError, match="loss over `labels`"):
            llava(input_ids=ids, attention_mask=mask, pixel_values=px, labels=ids)
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            llava(input_ids=ids, attention_mask=mask, pixel_values=px, output_attentions=True)
    finally:
        vlprune.unpatch(llava)
    with pytest.raises(ValueError, match=r"vision layer\(s\) \[3\] come after LLaVA's feature layer 2"):
        vlprune.patch(llava, "evit", layers=(3,), keep=0.5)
    assert get_patch(llava) is None
    assert "fastv_llm" in vlprune.list_methods(lvlm=True) and "fastv_llm" not in vlprune.list_methods()


def test_lvlm_bench_counts_tokens_flops_and_cache(llava):
    from vlprune.bench.hf_lvlm import format_lvlm_table, run_lvlm_bench

    rows = run_lvlm_bench(llava, [vlprune.ReduceConfig("fastv_llm", layers=(1,), keep=0.5),
                                  vlprune.ReduceConfig("visionzip", keep=0.25)], text_len=4, flops_only=True)
    assert [r["kept"] for r in rows] == [16, 8, 4]
    assert rows[0]["prefill_gflops"] > rows[1]["prefill_gflops"] > 0 and rows[0]["prefill_gflops"] > rows[2]["prefill_gflops"]
    # prompt = 10 text + 16 image tokens; FastV after layer 1 of 2: layer 1 caches all 26, layer 2 the 10 + 8 kept
    assert rows[1]["kv_ratio"] == pytest.approx((26 + 18) / 52) and rows[2]["kv_ratio"] == pytest.approx(14 / 26)
    assert get_patch(llava) is None and "| fastv_llm keep 0.5 layers 1 | 8 / 16 |" in format_lvlm_table(rows)
    # SparseVLM at layers 1, 2: layer 1 caches all 26, layer 2 the 10 text + 8 kept + 1 recycled; 4 kept at the end
    sv = run_lvlm_bench(llava, [vlprune.ReduceConfig("sparsevlm", layers=(1, 2), keep=(0.5, 0.25))], text_len=4,
                        flops_only=True)[1]
    assert sv["kept"] == 4 and sv["kv_ratio"] == pytest.approx((26 + 19) / 52)
    assert sv["prefill_gflops"] < rows[0]["prefill_gflops"]
