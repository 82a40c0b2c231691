"""Image-text contrastive loss (ITC) with momentum distillation and feature queues, as in ALBEF.

Letters: B local batch, G global batch (all ranks), Q queue size, E embedding width.

Keys (the other side of each similarity) are, for the current batch, the *momentum* features gathered from all
ranks when the model has momentum encoders, else the online features gathered from all ranks *with gradient*;
then the queue. Positives are the keys with the same image id (two captions of one image are not negatives of
each other); targets are spread uniformly over the positives. With ``alpha > 0`` and momentum features the
targets are ``alpha * softmax(momentum similarities) + (1 - alpha) * hard targets`` (ALBEF's momentum
distillation). After the loss, the gathered momentum (or detached online) features of the global batch are
enqueued on every rank, so the queues stay identical across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import gather, gather_with_grad


def positive_targets(idx: Tensor, idx_keys: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """idx (B,), idx_keys (K,) -> (B, K) rows summing to 1 over the keys with the same id."""
    pos = (idx[:, None] == idx_keys[None, :]).to(dtype)
    n = pos.sum(1, keepdim=True)
    if bool((n == 0).any()):
        raise ValueError("ITC: a sample has no positive key (its own feature must be among the keys)")
    return pos / n


def _f32(x: Tensor) -> Tensor:
    """At least float32 (half precision logits are promoted; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """mean_i -sum_k targets_ik log softmax(logits)_ik."""
    return -(F.log_softmax(_f32(logits), dim=1) * targets).sum(1).mean()


def itc_loss(
    img: Tensor, txt: Tensor, img_keys: Tensor, txt_keys: Tensor, idx: Tensor, idx_keys: Tensor, temp: Tensor,
    alpha: float = 0.0, img_m: Optional[Tensor] = None, txt_m: Optional[Tensor] = None,
) -> Tensor:
    """The symmetric ITC loss. img, txt (B, E) normalised queries; img_keys, txt_keys (K, E); idx (B,), idx_keys
    (K,); img_m, txt_m (B, E) momentum features for the distillation targets (needed when alpha > 0)."""
    sim_i2t = img @ txt_keys.t() / temp
    sim_t2i = txt @ img_keys.t() / temp
    hard = positive_targets(idx, idx_keys, _f32(sim_i2t).dtype)
    t_i2t = t_t2i = hard
    if alpha > 0:
        if img_m is None or txt_m is None:
            raise ValueError("ITC momentum distillation (alpha > 0) needs momentum features")
        with torch.no_grad():
            t_i2t = alpha * F.softmax(_f32(img_m @ txt_keys.t() / temp), dim=1) + (1 - alpha) * hard
            t_t2i = alpha * F.softmax(_f32(txt_m @ img_keys.t() / temp), dim=1) + (1 - alpha) * hard
    return (soft_cross_entropy(sim_i2t, t_i2t) + soft_cross_entropy(sim_t2i, t_t2i)) / 2


@dataclass
class ITCResult:
    loss: Tensor
    sim_i2t: Tensor  # (B, B) local online similarities / temp, detached: for ITM hard negatives
    sim_t2i: Tensor


def itc(model, img: Tensor, txt: Tensor, idx: Tensor, alpha: float = 0.0,
        img_m: Optional[Tensor] = None, txt_m: Optional[Tensor] = None, update_queue: bool = True) -> ITCResult:
    """ITC for a model with ``temp`` and optional queues (``image_queue``, ``text_queue``, ``idx_queue``,
    ``queue_ptr``); gathers across ranks, computes the loss, then (``update_queue``) enqueues the global batch."""
    temp = model.temp
    if img_m is not None:
        img_keys, txt_keys = gather(img_m), gather(txt_m)
    else:
        img_keys, txt_keys = gather_with_grad(img), gather_with_grad(txt)
    idx_all = gather(idx)
    idx_keys = idx_all
    queued = getattr(model, "image_queue", None) is not None
    if queued:
        img_keys = torch.cat([img_keys, model.image_queue.t().clone().detach()])
        txt_keys = torch.cat([txt_keys, model.text_queue.t().clone().detach()])
        idx_keys = torch.cat([idx_all, model.idx_queue[0].clone()])
    loss = itc_loss(img, txt, img_keys, txt_keys, idx, idx_keys, temp, alpha if img_m is not None else 0.0, img_m, txt_m)
    if queued and update_queue:
        n = idx_all.shape[0]
        enqueue(model, img_keys[:n].detach(), txt_keys[:n].detach(), idx_all)
    with torch.no_grad():
        s = img @ txt.t() / temp
    return ITCResult(loss, s.detach(), s.t().detach())


@torch.no_grad()
def enqueue(model, img: Tensor, txt: Tensor, idx: Tensor) -> None:
    """Write rows (n, E) at the queue pointer, wrapping around; n > Q keeps the last Q rows."""
    Q = model.image_queue.shape[1]
    if img.shape[0] > Q:
        img, txt, idx = img[-Q:], txt[-Q:], idx[-Q:]
    n = img.shape[0]
    ptr = int(model.queue_ptr[0])
    pos = (ptr + torch.arange(n, device=img.device)) % Q
    model.image_queue[:, pos] = img.t().to(model.image_queue.dtype)
    model.text_queue[:, pos] = txt.t().to(model.text_queue.dtype)
    model.idx_queue[0, pos] = idx.to(model.idx_queue.dtype)
    model.queue_ptr[0] = (ptr + n) % Q
