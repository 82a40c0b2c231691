"""The training losses that learned reduction methods bring, looked up by method name.

A learned method (``learned=True`` in its ``@register`` declaration) registers its loss here with
``@register_loss(name)`` (into ``LOSSES``, a ``vlprune.registry.Registry``): ``fn(inputs: MethodLossInputs) ->
{"total": ..., parts...}``; its module is imported by ``objectives/__init__``. The fine-tuning tasks call
``method_loss(name, inputs)`` without naming methods. Loss weights use one vocabulary across methods:
``distill`` (logit distillation from the teacher), ``sparsity``, ``contrast``, ``continuity`` (TiP), ``ratio``
and ``token_distill`` (DynamicViT); each method reads the ones it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence

from torch import Tensor, nn

from ..registry import Registry

# the loss of each learned method, by method name (the built-in ones are registered by ``objectives/__init__``)
LOSSES: Registry[Callable[["MethodLossInputs"], Dict[str, Tensor]]] = Registry("method loss")
_LOSSES = LOSSES._items


@dataclass
class MethodLossInputs:
    """What a training pass hands to a method's loss: the model, the task loss, the AuxRecords of its reductions,
    the head's logits and the teacher's (or None), image-encoder tokens of student and teacher (methods that
    distil tokens), lam (TiP's continuity weight of the training stage) and the loss weights."""

    model: nn.Module
    task_loss: Tensor
    aux: Sequence
    logits: Tensor
    teacher_logits: Optional[Tensor] = None
    student_tokens: Optional[Tensor] = None
    teacher_tokens: Optional[Tensor] = None
    lam: float = 1.0
    weights: Mapping[str, float] = field(default_factory=dict)


def register_loss(name: str) -> Callable:
    """Decorator registering the loss of learned method ``name``; a duplicate name raises."""
    return LOSSES.register(name)


def method_loss(name: str, inputs: MethodLossInputs) -> Dict[str, Tensor]:
    """{"total": ..., parts...} of learned method ``name``; a method without a registered loss raises."""
    if name not in LOSSES:
        raise ValueError(f"method {name!r} is declared learned but has no loss: {LOSSES.unknown(name)}")
    return LOSSES.get(name)(inputs)
