"""SparseVLM (reduce/sparsevlm.py) in the tiny random LLaVA-1.5, LLaVA-NeXT and Qwen2-VL of tests/hf_tiny_lvlm.py:
a slow loop reference (one unpadded sample, full attention maps, no cache: raters, rater-row scores, recycling,
renumbered positions), batch = one by one (greedy and beam, KV cache; identity at keep 1.0 is in test_patch_lvlm*.py), the cache lengths, the
official schedules and DPC-kNN against loops."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import vlprune  # noqa: E402
from vlprune.patch import get_patch  # noqa: E402
from vlprune.reduce.sparsevlm import dpc_knn_merge, recycle_counts, schedule_fractions  # noqa: E402

import hf_tiny_lvlm as H  # noqa: E402
from test_patch_lvlm import assert_same_new_tokens  # noqa: E402
from test_patch_lvlm_families import GEN, patched_batch_and_alone  # noqa: E402

KEEP = (0.5, 0.25)  # layers 1 and 2 of the 2-layer tiny decoders

FAMILIES = {"llava": (H.llava, lambda: dict(zip(("input_ids", "attention_mask", "pixel_values"), H.prompts())),
                      lambda d, i: dict(zip(("input_ids", "attention_mask", "pixel_values"),
                                            H.one(d["input_ids"], d["attention_mask"], d["pixel_values"], i))),
                      H.IMAGE_ID),
            "qwen2_vl": (H.qwen2_vl, H.qwen_prompts, H.qwen_one, H.Q_IMAGE),
            "llava_next": (H.llava_next, H.next_prompts, H.next_one, H.IMAGE_ID)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, prompts, one, image_id = FAMILIES[request.param]
    return build(), prompts(), one, image_id


# -- the slow reference ------------------------------------------------------------------------------------------
def naive_dpc(x, c):
    """DPC-kNN written with loops: x (m, D) -> (c, D) cluster means in centre order."""
    m, D = x.shape
    d = [[float((x[i] - x[j]).norm()) / math.sqrt(D) for j in range(m)] for i in range(m)]
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[:c]) / c) for i in range(m)]
    far = max(max(r) for r in d)
    delta = [min([d[i][j] for j in range(m) if rho[j] > rho[i]], default=far) for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-rho[i] * delta[i], i))[:c]
    groups = {j: [] for j in range(c)}
    for i in range(m):
        groups[centres.index(i) if i in centres else min(range(c), key=lambda j: (d[i][centres[j]], j))].append(i)
    return torch.stack([x[groups[j]].mean(0) for j in range(c)])


def naive_sparsevlm(model, inputs, new_ids, layers, fracs, image_id):
    """Logits (T, V) of [prompt, new tokens] for one unpadded sample under SparseVLM, layer by layer, and the
    number of visual tokens after each stage."""
    lm = model.model.language_model
    P = inputs["input_ids"].shape[1]
    x, pos = H.lm_inputs(model, inputs)
    pos = torch.arange(P)[None] if pos is None else (pos[1:] if pos.dim() == 3 and pos.shape[0] == 4 else pos)
    ids = inputs["input_ids"][0].tolist()
    img = [j for j in range(P) if ids[j] == image_id]
    after = [j for j in range(P) if j > img[-1]]
    rel = [[float(x[0, i] @ x[0, j]) for j in after] for i in img]
    rel = [[math.exp(v - max(row)) / sum(math.exp(u - max(row)) for u in row) for v in row] for row in rel]
    r = [sum(row[a] for row in rel) / len(img) for a in range(len(after))]
    raters = [j for a, j in enumerate(after) if r[a] > sum(r) / len(r)] or after
    t = new_ids.shape[1]
    if t:
        x = torch.cat([x, lm.embed_tokens(new_ids)], 1)
        pos = torch.cat([pos, pos[..., -1:] + torch.arange(1, t + 1)], -1)
    vis = [j in img for j in range(x.shape[1])]
    rat = [j in raters for j in range(x.shape[1])]
    counts = []
    for i, L in enumerate(lm.layers):
        cos, sin = lm.rotary_emb(x, pos)
        h = L(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos if pos.dim() == 2 else None)
        h = h[0] if isinstance(h, tuple) else h
        if i + 1 not in layers:
            x = h
            continue
        _, probs = H._full_attention(L, x, cos, sin)
        V = [j for j in range(x.shape[1]) if vis[j]]
        R = [j for j in range(x.shape[1]) if rat[j]]
        s = {j: sum(float(probs[0, :, q, j].mean()) for q in R) / len(R) for j in V}
        k = max(1, round(fracs[layers.index(i + 1)] * len(img)))
        x = h
        if k >= len(V):
            counts.append(len(V))
            continue
        by_score = sorted(V, key=lambda j: (-s[j], j))
        kept, pruned = set(by_score[:k]), by_score[k:]
        m = min(len(pruned), int(3 * len(pruned) // 10) + 1)
        merged = naive_dpc(h[0, pruned[:m]], m // 10 + 1)
        last_kept = max(kept)
        src, rows, flags = [], [], []
        for j in range(x.shape[1]):
            if vis[j] and j not in kept:
                continue
            src.append(j), rows.append(h[0, j]), flags.append((vis[j], rat[j]))
            if j == last_kept:
                for v in merged:
                    src.append(j), rows.append(v), flags.append((True, False))
        x = torch.stack(rows)[None]
        pos = torch.stack([pos[..., s_] - s_ + jj for jj, s_ in enumerate(src)], -1)  # renumbered contiguously
        vis, rat = [f[0] for f in flags], [f[1] for f in flags]
        counts.append(sum(vis))
    return model.lm_head(lm.norm(x))[0], counts


# -- the tests -----------------------------------------------------------------------------------------------------
def test_equals_the_slow_reference_batched_and_one_by_one(family):
    model, data, one_of, image_id = family
    logits, kept, gen = patched_batch_and_alone(model, data, one_of, "sparsevlm", layers=(1, 2), keep=KEEP)
    L = data["input_ids"].shape[1]
    for i in range(gen.shape[0]):
        one = one_of(data, i)
        with torch.no_grad():
            ref, counts = H_ref(model, one, one["input_ids"][:, :0], image_id)
            n = int((one["input_ids"] == image_id).sum())
            m1, c1 = recycle_counts(n - round(KEEP[0] * n))
            assert counts[0] == round(KEEP[0] * n) + c1 and [int(k[1][i].sum()) for k in kept] == [
                round(KEEP[0] * n), round(KEEP[1] * n)]
            torch.testing.assert_close(logits[i, -1], ref[-1], atol=1e-4, rtol=1e-4)
            new = gen[i:i + 1, L:]
            for t in range(1, GEN["max_new_tokens"]):
                step, _ = H_ref(model, one, new[:, :t], image_id)
                assert int(step[-1].argmax()) == int(new[0, t]), (i, t)


def H_ref(model, one, new, image_id):
    return naive_sparsevlm(model, one, new, [1, 2], list(KEEP), image_id)


def test_beam_search_and_cache_lengths_on_llava():
    model = H.llava(layers=4)
    ids, mask, px = H.prompts()
    vlprune.patch(model, "sparsevlm", layers=(1, 2, 4), keep=0.5)  # the interpolated three-layer schedule
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
            batch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, num_beams=2, **GEN)
            for i in range(ids.shape[0]):
                a, am, p = H.one(ids, mask, px, i)
                alone = model.generate(input_ids=a, attention_mask=am, pixel_values=p, num_beams=2, **GEN)
                assert_same_new_tokens(batch[i, ids.shape[1]:], alone[0, a.shape[1]:], i)
    finally:
        vlprune.unpatch(model)
    cache = out.past_key_values
    lengths = [cache.layers[i].keys.shape[2] for i in range(4)]
    k = [max(1, round(f * H.N)) for f in schedule_fractions(0.5)]
    v1 = k[0] + recycle_counts(H.N - k[0])[1]
    v2 = k[1] + recycle_counts(v1 - k[1])[1]
    L = ids.shape[1]
    assert lengths == [L, L - H.N + v1, L - H.N + v2, L - H.N + v2]
    assert out.logits.shape[1] == L - H.N + k[2] + recycle_counts(v2 - k[2])[1]


def test_official_schedules_and_recycled_counts():
    for target, counts in {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}.items():
        assert [round(f * 576) for f in schedule_fractions(target / 576)] == list(counts)
    assert schedule_fractions(1.0) == [1.0, 1.0, 1.0]
    seen, M = [], 576
    for k in (300, 200, 110):  # the notes' counts with recycling: 309 / 204 / 113
        M = k + recycle_counts(M - k)[1]
        seen.append(M)
    assert seen == [309, 204, 113]


def test_dpc_knn_merge_equals_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 25, 6, generator=g)
    out = dpc_knn_merge(x, 3)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_dpc(x[b], 3))


def test_errors(family):
    model = family[0]
    with pytest.raises(ValueError, match="give one keep per layer"):
        vlprune.patch(model, "sparsevlm", layers=(1, 2), keep=0.5)
    with pytest.raises(ValueError, match=r"layer 3 out of range.*\[1, 2\]"):
        vlprune.patch(model, "sparsevlm")  # defaults 3, 7, 16 on a 2-layer decoder
    assert get_patch(model) is None
