"""What a reducer receives in its slot (``SlotInput``) and what it returns (a ``Plan``, applied by ``apply_plan``).

A reduction slot sits in a layer of one of three kinds:

- ``"vision"``: a ViT layer of a two-stream model. ``queries`` and ``keys`` (B, H, T, d) are the layer's own, of
  the image tokens (row / column 0 = the image [CLS]). No text rows.
- ``"joint"``: a layer of a single-stream model over [text; image]. ``queries`` and ``keys`` are the image part of
  the layer's own; ``text_queries`` (B, H, L, d) its text rows (``ctx.guide`` is the text [CLS] after this
  layer's attention, ``ctx.text`` the text states). A score over ``keys`` is then a softmax over the image keys
  only, not over the whole joint row.
- ``"fusion"``: a fusion layer of a two-stream model, where text cross-attends to the image tokens. ``queries``
  and ``text_queries`` (B, H, L, d) are the text queries of the cross-attention; ``keys`` (B, H, T, d) are the
  image tokens' keys in it.

Where there are text rows, ``text_mask`` (B, L) marks real text tokens (1) and padding (0).

In every kind ``project_query(h)`` projects outside rows h (B, Lq, D) with the layer's own weights, exactly as the
layer projects its queries (ViT / joint: the pre-attention LayerNorm, then W_q; fusion: the cross-attention's W_q,
the BERT layer having no norm before it), so that a method scores a guide against ``keys`` without slicing
weights. A reducer placed before the layer's attention (``where = "pre"``) gets ``queries = keys = None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional as F
from .state import TokenState

KINDS = ("vision", "joint", "fusion")


@dataclass(frozen=True)
class SlotInput:
    """The slot a reducer runs in; see the module docstring for what each field holds in each kind of slot."""

    kind: str
    layer: nn.Module
    queries: Optional[Tensor]
    keys: Optional[Tensor]
    project_query: Callable[[Tensor], Tensor]
    text_queries: Optional[Tensor] = None
    text_mask: Optional[Tensor] = None

    @staticmethod
    def pre_norm(kind: str, layer: nn.Module, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                 text_queries: Optional[Tensor] = None, text_mask: Optional[Tensor] = None) -> "SlotInput":
        """The slot of a pre-norm self-attention layer (``layer.ln1``, ``layer.attn``): vision or joint."""
        return SlotInput(kind, layer, q, k, lambda h: layer.attn.project_query(layer.ln1(h)), text_queries, text_mask)


@dataclass(frozen=True)
class Plan:
    """What one reduction does to the candidates (the tokens after the image [CLS]); ``apply_plan`` carries it out.

    Exactly one of:
    - ``scores`` (B, M) and ``k``: keep [CLS] and the top-``k`` candidates (spatial order, ties to the lowest
      index); with ``fuse`` ("raw" or "renorm") the others fuse into one token appended last, weighted by
      ``fuse_weights`` (B, M) or else by ``scores``; with ``fuse=None`` they are dropped.
    - ``merge``: ToMe's bipartite matching ``(unm, src, dst)``; the matched tokens merge (size-weighted mean).
    - ``mask`` (B, M): a masked training path's hard keep mask; nothing is removed, masked tokens leave attention.
    ``prop_attn``: the layers that follow add log(size) to their attention logits (ToMe).
    """

    scores: Optional[Tensor] = None
    k: Optional[int] = None
    fuse: Optional[str] = None
    fuse_weights: Optional[Tensor] = None
    merge: Optional[Tuple[Tensor, Tensor, Tensor]] = None
    mask: Optional[Tensor] = None
    prop_attn: bool = False


def apply_plan(state: TokenState, plan: Plan, layer_index: int, method: str) -> TokenState:
    """The new TokenState (x, size, provenance, kinds in the trace, mask) after ``plan``, recorded as a LayerTrace
    of ``method`` at 0-based ``layer_index`` when tracing."""
    if plan.mask is not None:
        B = plan.mask.shape[0]
        return state.replace(mask=torch.cat([plan.mask.new_ones(B, 1), plan.mask], dim=1)).record(layer_index, method)
    if plan.merge is not None:
        unm, src, dst = plan.merge
        B, T, _ = state.x.shape
        x, size = F.merge_wavg(state.x, state.size, unm, src, dst)
        source = None if state.source is None else F.merge_source(state.source, unm, src, dst)
        kind = F.merge_kind(B, (T + 1) // 2, T // 2, unm, dst, x.device) if state.tracing else None
        new = state.replace(x=x, size=size, source=source, prop_attn=state.prop_attn or plan.prop_attn)
        return new.record(layer_index, method, kind)
    if plan.scores is None or plan.k is None:
        raise ValueError(f"{method}: a plan needs scores and k, a merge or a mask")
    if plan.k >= state.num_tokens - 1:  # keep everything: exactly the unpruned state
        return state.record(layer_index, method)
    x, size, source, kind = F.keep_and_fuse(state.x, state.size, state.source, plan.scores, plan.k, plan.fuse,
                                            plan.fuse_weights)
    return state.replace(x=x, size=size, source=source).record(layer_index, method, kind)


__all__ = ["SlotInput", "Plan", "apply_plan", "KINDS"]
