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
import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..reduce.fastv import fastv_scores
from ..reduce.trips_lvlm import image_softmax_scores, inattentive_fusion


class LLMSlot:
    """The reduction slot of one decoder layer (``reducer`` None = empty)."""

    def __init__(self, layer: nn.Module, index: int) -> None:
        self.layer, self.index = layer, index
        self.reducer: Optional[nn.Module] = None


# -- pure functions ---------------------------------------------------------------------------------------------
def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, d), cos / sin (B, T, d) -> RoPE(x) (Llama's rotate-half form)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def last_real_index(mask2d: Tensor) -> Tensor:
    """(B,) index of the last real token of each row of a 0/1 mask (B, L) (left or right padding)."""
    L = mask2d.shape[1]
    pos = torch.arange(L, device=mask2d.device).expand_as(mask2d)
    return torch.where(mask2d.bool(), pos, torch.full_like(pos, -1)).max(1).values


def row_softmax(logits: Tensor, allowed: Tensor) -> Tensor:
    """logits (B, H, L), allowed (B, L) bool keys -> softmax over the allowed keys (FastV's whole causal row)."""
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)


def topk_keep_mask(scores: Tensor, image: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """scores (B, N) per image token, image (B, L) bool -> (keep (B, L) bool: every non-image token and the top-k
    image tokens; chosen (B, N) bool over the image tokens). Ties go to the lower index."""
    B, N = scores.shape
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    chosen = torch.zeros(B, N, dtype=torch.bool, device=scores.device).scatter_(1, order, True)
    return (~image).masked_scatter(image, chosen), chosen


def kept_index(keep: Tensor) -> Tensor:
    """keep (B, L) bool with the same count per row -> (B, Lk) indices in order."""
    B = keep.shape[0]
    return keep.nonzero()[:, 1].view(B, -1)


def insert_after(src: Tensor, slot: Tensor, fill: Tensor, c: int = 1) -> Tensor:
    """src (B, Lk) kept indices -> (B, Lk + c): ``c`` copies of ``fill`` (B,) inserted at column ``slot`` (B,)."""
    B, Lk = src.shape
    col = torch.arange(Lk + c, device=src.device).expand(B, -1)
    here = src.gather(1, col.clamp(max=Lk - 1))
    prev = src.gather(1, (col - c).clamp(min=0))
    s = slot[:, None]
    return torch.where(col < s, here, torch.where(col < s + c, fill[:, None], prev))


def insert_after_image(src: Tensor, image: Tensor) -> Tuple[Tensor, Tensor]:
    """src (B, Lk) kept indices; image (B, L) -> (src' (B, Lk + 1) with the last image token's index inserted right
    after the kept image tokens, slot (B,) where it went): the fused token's place and position."""
    L = image.shape[1]
    last_img = torch.where(image, torch.arange(L, device=src.device), -1).max(1).values  # (B,)
    slot = (src <= last_img[:, None]).sum(1)  # (B,)
    return insert_after(src, slot, last_img), slot


def shift_rope(t: Tuple[Tensor, Tensor], shift: Tensor, inv_freq: Tensor) -> Tuple[Tensor, Tensor]:
    """(cos, sin) of positions p -> those of p - shift, by the angle-difference identities: shift (B, T) tokens,
    inv_freq (d / 2,); cos / sin (B, T, d) or unmerged M-RoPE (3, B, T, d) (every section moves by the same shift)."""
    ang = shift.float()[..., None] * inv_freq.float().to(shift.device)  # (B, T, d / 2)
    ang = torch.cat([ang, ang], -1)
    cs, sn = ang.cos(), ang.sin()
    cos, sin = t
    return ((cos.float() * cs + sin.float() * sn).to(cos.dtype), (sin.float() * cs - cos.float() * sn).to(sin.dtype))


def causal_key_mask(key_ok: Tensor, impl: str, dtype: torch.dtype) -> Tensor:
    """The 4-D mask of a prefill over a (reduced) sequence: causal by sequence index, padded keys masked, each
    token always sees itself (no fully masked rows). key_ok (B, T) bool -> (B, 1, T, T): bool for SDPA, additive
    float for eager."""
    T = key_ok.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=key_ok.device).tril()
    allowed = (causal[None] & key_ok[:, None, :]) | torch.eye(T, dtype=torch.bool, device=key_ok.device)[None]
    return as_impl(allowed[:, None], impl, dtype)


def as_impl(allowed: Tensor, impl: str, dtype: torch.dtype) -> Tensor:
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def gather_seq(t: Tensor, idx: Tensor) -> Tensor:
    """t (B or 1, L, ...) gathered along the sequence with idx (B, Lk)."""
    t = t.expand(idx.shape[0], *t.shape[1:])
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))


# -- per call and per cache state ------------------------------------------------------------------------------
@dataclass
class Call:
    """One call of the language model: prefill (no cache yet) or decode."""

    prefill: bool
    mask2d: Tensor  # (B, L_total) 0/1, the caller's padding mask (ones when none was given)
    image: Optional[Tensor]  # (B, L) bool image positions (prefill only)
    cache: Any = None
    # after a reduction at prefill: what the following layers get instead of the model's full-length tensors
    key_ok: Optional[Tensor] = None
    pe: Optional[Tuple[Tensor, Tensor]] = None
    pos: Optional[Tensor] = None
    mask4d: Optional[Tensor] = None
    image_now: Optional[Tensor] = None  # (B, T) image positions in the current (reduced) sequence
    kept: List[Tuple[int, Tensor]] = field(default_factory=list)  # (layer index, chosen (B, N)) records
    embeds: Optional[Tensor] = None  # (B, L, D) the language model's input embeddings (prefill)
    raters: Optional[Tensor] = None  # (B, T) SparseVLM's rater tokens in the current sequence


class LLMState:
    """The LLM-side state of a patch: the current call (a context variable) and, per cache object, the prompt
    length and each later layer's key padding mask, which decoding needs."""

    def __init__(self) -> None:
        self.call: contextvars.ContextVar = contextvars.ContextVar(f"vlprune_llm_{id(self)}", default=None)
        self.ids: contextvars.ContextVar = contextvars.ContextVar(f"vlprune_ids_{id(self)}", default=None)
        self.by_cache: "weakref.WeakKeyDictionary[Any, Dict[str, Any]]" = weakref.WeakKeyDictionary()
        self.last_kept: List[Tuple[int, Tensor]] = []  # the last prefill's (layer, chosen image tokens (B, N))
        self.inv_freq: Callable[[], Tensor] = lambda: None  # the language model's RoPE frequencies (SparseVLM)


def cache_of(kwargs: Dict[str, Any]) -> Any:
    c = kwargs.get("cache")
    return c if c is not None else kwargs.get("past_key_values")


def seen_tokens(cache: Any) -> int:
    if cache is None:
        return 0
    return int(cache.get_seq_length())


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


def first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def merged_rope(layer: nn.Module, t: Tensor) -> Tensor:
    """(cos or sin) as one (B, L, d) tensor: transformers 4.x Qwen2-VL passes the three M-RoPE sections unmerged,
    (3, B, L, d), and merges them in the attention with ``mrope_section``; 5.x passes them merged."""
    if t.dim() != 4:
        return t
    section = list(layer.self_attn.rope_scaling["mrope_section"]) * 2
    return torch.cat([m[i % 3] for i, m in enumerate(t.split(section, dim=-1))], dim=-1)


def gather_pe(t: Tensor, idx: Tensor) -> Tensor:
    """(cos or sin) gathered along the sequence: (B or 1, L, d), or (3, B or 1, L, d) unmerged M-RoPE."""
    if t.dim() == 4:
        return torch.stack([gather_seq(part, idx) for part in t])
    return gather_seq(t, idx)


def guide_logits(layer: nn.Module, x: Tensor, pe: Tuple[Tensor, Tensor], last: Tensor) -> Tensor:
    """The last real prompt token's attention logits over every key of this layer, (B, H, L), one row per sample."""
    return rows_logits(layer, x, pe, last[:, None])[:, :, 0]


def rows_logits(layer: nn.Module, x: Tensor, pe: Tuple[Tensor, Tensor], rows: Tensor) -> Tensor:
    """The attention logits of a few query rows over every key of this layer, (B, H, R, L), fp32, rows (B, R):
    q = RoPE(W_q norm(x_rows)), K = RoPE(W_k norm(x)) (the layer's own projections; never the L x L map)."""
    attn = layer.self_attn
    d = attn.head_dim
    B, L, _ = x.shape
    R = rows.shape[1]
    h = layer.input_layernorm(x)
    cos, sin = (t.expand(B, *t.shape[1:]) for t in (merged_rope(layer, u) for u in pe))
    q = attn.q_proj(gather_seq(h, rows)).view(B, R, -1, d).transpose(1, 2)  # (B, H, R, d)
    q = apply_rope(q, gather_seq(cos, rows), gather_seq(sin, rows))
    k = apply_rope(attn.k_proj(h).view(B, L, -1, d).transpose(1, 2), cos, sin)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    return torch.einsum("bhrd,bhld->bhrl", q.float(), k.float()) * d ** -0.5


def reducing_layer(st: LLMState, c: Call, slot: LLMSlot, r: nn.Module, fn: Callable, x: Tensor,
                   kwargs: Dict[str, Any], impl: str) -> Tensor:
    """The layer that reduces (prefill): FastV ("post": the whole layer, then drop) or TRIPS-LVLM ("mid": the
    attention residual, drop + fuse, then the MLP)."""
    custom = getattr(r, "reduce_layer", None)
    if custom is not None:  # SparseVLM: its own selection (reduce/sparsevlm.py)
        return custom(st, c, slot, fn, x, kwargs, impl)
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


def record_reduction(st: LLMState, c: Call, slot: LLMSlot, src: Tensor, image: Tensor, key_ok: Tensor,
                     kwargs: Dict[str, Any], impl: str, dtype: torch.dtype, shift: Optional[Tensor] = None) -> None:
    """After a reduction: the kept sequence's key mask, positions, (cos, sin) and 4-D mask for the later layers,
    and (with a cache) the key masks decoding needs. ``shift`` (B, T): positions renumbered to p - shift (SparseVLM);
    None: kept tokens keep their positions."""
    new_ok = key_ok.gather(1, src)
    c.key_ok = new_ok
    c.image_now = image.gather(1, src)
    cos, sin = kwargs["position_embeddings"]
    c.pe = (gather_pe(cos, src), gather_pe(sin, src))
    pos = kwargs.get("position_ids")
    c.pos = None if pos is None or pos.dim() != 2 else gather_seq(pos[..., None], src)[..., 0]
    if shift is not None:
        c.pe = shift_rope(c.pe, shift, st.inv_freq())
        c.pos = None if c.pos is None else c.pos - shift
    c.mask4d = causal_key_mask(new_ok, impl, dtype)
    if c.cache is not None:
        saved = st.by_cache.setdefault(c.cache, {"length": c.mask2d.shape[1], "stages": []})
        saved["stages"].append((slot.index, new_ok, None if shift is None else shift[:, -1]))


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


__all__ = ["install_llm", "no_tower_guide", "LLMSlot", "LLMState", "lm_forward", "layer_forward", "apply_rope",
           "topk_keep_mask", "insert_after_image", "insert_after", "rows_logits", "shift_rope", "causal_key_mask", "last_real_index"]
