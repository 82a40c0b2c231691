"""AdamW with per-module learning rates and a linear warm-up + cosine schedule.

Parameters are grouped by the module they belong to: ``vision``, ``text``, ``fusion``, ``heads`` (projections,
ITM/MLM/task heads, temperature, ViLT's joint layers and embeddings) and ``reducers`` (a method's own
parameters, e.g. TiP's pruners). Each group's learning rate is ``lr * lr_mult.get(group, 1)``. Biases, norms,
embeddings, position/cls tokens and the temperature get no weight decay.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping

import torch
from torch import nn

GROUPS = ("vision", "text", "fusion", "heads", "reducers")


def module_group(name: str) -> str:
    if ".reducer." in name:
        return "reducers"
    top = name.split(".", 1)[0]
    return top if top in ("vision", "text", "fusion") else "heads"


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.dim() < 2 or any(k in name for k in ("embeddings", "pos_embed", "cls_token", "temp", ".ln", "norm"))


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_mult: Mapping[str, float]) -> List[Dict]:
    unknown = sorted(set(lr_mult) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown lr_mult group(s) {unknown}; valid groups: {list(GROUPS)}")
    buckets: Dict[tuple, List] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # momentum copies
        key = (module_group(name), _no_decay(name, p))
        buckets.setdefault(key, []).append(p)
    out = []
    for (group, nd), params in sorted(buckets.items()):
        mult = float(lr_mult.get(group, 1.0))
        out.append({"params": params, "lr": lr * mult, "base_lr": lr * mult, "weight_decay": 0.0 if nd else weight_decay,
                    "group": group})
    return out


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate factor: linear 0 -> 1 over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
