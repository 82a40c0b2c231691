"""Deliberately naive per-sample references for TRIPS, ELIP (both modes), EViT and random.

One sample at a time, in float64, every attention computed by hand as an explicit (T x T) map per head from the
layer's weight matrices, keep counts from exact fractions, selections by a Python sort, fusion by a Python loop.
Nothing here calls the library's reduction code. Each function returns the final image tokens of the ViT (after
the final LayerNorm) and, per reduction, a record: the 1-based layer, the provenance of every token (a frozenset
of original token indices, 0 = [CLS]), the kept candidate indices and the fused token (or None).
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor


def _heads(attn, h: Tensor):
    """Per-head q, k, v (H, T, d) of one sample's normalised tokens h (T, D), from the weight matrix by hand."""
    D, H = attn.dim, attn.heads
    d = D // H
    W, b = attn.qkv.weight, attn.qkv.bias
    qkv = h @ W.T + b
    q, k, v = qkv[:, :D], qkv[:, D : 2 * D], qkv[:, 2 * D :]
    split = lambda t: torch.stack([t[:, i * d : (i + 1) * d] for i in range(H)])  # noqa: E731
    return split(q), split(k), split(v)


def _softmax(row: Tensor) -> Tensor:
    e = torch.exp(row - row.max())
    return e / e.sum()


def attention_by_hand(attn, h: Tensor):
    """out (T, D), the explicit attention map P (H, T, T), q and k (H, T, d) for one sample."""
    q, k, v = _heads(attn, h)
    H, T, d = q.shape
    P = torch.zeros(H, T, T, dtype=h.dtype)
    for i in range(H):
        for t in range(T):
            P[i, t] = _softmax(q[i, t] @ k[i].T / math.sqrt(d))
    out = torch.cat([P[i] @ v[i] for i in range(H)], dim=1)
    return out @ attn.proj.weight.T + attn.proj.bias, P, q, k


def query_row_by_hand(attn, ln, row: Tensor, k: Tensor, keys: slice) -> Tensor:
    """Head-mean softmax of one external row (D,) (normalised by ``ln``, projected by W_q) over keys[keys]."""
    D, H = attn.dim, attn.heads
    d = D // H
    qv = ln(row) @ attn.qkv.weight[:D].T + attn.qkv.bias[:D]
    rows = [_softmax(qv[i * d : (i + 1) * d] @ k[i, keys].T / math.sqrt(d)) for i in range(H)]
    return sum(rows) / H


def python_topk(scores: List[float], k: int):
    """Kept (sorted) and dropped (sorted) candidate indices: largest first, ties to the lowest index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k]), sorted(order[k:])


def ceil_count(keep: float, m: int) -> int:
    return max(1, min(m, math.ceil(Fraction(repr(keep)) * m)))


def floor_count(ratio: float, n: int, m: int) -> int:
    return max(1, min(m, math.floor(Fraction(repr(ratio)) * n)))


def prune(x: Tensor, prov: List[frozenset], scores: List[float], k: int, fuse: Optional[str], weights=None):
    """Keep [CLS] + the top-k candidates; fuse the rest ("raw": sum w_i x_i, "renorm": w_i / (sum w + 1e-6))."""
    kept, dropped = python_topk(scores, k)
    w = scores if weights is None else weights
    rows, new_prov = [x[0]], [prov[0]]
    for i in kept:
        rows.append(x[1 + i])
        new_prov.append(prov[1 + i])
    fused = None
    if fuse is not None and dropped:
        total = sum(w[i] for i in dropped)
        fused = torch.zeros_like(x[0])
        for i in dropped:
            wi = w[i] if fuse == "raw" else w[i] / (total + 1e-6)
            fused = fused + wi * x[1 + i]
        rows.append(fused)
        new_prov.append(frozenset().union(*(prov[1 + i] for i in dropped)))
    return torch.stack(rows), new_prov, kept, fused


def run_vit(vision, image: Tensor, hooks: Dict[int, Callable]):
    """Naive per-sample ViT in float64. hooks[i] (0-based layer) = fn(stage, ctx) called with stage "pre" before
    the attention and "mid" after the residual; it may return (x, prov, record) to replace the tokens."""
    vision = copy.deepcopy(vision).double()
    for layer in vision.layers:
        layer.reducer = None
    with torch.no_grad():
        x = vision.embed(image[None].double())[0]
        prov = [frozenset([i]) for i in range(x.shape[0])]
        records = []
        for i, layer in enumerate(vision.layers):
            hook = hooks.get(i)
            if hook is not None:
                res = hook("pre", dict(x=x, prov=prov, layer=layer, vision=vision, index=i))
                if res is not None:
                    x, prov, rec = res
                    records.append(rec)
            a, P, q, k = attention_by_hand(layer.attn, layer.ln1(x))
            x = x + a
            if hook is not None:
                res = hook("mid", dict(x=x, prov=prov, layer=layer, P=P, q=q, k=k, vision=vision, index=i))
                if res is not None:
                    x, prov, rec = res
                    records.append(rec)
            x = x + layer.mlp(layer.ln2(x))
        return vision.norm(x), records


def _record(i, prov, kept, fused):
    return dict(layer=i + 1, prov=prov, kept=kept, fused=fused)


def trips(vision, image, guide, layers, keeps):
    """TRIPS: TD-ATT of the guide over the candidates' keys (softmax over candidates), keep ceil(r M), raw fusion."""
    guide = guide.double()

    def make(keep):
        def hook(stage, c):
            if stage != "mid":
                return None
            M = c["x"].shape[0] - 1
            k = ceil_count(keep, M)
            if k == M:
                return None
            a = query_row_by_hand(c["layer"].attn, c["layer"].ln1, guide, c["k"], slice(1, None)).tolist()
            x, prov, kept, fused = prune(c["x"], c["prov"], a, k, "raw")
            return x, prov, _record(c["index"], prov, kept, fused)

        return hook

    return run_vit(vision, image, {l - 1: make(kp) for l, kp in zip(layers, keeps)})


def evit(vision, image, layers, keeps):
    """EViT: [CLS] row of the explicit attention map, head mean, candidates' part; keep ceil(r M); raw fusion."""

    def make(keep):
        def hook(stage, c):
            if stage != "mid":
                return None
            M = c["x"].shape[0] - 1
            k = ceil_count(keep, M)
            if k == M:
                return None
            a = c["P"][:, 0, 1:].mean(0).tolist()
            x, prov, kept, fused = prune(c["x"], c["prov"], a, k, "raw")
            return x, prov, _record(c["index"], prov, kept, fused)

        return hook

    return run_vit(vision, image, {l - 1: make(kp) for l, kp in zip(layers, keeps)})


def elip(vision, image, guide, starts, spans, ratios, lam=0.8, lookahead=True):
    """ELIP: look-ahead (a copy with [CLS] := cls' through the whole block, last layer's [CLS] row) or the
    [CLS]' row against the keys of the layer before the block; keep floor(ratio N); renormalised fusion."""
    guide = guide.double()
    N = None

    def make(ratio, span):
        def hook(stage, c):
            if stage != ("pre" if lookahead else "mid"):
                return None
            x = c["x"]
            M = x.shape[0] - 1
            k = floor_count(ratio, N, M)
            if k == M:
                return None
            if lookahead:
                h = x.clone()
                h[0] = lam * x[0] + (1 - lam) * guide
                for j in range(c["index"], c["index"] + span):
                    blk = c["vision"].layers[j]
                    a_out, P, _, _ = attention_by_hand(blk.attn, blk.ln1(h))
                    h = h + a_out
                    h = h + blk.mlp(blk.ln2(h))
                a = P[:, 0, 1:].mean(0).tolist()
            else:
                cls_p = lam * x[0] + (1 - lam) * guide
                a = query_row_by_hand(c["layer"].attn, c["layer"].ln1, cls_p, c["k"], slice(None))[1:].tolist()
            xn, prov, kept, fused = prune(x, c["prov"], a, k, "renorm")
            return xn, prov, _record(c["index"], prov, kept, fused)

        return hook

    N = (image.shape[-1] // vision.cfg.patch_size) ** 2
    off = 1 if lookahead else 2
    return run_vit(vision, image, {s - off: make(r, n) for s, n, r in zip(starts, spans, ratios)})


def random_drop(vision, image, index, batch, layers, keeps, gen_seed=None, seed=0, fuse=False):
    """Random: per reduction, a generator derived from the model's generator (one 62-bit draw) or from
    seed * 1_000_003 + layer; (batch, M) uniform scores, row ``index`` is this sample's; drop or mean-fuse."""
    g = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)

    def make(keep):
        def hook(stage, c):
            if stage != "mid":
                return None
            M = c["x"].shape[0] - 1
            k = ceil_count(keep, M)
            if k == M:
                return None
            if g is None:
                lg = torch.Generator().manual_seed(seed * 1_000_003 + c["index"])
            else:
                lg = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
            s = torch.rand(batch, M, generator=lg)[index].tolist()
            w = [1.0] * M
            x, prov, kept, fused = prune(c["x"], c["prov"], s, k, "renorm" if fuse else None, w)
            return x, prov, _record(c["index"], prov, kept, fused)

        return hook

    return run_vit(vision, image, {l - 1: make(kp) for l, kp in zip(layers, keeps)})
