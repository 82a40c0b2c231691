"""Parity with Hugging Face: tiny random checkpoints saved by the test, loaded through vlprune.from_hf."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlprune  # noqa: E402
from vlprune.models.hf import read_checkpoint, vision_from_hf  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    clip = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(num_hidden_layers=3, image_size=32, patch_size=8, **SMALL)
    ).eval()
    clip.save_pretrained(root / "clip")
    vit = transformers.ViTModel(
        transformers.ViTConfig(num_hidden_layers=2, image_size=32, patch_size=8, **SMALL), add_pooling_layer=False
    ).eval()
    vit.save_pretrained(root / "vit")
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(vocab_size=99, num_hidden_layers=4, max_position_embeddings=40, **SMALL)
    ).eval()
    bert.save_pretrained(root / "bert")
    return root, clip, vit, bert


def _images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _text():
    ids = torch.tensor([[2, 5, 7, 9, 11, 3], [2, 8, 4, 3, 0, 0]])
    return ids, (ids != 0).long()


def test_clip_vision_parity(hf_dirs):
    root, clip, _, bert = hf_dirs
    model = vlprune.from_hf(vision=root / "clip", text=root / "bert").eval()
    images = _images()
    with torch.no_grad():
        ref = clip(pixel_values=images, output_hidden_states=True)
        ours = model.vision(images, final_norm=False)
        normed = model.vision(images)
    torch.testing.assert_close(ours.x, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normed.x[:, 0], ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert model.cfg.vision.act == "quick_gelu" and model.cfg.vision.pre_norm


def test_vit_parity(hf_dirs):
    root, _, vit, _ = hf_dirs
    cfg, state = vision_from_hf(*read_checkpoint(root / "vit"))
    enc = vlprune.models.VisionTransformer(cfg).eval()
    enc.load_state_dict(state, strict=True)
    images = _images()
    with torch.no_grad():
        ref = vit(pixel_values=images).last_hidden_state  # ViTModel applies its final layernorm
        ours = enc(images).x
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_bert_parity_text_and_fusion_init(hf_dirs):
    root, _, _, bert = hf_dirs
    model = vlprune.from_hf(vision=root / "clip", text=root / "bert", text_layers=2).eval()
    ids, mask = _text()
    with torch.no_grad():
        ref = bert.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours = model.encode_text(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[2][real], atol=1e-5, rtol=1e-5)
    # the fusion layers start from BERT's upper layers (self-attention and MLP), as ALBEF does
    hf3 = bert.bert.encoder.layer[3]
    ours3 = model.fusion.layers[1]
    q, k, v = (getattr(hf3.attention.self, n).weight for n in ("query", "key", "value"))
    assert torch.equal(ours3.attn.qkv.weight, torch.cat([q, k, v]))
    assert torch.equal(ours3.mlp.fc2.weight, hf3.output.dense.weight)
    assert len(model.text.layers) == 2 and len(model.fusion.layers) == 2
    # MLM head loaded and tied to the word embeddings: equals HF's MLM logits on the same states
    with torch.no_grad():
        h = ref[4]
        torch.testing.assert_close(model.mlm_head(h), bert.cls(h), atol=1e-5, rtol=1e-5)
    # momentum copies start equal to the loaded weights
    assert torch.equal(model.momentum_encoders["text"].layers[0].attn.qkv.weight, model.text.layers[0].attn.qkv.weight)


def test_full_bert_as_text_encoder_parity(hf_dirs):
    root, _, _, bert = hf_dirs
    from vlprune.models.hf import text_from_hf

    cfg, text_sd, fusion_sd, _ = text_from_hf(*read_checkpoint(root / "bert"), text_layers=4)
    enc = vlprune.models.TextEncoder(cfg).eval()
    enc.load_state_dict(text_sd, strict=True)
    assert fusion_sd == {}
    ids, mask = _text()
    with torch.no_grad():
        ref = bert.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(enc(ids, mask)[real], ref[real], atol=1e-5, rtol=1e-5)


def test_from_hf_other_image_size_and_save_round_trip(hf_dirs, tmp_path):
    root = hf_dirs[0]
    model = vlprune.from_hf(vision=root / "clip", text=root / "bert", image_size=48).eval()
    assert model.cfg.vision.image_size == 48
    ids, mask = _text()
    images = torch.randn(2, 3, 48, 48)
    a = model(images, ids, mask).itm_logits
    vlprune.save_pretrained(model, tmp_path / "m")
    b = vlprune.load_pretrained(tmp_path / "m").eval()(images, ids, mask).itm_logits
    assert torch.equal(a, b)


def test_from_hf_errors(hf_dirs, tmp_path):
    root = hf_dirs[0]
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        vlprune.from_hf(vision=str(tmp_path / "nope"), text=root / "bert")
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "weird" / "model.safetensors").write_bytes(
        (root / "bert" / "model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="unsupported text encoder model_type 'gpt2'"):
        vlprune.from_hf(vision=root / "clip", text=tmp_path / "weird")
    with pytest.raises(ValueError, match="leaves none for the fusion encoder"):
        vlprune.from_hf(vision=root / "clip", text=root / "bert", text_layers=4)


def test_corrupt_hf_checkpoint_names_the_file(hf_dirs, tmp_path):
    """A bad config.json or a truncated weight file is a ValueError (CLI exit 2) that names the file."""
    import shutil

    root = hf_dirs[0]
    bad = tmp_path / "bad_config"
    shutil.copytree(root / "clip", bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not a readable JSON config"):
        read_checkpoint(bad)
    nested = tmp_path / "nested"
    shutil.copytree(root / "clip", nested)
    (nested / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match=r"config\.json"):
        read_checkpoint(nested)
    cut = tmp_path / "truncated"
    shutil.copytree(root / "clip", cut)
    w = next(cut.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{w.name}: cannot read the weights"):
        vlprune.from_hf(vision=cut, text=root / "bert")


def test_eval_hf_truncated_weights_exit_2(hf_dirs, tmp_path, capsys):
    """``--hf`` on a directory whose weights were cut short: exit 2 and a message naming the directory."""
    import shutil

    from vlprune.cli import main

    cut = tmp_path / "clip_cut"
    shutil.copytree(hf_dirs[0] / "clip", cut)
    w = next(cut.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:100])
    from vlprune.patch.hub import load_hf

    with pytest.raises(ValueError, match=r"clip_cut.*(truncated or corrupt)"):
        load_hf(str(cut))
    (tmp_path / "t.json").write_text(json.dumps([{"image": "a.png", "caption": ["a red cube"]}]))
    rc = main(["eval", "retrieval", "--hf", str(cut), "--test", str(tmp_path / "t.json")])
    assert rc == 2
    assert "clip_cut" in capsys.readouterr().err
