"""TiP's losses, pure functions: L = L_task + L_distill + L_sparsity + L_contrast + lam * L_continuity
(weights configurable, default 1; lam = 0 in training stage 1, 1 in stage 2). Inputs come from the AuxRecords that
the TiP reducers append to ``state.aux`` (see ``vlprune.reduce.tip``).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .distill import kl_distill
from .method_losses import MethodLossInputs, register_loss

NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Knowledge distillation: KL(p_teacher || p_student) of the softmax outputs (batch mean, times T^2), the usual
    ``kl_div(log p_student, p_teacher)`` reading of "KL(student logits || teacher logits)"."""
    return kl_distill(student_logits, teacher_logits, temperature)


def sparsity_loss(probs: Sequence[Tensor], targets: Sequence[float]) -> Tensor:
    """mean_l mean_{b,i} (p^l_bi - keep^l)^2 with p^l the cumulative keep probabilities (B, M) of pruner l and
    keep^l its cumulative target."""
    if len(probs) == 0 or len(probs) != len(targets):
        raise ValueError(f"sparsity_loss needs one target per layer, got {len(probs)} and {len(targets)}")
    return torch.stack([((p.float() - t) ** 2).mean() for p, t in zip(probs, targets)]).mean()


def contrast_loss(text_emb: Tensor, image_emb: Tensor, temp: Tensor) -> Tensor:
    """In-batch symmetric InfoNCE: text_emb, image_emb (B, E) (L2-normalised here), learnable temperature."""
    t = F.normalize(text_emb.float(), dim=-1)
    v = F.normalize(image_emb.float(), dim=-1)
    logits = t @ v.t() / temp.float().clamp_min(1e-3)
    labels = torch.arange(t.shape[0], device=t.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def continuity_loss_layer(p: Tensor, positions: Tensor, grid: int) -> Tensor:
    """Mean over tokens of the mean over each token's grid neighbours (8, fewer at borders or where a neighbour
    is absent) of (p_i - p_j)^2. p (B, M) keep probabilities, positions (B, M) grid index in [0, grid^2) or -1
    (a token that is not a single patch, ignored). Tokens without any neighbour are left out."""
    B, M = p.shape
    N = grid * grid
    valid = positions >= 0
    idx = torch.where(valid, positions, torch.full_like(positions, N))  # invalid tokens go to a dump cell N
    val = torch.zeros(B, N + 1, dtype=torch.float32, device=p.device).scatter(1, idx, p.float() * valid)
    occ = torch.zeros(B, N + 1, dtype=torch.float32, device=p.device).scatter(1, idx, valid.float())
    val = F.pad(val[:, :N].view(B, grid, grid), (1, 1, 1, 1))
    occ = F.pad(occ[:, :N].view(B, grid, grid), (1, 1, 1, 1))
    centre_v, centre_o = val[:, 1:-1, 1:-1], occ[:, 1:-1, 1:-1]
    sq = torch.zeros_like(centre_v)
    cnt = torch.zeros_like(centre_v)
    for dy, dx in NEIGHBOURS:
        nv = val[:, 1 + dy:1 + dy + grid, 1 + dx:1 + dx + grid]
        no = occ[:, 1 + dy:1 + dy + grid, 1 + dx:1 + dx + grid]
        sq = sq + no * (centre_v - nv) ** 2
        cnt = cnt + no
    use = (centre_o > 0) & (cnt > 0)
    if not use.any():
        return p.sum() * 0.0
    return (sq[use] / cnt[use]).mean()


def continuity_loss(probs: Sequence[Tensor], positions: Sequence[Optional[Tensor]], grid: int) -> Tensor:
    """Mean over pruning layers of ``continuity_loss_layer``."""
    if any(pos is None for pos in positions):
        raise ValueError("continuity loss needs grid positions: tokens were removed before TiP; run with trace=True")
    return torch.stack([continuity_loss_layer(p, pos, grid) for p, pos in zip(probs, positions)]).mean()


def tip_loss(
    task: Tensor, aux: Sequence, grid: int, student_logits: Optional[Tensor] = None,
    teacher_logits: Optional[Tensor] = None, weights: Optional[Dict[str, float]] = None, lam: float = 1.0,
) -> Dict[str, Tensor]:
    """The weighted total and its parts from the AuxRecords of a training pass (``state.aux``).

    weights: {"distill", "sparsity", "contrast", "continuity"} (default 1 each); lam multiplies continuity
    (0 in stage 1). ``grid`` is the patch grid side (sqrt N). Distillation needs the teacher's logits.
    """
    w = {"distill": 1.0, "sparsity": 1.0, "contrast": 1.0, "continuity": 1.0, **(weights or {})}
    recs = [a.values for a in aux if a.method == "tip" and "cum_prob" in a.values]
    if not recs:
        raise ValueError("no TiP training records in aux: run the model in train mode with method 'tip'")
    out = {"task": task, "sparsity": sparsity_loss([r["cum_prob"] for r in recs], [r["target"] for r in recs])}
    if all(r["text_emb"] is not None for r in recs):
        out["contrast"] = torch.stack([contrast_loss(r["text_emb"], r["image_emb"], r["temp"]) for r in recs]).mean()
    if lam != 0:
        out["continuity"] = continuity_loss([r["keep_prob"] for r in recs], [r["positions"] for r in recs], grid)
    if student_logits is not None and teacher_logits is not None:
        out["distill"] = distill_loss(student_logits, teacher_logits)
    total = task
    for name in ("distill", "sparsity", "contrast"):
        if name in out:
            total = total + w[name] * out[name]
    if "continuity" in out:
        total = total + lam * w["continuity"] * out["continuity"]
    out["total"] = total
    return out


def grid_side(num_patches: int) -> int:
    g = int(round(math.sqrt(num_patches)))
    if g * g != num_patches:
        raise ValueError(f"{num_patches} patches are not a square grid")
    return g


@register_loss("tip")
def _tip_method_loss(inp: MethodLossInputs) -> Dict[str, Tensor]:
    w = {k: inp.weights[k] for k in ("distill", "sparsity", "contrast", "continuity") if k in inp.weights}
    grid = grid_side(inp.model.cfg.vision.num_patches)
    return tip_loss(inp.task_loss, inp.aux, grid, inp.logits, inp.teacher_logits, w or None, inp.lam)
