"""One small working configuration per registered method, for the generic tests in test_methods_common.py.

CASES[name] = dict(
    model="tiny" | "tiny_vilt",          # the tiny ALBEF preset, or the tiny ViLT config below
    layers=..., keep=..., options=...,   # a ReduceConfig that really reduces on the tiny model
    noop=dict(layers=..., keep=..., options=...),  # the method's no-op setting: must equal the unpruned model
    skip={"check name": "reason"},       # optional: generic checks that do not apply, with the reason
)
Check names: "noop", "counts", "batch", "determinism", "roundtrip". A method missing here is skipped (with a
reason) by the generic tests; add it here with its module.
"""

from __future__ import annotations

import vlprune

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
    "laps": dict(model="tiny", layers=None, keep=0.5, options={}, noop=dict(keep=1.0),
                 skip={"counts": "LAPS reduces in its head after the encoders (tests/test_methods_b_losses.py)"}),
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
