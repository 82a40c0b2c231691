"""EViT: keep the patches the image [CLS] attends to, fuse the inattentive ones (official code youweiliang/evit).

At layers 4, 7 and 10 of a 12-layer ViT (keep 0.7 at each; on another depth without ``layers=``, the three
layers of ``uniform_layers(3, L)``, with a logged warning), after the attention residual and before the MLP:
the score is the layer's own [CLS] attention row over the candidates, averaged over heads: the softmax runs over
all 1 + M keys exactly as in the layer's attention ([CLS] key included, with the state's attention bias, e.g.
proportional attention), and the candidates' part is taken (as the official ``attn[:, :, 0, 1:]``). Keep
``k = ceil(keep * M)``; the rest fuse into one token with the **raw** attention weights (not renormalised),
appended last. Gradients flow through the weights and the tokens. In a single-stream model's joint layers the
reducer sees only the image part of the keys, so there the row is the [CLS] softmax over the image keys.

EViT's optional keep-rate warm-up (a cosine from 1 to ``keep`` during training) is not implemented: the keep rate
is fixed from the first step.
"""

from __future__ import annotations

from torch import nn

from . import functional as F
from .registry import ReduceConfig, register
from .select import RateReducer, cls_row_bias, rate_point, rate_schedule
from .slots import Plan, SlotInput
from .state import ReduceContext, TokenState

DEFAULT_LAYERS = (4, 7, 10)
DEFAULT_KEEP = 0.7

__all__ = ["EViTReducer", "attentive_plan"]


def attentive_plan(slot: SlotInput, state: TokenState, k: int) -> Plan:
    """Where EViT picks its tokens: the top k by the [CLS] attention row over the candidates, the inattentive rest
    fused with the raw weights. The row uses the layer's own [CLS] query, its keys and the attention's bias."""
    a = F.cls_attention_scores(slot.queries[:, :, :1], slot.keys, cls_row_bias(state, slot.keys.dtype))
    return Plan(scores=a, k=k, fuse="raw")  # inattentive fusion, raw a


class EViTReducer(RateReducer):
    where = "mid"
    method = "evit"

    def plan(self, state: TokenState, slot: SlotInput, ctx: ReduceContext, k: int) -> Plan:
        return attentive_plan(slot, state, k)


@register("evit", groups=("vision", "joint"), placement="mid", layers=DEFAULT_LAYERS, keep=DEFAULT_KEEP, title="EViT",
          point=rate_point)
def build_evit(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    """Install EViT in the ViT layers (two-stream) or the joint layers (single-stream)."""
    slots, schedule = rate_schedule(cfg, model)
    for layer, keep in schedule:
        slots[layer - 1].reducer = EViTReducer(keep)
