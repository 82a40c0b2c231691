"""Pure tensor functions that every reduction method is built from. No module state.

Tensor letters used in shapes:
    B  batch                      M  candidate tokens (image [CLS] excluded)
    T  tokens incl. [CLS] (1 + M)  K  kept candidates
    D  width                      H  attention heads, d = D / H per head
    N  original patches (provenance columns are 1 + N: [CLS] first)
    L  text length

Conventions (``docs/methods.md``): index 0 of a token sequence is the image [CLS] and is never removed or merged; kept
tokens keep their spatial order (sorted indices); a fused token is appended last; ties break towards the lowest
index; attention scores are softmaxed in fp32 and averaged over heads.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_pos_int
from .state import CLS, FUSED, KEPT, MERGED


def check_keep(keep: float, name: str = "keep") -> float:
    """Validate a keep rate: a float in (0, 1]. NaN, <= 0 and > 1 raise (never clamped)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or math.isnan(keep) or not 0 < keep <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {keep!r}")
    return float(keep)


def keep_count(keep: float, m: int) -> int:
    """k = ceil(keep * M), clamped to 1 <= k <= M (the clamp only guards rounding; keep is validated first)."""
    check_keep(keep)
    return max(1, min(m, math.ceil(keep * m - 1e-9)))


def attention_probs(q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Per-head attention rows softmax(q k^T / sqrt(d) + bias) in fp32.

    q (B, H, Lq, d), k (B, H, T, d), bias broadcastable to (B, H, Lq, T) -> (B, H, Lq, T).
    Only the Lq query rows asked for are computed, never the T x T map.
    """
    logits = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)


def head_mean_attention(q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Head-averaged attention rows: (B, H, Lq, d), (B, H, T, d) -> (B, Lq, T), fp32."""
    return attention_probs(q, k, bias).mean(dim=1)


def topk_keep(scores: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Indices of the ``k`` highest scores and of the rest, both sorted ascending (spatial order).

    scores (B, M) -> keep (B, K), drop (B, M - K). Ties break towards the lowest index (a stable sort), so the
    selection is deterministic and permutation-consistent.
    """
    M = scores.shape[-1]
    if not 1 <= k <= M:
        raise ValueError(f"k must be in [1, {M}] for {M} candidates, got {k}")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    keep = order[:, :k].sort(dim=-1).values
    drop = order[:, k:].sort(dim=-1).values
    return keep, drop


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, T, ...) gathered along dim 1 at idx (B, K) -> (B, K, ...)."""
    shape = idx.shape + x.shape[2:]
    index = idx.reshape(idx.shape + (1,) * (x.dim() - 2)).expand(shape)
    return x.gather(1, index)


def fuse_tokens(x: Tensor, weights: Tensor, renorm: bool, eps: float = 1e-6) -> Tensor:
    """One token from ``x`` (B, M', D) weighted by ``weights`` (B, M') -> (B, 1, D).

    renorm=False: sum_i w_i x_i with the raw weights (TRIPS eq. 3, EViT).
    renorm=True:  sum_i w_i / (sum_j w_j + eps) x_i (ELIP, LAPS).
    """
    w = weights.to(x.dtype)
    if renorm:
        w = w / (w.sum(dim=-1, keepdim=True) + eps)
    return (w.unsqueeze(-1) * x).sum(dim=1, keepdim=True)


def keep_and_fuse(
    x: Tensor,
    size: Tensor,
    source: Optional[Tensor],
    scores: Tensor,
    k: int,
    fuse: Optional[str] = "raw",
    fuse_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Keep [CLS] and the top-``k`` candidates by ``scores``; optionally fuse the rest into one token.

    x (B, T, D), size (B, T), source (B, T, 1 + N) or None, scores (B, M = T - 1) over the candidates.
    fuse: None (drop the rest), "raw" (raw weights) or "renorm" (renormalised weights); the weights are
    ``fuse_weights`` (B, M) when given, else ``scores``. A fused token is appended last; no fused token is made
    when nothing is left over (k = M).
    Returns x (B, 1 + K [+ 1], D), size, source, kind (B, 1 + K [+ 1]) with CLS / KEPT / FUSED.
    """
    B, T, D = x.shape
    keep, drop = topk_keep(scores, k)
    cls_idx = torch.zeros(B, 1, dtype=keep.dtype, device=keep.device)
    idx = torch.cat([cls_idx, keep + 1], dim=1)
    new_x, new_size = gather_tokens(x, idx), gather_tokens(size, idx)
    new_src = None if source is None else gather_tokens(source, idx)
    kind = torch.full((B, 1 + k), KEPT, dtype=torch.long, device=x.device)
    kind[:, 0] = CLS
    if fuse is not None and drop.shape[1] > 0:
        if fuse not in ("raw", "renorm"):
            raise ValueError(f"fuse must be None, 'raw' or 'renorm', got {fuse!r}")
        w = gather_tokens(scores if fuse_weights is None else fuse_weights, drop)
        fused = fuse_tokens(gather_tokens(x, drop + 1), w, renorm=(fuse == "renorm"))
        new_x = torch.cat([new_x, fused], dim=1)
        new_size = torch.cat([new_size, gather_tokens(size, drop + 1).sum(1, keepdim=True)], dim=1)
        if source is not None:
            new_src = torch.cat([new_src, gather_tokens(source, drop + 1).any(dim=1, keepdim=True)], dim=1)
        kind = torch.cat([kind, torch.full((B, 1), FUSED, dtype=torch.long, device=x.device)], dim=1)
    return new_x, new_size, new_src, kind


def gumbel_noise(shape, generator: Optional[torch.Generator], device, dtype) -> Tensor:
    """Standard Gumbel noise from an explicit generator (on CPU when the generator is a CPU one)."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32)
    g = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    return g.to(device=device, dtype=dtype)


def st_gumbel_softmax(
    logits: Tensor, tau: float = 1.0, generator: Optional[torch.Generator] = None, noise: bool = True
) -> Tensor:
    """Straight-through Gumbel-softmax over the last dim: a hard one-hot forward, soft gradients backward.

    logits (..., C) -> (..., C) with values exactly 0/1. ``noise=False`` gives the straight-through argmax.
    """
    if tau <= 0 or math.isnan(tau):
        raise ValueError(f"tau must be > 0, got {tau!r}")
    g = gumbel_noise(logits.shape, generator, logits.device, logits.dtype) if noise else 0.0
    soft = ((logits + g) / tau).softmax(dim=-1)
    index = soft.argmax(dim=-1, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return hard - soft.detach() + soft


# ---- selection helpers of the attention-score methods (TRIPS, ELIP, EViT, random) go here ----------------------


def text_query_scores(q_text: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """TRIPS's TD-ATT score of each candidate for one external query row (the text [CLS]).

    q_text (B, H, 1, d), k (B, H, 1 + M, d), bias broadcastable to (B, H, 1, 1 + M) or None -> a (B, M), fp32.
    Per head a softmax over the M candidates only (the image [CLS] key is excluded), then the mean over heads.
    """
    b = None if bias is None else bias[..., 1:]
    return head_mean_attention(q_text, k[:, :, 1:], b)[:, 0]  # eq. 2 (on keys)


def cls_attention_scores(q_cls: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The [CLS] attention row over the candidates, as the layer's own attention computes it (EViT, ELIP).

    q_cls (B, H, 1, d), k (B, H, 1 + M, d), bias broadcastable to (B, H, 1, 1 + M) or None -> (B, M), fp32.
    Per head a softmax over all 1 + M keys ([CLS] included, as in the attention itself), the candidates' part
    (columns 1..M, so the row sums to at most 1), then the mean over heads.
    """
    return head_mean_attention(q_cls, k, bias)[:, 0, 1:]


def external_key_bias(size: Tensor, mask: Optional[Tensor], prop_attn: bool, dtype: torch.dtype) -> Optional[Tensor]:
    """Additive bias (B, 1, 1, T) for a query row from outside the token set, consistent with the state's
    self-attention: log(size) under proportional attention, finfo(dtype).min on masked-out keys; None if neither."""
    bias = size.log().to(dtype)[:, None, None, :] if prop_attn else None
    if mask is not None:
        m = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask <= 0, torch.finfo(dtype).min)
        m = m[:, None, None, :]
        bias = m if bias is None else (bias + m).clamp_min(torch.finfo(dtype).min)
    return bias


def elip_guide(img_cls: Tensor, t_cls: Tensor, lam: float) -> Tensor:
    """ELIP's guide ``cls' = lam * img_cls + (1 - lam) * t_cls``: (B, D), (B, D) -> (B, D)."""
    return lam * img_cls + (1.0 - lam) * t_cls


def original_keep_count(ratio: float, n: int, m: int) -> int:
    """ELIP's k_b = floor(ratio * N) of the *original* patch count N, clamped to 1 <= k <= M (M candidates now)."""
    check_keep(ratio, "ratio")
    return max(1, min(m, math.floor(ratio * n + 1e-9)))


def random_scores(batch: int, m: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform scores (B, M) drawn row by row from ``generator`` (on the generator's device), moved to ``device``.

    Row i is draws i*M .. (i+1)*M - 1 of the stream, so a sample's scores depend only on the generator state and
    its position in the batch, never on the other samples (nor on the batch size).
    """
    return torch.rand(batch, m, generator=generator, device=generator.device).to(device)



# ---- merging and learned-mask helpers (ToMe, DynamicViT, TiP, LAPS) go here -----------------------------------


def check_merge_count(r: int, m: int) -> int:
    """ToMe's merge count: an int with 0 <= r <= (M - 1) // 2 for M candidates; larger raises (never clamped)."""
    check_pos_int("tome: r", r, 0)
    if r > (m - 1) // 2:
        raise ValueError(f"tome: r={r} is too large for {m} candidate tokens; r must be in [0, {(m - 1) // 2}]")
    return r


def bipartite_soft_matching(metric: Tensor, r: int) -> Tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching with the image [CLS] protected.

    metric (B, T, C) (keys averaged over heads). The sequence alternates into set A (even positions, [CLS] first)
    and set B (odd positions); each A token's most similar B token (cosine) is its edge; the ``r`` A tokens with
    the most similar edges merge into their B partners. [CLS] gets similarity -inf, so it is never merged.
    Returns unm (B, |A| - r) unmerged A positions sorted ascending (so [CLS] stays first), src (B, r) merged A
    positions and dst (B, r) the B positions they merge into (indices within A and B). Ties: lowest index first.
    """
    check_merge_count(r, metric.shape[1] - 1)
    with torch.no_grad():  # only indices come out: no graph
        m = F.normalize(metric.float(), dim=-1)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # cosine similarity, (B, |A|, |B|)
        scores[:, 0, :] = -math.inf  # [CLS] protected
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
        src, unm = edge_idx[:, :r], edge_idx[:, r:].sort(dim=-1).values
        dst = node_idx.gather(1, src)
    return unm, src, dst


def merge_tokens(x: Tensor, unm: Tensor, src: Tensor, dst: Tensor, reduce: str = "sum") -> Tensor:
    """Apply a matching to x (B, T, ...): -> (B, T - r, ...) = [unmerged A tokens, B tokens with their A
    partners reduced in] ("sum" or "amax"). This is ToMe's token order: [CLS] first, then A, then B."""
    a, b = x[:, ::2], x[:, 1::2]
    unm_x, src_x = gather_tokens(a, unm), gather_tokens(a, src)
    index = dst.reshape(dst.shape + (1,) * (x.dim() - 2)).expand(src_x.shape)
    b = b.scatter_reduce(1, index, src_x, reduce=reduce, include_self=True)
    return torch.cat([unm_x, b], dim=1)


def merge_wavg(
    x: Tensor, size: Tensor, unm: Tensor, src: Tensor, dst: Tensor
) -> Tuple[Tensor, Tensor]:
    """Size-weighted average merge: x (B, T, D), size (B, T) -> x (B, T - r, D), size (B, T - r).

    A merged token is sum_i size_i x_i / sum_i size_i over its members; sizes add up.
    """
    w = size.unsqueeze(-1).to(x.dtype)
    xs = merge_tokens(x * w, unm, src, dst, "sum")
    new_size = merge_tokens(size.unsqueeze(-1), unm, src, dst, "sum")
    return xs / new_size.to(x.dtype), new_size.squeeze(-1)


def merge_source(source: Tensor, unm: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Provenance (B, T, 1 + N) bool merged with logical OR -> (B, T - r, 1 + N)."""
    return merge_tokens(source.to(torch.uint8), unm, src, dst, "amax").bool()


def merge_kind(B: int, t_a: int, t_b: int, unm: Tensor, dst: Tensor, device) -> Tensor:
    """Token kinds after a merge: (B, |A| - r + |B|) with CLS first, KEPT, and MERGED for B tokens that absorbed."""
    absorbed = torch.zeros(B, t_b, dtype=torch.long, device=device).scatter_add_(1, dst, torch.ones_like(dst))
    kind_b = torch.where(absorbed > 0, MERGED, KEPT)
    kind_a = torch.full((B, unm.shape[1]), KEPT, dtype=torch.long, device=device)
    kind_a[:, 0] = CLS
    return torch.cat([kind_a, kind_b], dim=1)


def st_keep_mask(
    log_probs: Tensor, generator: Optional[torch.Generator], prev: Optional[Tensor] = None, tau: float = 1.0
) -> Tensor:
    """Straight-through Gumbel hard keep mask: log_probs (B, M, 2) (channel 0 = keep) -> (B, M) in {0, 1},
    multiplied by the previous mask ``prev`` (B, M) when given. Forward exactly 0/1; soft gradients backward."""
    hard = st_gumbel_softmax(log_probs, tau=tau, generator=generator)[..., 0]
    return hard if prev is None else hard * prev


def policy_softmax(logits: Tensor, policy: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Softmax restricted to entries with policy 1, differentiable in the policy (DynamicViT's masked softmax):
    exp(l_i) p_i / sum_j exp(l_j) p_j. For a 0/1 policy the forward equals a softmax over the kept entries; an
    all-zero row gives zeros. logits and policy broadcast together; computed in fp32."""
    ft = torch.promote_types(logits.dtype, torch.float32)
    l = logits.to(ft)
    e = (l - l.amax(dim=dim, keepdim=True).detach()).exp() * policy.to(ft)
    return (e / e.sum(dim=dim, keepdim=True).clamp_min(eps)).to(logits.dtype)


def minmax_norm(x: Tensor, dim: int = -1, eps: float = 1e-6) -> Tensor:
    """(x - min) / (max - min + eps) along ``dim``: values in [0, 1] (LAPS's norm)."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def grid_positions(source: Optional[Tensor], batch: int, m: int, num_patches: int, device) -> Tensor:
    """Grid index (0-based over the N patches) of each of the M candidate tokens, or -1 where a token covers not
    exactly one patch: (B, M) long. From provenance when traced; without it only when nothing was removed before
    (M = N: the tokens are the patches in order); otherwise a ValueError asks for trace=True."""
    if source is not None:
        cand = source[:, 1:, 1:]
        single = cand.sum(-1) == 1
        return torch.where(single, cand.float().argmax(-1), torch.full(single.shape, -1, device=device))
    if m == num_patches:
        return torch.arange(m, device=device).expand(batch, m)
    raise ValueError(
        f"grid positions of {m} candidate tokens are unknown ({num_patches} patches originally): run with trace=True"
        " so that provenance is kept"
    )


__all__ = [
    "check_keep",
    "keep_count",
    "attention_probs",
    "head_mean_attention",
    "topk_keep",
    "gather_tokens",
    "fuse_tokens",
    "keep_and_fuse",
    "gumbel_noise",
    "st_gumbel_softmax",
    "text_query_scores",
    "cls_attention_scores",
    "external_key_bias",
    "elip_guide",
    "original_keep_count",
    "random_scores",
    "check_merge_count",
    "bipartite_soft_matching",
    "merge_tokens",
    "merge_wavg",
    "merge_source",
    "merge_kind",
    "st_keep_mask",
    "policy_softmax",
    "minmax_norm",
    "grid_positions",
]
