"""Task heads on the multimodal [CLS], stored on the model (``model.task_heads``) so that ``save_pretrained`` /
``load_pretrained`` carry them (the config JSON records each head's output size).

VQA: classification over an answer vocabulary; SNLI-VE: 3-way; NLVR2: the two images' multimodal [CLS]
concatenated, true / false. The forward passes of these tasks are in ``vlprune.tasks.classify``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

NUM_OUTPUTS = {"ve": 3, "nlvr2": 2}
TASKS = ("vqa", "nlvr2", "ve")


class ClassifierHead(nn.Module):
    """Linear(in, 2D) -> GELU -> LayerNorm -> Linear(2D, n), as ViLT's and ALBEF's task heads."""

    def __init__(self, in_dim: int, width: int, num_outputs: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, 2 * width), nn.GELU(), nn.LayerNorm(2 * width), nn.Linear(2 * width, num_outputs)
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def add_task_head(model: nn.Module, task: str, num_outputs: Optional[int] = None) -> ClassifierHead:
    """Create (or replace) the head of ``task`` on ``model``; VQA needs ``num_outputs`` = answer-vocabulary size."""
    if task not in TASKS:
        raise ValueError(f"unknown task head {task!r}; valid: {list(TASKS)}")
    n = num_outputs if num_outputs is not None else NUM_OUTPUTS.get(task)
    if n is None or n < 1:
        raise ValueError(f"task {task!r} needs num_outputs >= 1, got {num_outputs!r}")
    D = model.cfg.width
    head = ClassifierHead(2 * D if task == "nlvr2" else D, D, n)
    p = next(model.parameters())
    model.task_heads[task] = head.to(device=p.device, dtype=p.dtype)
    return model.task_heads[task]


def task_head(model: nn.Module, task: str) -> nn.Module:
    """The head of ``task`` on ``model``; a missing head raises naming the heads there are."""
    if task not in model.task_heads:
        raise ValueError(f"the model has no {task!r} head; heads: {list(model.task_heads)} (add_task_head first)")
    return model.task_heads[task]
