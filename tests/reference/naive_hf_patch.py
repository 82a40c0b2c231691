"""A deliberately naive, per-sample reference for a patched HF vision tower (BLIP, CLIP): explicit attention maps,
argsort selection, a Python loop over the samples. Used to check ``vlprune.patch``'s vectorised SDPA path.

Methods: "evit" (the [CLS] attention row over the candidates, softmax over all keys, head mean) and "trips" (the
guide's row with the layer's own LN1 and W_q, softmax over the candidates only, head mean); both keep
ceil(keep * M) in spatial order and fuse the rest with the raw weights, appended last.
"""

from __future__ import annotations

import math

import torch


def _qkv(layer, h, D):
    a = layer.self_attn
    if hasattr(a, "qkv"):  # BLIP: fused, laid out (3, H, d)
        w, b = a.qkv.weight, a.qkv.bias
        return [h @ w[i * D:(i + 1) * D].T + b[i * D:(i + 1) * D] for i in range(3)], a.projection
    return [a.q_proj(h), a.k_proj(h), a.v_proj(h)], a.out_proj


def _heads(t, H):
    T, D = t.shape
    return t.view(T, H, D // H).transpose(0, 1)  # (H, T, d)


def vision_tower(layers, x, H, method=None, where=(), keep=1.0, guide=None):
    """x (B, 1 + N, D) embedded tokens -> list of per-sample outputs (T_b, D) after all ``layers``; reductions at the
    0-based layer indices ``where``."""
    outs = []
    for b in range(x.shape[0]):
        t = x[b]
        for i, layer in enumerate(layers):
            D = t.shape[-1]
            h = layer.layer_norm1(t)
            (q, k, v), proj = _qkv(layer, h, D)
            q, k, v = _heads(q, H), _heads(k, H), _heads(v, H)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)  # (H, T, T): the full map
            t = t + proj((att @ v).transpose(0, 1).reshape(-1, D))
            if i in where:
                M = t.shape[0] - 1
                if method == "evit":
                    a = att[:, 0, 1:].mean(0)
                else:
                    gq = _heads(_qkv(layer, layer.layer_norm1(guide[b][None]), D)[0][0], H)  # (H, 1, d)
                    a = torch.softmax((gq @ k[:, 1:].transpose(-1, -2))[:, 0] / math.sqrt(D // H), dim=-1).mean(0)
                kk = max(1, min(M, math.ceil(keep * M - 1e-9)))
                order = sorted(range(M), key=lambda j: (-float(a[j]), j))
                kept = sorted(order[:kk])
                rest = [j for j in range(M) if j not in kept]
                cand = t[1:]
                new = [t[:1], cand[kept]]
                if rest:
                    new.append((a[rest, None] * cand[rest]).sum(0, keepdim=True))
                t = torch.cat(new)
            t = t + layer.mlp(layer.layer_norm2(t))
        outs.append(t)
    return outs
