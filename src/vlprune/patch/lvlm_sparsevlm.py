"""SparseVLM's reducing layer in the language model of a vision-language LLM (the maths: ``reduce/sparsevlm.py``).

At prefill, at each of its layers: raters (once, from the input embeddings), the rater rows' attention over the
current visual tokens (``rows_logits``: only those rows), the top k kept, the best of the dropped ones recycled
into DPC-kNN cluster means right after the kept ones, positions renumbered (``record_reduction`` with a shift).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reduce.sparsevlm import dpc_knn_merge, rater_mask, rater_scores, recycle_counts, suffix_rows
from . import lvlm_ops as P


def sparsevlm_layer(st: P.LLMState, c: P.Call, slot, r, fn, x: Tensor, kwargs: dict, impl: str) -> Tensor:
    """The layer runs on every current token; its output keeps the top k visual tokens plus the recycled ones."""
    B, L, D = x.shape
    key_ok = c.key_ok if c.key_ok is not None else c.mask2d[:, -L:].bool()
    visual = c.image if c.key_ok is None else c.image_now
    counts = visual.sum(1)
    M, n = int(counts[0]), int(c.image.sum(1)[0])
    if M == 0 or bool((counts != M).any()):
        raise ValueError(f"sparsevlm: every sample of the batch needs the same number of image tokens (one image "
                         f"each), got {counts.tolist()}")
    if c.raters is None:
        if c.embeds is None:
            raise ValueError("sparsevlm needs the language model's inputs_embeds at prefill")
        c.raters = rater_mask(c.embeds, c.image, key_ok)
    k = r.keep_count(n)
    if k >= M:
        c.kept.append((slot.index, torch.ones(B, M, dtype=torch.bool, device=x.device)))
        return P.first(fn(x, **kwargs))
    rows, valid = suffix_rows(c.raters)
    logits = P.rows_logits(slot.layer, x, kwargs["position_embeddings"], rows)
    s = rater_scores(logits, rows, valid, key_ok, visual)
    out = P.first(fn(x, **kwargs))
    keep, chosen = P.topk_keep_mask(s, visual, k)
    m, nc = recycle_counts(M - k)
    order = torch.argsort(s.masked_fill(chosen, float("-inf")), dim=1, descending=True, stable=True)[:, :m]
    merged = dpc_knn_merge(out[visual].view(B, M, D).gather(1, order[..., None].expand(-1, -1, D)), nc)
    src = P.kept_index(keep)
    last_vis = torch.where(visual, torch.arange(L, device=x.device), -1).max(1).values
    slot_i = (src <= last_vis[:, None]).sum(1)  # right after the kept visual tokens
    src = P.insert_after(src, slot_i, src.gather(1, (slot_i - 1)[:, None])[:, 0], nc)
    col = torch.arange(src.shape[1], device=x.device)[None]
    new = P.gather_seq(out, src)
    fresh = (col >= slot_i[:, None]) & (col < slot_i[:, None] + nc)
    new = new.masked_scatter(fresh[..., None], merged)
    P.record_reduction(st, c, slot, src, visual, key_ok, kwargs, impl, new.dtype, shift=src - col)
    c.raters = c.raters.gather(1, src) & ~fresh
    c.kept.append((slot.index, chosen))
    return new


__all__ = ["sparsevlm_layer"]
