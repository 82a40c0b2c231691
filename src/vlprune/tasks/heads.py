"""Task heads on the multimodal [CLS] and the forward passes of the classification tasks.

VQA: classification over an answer vocabulary (soft-score targets). SNLI-VE: 3-way classification. NLVR2: the
caption is fused with each of the two images (each image pruned under the caption's guidance), the two [CLS]
states are concatenated and classified true/false. Heads are stored on the model (``model.task_heads``) so that
``save_pretrained`` / ``load_pretrained`` carry them (the config JSON records each head's output size).
"""

from __future__ import annotations

from typing import Optional

import torch
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


def _head(model: nn.Module, task: str) -> nn.Module:
    if task not in model.task_heads:
        raise ValueError(f"the model has no {task!r} head; heads: {list(model.task_heads)} (add_task_head first)")
    return model.task_heads[task]


def multimodal_cls(model: nn.Module, images: Tensor, ids: Tensor, mask: Tensor, generator=None, trace=False):
    """The multimodal [CLS] (B, D) of text-guided pairs: ALBEF's fused [CLS], ViLT's pooled [CLS]; and the
    image TokenState (for token counts and traces)."""
    out = model(images, ids, mask, generator=generator, trace=trace)
    if model.cfg.arch == "albef":
        return out.fused[:, 0], out.image
    return out.pooled, out.image


def classify(model: nn.Module, task: str, images: Tensor, ids: Tensor, mask: Tensor, generator=None) -> Tensor:
    """Logits of the VQA or VE head: (B, num_outputs)."""
    cls, _ = multimodal_cls(model, images, ids, mask, generator)
    return _head(model, task)(cls)


def nlvr2_logits(model: nn.Module, images0: Tensor, images1: Tensor, ids: Tensor, mask: Tensor, generator=None) -> Tensor:
    """NLVR2 logits (B, 2): the caption fused with each image, the two [CLS] concatenated."""
    if images0.shape != images1.shape:
        raise ValueError(f"NLVR2 image pairs differ in shape: {tuple(images0.shape)} vs {tuple(images1.shape)}")
    if model.cfg.arch == "albef":
        text = model.encode_text(ids, mask)  # the caption is encoded once and guides both images
        cls = []
        for imgs in (images0, images1):
            image = model.encode_image(imgs, text, mask, generator)
            cls.append(model.fuse(text, mask, image, generator)[0][:, 0])
    else:
        cls = [model(imgs, ids, mask, generator=generator).pooled for imgs in (images0, images1)]
    return _head(model, "nlvr2")(torch.cat(cls, dim=-1))
