"""What the fine-tuning tasks share: starting from a pre-trained run (``--init``), the teacher of TiP's and
DynamicViT's distillation (``--teacher``), TiP's two training stages, and the losses of the learned methods.

The saved-model layout (a run directory or a ``save_pretrained`` directory, and its tokenizer) and ``load_init``
live in ``vlprune.models.build`` (``checkpoint_dir``, ``tokenizer_dir``, ``model_config``, ``load_init``); they are
re-exported here for earlier imports.

TiP's stages (the TiP paper): stage 1 freezes the backbone and trains the pruners and the task head with lam = 0
(no continuity loss); stage 2 also trains the cross-modal layers (ViLT: the joint encoder, its final norm and
pooler; ALBEF: the fusion encoder) with lam = 1. Without a stage everything trains with lam = 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..models.build import checkpoint_dir, load_init, load_pretrained, model_config, tokenizer_dir  # noqa: F401
from ..objectives.method_losses import MethodLossInputs, method_loss
from ..reduce.registry import get_spec, installed_spec, list_methods

log = logging.getLogger(__name__)
PathLike = Union[str, Path]


def load_teacher(path: PathLike, device: torch.device) -> nn.Module:
    """The distillation teacher: the same task fine-tuned without pruning, frozen, in eval mode."""
    teacher = load_pretrained(checkpoint_dir(path), method=None).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def set_stage(model: nn.Module, stage: Optional[int]) -> None:
    """Freeze for TiP's stage 1 (reducers + task heads train) or stage 2 (also the cross-modal layers)."""
    if stage is None:
        return
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    spec = installed_spec(model)
    if spec is None or not spec.stages:
        staged = [n for n in list_methods() if get_spec(n).stages]
        raise ValueError(f"training stages need a learned method ({', '.join(staged)}), got {spec.name if spec else 'none'}")
    for p in model.parameters():
        p.requires_grad_(False)
    train: List[nn.Module] = list(model.reducers().values()) + [model.task_heads]
    if stage == 2:
        train += model.cross_modal_modules()
    for m in train:
        for name, p in m.named_parameters():
            p.requires_grad_(True)


def learned_methods() -> List[str]:
    """The registered methods that add losses to the fine-tuning tasks (``losses`` in their declaration)."""
    return [n for n in list_methods() if get_spec(n).losses]


def learned_method(model: nn.Module) -> Optional[str]:
    """The name of the installed method when it adds losses to the fine-tuning tasks, else None."""
    spec = installed_spec(model)
    return spec.name if spec is not None and spec.losses else None


def method_losses(
    model: nn.Module, task_loss: Tensor, aux: Sequence, logits: Tensor, teacher_logits: Optional[Tensor],
    student_tokens: Optional[Tensor] = None, teacher_tokens: Optional[Tensor] = None, lam: float = 1.0,
    weights: Optional[Dict[str, float]] = None,
) -> Dict[str, Tensor]:
    """{"loss": total, parts...} of a training pass: the task loss plus the installed learned method's losses
    (``objectives.method_losses``, from the AuxRecords ``aux`` of the pass); just the task loss for other methods.
    ``weights`` use the common names of ``objectives.method_losses`` (distill, sparsity, contrast, continuity, ratio,
    token_distill)."""
    name = learned_method(model) if model.training else None
    if name is None:
        return {"loss": task_loss}
    res = method_loss(name, MethodLossInputs(model, task_loss, aux, logits, teacher_logits, student_tokens,
                                             teacher_tokens, lam, dict(weights or {})))
    out: Dict[str, Any] = {"loss": res["total"]}
    out.update({k: v.detach() for k, v in res.items() if k not in ("total", "task")})
    return out
