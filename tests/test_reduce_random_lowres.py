"""Random's seeding and fusion, lowres, and low precision of TRIPS, ELIP, EViT, random and lowres (their reference
parity and invariants are in test_reduce_trips_elip_evit.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from conftest import make_batch

import vlprune
from vlprune import ReduceConfig as RC

N = 16


def model_with(method, seed=0, **over):
    torch.manual_seed(seed)
    return vlprune.build_model("tiny", method=method, **over).eval()


def test_random_prefix_of_a_batch_chooses_as_the_smaller_batch(batch):
    images, ids, mask = batch
    model = model_with(RC("random", layers=(2, 3), keep=0.6))
    with torch.no_grad():
        big = model(images, ids, mask, generator=torch.Generator().manual_seed(9), trace=True)
        small = model(images[:2], ids[:2], mask[:2], generator=torch.Generator().manual_seed(9), trace=True)
        other = model(images, ids, mask, generator=torch.Generator().manual_seed(10), trace=True)
    for a, b in zip(big.image.trace, small.image.trace):
        assert torch.equal(a.source[:2], b.source)
    assert not all(torch.equal(a.source, b.source) for a, b in zip(big.image.trace, other.image.trace))


def test_random_fuse_is_the_mean_and_seeds_differ(batch):
    images, ids, mask = batch
    a = model_with(RC("random", layers=(2,), keep=0.5, options={"seed": 1}))(images, ids, mask, trace=True)
    b = model_with(RC("random", layers=(2,), keep=0.5, options={"seed": 2}))(images, ids, mask, trace=True)
    assert not torch.equal(a.image.trace[0].source, b.image.trace[0].source)
    model = model_with(RC("random", layers=(1,), keep=0.5, options={"fuse": True}))
    outs = []
    model.vision.layers[0].reducer.register_forward_hook(lambda m, args, o: outs.append((args[0].x, o)))
    model(images, ids, mask, trace=True)
    x_in, o = outs[0]
    for i in range(3):
        dropped = (~o.source[i, :-1, 1:].any(0)).nonzero().flatten()
        torch.testing.assert_close(o.x[i, -1], x_in[i, 1 + dropped].mean(0), atol=1e-6, rtol=0)


def test_lowres_is_the_model_on_resized_images(batch):
    images, ids, mask = batch
    model = model_with(RC("lowres", options={"image_size": 16}))
    with torch.no_grad():
        got = model(images, ids, mask)
        small = TF.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        vlprune.attach(model, None)
        assert model.vision.embeddings.input_size is None  # clear_reducers resets the input size
        want = model(small, ids, mask, interpolate_pos=True)
    assert got.image.x.shape[1] == 1 + 4
    assert torch.equal(got.image.x, want.image.x) and torch.equal(got.itm_logits, want.itm_logits)
    default = model_with("lowres")
    assert default.vision.embeddings.input_size == 16  # floor(4 / sqrt 2) * 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "rc",
    [RC("trips", layers=(2, 3), keep=0.5), RC("evit", layers=(2, 3), keep=0.5), RC("elip", layers=(2, 3), keep=(0.7, 0.4)),
     RC("elip", layers=(2, 3), keep=(0.7, 0.4), options={"lookahead": False}), RC("random", layers=(2,), keep=0.5),
     RC("lowres", options={"image_size": 16})],
)
def test_low_precision_runs_without_nan(rc, dtype, batch):
    images, ids, mask = batch
    model = model_with(rc).to(dtype)
    with torch.no_grad():
        out = model(images.to(dtype), ids, mask, trace=True)
    assert out.image.x.dtype == dtype and torch.isfinite(out.image.x).all() and torch.isfinite(out.itm_logits).all()


@pytest.mark.parametrize(
    "rc,tokens",
    [(RC("evit", layers=(2, 3), keep=0.5), 1 + 5 + 1), (RC("random", layers=(2, 3), keep=0.5), 1 + 4),
     (RC("lowres", options={"image_size": 16}), 1 + 4), (RC("trips", layers=(1,), keep=0.25), 1 + 4 + 1)],
)
def test_single_stream_model_runs(rc, tokens, tiny_vilt_cfg):
    images, ids, mask = make_batch(tiny_vilt_cfg)
    torch.manual_seed(0)
    model = vlprune.build_model(tiny_vilt_cfg, method=rc).eval()
    with torch.no_grad():
        out = model(images, ids, mask, trace=True)
        again = model(images, ids, mask, trace=True)
    assert out.image.x.shape[1] == tokens and torch.isfinite(out.itm_logits).all()
    assert torch.equal(out.itm_logits, again.itm_logits)
