"""Foundation models: shapes, padding, batch independence, determinism, save/load, cheap attention rows, errors."""

import pytest
import torch

import vlprune
from vlprune.models import full_attention_map, load_pretrained, save_pretrained
from vlprune.models.vit import interpolate_pos_embed, sincos_pos_embed
from vlprune.reduce.functional import attention_probs

from conftest import make_batch


def test_albef_shapes(tiny_cfg, batch):
    model = vlprune.build_model(tiny_cfg).eval()
    images, ids, mask = batch
    out = model(images, ids, mask)
    B, L = ids.shape
    N = tiny_cfg.vision.num_patches
    assert out.image.x.shape == (B, 1 + N, tiny_cfg.vision.width)
    assert out.text.shape == out.fused.shape == (B, L, tiny_cfg.text.width)
    assert out.itm_logits.shape == (B, 2)
    assert model.image_embed(out.image).shape == (B, tiny_cfg.embed_dim)
    assert torch.allclose(model.image_embed(out.image).norm(dim=-1), torch.ones(B))
    assert torch.equal(out.image.size, torch.ones(B, 1 + N))
    assert model.mlm_head(out.fused).shape == (B, L, tiny_cfg.text.vocab_size)


def test_vilt_shapes(tiny_vilt_cfg):
    model = vlprune.build_model(tiny_vilt_cfg).eval()
    images, ids, mask = make_batch(tiny_vilt_cfg)
    out = model(images, ids, mask)
    assert out.text.shape == (3, ids.shape[1], 32)
    assert out.image.x.shape == (3, 17, 32)
    assert out.pooled.shape == (3, 32) and out.itm_logits.shape == (3, 2)


def test_albef_base_builds():
    with torch.device("meta"):
        model = vlprune.build_model("albef-base")
    online = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("momentum"))
    # ViT-B/16 (~86M) + BERT-base 12 layers incl. 6 fusion layers with cross-attention (~124M) + heads
    assert 200e6 < online < 240e6
    assert len(model.vision.layers) == 12 and len(model.text.layers) == 6 and len(model.fusion.layers) == 6
    assert model.image_queue.shape == (256, 65536)


@pytest.mark.parametrize("arch", ["albef", "vilt"])
def test_padding_never_changes_outputs(arch, tiny_cfg, tiny_vilt_cfg):
    cfg = tiny_cfg if arch == "albef" else tiny_vilt_cfg
    model = vlprune.build_model(cfg).eval()
    images, ids, mask = make_batch(cfg)
    pad = torch.zeros(ids.shape[0], 5, dtype=ids.dtype)
    ids2, mask2 = torch.cat([ids, pad + cfg.text.pad_token_id], 1), torch.cat([mask, pad], 1)
    a, b = model(images, ids, mask), model(images, ids2, mask2)
    L = ids.shape[1]
    real = mask.bool()
    torch.testing.assert_close(a.text[real], b.text[:, :L][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.itm_logits, b.itm_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.image.x, b.image.x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["albef", "vilt"])
def test_batch_independence(arch, tiny_cfg, tiny_vilt_cfg):
    cfg = tiny_cfg if arch == "albef" else tiny_vilt_cfg
    model = vlprune.build_model(cfg).eval()
    images, ids, mask = make_batch(cfg)
    full = model(images, ids, mask)
    for i in range(3):
        n = int(mask[i].sum())
        one = model(images[i : i + 1], ids[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(one.itm_logits[0], full.itm_logits[i], atol=1e-5, rtol=1e-5)
    # perturbing sample 2 leaves samples 0 and 1 bitwise unchanged
    images2, ids2 = images.clone(), ids.clone()
    images2[2] += 1.0
    ids2[2, 1] = 5
    other = model(images2, ids2, mask)
    assert torch.equal(other.itm_logits[:2], full.itm_logits[:2])


def test_eval_is_deterministic(tiny_cfg, batch):
    model = vlprune.build_model(tiny_cfg, **{"text.dropout": 0.1}).eval()
    a, b = model(*batch), model(*batch)
    assert torch.equal(a.itm_logits, b.itm_logits) and torch.equal(a.image.x, b.image.x)


def test_save_load_round_trip(tmp_path, tiny_cfg, batch):
    model = vlprune.build_model(tiny_cfg).eval()
    with torch.no_grad():
        model.image_queue.normal_()  # buffers travel too
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt").eval()
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(*batch).itm_logits, model(*batch).itm_logits)
    assert torch.equal(loaded.image_queue, model.image_queue)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_load_errors_name_keys(tmp_path, tiny_cfg):
    from safetensors.torch import load_file, save_file

    model = vlprune.build_model(tiny_cfg)
    d = save_pretrained(model, tmp_path / "ckpt")
    state = load_file(str(d / "model.safetensors"))
    state.pop("itm_head.weight")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['itm_head.weight'\].*unexpected keys \['extra.weight'\]"):
        load_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "nothing")


def test_load_shape_mismatch_is_named(tmp_path, tiny_cfg):
    d = save_pretrained(vlprune.build_model(tiny_cfg), tmp_path / "a")
    other = vlprune.build_model(tiny_cfg, embed_dim=8)
    save_pretrained(other, tmp_path / "b")
    import shutil

    shutil.copy(tmp_path / "b" / "model.safetensors", d / "model.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatches \['image_queue: checkpoint \(8, 24\) vs model \(16, 24\)"):
        load_pretrained(d)


def test_load_at_other_image_size_interpolates(tmp_path, tiny_cfg, batch):
    d = save_pretrained(vlprune.build_model(tiny_cfg), tmp_path / "a")
    big = load_pretrained(d, **{"vision.image_size": 48})
    assert big.vision.embeddings.pos_embed.shape == (1, 1 + 36, 32)
    out = big.eval()(torch.randn(3, 3, 48, 48), batch[1], batch[2])
    assert out.image.x.shape[1] == 37


def test_cheap_attention_rows_equal_full_map(tiny_cfg):
    """The [CLS] row and an external query row computed from the layer's q/k equal rows of the full map."""
    model = vlprune.build_model(tiny_cfg).eval()
    layer = model.vision.layers[1]
    x = torch.randn(3, 17, 32)
    h = layer.ln1(x)
    _, q, k = layer.attn(h)
    full = full_attention_map(q, k)
    torch.testing.assert_close(attention_probs(q[:, :, :1], k), full[:, :, :1], atol=1e-6, rtol=1e-6)
    # an external query through the layer's own q projection: equals the row of a map over [x; guide]
    guide = torch.randn(3, 1, 32)
    qg = layer.attn.project_query(layer.ln1(guide))
    _, q2, k2 = layer.attn(layer.ln1(torch.cat([x, guide], 1)))
    torch.testing.assert_close(qg, q2[:, :, -1:], atol=1e-6, rtol=1e-6)
    row = attention_probs(qg, k)
    big = full_attention_map(q2, k2[:, :, :17])
    torch.testing.assert_close(row, big[:, :, -1:], atol=1e-6, rtol=1e-6)


def test_attention_output_matches_explicit_softmax(tiny_cfg):
    model = vlprune.build_model(tiny_cfg).eval()
    attn = model.vision.layers[0].attn
    x = torch.randn(2, 5, 32)
    bias = torch.randn(2, 1, 1, 5)
    out, q, k = attn(x, bias=bias)
    v = attn.qkv(x).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)[2]
    ref = (full_attention_map(q, k, bias) @ v).transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(out, attn.proj(ref), atol=1e-5, rtol=1e-5)


def test_position_embedding_interpolation_identity_and_shape():
    pos = torch.randn(1, 17, 8)
    assert torch.equal(interpolate_pos_embed(pos, 4), pos)
    assert interpolate_pos_embed(pos, 6).shape == (1, 37, 8)


def test_sincos_position_embedding_against_a_loop_and_in_a_fresh_model(tiny_cfg):
    import dataclasses
    import math

    grid, width = 3, 8
    pe = sincos_pos_embed(grid, width)
    assert pe.shape == (1, 1 + grid * grid, width) and torch.equal(pe[0, 0], torch.zeros(width))
    for r in range(grid):
        for c in range(grid):
            want = []
            for v in (r, c):  # row channels first, then column channels: sin at each frequency, then cos
                f = [1.0 / 10000 ** (i / 2) for i in range(2)]
                want += [math.sin(v * a) for a in f] + [math.cos(v * a) for a in f]
            assert torch.allclose(pe[0, 1 + r * grid + c], torch.tensor(want), atol=1e-6)
    cfg = dataclasses.replace(tiny_cfg, vision=dataclasses.replace(tiny_cfg.vision, pos_init="sincos"))
    model = vlprune.build_model(cfg)
    assert torch.equal(model.vision.embeddings.pos_embed.data, sincos_pos_embed(cfg.vision.grid, cfg.vision.width))
    assert model.vision.embeddings.pos_embed.requires_grad  # a starting point, still learned
    with pytest.raises(ValueError, match="vision.pos_init must be one of"):
        dataclasses.replace(tiny_cfg.vision, pos_init="rope")
    with pytest.raises(ValueError, match="divisible by 4, got 30"):
        dataclasses.replace(tiny_cfg.vision, pos_init="sincos", width=30, heads=2)


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda i, t, m: (i[0], t, m), "rank 3"),
        (lambda i, t, m: (i[:, :1], t, m), "must have 3 channels, got 1"),
        (lambda i, t, m: (i[..., :16, :16], t, m), r"must be 32x32, got 16x16 \(pass interpolate_pos=True"),
        (lambda i, t, m: (i[:0], t[:0], m[:0]), "batch size 0"),
        (lambda i, t, m: (i[:2], t, m), r"image batch \(2\) and caption batch \(3\) differ"),
        (lambda i, t, m: (i, t, torch.zeros_like(m)), "fully padded"),
        (lambda i, t, m: (i, t + 1000, m), r"token ids must be in \[0, 100\]"),
        (lambda i, t, m: (i, t, m[:, :2]), "differ in shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_cfg, batch, make, msg):
    model = vlprune.build_model(tiny_cfg).eval()
    with pytest.raises(ValueError, match=msg):
        model(*make(*batch))


def test_interpolate_pos_runs_other_sizes(tiny_cfg, batch):
    model = vlprune.build_model(tiny_cfg).eval()
    out = model(torch.randn(3, 3, 48, 48), batch[1], batch[2], interpolate_pos=True)
    assert out.image.x.shape[1] == 37


def test_one_token_caption_no_nan(tiny_cfg):
    model = vlprune.build_model(tiny_cfg).eval()
    images, ids, mask = make_batch(tiny_cfg, lengths=(1, 1, 1))
    assert torch.isfinite(model(images, ids, mask).itm_logits).all()


def test_momentum_update_moves_towards_online(tiny_cfg):
    model = vlprune.build_model(tiny_cfg)
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    before = model.momentum_encoders["vision_proj"].weight.clone()
    model.momentum_update()
    after = model.momentum_encoders["vision_proj"].weight
    m = tiny_cfg.momentum
    torch.testing.assert_close(after, m * before + (1 - m) * model.vision_proj.weight)
    model.copy_to_momentum()
    assert torch.equal(model.momentum_encoders["vision_proj"].weight, model.vision_proj.weight)


def test_gradients_reach_every_online_parameter(tiny_cfg, batch):
    model = vlprune.build_model(tiny_cfg).train()
    out = model(*batch)
    loss = out.itm_logits.sum() + model.mlm_head(out.fused).sum() + model.image_embed(out.image).sum()
    loss = loss + model.text_embed(out.text).sum() + model.temp
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    # the token-type table only has type 0 used; the padding row of the word table is zeroed by design
    assert no_grad == [], no_grad
    assert all(p.grad is None for p in model.momentum_encoders.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_cpu_runs(tiny_cfg, batch, dtype):
    model = vlprune.build_model(tiny_cfg).eval().to(dtype)
    images, ids, mask = batch
    out = model(images.to(dtype), ids, mask)
    assert torch.isfinite(out.itm_logits.float()).all()
