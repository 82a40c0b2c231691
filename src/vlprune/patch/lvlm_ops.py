"""The pieces of the language-model reductions of ``lvlm.py`` that do not patch anything: RoPE and sequence
gathers, the per-call / per-cache state, the few query rows a method scores with, and the bookkeeping after a
reduction (``record_reduction``). Tensor letters: B batch, L length, N image tokens, H heads, d head width."""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn


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


def record_reduction(st: LLMState, c: Call, slot: Any, src: Tensor, image: Tensor, key_ok: Tensor,
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


__all__ = ["Call", "LLMState", "apply_rope", "shift_rope", "rows_logits", "guide_logits", "topk_keep_mask", "kept_index",
           "insert_after", "insert_after_image", "causal_key_mask", "as_impl", "gather_seq", "gather_pe",
           "record_reduction", "last_real_index", "row_softmax", "first", "merged_rope", "cache_of", "seen_tokens"]
