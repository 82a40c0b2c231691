"""A minimal ALBEF pre-training step for ``vlprune bench --train``: forward + backward of ITC + ITM + MLM, the
optimiser step and the momentum update.

This is a stand-in written for the benchmark, so that the cost of a pre-training step can be measured before
``vlprune.objectives`` exists; once it lands, ``pretrain_loss`` should call it instead (the step's structure,
timing and memory measurement stay the same). What it computes, per batch of B matched pairs:

- ITC: image / text [CLS] embeddings against the momentum encoders' features of the batch and the queues
  (in-batch positives on the diagonal); ALBEF's momentum distillation (soft targets) is left out.
- ITM: the fusion encoder on B positive pairs and 2B hard negatives (one text per image and one image per text,
  sampled in proportion to the in-batch ITC similarity, the positive excluded); needs B >= 2.
- MLM: 15% of the real tokens (never position 0, never padding, at least one per caption) replaced by
  ``mask_token_id``; the masked text is encoded again and fused with the same image tokens.
Text-guided methods prune the image with the matching caption's [CLS]; negatives reuse those image tokens.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reduce.state import TokenState


def _take(state: TokenState, idx: Tensor) -> TokenState:
    """Rows ``idx`` of an image TokenState (for hard-negative pairs)."""
    pick = lambda t: None if t is None else t[idx]  # noqa: E731
    return state.replace(x=state.x[idx], size=state.size[idx], source=pick(state.source), mask=pick(state.mask))


def _cat(states) -> TokenState:
    s0 = states[0]
    cat = lambda name: None if getattr(s0, name) is None else torch.cat([getattr(s, name) for s in states])  # noqa: E731
    return s0.replace(x=cat("x"), size=cat("size"), source=cat("source"), mask=cat("mask"))


def mask_tokens(ids: Tensor, mask: Tensor, prob: float, mask_token_id: int, generator: Optional[torch.Generator]):
    """(masked ids, labels): each real token except position 0 is masked with probability ``prob``; every
    caption with a maskable token gets at least one. Labels are -100 where nothing is predicted."""
    eligible = mask.bool().clone()
    eligible[:, 0] = False
    r = torch.rand(ids.shape, generator=generator, device=ids.device)
    chosen = (r < prob) & eligible
    first = torch.where(eligible, r, torch.full_like(r, 2.0)).argmin(dim=1)  # lowest draw among eligible
    has = eligible.any(dim=1)
    chosen[has, first[has]] = True
    labels = ids.masked_fill(~chosen, -100)
    return ids.masked_fill(chosen, mask_token_id), labels


def _itc(model: nn.Module, img_f: Tensor, txt_f: Tensor, images: Tensor, ids: Tensor, mask: Tensor):
    me = model.momentum_encoders
    with torch.no_grad():
        if me is not None:
            img_m = F.normalize(me["vision_proj"](me["vision"](images).x[:, 0]), dim=-1)
            txt_m = F.normalize(me["text_proj"](me["text"](ids, mask)[:, 0]), dim=-1)
        else:
            img_m, txt_m = img_f.detach(), txt_f.detach()
        all_txt, all_img = txt_m.t(), img_m.t()
        if hasattr(model, "text_queue"):
            all_txt = torch.cat([all_txt, model.text_queue.clone().detach()], dim=1)
            all_img = torch.cat([all_img, model.image_queue.clone().detach()], dim=1)
    temp = model.temp.clamp(0.001, 0.5)
    sim_i2t, sim_t2i = img_f @ all_txt / temp, txt_f @ all_img / temp
    target = torch.arange(img_f.shape[0], device=img_f.device)
    loss = (F.cross_entropy(sim_i2t, target) + F.cross_entropy(sim_t2i, target)) / 2
    return loss, sim_i2t, sim_t2i, img_m, txt_m


@torch.no_grad()
def _enqueue(model: nn.Module, img_m: Tensor, txt_m: Tensor) -> None:
    if not hasattr(model, "text_queue"):
        return
    B, Q = img_m.shape[0], model.text_queue.shape[1]
    idx = (model.queue_ptr[0] + torch.arange(B, device=img_m.device)) % Q
    model.image_queue[:, idx] = img_m.t()
    model.text_queue[:, idx] = txt_m.t()
    model.queue_ptr[0] = (model.queue_ptr[0] + B) % Q


def pretrain_loss(
    model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor, generator: Optional[torch.Generator] = None,
    mlm_prob: float = 0.15, mask_token_id: Optional[int] = None,
) -> Dict[str, Tensor]:
    """ITC + ITM + MLM losses of an ALBEF model on B >= 2 matched pairs (see the module docstring)."""
    if model.cfg.arch != "albef":
        raise ValueError(f"the pre-training step needs an ALBEF model (arch 'albef'), got arch {model.cfg.arch!r}")
    B = images.shape[0]
    if B < 2:
        raise ValueError(f"a pre-training step needs batch size >= 2 (ITM hard negatives), got {B}")
    text = model.encode_text(ids, mask)
    image = model.encode_image(images, text, mask, generator)
    itc, sim_i2t, sim_t2i, img_m, txt_m = _itc(model, model.image_embed(image), model.text_embed(text), images, ids, mask)
    with torch.no_grad():
        eye = torch.eye(B, dtype=torch.bool, device=images.device)
        w_i2t = sim_i2t[:, :B].float().softmax(dim=1).masked_fill(eye, 0) + 1e-9 * (~eye)
        w_t2i = sim_t2i[:, :B].float().softmax(dim=1).masked_fill(eye, 0) + 1e-9 * (~eye)
        neg_txt = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
        neg_img = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    txt_all = torch.cat([text, text, text[neg_txt]])
    mask_all = torch.cat([mask, mask, mask[neg_txt]])
    img_all = _cat([image, _take(image, neg_img), image])
    fused, _ = model.fuse(txt_all, mask_all, img_all, generator)
    itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(images.device)
    itm = F.cross_entropy(model.itm_head(fused[:, 0]), itm_labels)
    mid = model.cfg.text.vocab_size - 1 if mask_token_id is None else mask_token_id
    masked, labels = mask_tokens(ids, mask, mlm_prob, mid, generator)
    fused_m, _ = model.fuse(model.encode_text(masked, mask), mask, image, generator)
    logits = model.mlm_head(fused_m)
    mlm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    _enqueue(model, img_m, txt_m)
    return {"itc": itc, "itm": itm, "mlm": mlm, "loss": itc + itm + mlm}


class PretrainStep:
    """One optimiser step: ``pretrain_loss`` forward + backward, AdamW step, momentum update."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, generator: Optional[torch.Generator] = None):
        self.model = model.train()
        self.generator = generator
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.02)

    def __call__(self, images: Tensor, ids: Tensor, mask: Tensor) -> float:
        losses = pretrain_loss(self.model, images, ids, mask, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.momentum_update()
        return float(losses["loss"].detach())


__all__ = ["PretrainStep", "pretrain_loss", "mask_tokens"]
