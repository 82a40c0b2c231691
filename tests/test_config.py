import json
import math

import pytest

import vlprune
from vlprune.config import ModelConfig, TextConfig, VisionConfig, from_dict, override, to_dict


@pytest.mark.parametrize("name", ["tiny", "small", "albef-base", "vilt-base"])
def test_presets_round_trip(name):
    cfg = vlprune.load_preset(name)
    again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg


def test_albef_base_matches_paper_sizes():
    cfg = vlprune.load_preset("albef-base")
    v, t = cfg.vision, cfg.text
    assert (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_dim) == (256, 16, 768, 12, 12, 3072)
    assert (t.width, t.layers, cfg.fusion_layers, t.vocab_size) == (768, 6, 6, 30522)
    vilt = vlprune.load_preset("vilt-base")
    assert (vilt.arch, vilt.vision.patch_size, vilt.vision.image_size, vilt.vision.layers) == ("vilt", 32, 384, 12)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\].*valid keys"):
        from_dict(ModelConfig, {"colour": 1})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['depth'\] in config.vision"):
        from_dict(ModelConfig, {"vision": {"depth": 3}})


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(width=30, heads=4), "not divisible by vision.heads=4"),
        (dict(image_size=30, patch_size=8), "not divisible by vision.patch_size"),
        (dict(layers=0), r"vision.layers must be an integer >= 1, got 0"),
        (dict(act="swish"), "vision.act must be one of"),
        (dict(ln_eps=math.nan), r"vision.ln_eps must be in"),
        (dict(image_mean=(0.5, 0.5)), "must have 3 values"),
    ],
)
def test_bad_vision_values(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        VisionConfig(**kwargs)


def test_bad_model_values():
    with pytest.raises(ValueError, match="text.width=30 is not divisible"):
        TextConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="arch must be one of"):
        ModelConfig(arch="blip")
    with pytest.raises(ValueError, match="fusion_layers must be 0 for arch='vilt'"):
        ModelConfig(arch="vilt", fusion_layers=2)
    with pytest.raises(ValueError, match=r"momentum must be in \[0.0, 1.0\]"):
        ModelConfig(momentum=1.5)


def test_override_and_errors(tiny_cfg):
    cfg = override(tiny_cfg, **{"vision.image_size": 64})
    assert cfg.vision.image_size == 64 and cfg.vision.width == tiny_cfg.vision.width
    cfg = override(tiny_cfg, vision={"layers": 3}, embed_dim=8)
    assert cfg.vision.layers == 3 and cfg.embed_dim == 8
    with pytest.raises(ValueError, match="unknown config key 'vision.depth'"):
        override(tiny_cfg, **{"vision.depth": 3})


def test_unknown_preset_lists_valid(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'; valid presets: \['albef-base'"):
        vlprune.load_preset("huge")
    with pytest.raises(FileNotFoundError, match="model config file not found"):
        vlprune.load_preset(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: malformed JSON at line 1"):
        vlprune.load_preset(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(to_dict(vlprune.load_preset("tiny"))))
    assert vlprune.load_preset(good) == vlprune.load_preset("tiny")


def test_sizes_are_bounded_before_anything_is_allocated():
    """A config asking for terabytes is refused in its constructor (no tensor exists yet), naming the sizes; a
    size beyond its field's bound names the field and the allowed range."""
    import time

    import vlprune
    from vlprune.config import MAX_PARAMS, ModelConfig, estimate_params, from_dict, list_presets, load_preset

    huge = {"vision": {"image_size": 4096, "patch_size": 16, "width": 16384, "heads": 128, "layers": 256,
                       "mlp_dim": 65536}}
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"about [\d,.]+ billion parameters \([\d,]+ GB in float32\), over the limit "
                       r"of 10 billion \(vision: width 16384, layers 256"):
        from_dict(ModelConfig, huge)
    assert time.perf_counter() - t0 < 1.0
    for field, value, message in (("image_size", 16384, r"vision.image_size must be an integer in \[1, 8192\], got 16384"),
                                  ("layers", 10**6, r"vision.layers must be an integer in \[1, 256\]")):
        with pytest.raises(ValueError, match=message):
            from_dict(ModelConfig, {"vision": {field: value}})
    with pytest.raises(ValueError, match=r"text.vocab_size must be an integer in \[2, 2000000\]"):
        from_dict(ModelConfig, {"text": {"vocab_size": 10**9}})
    for name in list_presets():  # every preset fits, and the estimate is close to a built model's count
        assert estimate_params(load_preset(name)) < MAX_PARAMS
    model = vlprune.build_model("small")
    real = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert abs(estimate_params(load_preset("small")) - real) < 0.05 * real
