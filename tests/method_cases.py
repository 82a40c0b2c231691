"""One small working configuration per registered method, for the generic tests in test_reduce_all_methods.py.

CASES[name] = dict(
    model="tiny" | "tiny_vilt",          # the tiny ALBEF preset, or the tiny ViLT config below
    layers=..., keep=..., options=...,   # a ReduceConfig that really reduces on the tiny model
    noop=dict(layers=..., keep=..., options=...),  # the method's no-op setting: must equal the unpruned model
    skip={"check name": "reason"},       # optional: generic checks that do not apply, with the reason
    outputs=fn(model, batch, out) -> {name: tensor},  # optional: outputs of a method that works outside the
                                         # encoders (LAPS's similarity), compared by the generic checks too
    tokens=fn(model, batch) -> int,      # optional: image tokens after the method's last reduction (default: the
                                         # image state after the encoders and the fusion / joint layers)
)
Check names: "reduces", "noop", "counts", "batch", "determinism", "roundtrip". A registered method missing here fails the
generic tests: add it here with its module.
"""

from __future__ import annotations

import torch

import vlprune
from vlprune.reduce.laps import laps_similarity


def _laps_outputs(model, batch, out) -> dict:
    """LAPS's image x caption similarity (its reduction happens there, after both encoders)."""
    return {"laps_similarity": laps_similarity(model, out.image, out.text, batch[2])}


def _laps_tokens(model, batch) -> int:
    """Tokens of LAPS's slimmed set for the first image-caption pair: [CLS], N_c aggregated, 1 fused."""
    images, ids, mask = batch
    with torch.no_grad():
        out = model(images, ids, mask)
        head = model.laps
        img, words = head.image_proj(out.image.x[:1]), head.text_proj(out.text[:1])
        tokens, _ = head.slim(img[:, :1], img[:, 1:], head.scores(img[:, 1:], words, mask[:1]))
    return tokens.shape[1]

CASES = {
    "none": dict(model="tiny", layers=None, keep=None, options={}, noop=dict()),
    "trips": dict(model="tiny", layers=(2, 3), keep=0.5, options={}, noop=dict(layers=(2, 3), keep=1.0)),
    "elip": dict(model="tiny", layers=(2, 3), keep=(0.7, 0.4), options={"lam": 0.8},
                 noop=dict(layers=(2, 3), keep=1.0)),
    "evit": dict(model="tiny", layers=(2, 4), keep=0.6, options={}, noop=dict(layers=(2, 4), keep=1.0)),
    "random": dict(model="tiny", layers=(2, 3), keep=0.5, options={"seed": 1}, noop=dict(layers=(2, 3), keep=1.0)),
    "lowres": dict(model="tiny", layers=None, keep=None, options={"image_size": 16},
                   noop=dict(options={"image_size": 32})),
    "tome": dict(model="tiny", layers=None, keep=None, options={"r": 3}, noop=dict(options={"r": 0})),
    "dynamicvit": dict(model="tiny", layers=(2, 3), keep=0.6, options={}, noop=dict(layers=(2, 3), keep=1.0)),
    "tip": dict(model="tiny_vilt", layers=(1, 3), keep=0.5, options={}, noop=dict(layers=(1, 3), keep=1.0)),
    "laps": dict(model="tiny", layers=None, keep=0.5, options={}, noop=dict(keep=1.0), outputs=_laps_outputs,
                 tokens=_laps_tokens,
                 skip={"counts": "LAPS keeps no provenance: its slimmed tokens are aggregates of all kept patches"}),
    "fastv": dict(model="tiny", layers=(1,), keep=0.5, options={}, noop=dict(layers=(1,), keep=1.0)),
}


def model_config(name: str) -> vlprune.ModelConfig:
    """The tiny configs of tests/conftest.py by name."""
    if name == "tiny":
        return vlprune.load_preset("tiny")
    if name == "tiny_vilt":
        return vlprune.ModelConfig(
            arch="vilt",
            vision=vlprune.VisionConfig(image_size=32, patch_size=8, width=32, layers=4, heads=4, mlp_dim=37),
            text=vlprune.TextConfig(vocab_size=101, width=32, layers=0, heads=4, mlp_dim=37, max_len=40),
            fusion_layers=0,
        )
    raise ValueError(f"unknown test model {name!r}; valid: 'tiny', 'tiny_vilt'")


def reduce_config(name: str, noop: bool = False) -> vlprune.ReduceConfig:
    case = CASES[name]
    spec = case["noop"] if noop else case
    return vlprune.ReduceConfig(name, layers=spec.get("layers"), keep=spec.get("keep"), options=spec.get("options", {}))
