"""Masked language modelling (MLM) conditioned on the image, BERT style.

Each real, non-special token is chosen with probability ``prob`` (0.15); of the chosen, 80% become [MASK], 10% a
random non-special token and 10% stay as they are; the loss is the cross-entropy on the chosen positions only.
[PAD], [CLS], [SEP] and other special tokens are never chosen. All randomness comes from an explicit generator.
Optional momentum distillation (ALBEF): ``(1 - alpha) * CE + alpha * soft CE`` against the softmax of teacher
logits given by the caller.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def mask_tokens(
    ids: Tensor, mask: Tensor, vocab_size: int, mask_id: int, special_ids: Sequence[int],
    generator: Optional[torch.Generator] = None, prob: float = 0.15,
) -> Tuple[Tensor, Tensor]:
    """ids, mask (B, L) -> (masked input ids (B, L), labels (B, L) with IGNORE where not chosen)."""
    if not 0.0 < prob < 1.0:
        raise ValueError(f"MLM masking probability must be in (0, 1), got {prob}")
    dev = ids.device
    specials = torch.tensor(sorted(set(int(s) for s in special_ids)), device=dev)
    allowed = (mask > 0) & ~torch.isin(ids, specials)
    u = torch.rand(ids.shape, generator=generator, device=dev)
    chosen = allowed & (u < prob)
    labels = ids.masked_fill(~chosen, IGNORE)
    v = torch.rand(ids.shape, generator=generator, device=dev)
    to_mask = chosen & (v < 0.8)
    to_rand = chosen & (v >= 0.8) & (v < 0.9)
    pool = torch.ones(vocab_size, dtype=torch.bool, device=dev)
    pool[specials[specials < vocab_size]] = False
    pool = pool.nonzero().squeeze(1)
    rand = pool[torch.randint(len(pool), ids.shape, generator=generator, device=dev)]
    out = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    out = torch.where(to_rand, rand, out)
    return out, labels


def mlm_loss(logits: Tensor, labels: Tensor, alpha: float = 0.0, teacher_logits: Optional[Tensor] = None) -> Tensor:
    """logits (B, L, V), labels (B, L) -> mean CE over chosen positions (0 with the graph kept if none chosen)."""
    sel = labels != IGNORE
    if not bool(sel.any()):
        return logits.sum() * 0.0
    lg = logits[sel].float()
    loss = F.cross_entropy(lg, labels[sel])
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("MLM distillation (alpha > 0) needs teacher logits")
        soft = F.softmax(teacher_logits[sel].float(), dim=-1)
        loss = (1 - alpha) * loss + alpha * -(F.log_softmax(lg, dim=-1) * soft).sum(-1).mean()
    return loss
