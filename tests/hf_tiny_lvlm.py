"""Tiny random LLaVA-style models for the ``vlprune.patch`` LVLM tests (built from configs, nothing downloaded):
CLIP tower image 32, patch 8 (16 patches), width 32, 3 layers; Llama decoder 2 layers, width 64, 4 heads (2 kv
heads), vocab 120; image token 100. Prompts: left-padded [text, 16 x <image>, question] rows."""

from __future__ import annotations

import torch

IMAGE_ID, PAD_ID, VOCAB, N = 100, 0, 120, 16
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD_ID,
             bos_token_id=1, eos_token_id=2)


def llava(seed: int = 0, attn: str = "sdpa", layers: int = 2):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(vision_config=CLIP, text_config=dict(LLAMA, num_hidden_layers=layers), image_token_index=IMAGE_ID,
                                   image_seq_length=N, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default")
    cfg._attn_implementation = attn
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD_ID
    return model


def left_pad(rows):
    """(ids, mask) of 1-D token rows, left-padded to the longest."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD_ID)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = r
        mask[i, L - len(r):] = 1
    return ids, mask


def prompts(lengths=((3, 4), (1, 2), (2, 5)), seed: int = 1):
    """(input_ids, attention_mask, pixel_values) for prompts [bos, a text tokens, N image tokens, b text tokens],
    left-padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for a, b in lengths:
        t = torch.randint(3, IMAGE_ID, (a + b,), generator=g)
        rows.append(torch.cat([torch.tensor([1]), t[:a], torch.full((N,), IMAGE_ID), t[a:]]))
    ids, mask = left_pad(rows)
    px = torch.randn(len(rows), 3, 32, 32, generator=g)
    return ids, mask, px


def one(ids, mask, px, i):
    """Row i alone, its padding removed."""
    keep = mask[i].bool()
    return ids[i:i + 1, keep], mask[i:i + 1, keep], px[i:i + 1]


# -- a deliberately naive reference of the LLM-side methods (batch 1, no padding, no cache, full attention maps) --
def lm_inputs(model, inputs):
    """(inputs_embeds, position_ids or None) the unpatched model feeds its language model for these inputs."""
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["inputs_embeds"], seen.get("position_ids")


def _full_attention(layer, x, cos, sin):
    """(1, H, T, T) causal softmax attention of one Llama layer, the whole map, from HF's own RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    a = layer.self_attn
    T, d = x.shape[1], a.head_dim
    h = layer.input_layernorm(x)
    q = a.q_proj(h).view(1, T, -1, d).transpose(1, 2)
    k = a.k_proj(h).view(1, T, -1, d).transpose(1, 2)
    if cos.dim() == 4:  # transformers 4.x Qwen2-VL: unmerged M-RoPE sections
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_multimodal_rotary_pos_emb

        q, k = apply_multimodal_rotary_pos_emb(q, k, cos, sin, a.rope_scaling["mrope_section"])
    else:
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)).float() * d ** -0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return s, s.softmax(-1)


def naive_llm_logits(model, inputs, new_ids, method, layer, keep, image_id=IMAGE_ID):
    """Logits (T, V) of [prompt, new tokens] (one unpadded sample, ``inputs`` the model's keyword inputs) under
    FastV ("fastv_llm") or TRIPS-LVLM ("trips_llm") at 1-based ``layer``, written out layer by layer: the selection
    from the full attention map's last-prompt row; later layers see the kept tokens only, at their original
    positions (Qwen2-VL: its M-RoPE ids, new tokens at the last prompt position + 1, 2, ...). Returns
    (logits, chosen (N,) bool)."""
    import math

    lm = model.model.language_model
    prompt_ids = inputs["input_ids"]
    P = prompt_ids.shape[1]
    x, pos = lm_inputs(model, inputs)
    if pos is None:
        pos = torch.arange(P)[None]
    if pos.dim() == 3 and pos.shape[0] == 4:
        pos = pos[1:]
    t = new_ids.shape[1]
    if t:
        x = torch.cat([x, lm.embed_tokens(new_ids)], 1)
        pos = torch.cat([pos, pos[..., -1:] + torch.arange(1, t + 1)], -1)
    img = (prompt_ids[0] == image_id).nonzero()[:, 0]
    chosen = None
    for i, L in enumerate(lm.layers):
        cos, sin = lm.rotary_emb(x, pos)
        if i != layer - 1:
            x = L(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos if pos.dim() == 2 else None)
            x = x[0] if isinstance(x, tuple) else x
            continue
        logits, probs = _full_attention(L, x, cos, sin)
        if method == "fastv_llm":
            s = probs[0, :, P - 1].mean(0)[img]
            k = max(1, int(round(len(img) * keep)))
        else:
            s = logits[0, :, P - 1][:, img].softmax(-1).mean(0)
            k = math.ceil(len(img) * keep)
        top = sorted(sorted(range(len(img)), key=lambda j: (-float(s[j]), j))[:k])
        chosen = torch.zeros(len(img), dtype=torch.bool)
        chosen[top] = True
        if method == "fastv_llm":
            x = L(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos if pos.dim() == 2 else None)
            x = x[0] if isinstance(x, tuple) else x
        else:
            x = x + L.self_attn(hidden_states=L.input_layernorm(x), position_embeddings=(cos, sin), attention_mask=None)[0]
        drop = img[~chosen]
        rows = [j for j in range(x.shape[1]) if j not in set(drop.tolist())]
        if method == "trips_llm":
            fused = sum(float(s[j]) * x[0, img[j]] for j in range(len(img)) if not chosen[j])
            at = int(img[-1]) + 1 - len(drop)  # right after the kept image tokens
            xs = [x[0, j] for j in rows]
            cols = list(rows)
            xs.insert(at, fused)
            cols.insert(at, int(img[-1]))  # the fused token takes the last image token's position
            x = torch.stack(xs)[None]
            pos = pos[..., cols]
            x = x + L.mlp(L.post_attention_layernorm(x))
        else:
            x, pos = x[:, rows], pos[..., rows]
    return model.lm_head(lm.norm(x))[0], chosen


# -- Qwen2-VL: image grid (t, h, w) = (1, 8, 8) patches of 4 px -> 16 merged tokens per image ----------------------
Q_IMAGE, Q_START, Q_END = 110, 111, 112


def qwen2_vl(seed: int = 0, layers: int = 2):
    import transformers

    torch.manual_seed(seed)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, in_channels=3, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # transformers 4.x
                pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
    cfg = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=Q_IMAGE,
                                     vision_start_token_id=Q_START, vision_end_token_id=Q_END)
    cfg._attn_implementation = "sdpa"
    cfg.text_config._attn_implementation = "sdpa"
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD_ID
    return model


def qwen_prompts(lengths=((3, 4), (1, 2), (2, 5)), seed: int = 1):
    """dict(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids), left-padded rows
    [bos, a text, <vision_start>, 16 x <image>, <vision_end>, b text]."""
    import transformers

    g = torch.Generator().manual_seed(seed)
    rows = []
    for a, b in lengths:
        t = torch.randint(3, IMAGE_ID, (a + b,), generator=g)
        rows.append(torch.cat([torch.tensor([1]), t[:a], torch.tensor([Q_START]), torch.full((N,), Q_IMAGE),
                               torch.tensor([Q_END]), t[a:]]))
    ids, mask = left_pad(rows)
    B = len(rows)
    px = torch.randn(B * 64, 3 * 2 * 4 * 4, generator=g)
    grid = torch.tensor([[1, 8, 8]] * B)
    out = dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_grid_thw=grid)
    if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x needs the token types for M-RoPE; 4.x refuses them
        out["mm_token_type_ids"] = (ids == Q_IMAGE).long()
    return out


def qwen_one(inputs, i):
    """Row i alone, its padding removed."""
    keep = inputs["attention_mask"][i].bool()
    out = {k: inputs[k][i:i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    return dict(out, pixel_values=inputs["pixel_values"][i * 64:(i + 1) * 64], image_grid_thw=inputs["image_grid_thw"][i:i + 1])


# -- LLaVA-NeXT: images 32 x 64 -> base crop + a 1 x 2 tile grid: 16 + 4 x 8 + 4 newlines = 52 image tokens ------
NEXT_N = 52


def llava_next(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlavaNextConfig(vision_config=CLIP, text_config=LLAMA, image_token_index=IMAGE_ID,
                                       image_grid_pinpoints=[[32, 64], [64, 32]], vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD_ID
    return model


def next_prompts(lengths=((3, 4), (1, 2), (2, 5)), seed: int = 1):
    """dict(input_ids, attention_mask, pixel_values (B, 3 crops, 3, 32, 32), image_sizes), left-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for a, b in lengths:
        t = torch.randint(3, IMAGE_ID, (a + b,), generator=g)
        rows.append(torch.cat([torch.tensor([1]), t[:a], torch.full((NEXT_N,), IMAGE_ID), t[a:]]))
    ids, mask = left_pad(rows)
    B = len(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(B, 3, 3, 32, 32, generator=g),
                image_sizes=torch.tensor([[32, 64]] * B))


def next_one(inputs, i):
    keep = inputs["attention_mask"][i].bool()
    return dict({k: inputs[k][i:i + 1, keep] for k in ("input_ids", "attention_mask")},
                pixel_values=inputs["pixel_values"][i:i + 1], image_sizes=inputs["image_sizes"][i:i + 1])


def save_llava_with_processor(directory, seed: int = 0, next_: bool = False):
    """The tiny LLaVA (``next_``: LLaVA-NeXT, 1 x 2 / 2 x 1 tiles) saved with a local processor (CLIP image processor
    at 32 px; a BERT word-piece tokenizer whose 120-entry vocabulary puts "<image>" at IMAGE_ID and "[PAD]" at
    PAD_ID; no chat template) to ``directory``."""
    import inspect

    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "user", "assistant", ":", "what", "color", "is", "the",
             "cube", "red", "blue", "how", "many", "two", "yes", "no", "?", "answer", "question", "using", "a",
             "single", "word", "or", "phrase", "."]
    vocab = words + [f"w{i}" for i in range(len(words), VOCAB)]
    vocab[IMAGE_ID] = "<image>"
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    params = inspect.signature(transformers.BertTokenizerFast.__init__).parameters  # 5.x: vocab=, 4.x: vocab_file=
    tok = transformers.BertTokenizerFast(**{"vocab" if "vocab" in params else "vocab_file": str(directory / "vocab.txt")})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    how = dict(tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if next_:
        ip = transformers.LlavaNextImageProcessor(**size, image_grid_pinpoints=[[32, 64], [64, 32]])
        proc, model = transformers.LlavaNextProcessor(image_processor=ip, **how), llava_next(seed)
    else:
        ip = transformers.CLIPImageProcessor(**size)
        proc, model = transformers.LlavaProcessor(image_processor=ip, **how), llava(seed)
    model.save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory
