"""TRIPS: Text-Relevant Image Patch Selection (the TRIPS paper; no official code exists).

At each selection layer of the ViT, after the attention residual and before the MLP:

1. TD-ATT score (eq. 2): ``q_text = W_q(LN1(t_cls))`` with the layer's **own** pre-attention LayerNorm and query
   projection (no new parameters) and the layer's own keys of the candidates (reused from the attention). Per
   head ``a = softmax(q_text K^T / sqrt(d))`` over the M candidates (image [CLS] excluded), mean over heads, fp32.
   The paper writes eq. 2 against the layer's output features; we score against the keys so that ``a`` is a true
   attention row (``docs/methods.md``).
2. Keep ``k = ceil(r * M)`` candidates with the largest ``a`` (spatial order kept; ties to the lowest index).
3. ITF (eq. 3): one fused token ``v_f = sum_{i unselected} a_i v_i`` with the **raw** weights (not renormalised),
   appended last. Gradients flow through ``a`` (into the text encoder, ``W_q``, ``LN1`` and the keys) and
   through ``v``; only the top-k choice is not differentiable.

Defaults: layers 5 and 10 of a 12-layer ViT, r = 0.7 at each. On a model of another depth without ``layers=``,
the two layers are spread evenly, ``uniform_layers(2, L)`` (the paper's ``uniform(t)``), with a logged warning.

``placement="pre"`` (an option; the default stays "mid"): the selection at layer j runs **before** its attention,
scoring the incoming tokens with the layer's own LN1, W_q (guide) and W_k (tokens), so that layer j's attention
already runs on the kept tokens, as the paper's FLOPs table counts it. Vision slots only (two-stream models).

TRIPS-S: in a single-stream (ViLT-style) model the same reducer sits in the joint layers (slot group "joint") and
the guide is the layer's multimodal [CLS] (the text [CLS] row of the joint sequence after this layer's attention),
which the joint layer passes as ``ctx.guide``. The method name is the same, "trips"; the slot group is chosen by
the model (two-stream: "vision", single-stream: "joint").
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from . import functional as F
from .registry import Option, ReduceConfig, register
from .select import (RateReducer, check_unmasked, outside_query_bias, rate_point, rate_schedule, require_guide,
                     slot_group)
from .slots import Plan, SlotInput
from .state import ReduceContext, TokenState

DEFAULT_LAYERS = (5, 10)
DEFAULT_KEEP = 0.7
OPTIONS = {"placement": Option("mid", "choice", choices=("mid", "pre"))}


def text_relevant_scores(project_query: Callable[[Tensor], Tensor], k: Tensor, guide: Tensor,
                         bias: Optional[Tensor] = None) -> Tensor:
    """TD-ATT: the guide's attention over the candidates with the layer's own LN1 and W_q.

    project_query: the slot's (``SlotInput.project_query``); k (B, H, 1 + M, d) the layer's keys; guide (B, D)
    -> (B, M).
    """
    q_text = project_query(guide[:, None, :])  # W_q(LN1(t_cls)): (B, H, 1, d)
    return F.text_query_scores(q_text, k, bias)  # eq. 2 on keys


def text_relevant_plan(scores: Tensor, k: int) -> Plan:
    """Where TRIPS picks its tokens: keep the k = ceil(r * M) best by TD-ATT, fuse the rest with the raw weights
    (ITF, eq. 3: v_f = sum a_i v_i, appended last)."""
    return Plan(scores=scores, k=k, fuse="raw")


def incoming_keys(slot: SlotInput, x: Tensor) -> Tensor:
    """The layer's own keys W_k(LN1(x)) of the tokens x (B, T, D) entering it: (B, H, T, d) ("pre" placement)."""
    return slot.layer.attn.project_key(slot.layer.ln1(x))


class TripsReducer(RateReducer):
    """TRIPS selection in one layer ("mid": after the attention residual, before the MLP; "pre": before the
    layer's attention, on the incoming tokens' keys)."""

    method = "trips"

    def __init__(self, keep: float, placement: str = "mid") -> None:
        super().__init__(keep)
        self.where = placement

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", placement={self.where}" if self.where != "mid" else "")

    def check(self, state: TokenState, ctx: ReduceContext) -> None:
        check_unmasked(state, self.method)
        require_guide(ctx, state, self.method)

    def plan(self, state: TokenState, slot: SlotInput, ctx: ReduceContext, k: int) -> Plan:
        keys = slot.keys if self.where == "mid" else incoming_keys(slot, state.x)
        a = text_relevant_scores(slot.project_query, keys, ctx.guide, outside_query_bias(state, keys.dtype))
        return text_relevant_plan(a, k)


@register("trips", groups=("vision", "joint"), placement="mid", layers=DEFAULT_LAYERS, keep=DEFAULT_KEEP,
          options=OPTIONS, text_guided=True, title="TRIPS", point=rate_point)
def build_trips(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    """Install TRIPS (two-stream: in the ViT layers; single-stream: TRIPS-S in the joint layers)."""
    slots, schedule = rate_schedule(cfg, model)
    tw, vw = model.cfg.text.width, model.cfg.vision.width
    if tw != vw:
        raise ValueError(
            f"trips scores the text [CLS] with the ViT's own query projection, so text and vision widths must "
            f"match; got text.width={tw}, vision.width={vw}"
        )
    placement = opts["placement"]
    if placement == "pre" and slot_group(model, "trips")[0] != "vision":
        raise ValueError("trips placement='pre' reduces before a ViT layer's attention (two-stream models); in a "
                         "single-stream model the guide only exists after the joint attention: use placement='mid'")
    for layer, keep in schedule:
        slots[layer - 1].reducer = TripsReducer(keep, placement)
