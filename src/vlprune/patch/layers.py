"""Views of Hugging Face transformer layers that run them with a reduction slot, on SDPA.

A view holds a reference to one HF layer and reads its weights; it is not an ``nn.Module`` and is not attached to
the model, so the model's ``state_dict`` never changes. It offers what vlprune's reducers expect of a layer
(``reduce.slots.SlotInput``): ``ln1``, ``attn.project_query`` / ``attn.project_key``, a ``reducer`` slot, and for
ELIP's look-ahead ``plain(x, bias)`` and ``cls_query_and_keys(x)``.

Every layer computes ``x = x + attn(ln1(x)); state = reduce(state); x = x + mlp(ln2(x))``, the placement of
``docs/methods.md``; the attention is ``scaled_dot_product_attention`` on the layer's own projections (BLIP's
vision attention is eager in transformers; here it is not), and a reducer gets the layer's own ``q`` and ``k`` so
that a score row costs one row, never the T x T map.

Tensor letters: B batch, T image tokens, L text tokens, D width, H heads, d = D / H.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..models.vilt import JointLayer
from ..models.vit import ViTLayer
from ..reduce.state import ReduceContext, TokenState


class AttnView:
    """The q/k/v and output projections of one HF self-attention, as functions of normalised tokens h (B, T, D).

    ``q_w``, ``k_w``, ``v_w``: callables h -> (B, T, D) (the layer's own linear maps); ``out``: (B, T, D) -> (B, T, D).
    ``dropout``: the attention dropout probability applied in training, as the HF layer does."""

    def __init__(self, heads: int, dim: int, q_w: Callable, k_w: Callable, v_w: Callable, out: Callable,
                 dropout: float = 0.0, owner: Optional[nn.Module] = None) -> None:
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads {heads}")
        self.heads, self.dim, self.head_dim = heads, dim, dim // heads
        self.q_w, self.k_w, self.v_w, self.out = q_w, k_w, v_w, out
        self.dropout, self.owner = dropout, owner

    def _split(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def project_query(self, h: Tensor) -> Tensor:
        """The layer's own query projection of normalised rows h (B, Lq, D) -> (B, H, Lq, d)."""
        if h.shape[-1] != self.dim:
            raise ValueError(f"query width {h.shape[-1]} does not match the attention width {self.dim}")
        return self._split(self.q_w(h))

    def project_key(self, h: Tensor) -> Tensor:
        return self._split(self.k_w(h))

    def __call__(self, h: Tensor, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """h (B, T, D) -> out (B, T, D), q and k (B, H, T, d)."""
        q, k, v = self._split(self.q_w(h)), self._split(self.k_w(h)), self._split(self.v_w(h))
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        training = self.owner is not None and self.owner.training
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if training else 0.0)
        B, _, T, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(B, T, self.dim)), q, k


def fused_qkv(linear: nn.Linear, dim: int) -> Tuple[Callable, Callable, Callable]:
    """q, k, v maps of a fused ``qkv`` linear whose output is laid out (3, H, d) (BLIP's vision attention)."""

    def part(i: int) -> Callable:
        def f(h: Tensor) -> Tensor:
            w = linear.weight[i * dim : (i + 1) * dim]
            b = None if linear.bias is None else linear.bias[i * dim : (i + 1) * dim]
            return F.linear(h, w, b)

        return f

    return part(0), part(1), part(2)


class LayerView:
    """A pre-norm HF layer seen as a vlprune layer: ``ln1``, ``attn`` (an AttnView), ``ln2``, ``mlp`` (callables
    on (B, T, D)) and a ``reducer`` slot (None = empty)."""

    def __init__(self, layer: nn.Module, ln1: nn.Module, attn: AttnView, ln2: nn.Module, mlp: Callable) -> None:
        self.layer, self.ln1, self.attn, self.ln2, self.mlp = layer, ln1, attn, ln2, mlp
        self.reducer: Optional[nn.Module] = None

    # The layer computations are vlprune's own (``models.vit.ViTLayer``, ``models.vilt.JointLayer``): they only use
    # ln1, attn(h, bias=...) -> (out, q, k), ln2, mlp and reducer, which this view provides.
    vision = ViTLayer.forward  # (state, ctx) -> state: a layer of the image encoder (slot kind "vision")
    plain = ViTLayer.plain  # (x, bias) -> x: the layer without its reducer (ELIP's look-ahead)
    cls_query_and_keys = ViTLayer.cls_query_and_keys
    joint = JointLayer.forward  # (text, text_mask, image, ctx) -> (text, image): a single-stream layer ("joint")


class EncoderView:
    """The layers of one HF encoder as LayerViews (``ctx.encoder`` for look-ahead methods)."""

    def __init__(self, layers: List[LayerView]) -> None:
        self.layers = layers

    def run_vision(self, x: Tensor, ctx: ReduceContext, reduce: bool = True) -> TokenState:
        """Image tokens x (B, 1 + N, D) through every layer; ``reduce=False`` leaves the slots out (a text-free pass
        of a text-guided method)."""
        state = TokenState.start(x)
        ctx = dataclasses.replace(ctx, num_patches=state.num_tokens - 1)
        for i, view in enumerate(self.layers):
            if reduce:
                state = view.vision(state, ctx.at(i, self))
            else:
                state = state.replace(x=view.plain(state.x, state.attn_bias(x.dtype)))
        return state

    def run_joint(self, text: Tensor, text_mask: Tensor, image: Tensor, ctx: ReduceContext) -> Tuple[Tensor, TokenState]:
        state = TokenState.start(image)
        ctx = dataclasses.replace(ctx, num_patches=state.num_tokens - 1)
        for i, view in enumerate(self.layers):
            text, state = view.joint(text, text_mask, state, ctx.at(i, self))
        return text, state


__all__ = ["AttnView", "LayerView", "EncoderView", "fused_qkv"]
