"""The training steps that ``vlprune bench --train`` measures, the same steps ``vlprune train`` runs:

- ``pretrain``: ``vlprune.tasks.pretrain.PretrainTask.step`` (ITC with momentum distillation and queues, ITM with
  hard negatives, MLM with momentum distillation; the momentum update included), its backward pass and an AdamW
  step;
- ``vqa``: ``vlprune.tasks.classify.VQATask.step`` (the VQA head over an answer vocabulary, soft-score BCE), its
  backward pass and an AdamW step.

Under ``precision`` bf16/fp16 the forward and the loss run under autocast, the backward outside it (as in
``vlprune train``). One optimiser may be shared by several methods on the same model (``optimizer=``), so that the
bench can interleave their steps without holding one AdamW state per method.

The benchmark has no tokenizer (captions are random token ids), so ``BenchTokens`` gives the step what it needs
from one: the [MASK] id (the last id of the vocabulary) and the special ids never to mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..runtime import precision_context
from ..tasks.base import StepContext
from ..tasks.pretrain import PretrainTask

TRAIN_TASKS = ("pretrain", "vqa")
VQA_ANSWERS = 3129  # ALBEF's / ViLT's VQA answer vocabulary size


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


class _Step:
    """One optimiser step of ``losses(images, ids, mask)``: forward (under the precision's autocast) + backward +
    AdamW step."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, generator: Optional[torch.Generator] = None,
                 precision: str = "fp32", optimizer: Optional[torch.optim.Optimizer] = None):
        self.model = model.train()
        self.generator = generator
        self.precision = precision
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.02)

    def losses(self, images: Tensor, ids: Tensor, mask: Tensor) -> Dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, images: Tensor, ids: Tensor, mask: Tensor) -> float:
        self.model.train()
        with precision_context(self.precision, images.device):
            losses = self.losses(images, ids, mask)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(losses["loss"].detach())


class PretrainStep(_Step):
    """One pre-training optimiser step: ``pretrain_loss`` forward (incl. the momentum update) + backward + AdamW."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, generator: Optional[torch.Generator] = None,
                 precision: str = "fp32", optimizer: Optional[torch.optim.Optimizer] = None):
        super().__init__(model, lr, generator, precision, optimizer)
        self.task = PretrainTask()

    def losses(self, images: Tensor, ids: Tensor, mask: Tensor) -> Dict[str, Tensor]:
        return pretrain_loss(self.model, images, ids, mask, self.generator, self.task)


class VQAStep(_Step):
    """One VQA fine-tuning optimiser step (``VQATask.step``) on random questions whose answer is one of
    ``answers`` vocabulary entries; adds the VQA head to the model when it has none."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, generator: Optional[torch.Generator] = None,
                 precision: str = "fp32", optimizer: Optional[torch.optim.Optimizer] = None,
                 answers: int = VQA_ANSWERS):
        from ..models.heads import add_task_head
        from ..tasks.classify import VQATask

        if "vqa" not in model.task_heads:
            add_task_head(model, "vqa", answers)
        super().__init__(model, lr, generator, precision, optimizer)
        self.task = VQATask()
        self.task.vocab = {f"answer{i}": i for i in range(answers)}
        self.answers = answers

    def losses(self, images: Tensor, ids: Tensor, mask: Tensor) -> Dict[str, Tensor]:
        B = images.shape[0]
        g = self.generator if self.generator is not None else torch.Generator(device=images.device).manual_seed(0)
        picks = torch.randint(0, self.answers, (B,), generator=torch.Generator().manual_seed(B)).tolist()
        batch = {"images": images, "ids": ids, "mask": mask, "answers": [[f"answer{i}"] for i in picks]}
        ctx = StepContext(generator=g, tokenizer=BenchTokens.for_model(self.model), step=1, total_steps=1,
                          warmup_steps=0)
        return self.task.step(self.model, batch, ctx)


def make_step(task: str, model: nn.Module, generator: Optional[torch.Generator] = None, precision: str = "fp32",
              optimizer: Optional[torch.optim.Optimizer] = None) -> _Step:
    """The training step of ``task`` ("pretrain" or "vqa") on ``model``."""
    if task == "pretrain":
        return PretrainStep(model, generator=generator, precision=precision, optimizer=optimizer)
    if task == "vqa":
        return VQAStep(model, generator=generator, precision=precision, optimizer=optimizer)
    raise ValueError(f"--train-task must be one of {', '.join(TRAIN_TASKS)}, got {task!r}")


__all__ = ["PretrainStep", "VQAStep", "TRAIN_TASKS", "make_step", "pretrain_loss", "BenchTokens"]
