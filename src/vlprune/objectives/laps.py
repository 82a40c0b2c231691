"""LAPS's losses, pure functions (seed: the LAPS paper; official code CrossmodalGroup/LAPS lib/loss.py, vse.py).

Paper: bidirectional triplet loss with margin 0.2 on the hardest in-batch negatives, plus the ratio loss
(rho - mean D)^2 (official weight 2.0). The official code sums the hinge over all negatives in the first epoch
(``hardest=False``) and uses the hardest negatives afterwards; sums over anchors (VSE++ convention).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor


def triplet_loss(sim: Tensor, margin: float = 0.2, hardest: bool = True, ids: Optional[Tensor] = None) -> Tensor:
    """sim (B, B) image x caption similarities, positives on the diagonal (or where ``ids`` (B,) of the images
    match). Image->text: relu(margin + S_ik - S_ii) over negatives k; text->image: relu(margin + S_kj - S_jj).
    ``hardest``: keep the largest violation per anchor; else sum over all negatives. Summed over anchors."""
    B = sim.shape[0]
    if sim.dim() != 2 or sim.shape[1] != B:
        raise ValueError(f"triplet_loss needs a square (B, B) similarity matrix, got {tuple(sim.shape)}")
    diag = sim.diagonal().view(B, 1)
    cost_t = (margin + sim - diag).clamp(min=0)  # image i as anchor, row i: captions
    cost_i = (margin + sim - diag.t()).clamp(min=0)  # caption j as anchor, column j: images
    if ids is None:
        pos = torch.eye(B, dtype=torch.bool, device=sim.device)
    else:
        pos = ids.view(-1, 1) == ids.view(1, -1)
    cost_t = cost_t.masked_fill(pos, 0)
    cost_i = cost_i.masked_fill(pos, 0)
    if hardest:
        return cost_t.amax(dim=1).sum() + cost_i.amax(dim=0).sum()
    return cost_t.sum() + cost_i.sum()


def ratio_loss(decisions: Tensor, rho: float) -> Tensor:
    """(mean D - rho)^2 over all pairs and patches: decisions (..., N) in {0, 1}."""
    return (decisions.float().mean() - rho) ** 2


def laps_loss(sim: Tensor, decisions: Tensor, rho: float, margin: float = 0.2, hardest: bool = True,
              ratio_weight: float = 2.0, ids: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Total = triplet + ratio_weight * ratio (official ratio_weight 2.0)."""
    out = {"triplet": triplet_loss(sim, margin, hardest, ids), "ratio": ratio_loss(decisions, rho)}
    out["total"] = out["triplet"] + ratio_weight * out["ratio"]
    return out
