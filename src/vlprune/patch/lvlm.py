"""Token reduction inside the language model of a vision-language LLM (LLaVA-style; Llama / Qwen2 decoders).

The decoder layers of the LLM get reduction slots (``LLMSlot``, group "llm"); a method marks the layer(s) where
it reduces (FastV after layer K, TRIPS-LVLM mid-layer l). The patch replaces, on the instance, the language
model's ``forward`` (to learn the call: prefill or decode, the 2-D padding mask, where the image tokens are) and
each decoder layer's ``forward``:

- at prefill, the reducing layer scores the image tokens with **one query row per sample** (the last real prompt
  token's query from the layer's own q/k projections and RoPE; the layer itself still runs SDPA, no N x N map),
  keeps k per sample and gathers, per sample, the hidden states, (cos, sin), position ids and key mask; the
  layers after it get these and a rebuilt 4-D mask (causal over the kept sequence, padded keys masked);
- kept tokens keep their original positions, so generate's decode positions (full-length numbering) stay right;
- layers up to the reducing one cache every token, later layers the kept ones; at decode a later layer's key mask
  is [kept keys' padding mask, the generated tokens'], kept per cache object (``LLMState``).

Never during decode (selection is prefill-only), never with ``output_attentions`` / ``output_hidden_states``.

Tensor letters: B batch, L prompt length, N image tokens per sample, H heads, d head width, D width.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..reduce.fastv import fastv_scores
from ..reduce.trips_lvlm import image_softmax_scores, inattentive_fusion
from .lvlm_ops import (Call, LLMState, as_impl, cache_of, first, gather_seq, guide_logits, insert_after_image,
                       kept_index, last_real_index, record_reduction, row_softmax, seen_tokens, shift_rope,
                       topk_keep_mask)
from .lvlm_sparsevlm import sparsevlm_layer


class LLMSlot:
    """The reduction slot of one decoder layer (``reducer`` None = empty)."""

    def __init__(self, layer: nn.Module, index: int) -> None:
        self.layer, self.index = layer, index
        self.reducer: Optional[nn.Module] = None


# -- the overrides ----------------------------------------------------------------------------------------------
def lm_forward(st: LLMState, fn: Callable, image_token_id: int, what: str) -> Callable:
    """Replacement of the language model's ``forward``: sets the Call for its decoder layers."""

    @functools.wraps(fn)
    def forward(*args: Any, **kwargs: Any):
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"{flag}=True is not supported while {what} is patched by vlprune (the LLM changes "
                                 "its sequence length between layers); call vlprune.unpatch(model) first")
        emb = kwargs.get("inputs_embeds")
        ref = emb if emb is not None else (args[0] if args else kwargs.get("input_ids"))
        B, L = ref.shape[:2]
        cache = cache_of(kwargs)
        past = seen_tokens(cache)
        m = kwargs.get("attention_mask")
        if m is not None and m.dim() != 2:
            raise ValueError(f"the patched {what} needs a 2-D attention_mask (B, L), got shape {tuple(m.shape)}")
        mask2d = m if m is not None else torch.ones(B, past + L, dtype=torch.long, device=ref.device)
        image = None
        if past == 0:
            ids = st.ids.get()
            if ids is None:
                raise ValueError(f"{what}: a language-model reduction needs input_ids (to find the image tokens), "
                                 "not inputs_embeds alone")
            image = ids == image_token_id
        token = st.call.set(Call(past == 0, mask2d, image, cache, embeds=emb if past == 0 else None))
        try:
            return fn(*args, **kwargs)
        finally:
            c = st.call.get()
            if c is not None and c.prefill:
                st.last_kept = c.kept
            st.call.reset(token)

    return forward


def layer_forward(st: LLMState, slot: LLMSlot, fn: Callable, impl: Callable[[], str]) -> Callable:
    """Replacement of one decoder layer's ``forward``."""

    @functools.wraps(fn)
    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any):
        c: Optional[Call] = st.call.get()
        if c is None:
            return fn(hidden_states, *args, **kwargs)
        if args:
            raise TypeError("the patched decoder layer takes its arguments by keyword after hidden_states")
        if c.prefill:
            if c.key_ok is not None:  # an earlier layer reduced: the kept sequence's positions and mask
                kwargs.update(attention_mask=c.mask4d, position_embeddings=c.pe, position_ids=c.pos)
            r = slot.reducer
            if r is None:
                return fn(hidden_states, **kwargs)
            out = reducing_layer(st, c, slot, r, fn, hidden_states, kwargs, impl())
            return (out,) if returns_tuple(slot.layer) else out  # transformers 4.x Qwen2-VL layers return tuples
        key_ok, shift = decode_key_mask(st, c, slot.index)
        if key_ok is not None:
            kwargs["attention_mask"] = as_impl(key_ok[:, None, None, :], impl(), hidden_states.dtype)
        if shift is not None:
            kwargs["position_embeddings"] = shift_rope(kwargs["position_embeddings"], shift[:, None], st.inv_freq())
        return fn(hidden_states, **kwargs)

    return forward


def decode_key_mask(st: LLMState, c: Call, index: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """At decode, for decoder layer ``index`` when its cache holds a reduced prompt: the key mask (B, cache + new)
    [the kept prompt keys' padding mask, the generated tokens'] and the position shift (B,) of a method that
    renumbers positions (None, None: the layer caches the whole prompt)."""
    saved = st.by_cache.get(c.cache) if c.cache is not None else None
    if saved is None:
        return None, None
    stages = [s for s in saved["stages"] if s[0] < index]
    if not stages:
        return None, None
    _, ok, shift = stages[-1]
    return torch.cat([ok, c.mask2d[:, saved["length"]:].bool()], 1), shift


def returns_tuple(layer: nn.Module) -> bool:
    import inspect

    return "tuple" in str(inspect.signature(type(layer).forward).return_annotation)


def reducing_layer(st: LLMState, c: Call, slot: LLMSlot, r: nn.Module, fn: Callable, x: Tensor,
                   kwargs: Dict[str, Any], impl: str) -> Tensor:
    """The layer that reduces (prefill): FastV ("post": the whole layer, then drop) or TRIPS-LVLM ("mid": the
    attention residual, drop + fuse, then the MLP)."""
    if r.method == "sparsevlm":  # its own selection and recycling
        return sparsevlm_layer(st, c, slot, r, fn, x, kwargs, impl)
    B, L, _ = x.shape
    key_ok = c.key_ok if c.key_ok is not None else c.mask2d[:, -L:].bool()
    image = c.image if c.key_ok is None else c.image_now
    n = int(image.sum(1)[0])
    if n == 0 or bool((image.sum(1) != n).any()):
        raise ValueError(f"{r.method}: every sample of the batch needs the same number of image tokens (one image "
                         f"each), got {image.sum(1).tolist()}")
    k = r.keep_count(n)
    pe = kwargs["position_embeddings"]
    last = last_real_index(key_ok.long())
    logits = guide_logits(slot.layer, x, pe, last)
    if r.softmax == "row":
        causal = torch.arange(L, device=x.device)[None] <= last[:, None]
        scores = fastv_scores(row_softmax(logits, key_ok & causal), image)
    else:
        scores = image_softmax_scores(logits, image)
    if r.where == "post":
        out = first(fn(x, **kwargs))
    else:
        layer = slot.layer
        out = x + first(layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs))
    if k >= n:
        c.kept.append((slot.index, torch.ones(B, n, dtype=torch.bool, device=x.device)))
        return out if r.where == "post" else out + slot.layer.mlp(slot.layer.post_attention_layernorm(out))
    keep, chosen = topk_keep_mask(scores, image, k)
    src = kept_index(keep)
    new = gather_seq(out, src)
    if r.where == "mid":
        fused = inattentive_fusion(out[image].view(B, n, -1), scores.to(out.dtype), chosen)
        src, slot_i = insert_after_image(src, image)
        col = torch.arange(src.shape[1], device=x.device)[None]
        before = gather_seq(new, torch.where(col > slot_i[:, None], col - 1, col).clamp(max=new.shape[1] - 1))
        new = torch.where((col == slot_i[:, None])[..., None], fused.expand_as(before), before)
    record_reduction(st, c, slot, src, image, key_ok, kwargs, impl, new.dtype)
    c.kept.append((slot.index, chosen))
    if r.where == "mid":
        layer = slot.layer
        new = new + layer.mlp(layer.post_attention_layernorm(new))
    return new


def ids_capture(st: LLMState, fn: Callable) -> Callable:
    """Wrap the multimodal model's ``forward`` (it gets ``input_ids``) so the decoder layers see where the image
    tokens are."""

    @functools.wraps(fn)
    def forward(*args: Any, **kwargs: Any):
        ids = kwargs.get("input_ids", args[0] if args else None)
        token = st.ids.set(ids)
        try:
            return fn(*args, **kwargs)
        finally:
            st.ids.reset(token)

    return forward


def no_labels(p: Patch, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def forward(*args: Any, **kwargs: Any):
        if kwargs.get("labels") is not None:
            raise ValueError(f"{p.config.name} changes the sequence inside the language model, so a loss over "
                             "`labels` is not defined; call the patched model without labels")
        return fn(*args, **kwargs)

    return forward


def no_tower_guide(family: str) -> str:
    """Why TRIPS / ELIP-style text-guided selection cannot run in an LVLM's vision tower."""
    return (f"{family} has no text encoder in the vision tower's space (the prompt is embedded by the language "
            "model, after the projector), so no text guide reaches the tower; use trips_llm (TRIPS-style selection "
            "guided by the prompt inside the language model) or sparsevlm")


ATTN = ("sdpa", "eager")


def install_llm(p: Any, model: nn.Module, slots: List[LLMSlot], image_token_id: int) -> None:
    """Set the overrides of an LLM-placed method on a model whose ``model.model`` holds ``language_model``."""
    inner = model.model
    lm = inner.language_model
    impl = getattr(lm.config, "_attn_implementation", "sdpa")
    if impl not in ATTN:
        raise ValueError(f"{p.config.name} supports attn_implementation {list(ATTN)} in the language model, got {impl!r}")
    st = LLMState()
    st.inv_freq = lambda: lm.rotary_emb.inv_freq
    p.lvlm = st
    p.override(lm, "forward", lm_forward(st, lm.forward, image_token_id, type(model).__name__))
    for s in slots:
        p.override(s.layer, "forward", layer_forward(st, s, s.layer.forward, lambda: lm.config._attn_implementation))
    p.override(inner, "forward", ids_capture(st, inner.forward))
    p.override(model, "forward", no_labels(p, model.forward))


__all__ = ["install_llm", "no_tower_guide", "LLMSlot", "LLMState", "lm_forward", "layer_forward"]
