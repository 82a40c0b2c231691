"""The pre-training step that ``vlprune bench --train`` measures: ``vlprune.tasks.pretrain.PretrainTask.step``
(ITC with momentum distillation and queues, ITM with hard negatives, MLM with momentum distillation; the momentum
update included), its backward pass and an AdamW step — the same step ``vlprune train --task pretrain`` runs.

The benchmark has no tokenizer (captions are random token ids), so ``BenchTokens`` gives the step what it needs
from one: the [MASK] id (the last id of the vocabulary) and the special ids never to mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..tasks.base import StepContext
from ..tasks.pretrain import PretrainTask


@dataclass(frozen=True)
class BenchTokens:
    """The two tokenizer attributes the pre-training step reads."""

    mask_id: int
    special_ids: Tuple[int, ...]

    @staticmethod
    def for_model(model: nn.Module) -> "BenchTokens":
        v = model.cfg.text.vocab_size
        return BenchTokens(mask_id=v - 1, special_ids=(model.cfg.text.pad_token_id, v - 1))


def pretrain_loss(
    model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor, generator: Optional[torch.Generator] = None,
    task: Optional[PretrainTask] = None,
) -> Dict[str, Tensor]:
    """The losses of one pre-training step on B >= 2 matched pairs (each image its own id), with the momentum
    update. ``task`` defaults to ``PretrainTask()`` (its default loss weights and alpha)."""
    task = task or PretrainTask()
    task.check_model(model)
    B = images.shape[0]
    if B < 2:
        raise ValueError(f"a pre-training step needs batch size >= 2 (ITM hard negatives), got {B}")
    g = generator if generator is not None else torch.Generator(device=images.device).manual_seed(0)
    batch = {"images": images, "ids": ids, "mask": mask, "image_id": torch.arange(B, device=images.device)}
    ctx = StepContext(generator=g, tokenizer=BenchTokens.for_model(model), step=1, total_steps=1, warmup_steps=0)
    return task.step(model, batch, ctx, update=True)


class PretrainStep:
    """One optimiser step: ``pretrain_loss`` forward (incl. the momentum update) + backward + AdamW step."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, generator: Optional[torch.Generator] = None):
        self.model = model.train()
        self.generator = generator
        self.task = PretrainTask()
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.02)

    def __call__(self, images: Tensor, ids: Tensor, mask: Tensor) -> float:
        losses = pretrain_loss(self.model, images, ids, mask, self.generator, self.task)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(losses["loss"].detach())


__all__ = ["PretrainStep", "pretrain_loss", "BenchTokens"]
