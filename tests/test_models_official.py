"""Official checkpoints: ALBEF (every variant), ELIP, LAPS and PuMer's ViLT load into our models with a report of
every key, and give the official code's outputs. The checkpoints are tiny fakes with the official names and shapes
(tests/reference/official_fakes.py), made here; nothing is downloaded."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import vlprune
from vlprune.models.heads import task_head
from vlprune.models.official import load_official, to_official
from vlprune.reduce.laps import laps_similarity
from vlprune.reduce.tip import tip_keep_count

from conftest import make_batch
from reference.official_fakes import FakeALBEF, FakeLAPS, FakePuMerViLT, interpolate_like_albef

CFG = vlprune.load_preset("tiny")


def _save(tmp_path, state, name="ckpt.pth", **extra):
    path = tmp_path / name
    torch.save({"model": state, **extra}, path)
    return path


def _fake_albef(variant, **kw):
    torch.manual_seed(1)
    return FakeALBEF(variant, **kw).eval()


@pytest.mark.parametrize("variant", ["pretrain", "retrieval"])
def test_albef_loads_and_matches_the_official_forward(variant, tmp_path):
    fake = _fake_albef(variant)
    model, rep = load_official(_save(tmp_path, fake.state_dict()), "albef", heads=4)
    assert rep.ok and rep.variant == variant
    images, ids, mask = make_batch(CFG)
    with torch.no_grad():
        out = model.eval()(images, ids, mask)
        ref_cls = fake.fused_cls(images, ids, mask)
        torch.testing.assert_close(out.itm_logits, fake.itm_head(ref_cls), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.image.x, fake.visual_encoder(images, 4), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.image_embed(out.image), nn.functional.normalize(
            fake.vision_proj(fake.visual_encoder(images, 4)[:, 0]), dim=-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.text_embed(out.text), nn.functional.normalize(
            fake.text_proj(fake.bert().text(ids, mask, 4)[:, 0]), dim=-1), atol=1e-5, rtol=1e-5)
    # the momentum copies and the queues are the checkpoint's, not copies of the online weights
    assert torch.equal(model.momentum_encoders.vision.embeddings.pos_embed, fake.visual_encoder_m.pos_embed)
    assert torch.equal(model.image_queue, fake.image_queue)
    ignored = dict(rep.ignored)
    assert all("position_ids" not in k for k, _, _ in rep.loaded)
    if variant == "pretrain":
        assert torch.equal(model.mlm_head.bias, fake.text_encoder.cls.predictions.bias)
        assert "text_encoder.cls.predictions.decoder.weight" in ignored
        assert "idx_queue" in dict(rep.initialised)
    else:
        assert torch.equal(model.idx_queue, fake.idx_queue)
        assert all(k.startswith("mlm_head.") for k, _ in rep.initialised)
    # every key of theirs is accounted for, exactly once
    theirs = set(fake.state_dict())
    used = {t for _, ts, _ in rep.loaded for t in ts.split(", ")}
    assert used | set(ignored) == theirs and not used & set(ignored)


def test_albef_ve_head_and_vqa_decoder(tmp_path):
    fake = _fake_albef("ve")
    model, rep = load_official(_save(tmp_path, fake.state_dict()), "albef", heads=4)
    images, ids, mask = make_batch(CFG)
    with torch.no_grad():
        cls = model.eval().encode_pair(images, ids, mask).cls
        torch.testing.assert_close(task_head(model, "ve")(cls), fake.cls_head(fake.fused_cls(images, ids, mask)),
                                   atol=1e-5, rtol=1e-5)
    assert rep.variant == "ve" and model.task_heads["ve"].style == "albef"
    assert "cls_head_m.0.weight" in dict(rep.ignored)
    # the momentum projections ALBEF's VE model lacks start as copies of the online ones
    assert torch.equal(model.momentum_encoders.vision_proj.weight, model.vision_proj.weight)
    fake = _fake_albef("vqa")
    model, rep = load_official(_save(tmp_path, fake.state_dict(), "vqa.pth"), "albef", heads=4)
    why = dict(rep.ignored)["text_decoder.bert.encoder.layer.0.crossattention.self.query.weight"]
    assert "decoder" in why and "fine-tuned" in why
    assert "vqa" not in model.task_heads and any("VQA" in n for n in rep.notes)
    assert {k.split(".")[0] for k, _ in rep.initialised} >= {"vision_proj", "text_proj", "itm_head", "temp"}


def test_albef_nlvr2_loads_the_encoders_and_names_the_rest(tmp_path):
    fake = _fake_albef("nlvr2")
    model, rep = load_official(_save(tmp_path, fake.state_dict()), "albef", heads=4)
    assert rep.ok and rep.variant == "nlvr2"
    assert model.cfg.fusion_layers == 2 and model.cfg.text.layers == 2
    assert torch.equal(model.text.layers[1].attn_ln.weight, fake.text_encoder.encoder.layer[1].attention.output.LayerNorm.weight)
    assert "text_encoder.encoder.layer.5.crossattention.self.key.weight" in dict(rep.ignored)
    assert any(k.startswith("fusion.layers.0.") for k, _ in rep.initialised)


def test_albef_position_embeddings_interpolated_as_the_official_code(tmp_path):
    fake = _fake_albef("retrieval")
    model, rep = load_official(_save(tmp_path, fake.state_dict()), "albef", heads=4, image_size=48)
    want = interpolate_like_albef(fake.visual_encoder.pos_embed.detach(), 6)
    torch.testing.assert_close(model.vision.embeddings.pos_embed, want, atol=1e-6, rtol=0)
    assert any("interpolated 16 -> 36" in how for o, _, how in rep.loaded if o == "vision.embeddings.pos_embed")


def test_round_trip_ours_to_official_names_and_back(tmp_path):
    torch.manual_seed(2)
    ours = vlprune.build_model("tiny").eval()
    path = _save(tmp_path, to_official(ours, "albef"))
    back, rep = load_official(path, "albef", heads=4)
    for k, v in ours.state_dict().items():
        if not k.startswith("mlm_head."):  # a retrieval-layout file has no MLM head (reported)
            assert torch.equal(v, back.state_dict()[k]), k
    laps = vlprune.build_model("tiny", method=vlprune.ReduceConfig("laps", options={"official": True})).eval()
    back, rep = load_official(_save(tmp_path, to_official(laps, "laps"), "laps.pth"), "laps", heads=4)
    assert rep.ok and back.cfg.fusion_layers == 1  # LAPS has no fusion encoder: one, initialised (reported)
    for k, v in laps.state_dict().items():
        if k.startswith(("vision.", "text.", "laps.")):
            assert torch.equal(v, back.state_dict()[k]), k
    vilt = vlprune.build_model(_vilt_cfg(), method=vlprune.ReduceConfig(
        "tip", layers=(2, 3), keep=0.5, options={"placement": "post_mlp", "count": "pumer", "proj_dim": 8}))
    vlprune.models.heads.add_task_head(vilt, "vqa", 5, "vilt")
    path = _save(tmp_path, to_official(vilt, "pumer-vilt"), "vilt.pth")
    back, rep = load_official(path, "pumer-vilt", heads=4, keep=0.5)
    assert rep.method == vilt.method_config.to_dict()
    for k, v in vilt.state_dict().items():
        if not k.startswith("mlm_head.") and not k.endswith("reducer.temp"):
            assert torch.equal(v, back.state_dict()[k]), k


def test_errors_name_unknown_missing_and_mismatched_keys(tmp_path):
    sd = _fake_albef("retrieval").state_dict()
    bad = dict(sd)
    bad["visual_encoder.extra.weight"] = torch.zeros(2)
    del bad["itm_head.bias"]
    bad["text_proj.weight"] = torch.zeros(3, 32)
    with pytest.raises(ValueError) as e:
        load_official(_save(tmp_path, bad), "albef", heads=4)
    msg = str(e.value)
    assert "visual_encoder.extra.weight" in msg and "itm_head.bias" in msg and "text_proj.weight" in msg
    model, rep = load_official(_save(tmp_path, bad), "albef", heads=4, strict=False)
    assert rep.unknown == ["visual_encoder.extra.weight"] and ("itm_head.bias", "itm_head.bias") in rep.missing
    assert re.search(r"UNKNOWN +visual_encoder\.extra\.weight", rep.table()) and "MISSING" in rep.table(full=True)
    assert "vision.layers.#.attn.qkv.{weight,bias}" in rep.table(full=True)  # layers and weight/bias grouped
    with pytest.raises(ValueError, match="not a LAPS state dict"):
        load_official(_save(tmp_path, sd), "laps")
    with pytest.raises(ValueError, match="valid: \\['albef', 'elip', 'laps', 'pumer-vilt'\\]"):
        load_official(_save(tmp_path, sd), "blip")
    with pytest.raises(FileNotFoundError):
        load_official(tmp_path / "nope.pth", "albef")
    torch.save({"model": sd, "thing": _Opaque()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_official(tmp_path / "pickled.pth", "albef")
    torch.save({"state_dict": {k: v for k, v in sd.items()}}, tmp_path / "sd.pth")
    assert load_official(tmp_path / "sd.pth", "albef", heads=4)[1].ok  # the {"state_dict": ...} wrapper
    from safetensors.torch import save_file

    save_file({"module." + k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ddp.safetensors"))
    assert load_official(tmp_path / "ddp.safetensors", "albef", heads=4)[1].ok  # DDP's module. prefix


class _Opaque:
    pass


def test_elip_takes_its_schedule_from_the_checkpoint_config(tmp_path):
    fake = _fake_albef("pretrain")
    prune = {"begin_layer": [0, 1], "num_act_layers": [1, 1], "keep_ratio": [0.9, 0.5]}
    model, rep = load_official(_save(tmp_path, fake.state_dict(), config={"img_prune": prune}), "elip", heads=4)
    assert rep.method == {"name": "elip", "layers": [1, 2], "keep": [0.9, 0.5], "options": {"spans": [1, 1]}}
    images, ids, mask = make_batch(CFG)
    out = model.eval()(images, ids, mask, trace=True)
    assert [t.tokens for t in out.image.trace] == [1 + 14 + 1, 1 + 8 + 1]  # floor(0.9 * 16), floor(0.5 * 16), + fused


def test_laps_scale_folded_exactly(tmp_path):
    torch.manual_seed(3)
    fake = FakeLAPS(scale=1.7).eval()
    opt = __import__("argparse").Namespace(sparse_ratio=0.5, aggr_ratio=0.4, embed_size=20)
    model, rep = load_official(_save(tmp_path, fake.state_dict(), opt=opt), "laps", heads=4)
    assert rep.ok and rep.method["options"]["official"] is True
    assert "txt_enc.bert.pooler.dense.weight" in dict(rep.ignored)
    v = torch.randn(3, 8, 20)
    with torch.no_grad():
        folded = model.laps.aggr(v).transpose(1, 2).softmax(-1)
        torch.testing.assert_close(folded, fake.aggregation_weights(v), atol=1e-6, rtol=0)
        # the whole similarity, folded vs an unfolded head that multiplies by the scale itself
        unfolded = copy.deepcopy(model)
        last = unfolded.laps.aggr[3]
        last.weight.copy_(fake.cross_net.aggr_net.weight[3].weight)
        last.bias.copy_(fake.cross_net.aggr_net.weight[3].bias)
        unfolded.laps.aggr = nn.Sequential(unfolded.laps.aggr, _Scale(fake.cross_net.aggr_net.scale))
        images, ids, mask = make_batch(CFG)
        img, txt = model.encode_image(images), model.encode_text(ids, mask)
        torch.testing.assert_close(laps_similarity(model.eval(), img, txt, mask),
                                   laps_similarity(unfolded.eval(), img, txt, mask), atol=1e-6, rtol=0)
        torch.testing.assert_close(img.x, fake.img_enc.visual_encoder(images, 4), atol=1e-5, rtol=1e-5)


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s.reshape(())


def _vilt_cfg():
    return vlprune.ModelConfig(
        arch="vilt", vision=vlprune.VisionConfig(image_size=32, patch_size=8, width=32, layers=4, heads=4, mlp_dim=37,
                                                 ln_eps=1e-6),
        text=vlprune.TextConfig(vocab_size=101, width=32, layers=0, heads=4, mlp_dim=37, max_len=40), fusion_layers=0)


@pytest.mark.parametrize("keep", [0.5, 0.7])
def test_pumer_vilt_matches_pumers_inference(keep, tmp_path):
    torch.manual_seed(4)
    fake = FakePuMerViLT(prune_layers=(1, 2)).eval()
    d = tmp_path / "pumer"
    d.mkdir()
    torch.save(fake.state_dict(), d / "pytorch_model.bin")
    (d / "config.json").write_text(f'{{"prune_layers": [1, 2], "keep_ratio": {keep}, "prune_method": "mlp_states"}}')
    model, rep = load_official(d, "pumer-vilt", heads=4)
    assert rep.ok and rep.variant == "vqa"
    assert rep.method == {"name": "tip", "layers": [2, 3], "keep": keep,
                          "options": {"placement": "post_mlp", "count": "pumer", "proj_dim": 8}}
    assert "mlm_score" not in str(rep.ignored) and "vilt.text_embeddings.position_ids" in dict(rep.ignored)
    images, ids, mask = make_batch(CFG)
    with torch.no_grad():
        itm, vqa, kept = fake(images, ids, mask, keep)
        out = model.eval()(images, ids, mask, trace=True)
        torch.testing.assert_close(out.itm_logits, itm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(task_head(model, "vqa")(out.pooled), vqa, atol=1e-5, rtol=1e-5)
    # the kept sets, as sets (PuMer keeps score order, we keep spatial order): the second pruner's indices are
    # positions among the first pruner's survivors, mapped back to patches through the provenance
    first = [set((p + 1).tolist()) for p in kept[0]]
    ours = [set(r.nonzero()[:, 1].tolist()) for r in out.image.trace[0].source[:, 1:].unbind(0)]
    assert first == ours
    assert [t.tokens for t in out.image.trace] == [1 + int(17 * keep), 1 + int((1 + int(17 * keep)) * keep)]


def test_tip_pumer_options_against_naive_counts_and_placement():
    for m in range(1, 40):
        for keep in (0.1, 0.25, 0.5, 0.7, 1.0):
            assert tip_keep_count(keep, m, "pumer") == max(1, min(m, int((1 + m) * keep)))
            assert tip_keep_count(keep, m) == max(1, min(m, -(-keep * m // 1)))
    images, ids, mask = make_batch(CFG)
    torch.manual_seed(5)
    base = vlprune.build_model("tiny", method=vlprune.ReduceConfig("tip", layers=(1,), keep=0.5)).eval()
    post = copy.deepcopy(base)
    vlprune.attach(post, vlprune.ReduceConfig("tip", layers=(1,), keep=0.5, options={"placement": "post_mlp"}))
    post.load_state_dict(base.state_dict())
    with torch.no_grad():  # in a fusion slot the image tokens do not change inside the layer: the same result
        assert torch.equal(base(images, ids, mask).itm_logits, post(images, ids, mask).itm_logits)
    with pytest.raises(ValueError, match="placement must be one of"):
        vlprune.build_model("tiny", method=vlprune.ReduceConfig("tip", options={"placement": "after"}))


def test_tip_post_mlp_in_vilt_scores_the_layer_output():
    torch.manual_seed(6)
    cfg = _vilt_cfg()
    rc = vlprune.ReduceConfig("tip", layers=(2,), keep=0.5, options={"placement": "post_mlp"})
    model = vlprune.build_model(cfg, method=rc).eval()
    images, ids, mask = make_batch(cfg)
    seen = {}
    layer = model.layers[1]
    layer.reducer.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].x.clone()))
    plain = vlprune.build_model(cfg).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".reducer." not in k})
    outs = {}
    plain.layers[1].register_forward_hook(lambda mod, args, out: outs.update(img=out[1].x))
    with torch.no_grad():
        model(images, ids, mask)
        plain(images, ids, mask)
    torch.testing.assert_close(seen["x"], outs["img"], atol=0, rtol=0)  # the pruner saw the layer's output


def test_elip_count_cls_matches_elips_clip_count():
    images, ids, mask = make_batch(CFG)
    for count_cls in (False, True):
        rc = vlprune.ReduceConfig("elip", layers=(2, 3), keep=(0.9, 0.65), options={"count_cls": count_cls})
        model = vlprune.build_model("tiny", method=rc).eval()
        with torch.no_grad():
            out = model(images, ids, mask, trace=True)
        n = 16 + (1 if count_cls else 0)  # ELIP's CLIP code: int(197 * ratio) counts [CLS] among the tokens
        assert [t.tokens for t in out.image.trace] == [1 + int(n * 0.9) + 1, 1 + int(n * 0.65) + 1]
    assert [int(197 * r) for r in (0.9, 0.65, 0.4)] == [177, 128, 78]


def test_save_pretrained_keeps_the_head_style(tmp_path):
    fake = _fake_albef("ve")
    model, _ = load_official(_save(tmp_path, fake.state_dict()), "albef", heads=4)
    vlprune.save_pretrained(model, tmp_path / "saved")
    back = vlprune.load_pretrained(tmp_path / "saved")
    assert back.task_heads["ve"].style == "albef"
    assert torch.equal(back.task_heads["ve"].net[2].weight, model.task_heads["ve"].net[2].weight)
