"""Deliberately naive per-sample references for ToMe, DynamicViT/TiP inference selection and LAPS similarity.

Explicit Python loops over samples and tokens; clarity over speed. Used by tests/test_reduce_tome_tip_dynamicvit.py and tests/test_reduce_laps_and_learned_losses.py.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _cos(u: Tensor, v: Tensor) -> float:
    u, v = u.detach(), v.detach()
    return float((u @ v) / (u.norm().clamp_min(1e-12) * v.norm().clamp_min(1e-12)))


def tome_merge_one(x: Tensor, size: Tensor, source: Tensor, metric: Tensor, r: int):
    """One sample: x (T, D), size (T,), source (T, S) bool, metric (T, C) -> merged x, size, source (T - r, ...).

    A = even positions ([CLS] at 0, never merged), B = odd positions. Each A token's edge is its most similar B
    token (cosine, first one on ties); the r A tokens with the largest edge similarity (ties: lowest position)
    merge into their partners; a merged token is the size-weighted mean of its members. Output order: unmerged A
    tokens in position order, then every B token in position order.
    """
    T = x.shape[0]
    A = list(range(0, T, 2))
    Bs = list(range(1, T, 2))
    edges = []  # (similarity, position in A, partner position in B)
    for ai, a in enumerate(A):
        if a == 0:
            edges.append((-math.inf, ai, 0))
            continue
        best, best_j = -math.inf, 0
        for bj, b in enumerate(Bs):
            s = _cos(metric[a].double(), metric[b].double())
            if s > best:
                best, best_j = s, bj
        edges.append((best, ai, best_j))
    order = sorted(range(len(edges)), key=lambda i: (-edges[i][0], i))
    merged = set(order[:r])
    groups = {bj: [Bs[bj]] for bj in range(len(Bs))}
    for ai in merged:
        groups[edges[ai][2]].append(A[ai])
    out_x, out_s, out_src = [], [], []
    for ai, a in enumerate(A):
        if ai not in merged:
            out_x.append(x[a]), out_s.append(size[a]), out_src.append(source[a])
    for bj in range(len(Bs)):
        members = groups[bj]
        tot = sum(float(size[m]) for m in members)
        out_x.append(sum(x[m] * size[m] for m in members) / tot)
        out_s.append(torch.tensor(tot, dtype=size.dtype))
        src = source[members[0]].clone()
        for m in members[1:]:
            src = src | source[m]
        out_src.append(src)
    return torch.stack(out_x), torch.stack(out_s), torch.stack(out_src)


def topk_indices_one(scores: Tensor, k: int) -> List[int]:
    """Indices of the k largest scores of one sample (ties: lowest index first), in ascending order."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i].detach()), i))
    return sorted(order[:k])


def spa_one(img: Tensor, words: Tensor, leaky: bool) -> float:
    """SPA of one pair: img (Ti, E), words (L, E) (real words only, both L2-normalised)."""
    img, words = img.detach(), words.detach()
    A = [[float(img[i] @ words[j]) for j in range(words.shape[0])] for i in range(img.shape[0])]
    if leaky:
        A = [[a if a >= 0 else 0.1 * a for a in row] for row in A]
    i2t = sum(max(row) for row in A) / len(A)
    t2i = sum(max(A[i][j] for i in range(len(A))) for j in range(words.shape[0])) / words.shape[0]
    return i2t + t2i


def laps_pair_eval(head, img: Tensor, words: Tensor) -> float:
    """LAPS similarity of one pair at inference: img (1 + N, Dv) image states, words (L, Dt) real words only."""
    v_all = head.image_proj(img)
    t = head.text_proj(words)
    cls, v = v_all[0], v_all[1:]
    N = v.shape[0]
    v_glo = v.mean(0)
    t_glo = t.mean(0)
    cos_s = torch.stack([torch.tensor(_cos(v[i], v_glo)) for i in range(N)])
    cos_r = torch.stack([torch.tensor(_cos(v[i], t_glo)) for i in range(N)])
    if head.official:
        a = cos_s + cos_r
    else:
        def mm(z):
            return (z - z.min()) / (z.max() - z.min() + 1e-6)
        a_p = torch.stack([torch.sigmoid(head.score_net(v[i])).squeeze() for i in range(N)])
        a = (1 - head.beta) * a_p + head.beta / 2 * (mm(cos_s) + mm(cos_r))
    k = max(1, min(N, math.ceil(head.rho * N - 1e-9)))
    keep = topk_indices_one(a, k)
    drop = [i for i in range(N) if i not in keep]
    vs = v[keep]
    logits = head.aggr(vs)  # (K, N_c)
    tokens = [cls]
    for c in range(logits.shape[1]):
        w = torch.softmax(logits[:, c], dim=0)
        tokens.append(sum(w[i] * vs[i] for i in range(len(keep))))
    if drop:
        w = torch.softmax(a[drop], dim=0)
        tokens.append(sum(w[i] * v[d] for i, d in enumerate(drop)))
    img_t = F.normalize(torch.stack(tokens), dim=-1)
    return spa_one(img_t, F.normalize(t, dim=-1), head.official)


def continuity_one_layer(p: Tensor, pos: Tensor, grid: int) -> float:
    """TiP continuity of one layer by loops over samples, tokens and neighbours."""
    vals = []
    for b in range(p.shape[0]):
        cell = {int(pos[b, i]): float(p[b, i]) for i in range(p.shape[1]) if int(pos[b, i]) >= 0}
        for c, pv in cell.items():
            y, x = divmod(c, grid)
            diffs = []
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (dy, dx) == (0, 0):
                        continue
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < grid and 0 <= xx < grid and yy * grid + xx in cell:
                        diffs.append((pv - cell[yy * grid + xx]) ** 2)
            if diffs:
                vals.append(sum(diffs) / len(diffs))
    return sum(vals) / len(vals)


def info_nce(t: Tensor, v: Tensor, temp: float) -> float:
    t = [x / x.norm() for x in t]
    v = [x / x.norm() for x in v]
    B = len(t)
    tot = 0.0
    for i in range(B):
        row = [float(t[i] @ v[j]) / temp for j in range(B)]
        col = [float(t[j] @ v[i]) / temp for j in range(B)]
        tot += -(row[i] - math.log(sum(math.exp(r) for r in row))) / B / 2
        tot += -(col[i] - math.log(sum(math.exp(c) for c in col))) / B / 2
    return tot


def triplet_naive(S: Tensor, margin: float, hardest: bool) -> float:
    B = S.shape[0]
    total = 0.0
    for i in range(B):
        ct = [max(0.0, margin + float(S[i, k]) - float(S[i, i])) for k in range(B) if k != i]
        ci = [max(0.0, margin + float(S[k, i]) - float(S[i, i])) for k in range(B) if k != i]
        total += (max(ct) + max(ci)) if hardest else (sum(ct) + sum(ci))
    return total
