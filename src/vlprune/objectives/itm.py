"""Image-text matching (ITM) with in-batch hard negatives sampled from the ITC similarities (ALBEF).

For each image a negative caption is drawn with probability ``softmax(sim_i2t)`` over the other captions of the
local batch, and for each caption a negative image likewise; captions of the same image (same id) are never
drawn. If a sample has no other image in the batch (all captions of one image), its negative falls back to a
uniformly drawn other sample: that pair is then not a true negative; batches from a shuffled sampler make this
rare. The fusion encoder scores B positives and 2B negatives; the loss is the cross-entropy of ``itm_logits``
(match = class 1).

``hard`` in [0, 1] mixes the two ways of drawing: ``hard * softmax(sim) + (1 - hard) * uniform`` over the valid
negatives. ALBEF uses ``hard = 1``. From random weights that is a trap: once ITC has learned a little, the
drawn negatives are exactly the captions that the easiest matching feature (ITC-like similarity) cannot tell
apart, so ITM stays at the class prior. Measured on the scenes data (``small``; 125 more ITC + ITM steps at lr
3e-4 from a 1000-step pre-training run whose ITM had stayed at 0.637, the prior): with ``hard = 1`` the ITM loss
stayed at 0.637; with uniform negatives it fell to 0.47. The pre-training task therefore ramps ``hard`` up over
training (``PretrainTask``'s ``hard_ramp``).

Text-guided image tokens: the image state passed in is each image encoded with its *own* caption as guide.
Negative pairs reuse those tokens (image i's tokens with caption j), as ALBEF + TRIPS do: re-encoding each
image for each negative caption would cost two more ViT passes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reduce.state import TokenState


def negative_weights(sim: Tensor, idx: Optional[Tensor] = None, hard: float = 1.0) -> Tensor:
    """sim (B, B) -> sampling weights (B, B): ``hard * softmax(sim) + (1 - hard) * uniform`` over each row, with
    the diagonal and same-id pairs zeroed."""
    B = sim.shape[0]
    if B < 2:
        raise ValueError(f"ITM hard negatives need a batch of at least 2 samples, got {B}")
    if not 0.0 <= hard <= 1.0:
        raise ValueError(f"ITM hard-negative share must be in [0, 1], got {hard}")
    same = torch.eye(B, dtype=torch.bool, device=sim.device)
    if idx is not None:
        same = same | (idx[:, None] == idx[None, :])
    p = F.softmax(sim.float(), dim=1)
    if hard < 1.0:
        p = hard * p + (1.0 - hard) / B
    w = p.masked_fill(same, 0.0) + (~same).float() * 1e-6
    empty = w.sum(1) == 0  # no other image in the batch: any other sample
    off_diag = ~torch.eye(B, dtype=torch.bool, device=sim.device)
    return torch.where(empty[:, None], off_diag.float(), w)


def sample_negatives(
    sim_i2t: Tensor, sim_t2i: Tensor, generator: Optional[torch.Generator] = None, idx: Optional[Tensor] = None,
    hard: float = 1.0,
) -> Tuple[Tensor, Tensor]:
    """(B,) index of a negative caption for each image, (B,) index of a negative image for each caption."""
    neg_txt = torch.multinomial(negative_weights(sim_i2t, idx, hard), 1, generator=generator).squeeze(1)
    neg_img = torch.multinomial(negative_weights(sim_t2i, idx, hard), 1, generator=generator).squeeze(1)
    return neg_txt, neg_img


def index_state(state: TokenState, i: Tensor) -> TokenState:
    """Rows ``i`` of every per-sample tensor of a TokenState (the trace is dropped)."""
    pick = lambda t: None if t is None else t[i]  # noqa: E731
    return state.replace(x=state.x[i], size=state.size[i], source=pick(state.source), mask=pick(state.mask), trace=None)


def cat_states(*states: TokenState) -> TokenState:
    s0 = states[0]
    cat = lambda name: None if getattr(s0, name) is None else torch.cat([getattr(s, name) for s in states])  # noqa: E731
    return s0.replace(x=cat("x"), size=cat("size"), source=cat("source"), mask=cat("mask"), trace=None)


def itm_loss(
    model, image: TokenState, text: Tensor, mask: Tensor, neg_txt: Tensor, neg_img: Tensor,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """ITM loss and accuracy over B positives + 2B negatives. image: the guided image state (B, T, D);
    text (B, L, D) text states with mask (B, L); neg_txt / neg_img from ``sample_negatives``."""
    B = text.shape[0]
    ar = torch.arange(B, device=text.device)
    images = cat_states(image, image, index_state(image, neg_img))
    texts = torch.cat([text, text[neg_txt], text])
    masks = torch.cat([mask, mask[neg_txt], mask])
    fused, _ = model.fuse(texts, masks, images, generator)
    logits = model.itm_head(fused[:, 0])
    labels = torch.cat([torch.ones_like(ar), torch.zeros(2 * B, dtype=torch.long, device=text.device)])
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.argmax(1) == labels).float().mean()
    return loss, acc.detach()
