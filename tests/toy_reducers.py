"""Test-only reducers (never registered, so other tests' ``list_methods()`` is unaffected): they install
straight into a model's reduction slots to exercise the benchmark and the overlays before real methods land.

ToyKeepFuse keeps the top ``ceil(keep * M)`` candidates by a [CLS] score and fuses (or drops) the rest, with
the score computed by a matrix product so that the reducer has FLOPs of its own ("selection" FLOPs).
"""

from __future__ import annotations

import math

import torch

from vlprune.reduce import functional as Fn
from vlprune.reduce.registry import Reducer


class ToyKeepFuse(Reducer):
    method = "toy"

    def __init__(self, keep: float, fuse: bool = True, where: str = "mid"):
        super().__init__()
        self.keep, self.fuse, self.where = keep, fuse, where

    def forward(self, state, slot, ctx):
        x = state.x
        q, k = slot.queries, slot.keys
        if q is None:  # "pre": score with the [CLS] row against the tokens
            scores = (x[:, :1] @ x[:, 1:].transpose(1, 2)).squeeze(1).float().softmax(-1)
        elif slot.kind == "fusion":  # the text queries: mean over them
            scores = Fn.head_mean_attention(q, k).mean(1)[:, 1:]
        else:
            scores = Fn.head_mean_attention(q[:, :, :1], k)[:, 0, 1:]
        m = x.shape[1] - 1
        kk = max(1, min(m, math.ceil(self.keep * m - 1e-9)))
        nx, size, src, kind = Fn.keep_and_fuse(x, state.size, state.source, scores, kk, "raw" if self.fuse else None)
        return state.replace(x=nx, size=size, source=src).record(ctx.layer, self.method, kind)


def install(model, group: str, layers, keep: float = 0.5, fuse: bool = True, where: str = "mid"):
    """Put a ToyKeepFuse in the given 1-based layers of a slot group; returns the model."""
    slots = model.reduction_slots()[group]
    p = next(model.parameters())
    for n in layers:
        slots[n - 1].reducer = ToyKeepFuse(keep, fuse, where).to(p.device)
    return model
