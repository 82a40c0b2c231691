"""EViT: keep the patches the image [CLS] attends to, fuse the inattentive ones (youweiliang/evit; METHODS.md).

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

from typing import Tuple

from torch import Tensor, nn

from . import functional as F
from .registry import ReduceConfig, check_layers, per_layer, register
from .select import RateReducer, check_keeps, check_unmasked, cls_row_bias, default_layers, select_tokens, slot_group
from .state import ReduceContext, TokenState

DEFAULT_LAYERS = (4, 7, 10)
DEFAULT_KEEP = 0.7

__all__ = ["EViTReducer", "attentive_select"]


def attentive_select(q: Tensor, k: Tensor, state: TokenState, keep: float) -> Tuple[Tensor, int]:
    """Where EViT picks its tokens: the [CLS] attention row (B, M) over the candidates and the keep count.

    q, k (B, H, 1 + M, d) are the layer's own queries and keys; the row uses the same bias as the attention.
    """
    a = F.cls_attention_scores(q[:, :, :1], k, cls_row_bias(state, k.dtype))
    return a, F.keep_count(keep, a.shape[1])


class EViTReducer(RateReducer):
    where = "mid"
    method = "evit"

    def forward(self, state: TokenState, q: Tensor, k: Tensor, layer: nn.Module, ctx: ReduceContext) -> TokenState:
        check_unmasked(state, self.method)
        M = state.num_tokens - 1
        if F.keep_count(self.keep, M) >= M:
            return state.record(ctx.layer, self.method)
        a, kk = attentive_select(q, k, state, self.keep)
        return select_tokens(state, a, kk, ctx.layer, self.method, fuse="raw")  # inattentive fusion, raw a


@register("evit", groups=("vision", "joint"), placement="mid", layers=DEFAULT_LAYERS, keep=DEFAULT_KEEP)
def build_evit(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    """Install EViT in the ViT layers (two-stream) or the joint layers (single-stream)."""
    _, layers_ = slot_group(model, "evit")
    L = len(layers_)
    layers = cfg.layers if cfg.layers is not None else default_layers("evit", DEFAULT_LAYERS, L)
    check_layers(layers, L, "evit")
    keeps = check_keeps(per_layer(DEFAULT_KEEP if cfg.keep is None else cfg.keep, layers, "evit"), layers, "evit")
    for l, kp in zip(layers, keeps):
        layers_[l - 1].reducer = EViTReducer(kp)
