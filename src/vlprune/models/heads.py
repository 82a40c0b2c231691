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


HEAD_STYLES = ("vlprune", "vilt", "albef")


class ClassifierHead(nn.Module):
    """A task head on the multimodal [CLS]. ``style``:
    "vlprune" (default): Linear(in, 2D) -> GELU -> LayerNorm -> Linear(2D, n);
    "vilt": Linear(in, 2D) -> LayerNorm -> GELU -> Linear(2D, n), the order of ViLT's (and PuMer's) heads;
    "albef": Linear(in, D) -> ReLU -> Linear(D, n), ALBEF's ``cls_head`` (official checkpoints load into these)."""

    def __init__(self, in_dim: int, width: int, num_outputs: int, style: str = "vlprune"):
        super().__init__()
        if style not in HEAD_STYLES:
            raise ValueError(f"unknown head style {style!r}; valid: {list(HEAD_STYLES)}")
        self.style = style
        h = width if style == "albef" else 2 * width
        if style == "albef":
            layers = [nn.Linear(in_dim, h), nn.ReLU(), nn.Linear(h, num_outputs)]
        elif style == "vilt":
            layers = [nn.Linear(in_dim, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, num_outputs)]
        else:
            layers = [nn.Linear(in_dim, h), nn.GELU(), nn.LayerNorm(h), nn.Linear(h, num_outputs)]
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def add_task_head(model: nn.Module, task: str, num_outputs: Optional[int] = None, style: str = "vlprune") -> ClassifierHead:
    """Create (or replace) the head of ``task`` on ``model``; VQA needs ``num_outputs`` = answer-vocabulary size;
    ``style``: the head's layer layout (``ClassifierHead``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task head {task!r}; valid: {list(TASKS)}")
    n = num_outputs if num_outputs is not None else NUM_OUTPUTS.get(task)
    if n is None or n < 1:
        raise ValueError(f"task {task!r} needs num_outputs >= 1, got {num_outputs!r}")
    D = model.cfg.width
    head = ClassifierHead(2 * D if task == "nlvr2" else D, D, n, style)
    p = next(model.parameters())
    model.task_heads[task] = head.to(device=p.device, dtype=p.dtype)
    return model.task_heads[task]


def head_record(head: ClassifierHead):
    """What ``save_pretrained`` writes for a head: its output size, or {"outputs", "style"} for another style."""
    n = head.net[-1].out_features
    return n if head.style == "vlprune" else {"outputs": n, "style": head.style}


def add_recorded_head(model: nn.Module, task: str, record) -> ClassifierHead:
    """The inverse of ``head_record``: an int (the default style) or {"outputs": n, "style": s}."""
    if isinstance(record, dict):
        return add_task_head(model, task, record.get("outputs"), record.get("style", "vlprune"))
    return add_task_head(model, task, record)


def task_head(model: nn.Module, task: str) -> nn.Module:
    """The head of ``task`` on ``model``; a missing head raises naming the heads there are."""
    if task not in model.task_heads:
        raise ValueError(f"the model has no {task!r} head; heads: {list(model.task_heads)} (add_task_head first)")
    return model.task_heads[task]
