"""Knowledge distillation: KL divergence from a teacher's distribution to the student's.

``kl_distill(student, teacher, T) = T^2 * mean_i KL(softmax(teacher_i / T) || softmax(student_i / T))`` over the
rows of (N, C) logits (leading dimensions are flattened); the teacher carries no gradient. This is the usual
Hinton KD term (``F.kl_div(log_softmax(student), softmax(teacher))``), used by TiP and DynamicViT.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kl_distill(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    C = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, C).float() / temperature, dim=-1)
    t = F.softmax(teacher.detach().reshape(-1, C).float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean") * temperature**2
