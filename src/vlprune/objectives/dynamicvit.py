"""DynamicViT's losses (Rao et al., 2021; official code raoyongming/DynamicViT losses.py), pure functions.

Total (official defaults): task + ratio_weight (2.0) * ratio + cls_weight (0.5) * cls_distill + token_weight (0.5)
* token_distill. The masks and targets come from ``state.aux`` (``vlprune.reduce.dynamicvit.collect``).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from .distill import kl_distill
from .method_losses import MethodLossInputs, register_loss

def ratio_loss(masks: Sequence[Tensor], targets: Sequence[float]) -> Tensor:
    """mean_l mean_b (mean_i D^l_bi - rho_l)^2: masks (B, N) hard keep masks per pruning layer over all N
    candidates (the training path), targets the cumulative keep ratios rho_l."""
    if len(masks) == 0 or len(masks) != len(targets):
        raise ValueError(f"ratio_loss needs one target per mask, got {len(masks)} masks and {len(targets)} targets")
    return torch.stack([((m.float().mean(1) - t) ** 2).mean() for m, t in zip(masks, targets)]).mean()


def cls_distill_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the softmax outputs at ``temperature`` (batch mean, times T^2)."""
    return kl_distill(student_logits, teacher_logits, temperature)


def token_distill_loss(student_tokens: Tensor, teacher_tokens: Tensor, mask: Tensor) -> Tensor:
    """MSE between student and teacher token features over the tokens the last mask keeps.

    student_tokens, teacher_tokens (B, N, D) (candidates, [CLS] excluded), mask (B, N) the last hard mask.
    """
    keep = mask > 0.5
    if not keep.any():
        return student_tokens.sum() * 0.0
    return (student_tokens[keep].float() - teacher_tokens[keep].float()).pow(2).mean()


def dynamicvit_loss(
    task: Tensor, aux: Sequence, student_logits: Optional[Tensor] = None, teacher_logits: Optional[Tensor] = None,
    student_tokens: Optional[Tensor] = None, teacher_tokens: Optional[Tensor] = None,
    ratio_weight: float = 2.0, cls_weight: float = 0.5, token_weight: float = 0.5,
) -> Dict[str, Tensor]:
    """The weighted total and its parts from the AuxRecords of a training forward pass."""
    recs = [a for a in aux if a.method == "dynamicvit"]
    out = {"task": task, "ratio": ratio_loss([a.values["mask"] for a in recs], [a.values["target"] for a in recs])}
    total = task + ratio_weight * out["ratio"]
    if student_logits is not None and teacher_logits is not None:
        out["cls_distill"] = cls_distill_loss(student_logits, teacher_logits)
        total = total + cls_weight * out["cls_distill"]
    if student_tokens is not None and teacher_tokens is not None:
        out["token_distill"] = token_distill_loss(student_tokens, teacher_tokens, recs[-1].values["mask"])
        total = total + token_weight * out["token_distill"]
    out["total"] = total
    return out


@register_loss("dynamicvit")
def _dynamicvit_method_loss(inp: MethodLossInputs) -> Dict[str, Tensor]:
    w = {"ratio": 2.0, "distill": 1.0, "token_distill": 0.5, **inp.weights}
    return dynamicvit_loss(inp.task_loss, inp.aux, inp.logits, inp.teacher_logits, inp.student_tokens,
                           inp.teacher_tokens, ratio_weight=w["ratio"], cls_weight=w["distill"] / 2,
                           token_weight=w["token_distill"])
