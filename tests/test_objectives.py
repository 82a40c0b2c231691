"""Objectives against naive references: ITC (queues, ids, distillation), queue wraparound, ITM negatives, MLM
masking, KL distillation, and the ITM/MLM losses on the tiny model."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import vlprune
from vlprune.objectives import enqueue, itc, itc_loss, itm_loss, kl_distill, mask_tokens, mlm_loss, sample_negatives
from vlprune.objectives.itm import negative_weights
from vlprune.objectives.mlm import IGNORE

from reference.objectives_ref import itc_naive, kl_naive


def _norm(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_itc_by_hand_two_pairs():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    temp = torch.tensor(0.5, dtype=torch.float64)
    idx = torch.tensor([0, 1])
    got = itc_loss(img, txt, img, txt, idx, idx, temp)
    import math

    # image 0: logits (1.2, 0) -> -log softmax_0; image 1: logits (1.6, 2) -> -log softmax_1; same for texts
    i2t = (-math.log(math.exp(1.2) / (math.exp(1.2) + 1)) - math.log(math.exp(2) / (math.exp(1.6) + math.exp(2)))) / 2
    t2i = (-math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6))) - math.log(math.exp(2) / (1 + math.exp(2)))) / 2
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_with_queue_and_shared_ids_matches_naive(alpha):
    B, Q, E = 3, 4, 5
    img, txt, img_m, txt_m = _norm(B, E, seed=1), _norm(B, E, seed=2), _norm(B, E, seed=3), _norm(B, E, seed=4)
    qi, qt = _norm(Q, E, seed=5), _norm(Q, E, seed=6)
    idx = torch.tensor([7, 8, 7])  # samples 0 and 2 share an image
    idx_q = torch.tensor([8, -100, 7, 9])
    keys_i, keys_t, idx_k = torch.cat([img_m, qi]), torch.cat([txt_m, qt]), torch.cat([idx, idx_q])
    temp = torch.tensor(0.07, dtype=torch.float64)
    got = itc_loss(img, txt, keys_i, keys_t, idx, idx_k, temp, alpha, img_m, txt_m)
    want = itc_naive(img.tolist(), txt.tolist(), keys_i.tolist(), keys_t.tolist(), idx.tolist(), idx_k.tolist(),
                     0.07, alpha, img_m.tolist(), txt_m.tolist())
    assert got.item() == pytest.approx(want, rel=1e-10)


def _queue_model(Q=5, E=3):
    m = types.SimpleNamespace()
    m.image_queue = torch.zeros(E, Q)
    m.text_queue = torch.zeros(E, Q)
    m.idx_queue = torch.full((1, Q), -100, dtype=torch.long)
    m.queue_ptr = torch.zeros(1, dtype=torch.long)
    m.temp = torch.tensor(0.1)
    return m


def test_enqueue_wraps_around():
    m = _queue_model()
    rows = lambda a, n: torch.arange(a, a + n, dtype=torch.float32)[:, None].repeat(1, 3)  # noqa: E731
    enqueue(m, rows(0, 3), rows(0, 3), torch.arange(3))
    assert m.queue_ptr.item() == 3
    enqueue(m, rows(10, 4), -rows(10, 4), torch.arange(10, 14))  # positions 3, 4, 0, 1
    assert m.queue_ptr.item() == 2
    assert m.idx_queue[0].tolist() == [12, 13, 2, 10, 11]
    assert m.image_queue[0].tolist() == [12.0, 13.0, 2.0, 10.0, 11.0]
    assert m.text_queue[1].tolist() == [-12.0, -13.0, 2.0, -10.0, -11.0]
    enqueue(m, rows(20, 7), rows(20, 7), torch.arange(20, 27))  # more rows than the queue: the last 5 stay
    assert sorted(m.idx_queue[0].tolist()) == [22, 23, 24, 25, 26] and m.queue_ptr.item() == 2


def test_itc_orchestrator_enqueues_momentum_features():
    m = _queue_model(Q=6, E=4)
    img, txt, img_m, txt_m = (_norm(2, 4, seed=s).float() for s in range(4))
    r = itc(m, img, txt, torch.tensor([0, 1]), 0.4, img_m, txt_m)
    assert torch.isfinite(r.loss) and r.sim_i2t.shape == (2, 2)
    torch.testing.assert_close(m.image_queue[:, :2].t(), img_m)
    torch.testing.assert_close(m.text_queue[:, :2].t(), txt_m)
    assert m.queue_ptr.item() == 2
    itc(m, img, txt, torch.tensor([0, 1]), 0.4, img_m, txt_m, update_queue=False)
    assert m.queue_ptr.item() == 2


def test_itm_negatives_never_positive():
    g = torch.Generator().manual_seed(0)
    B = 6
    idx = torch.tensor([0, 1, 0, 2, 3, 3])
    for _ in range(50):
        sim = torch.randn(B, B, generator=g) * 5
        nt, ni = sample_negatives(sim, sim.t(), g, idx)
        assert (idx[nt] != idx).all() and (idx[ni] != idx).all()
    # hard negatives follow the similarity: a dominant off-diagonal entry is drawn almost always
    sim = torch.zeros(3, 3)
    sim[0, 2] = 20.0
    counts = torch.bincount(torch.stack([sample_negatives(sim, sim, g)[0][0] for _ in range(200)]), minlength=3)
    assert counts[2] > 190 and counts[0] == 0
    # every sample of one image: fall back to other samples (never itself)
    w = negative_weights(torch.randn(3, 3, generator=g), torch.tensor([5, 5, 5]))
    assert (w.diagonal() == 0).all() and (w.sum(1) > 0).all()
    with pytest.raises(ValueError, match="at least 2"):
        negative_weights(torch.zeros(1, 1))


def test_itm_negative_hard_share():
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 1, 0, 2, 3])
    sim = torch.randn(5, 5, generator=g) * 5
    valid = (idx[:, None] != idx[None, :]).float()
    hard, uniform = negative_weights(sim, idx, 1.0), negative_weights(sim, idx, 0.0)
    # uniform: equal weight on every other-image sample, none on the same image
    norm = lambda w: w / w.sum(1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(norm(uniform), norm(valid), atol=1e-5, rtol=0)
    # the mix is the naive per-row formula hard * softmax + (1 - hard) / B, zeroed on same-image pairs
    mix = negative_weights(sim, idx, 0.3)
    ref = (0.3 * torch.softmax(sim, 1) + 0.7 / 5) * valid + valid * 1e-6
    torch.testing.assert_close(mix, ref)
    assert torch.equal(hard, negative_weights(sim, idx))  # default = ALBEF
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        negative_weights(sim, idx, 1.5)


def test_pretrain_hard_negative_ramp():
    from vlprune.tasks.base import StepContext
    from vlprune.tasks.pretrain import PretrainTask

    at = lambda t, step: t.hard_at(StepContext(torch.Generator(), None, step, 100, 5))  # noqa: E731
    t = PretrainTask(hard_ramp=0.5)
    assert [at(t, s) for s in (0, 25, 50, 99)] == [0.0, 0.5, 1.0, 1.0]
    assert at(PretrainTask(), 25) == 0.25  # default: the share of training done
    assert at(PretrainTask(hard_ramp=0.0), 0) == 1.0  # ALBEF: hard from the first step
    with pytest.raises(ValueError, match="hard_ramp"):
        PretrainTask(hard_ramp=2)


def test_mlm_masking_rate_and_specials():
    g = torch.Generator().manual_seed(0)
    V, B, L = 50, 400, 30
    specials = [0, 1, 2, 3, 4]
    ids = torch.randint(5, V, (B, L), generator=g)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids[:, 0] = 2
    ids[torch.arange(B), lengths - 1] = 3
    ids = ids.masked_fill(mask == 0, 0)
    out, labels = mask_tokens(ids, mask, V, 4, specials, torch.Generator().manual_seed(1))
    chosen = labels != IGNORE
    eligible = (mask > 0) & (ids > 4)
    assert not (chosen & ~eligible).any()  # never [PAD]/[CLS]/[SEP]
    assert torch.equal(out[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    rate = chosen.sum() / eligible.sum()
    assert abs(rate.item() - 0.15) < 0.01
    frac_mask = (out[chosen] == 4).float().mean().item()
    frac_same = (out[chosen] == ids[chosen]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_same - 0.1) < 0.03  # (random may also hit the same token)
    assert not torch.isin(out[chosen & (out != 4)], torch.tensor(specials)).any()
    again = mask_tokens(ids, mask, V, 4, specials, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], out) and torch.equal(again[1], labels)


def test_mlm_loss_and_distill():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    labels = torch.full((2, 4), IGNORE)
    assert mlm_loss(logits, labels).item() == 0.0  # nothing chosen: zero, not NaN
    labels[0, 1], labels[1, 3] = 2, 5
    want = (F.cross_entropy(logits[0, 1][None], torch.tensor([2])) + F.cross_entropy(logits[1, 3][None], torch.tensor([5]))) / 2
    torch.testing.assert_close(mlm_loss(logits, labels), want)
    t = torch.randn(2, 4, 7, generator=g)
    d = mlm_loss(logits, labels, 0.4, t)
    sel = labels != IGNORE
    soft = -(F.log_softmax(logits[sel], -1) * F.softmax(t[sel], -1)).sum(-1).mean()
    torch.testing.assert_close(d, 0.6 * want + 0.4 * soft)


def test_kl_distill_matches_naive():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    assert kl_distill(s, t, 2.0).item() == pytest.approx(kl_naive(s.tolist(), t.tolist(), 2.0), rel=1e-5)
    assert kl_distill(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_itm_loss_on_tiny_model(tiny_cfg, batch):
    model = vlprune.build_model(tiny_cfg)
    images, ids, mask = batch
    text = model.encode_text(ids, mask)
    image = model.encode_image(images, text, mask)
    nt, ni = sample_negatives(torch.randn(3, 3), torch.randn(3, 3), torch.Generator().manual_seed(0))
    loss, acc = itm_loss(model, image, text, mask, nt, ni)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= acc <= 1
    assert model.itm_head.weight.grad.abs().sum() > 0 and model.vision.layers[0].attn.qkv.weight.grad.abs().sum() > 0
