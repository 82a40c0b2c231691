"""SparseVLM inside a vision-language LLM (Zhang et al., ICML 2025; official code Gumpest/SparseVLMs, version 1.0):
text-guided, training-free ranking of the image tokens by the prompt tokens that matter, in the language model.

Where: decoder layers of the language model (slot group "llm"), default 3, 7 and 16 (1-based); each of them runs
on every current token and its **output** is pruned (its own cache keeps everything, later layers the reduced set).
1. Raters, once per prompt, from the language model's input embeddings: V = the image tokens, T = every real token
   after the image; r = mean over image rows of softmax over T of V . T^T; the raters are the tokens with r_j above
   the mean of r (all of T when none is).
2. At each of its layers: the layer's causal softmax attention of the rater rows only (one query per rater, the
   layer's own q/k and RoPE; never the L x L map), head mean, over the current visual tokens, mean over raters = s.
   Keep the top k_l visual tokens (in order; ties to the lower index).
3. Recycling: of the p pruned tokens, the m = floor(3p / 10) + 1 with the highest s are clustered (DPC-kNN,
   c = floor(m / 10) + 1 centres; ``dpc_knn_merge``) into c tokens, each the plain mean of its members, placed right
   after the kept visual tokens; they count as visual tokens at the next layer.
4. Positions are renumbered contiguously after each pruning (each token moves down by the number of tokens removed
   before it, recycled ones added); at decode every position of a later layer moves by the same count.
Counts: ``keep`` is the layer-averaged target as a fraction of the N image tokens; the official schedules for
N = 576 (192 -> 300 / 200 / 110, 128 -> 303 / 110 / 36, 96 -> 238 / 48 / 26, 64 -> 66 / 30 / 17) scale with N,
other targets interpolate linearly between them (and up to every token at keep 1.0). A tuple of three (or one per
layer) sets each layer's count as a fraction of N. vlprune keeps every token at a layer whose count reaches the
current visual count (the official code still drops one), so keep 1.0 is exactly the unpatched model; it runs per
sample on padded batches (the official code: batch 1) without the official density jitter (ties: lower index).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .fastv import LLMReducer
from .registry import ReduceConfig, check_layers, get_spec, per_layer, register
from .select import check_keeps

DEFAULT_LAYERS = (3, 7, 16)
DEFAULT_KEEP = 192 / 576
# the official per-layer counts for 576 image tokens, by layer-averaged target
SCHEDULES = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}


def schedule_fractions(keep: float) -> List[float]:
    """The three layers' counts as fractions of N for a layer-averaged target ``keep`` (a fraction of N)."""
    pts = [(t / 576, [c / 576 for c in cs]) for t, cs in sorted(SCHEDULES.items())] + [(1.0, [1.0, 1.0, 1.0])]
    if keep <= pts[0][0]:
        return [f * keep / pts[0][0] for f in pts[0][1]]
    for (t0, f0), (t1, f1) in zip(pts, pts[1:]):
        if keep <= t1:
            w = (keep - t0) / (t1 - t0)
            return [a + w * (b - a) for a, b in zip(f0, f1)]
    return [1.0, 1.0, 1.0]


def recycle_counts(pruned: int) -> Tuple[int, int]:
    """(m tokens recycled, c clusters) for ``pruned`` dropped tokens: m = floor(0.3 p) + 1, c = floor(m / 10) + 1."""
    m = min(pruned, 3 * pruned // 10 + 1)
    return m, m // 10 + 1


def suffix_rows(after: Tensor) -> Tuple[Tensor, Tensor]:
    """after (B, L) bool -> (rows (B, S) the indices of the True entries, padded with index 0; valid (B, S))."""
    n = after.sum(1)
    S = max(1, int(n.max()))
    order = torch.argsort((~after).to(torch.int8), dim=1, stable=True)[:, :S]
    valid = torch.arange(S, device=after.device)[None] < n[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def rater_mask(embeds: Tensor, image: Tensor, key_ok: Tensor) -> Tensor:
    """embeds (B, L, D) the LLM's input embeddings, image (B, L) bool (N per row), key_ok (B, L) real tokens ->
    raters (B, L) bool: the real tokens after the image whose mean (over image rows) softmax relevance
    softmax_T(V . T^T) is above the mean; every token after the image when none is."""
    B, L, D = embeds.shape
    idx = torch.arange(L, device=embeds.device)
    last = torch.where(image, idx, -1).max(1).values
    rows, valid = suffix_rows(key_ok & (idx[None] > last[:, None]))
    if not bool(valid.any(1).all()):
        raise ValueError("sparsevlm needs text after the image in every prompt (its raters), got a prompt that "
                         "ends with the image")
    v = embeds[image].view(B, -1, D).float()
    t = embeds.gather(1, rows[..., None].expand(-1, -1, D)).float()
    rel = (v @ t.transpose(1, 2)).masked_fill(~valid[:, None], float("-inf")).softmax(-1).mean(1)  # (B, S)
    mean = (rel * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
    pick = valid & (rel > mean)
    pick = torch.where(pick.any(1, keepdim=True), pick, valid)
    return torch.zeros(B, L, dtype=torch.bool, device=embeds.device).scatter_(1, rows, pick) & key_ok


def rater_scores(logits: Tensor, rows: Tensor, valid: Tensor, key_ok: Tensor, visual: Tensor) -> Tensor:
    """logits (B, H, R, L) of the rater rows (indices rows (B, R), valid (B, R)); key_ok (B, L); visual (B, L) bool
    with M per row -> s (B, M): causal softmax per row over the real keys, head mean, visual columns, rater mean."""
    B, _, R, L = logits.shape
    allowed = key_ok[:, None] & (torch.arange(L, device=logits.device)[None, None] <= rows[..., None])
    allowed = allowed | ~valid[..., None]  # padding rows: any finite row, weighted 0 below
    p = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)  # (B, R, L)
    s = (p * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    return s[visual].view(B, -1)


def dpc_knn_merge(x: Tensor, c: int) -> Tensor:
    """x (B, m, D) tokens -> (B, c, D): DPC-kNN clustering (d = ||x_i - x_j|| / sqrt(D); density
    rho = exp(-mean of the c smallest d^2, itself included); delta = distance to the nearest denser token, the
    largest distance for the densest; centres = top-c rho * delta; each token to its nearest centre), each cluster
    the plain mean of its members, in centre order."""
    B, m, D = x.shape
    xf = x.float()
    d = torch.cdist(xf, xf) / D ** 0.5  # (B, m, m)
    rho = (-(d.topk(c, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    denser = rho[:, None, :] > rho[:, :, None]  # [b, i, j]: j denser than i
    far = d.flatten(1).max(-1).values[:, None, None].expand_as(d)
    delta = torch.where(denser, d, far).min(-1).values
    centres = torch.argsort(rho * delta, dim=1, descending=True, stable=True)[:, :c]  # (B, c)
    to_c = d.gather(2, centres[:, None].expand(-1, m, -1))  # (B, m, c)
    assign = to_c.argmin(-1)
    assign.scatter_(1, centres, torch.arange(c, device=x.device).expand(B, -1))
    sums = torch.zeros(B, c, D, device=x.device).scatter_add_(1, assign[..., None].expand(-1, -1, D), xf)
    counts = torch.zeros(B, c, device=x.device).scatter_add_(1, assign, torch.ones(B, m, device=x.device))
    return (sums / counts[..., None]).to(x.dtype)


class SparseVLMLLM(LLMReducer):
    """SparseVLM at one decoder layer: keeps ``round(keep * N)`` of the original N image tokens (N counted on the
    prompt), the rest ranked out by the raters and partly recycled (``patch/lvlm_sparsevlm.py`` runs it)."""

    where = "post"
    method = "sparsevlm"

    def keep_count(self, n: int) -> int:
        return max(1, int(round(self.keep * n)))


def sparsevlm_schedule(keep: Union[None, float, Sequence[float]], layers: Sequence[int]) -> List[float]:
    """Each layer's count as a fraction of N: a tuple as given, a number through ``schedule_fractions``."""
    if isinstance(keep, (list, tuple)):
        return check_keeps(per_layer(list(keep), layers, "sparsevlm"), layers, "sparsevlm")
    keep = DEFAULT_KEEP if keep is None else keep
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"sparsevlm: keep must be in (0, 1] or one value per layer, got {keep!r}")
    if len(layers) != 3:
        raise ValueError(f"sparsevlm: a single keep sets the official three-layer schedule; with {len(layers)} "
                         f"layers {list(layers)} give one keep per layer (a fraction of the image tokens)")
    return schedule_fractions(float(keep))


@register("sparsevlm", groups=("llm",), placement="llm", lvlm_only=True, layers=DEFAULT_LAYERS, keep=DEFAULT_KEEP,
          text_guided=True)
def build(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    """Install SparseVLM at LLM decoder layers (default 3, 7, 16; keep = the layer-averaged target)."""
    _, slots = get_spec(cfg.name).slots(model)
    layers = cfg.layers if cfg.layers is not None else DEFAULT_LAYERS
    check_layers(layers, len(slots), cfg.name)
    for layer, frac in zip(layers, sparsevlm_schedule(cfg.keep, layers)):
        slots[layer - 1].reducer = SparseVLMLLM(frac)


__all__ = ["SparseVLMLLM", "schedule_fractions", "recycle_counts", "rater_mask", "rater_scores", "dpc_knn_merge",
           "suffix_rows", "sparsevlm_schedule"]
