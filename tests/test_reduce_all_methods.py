"""Generic invariants of every registered method, on the working configuration of each in tests/method_cases.py:
the configured method really reduces, the no-op setting is the unpruned model, token counts and provenance add
up, batch independence, eval determinism and the save/load round trip. A registered method without a case fails."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch
from method_cases import CASES, model_config, reduce_config

import vlprune
from vlprune.reduce.state import CLS

METHODS = vlprune.list_methods()


def _case(name: str, check: str) -> dict:
    if name not in CASES:
        pytest.fail(f"method {name!r} has no entry in tests/method_cases.py CASES (add one with its module)")
    case = CASES[name]
    if check in case.get("skip", {}):
        pytest.skip(f"{name}: {case['skip'][check]}")
    return case


def _build(name: str, noop: bool = False, method: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = model_config(CASES[name]["model"])
    return vlprune.build_model(cfg, method=reduce_config(name, noop) if method else None).eval(), cfg


def _outputs(model, batch, generator=None, trace=False, name=None) -> dict:
    """The model's outputs, plus those of a method working outside the encoders (the case's ``outputs``)."""
    images, ids, mask = batch
    with torch.no_grad():
        out = model(images, ids, mask, generator=generator, trace=trace)
        extra = CASES[name]["outputs"](model, batch, out) if name and "outputs" in CASES[name] else {}
    if hasattr(out, "fused"):
        res = {"image": out.image.x, "fused": out.fused, "itm": out.itm_logits, "_state": out.fused_image}
    else:
        res = {"image": out.image.x, "text": out.text, "pooled": out.pooled, "itm": out.itm_logits, "_state": out.image}
    return {**res, **extra}


def _final_tokens(model, batch) -> int:
    """Image tokens after the encoders and the fusion / joint layers (eval mode)."""
    images, ids, mask = batch
    with torch.no_grad():
        out = model(images, ids, mask)
    return getattr(out, "fused_image", out.image).num_tokens


def _assert_equal(a: dict, b: dict, rows=None) -> None:
    for key in a:
        if key.startswith("_"):
            continue
        x, y = (a[key], b[key]) if rows is None else (a[key][rows], b[key][rows])
        assert torch.equal(x, y), key


def test_cases_name_registered_methods():
    unknown = sorted(set(CASES) - set(METHODS))
    assert not unknown, f"CASES has entries for unregistered methods {unknown}"


@pytest.mark.parametrize("name", [m for m in METHODS if m != "none"])
def test_configured_method_reduces_tokens(name):
    case = _case(name, "reduces")
    model, cfg = _build(name)
    batch = make_batch(cfg)
    before = 1 + cfg.vision.num_patches
    after = case.get("tokens", _final_tokens)(model, batch)
    assert after < before, f"{name} configured as {reduce_config(name)} kept all {before} tokens"


@pytest.mark.parametrize("name", METHODS)
def test_noop_setting_is_the_unpruned_model(name):
    _case(name, "noop")
    model, cfg = _build(name, method=False)
    batch = make_batch(cfg)
    want = _outputs(model, batch)
    vlprune.attach(model, reduce_config(name, noop=True))
    _assert_equal(want, _outputs(model, batch))


@pytest.mark.parametrize("name", METHODS)
def test_token_counts_and_provenance_add_up(name):
    _case(name, "counts")
    model, cfg = _build(name)
    state = _outputs(model, make_batch(cfg), trace=True)["_state"]
    B, T = state.x.shape[:2]
    assert state.source is not None and state.source.shape[:2] == (B, T)
    n_orig = state.source.shape[-1]
    for tr in state.trace:
        assert tr.source.shape[1] == tr.tokens and tr.kind.shape == (B, tr.tokens)
        assert (tr.kind[:, 0] == CLS).all()
        assert (tr.source.sum(dim=1) <= 1).all()  # no original patch in two tokens
        assert torch.equal(tr.source[:, 0], torch.eye(n_orig, dtype=torch.bool)[0].expand(B, -1))
    assert (state.source.sum(dim=1) <= 1).all()
    torch.testing.assert_close(state.size, state.source.sum(-1).to(state.size.dtype))
    assert state.size.sum(-1).le(n_orig).all()
    if name != "none" and state.trace:
        assert state.trace[-1].tokens == T


@pytest.mark.parametrize("name", METHODS)
def test_batch_independence(name):
    _case(name, "batch")
    model, cfg = _build(name)
    batch = make_batch(cfg)
    a = _outputs(model, batch, generator=torch.Generator().manual_seed(3), name=name)
    images, ids, mask = batch
    images = images.clone()
    images[2] = torch.randn_like(images[2])
    b = _outputs(model, (images, ids, mask), generator=torch.Generator().manual_seed(3), name=name)
    _assert_equal(a, b, rows=slice(0, 2))


@pytest.mark.parametrize("name", METHODS)
def test_eval_is_deterministic(name):
    _case(name, "determinism")
    model, cfg = _build(name)
    batch = make_batch(cfg)
    _assert_equal(_outputs(model, batch, name=name), _outputs(model, batch, name=name))


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip(name, tmp_path):
    _case(name, "roundtrip")
    model, cfg = _build(name)
    batch = make_batch(cfg)
    vlprune.save_pretrained(model, tmp_path / "ckpt")
    loaded = vlprune.load_pretrained(tmp_path / "ckpt").eval()
    assert loaded.method_config == model.method_config
    _assert_equal(_outputs(model, batch, name=name), _outputs(loaded, batch, name=name))
