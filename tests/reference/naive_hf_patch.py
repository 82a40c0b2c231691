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


def bridgetower_elip(model, px, ids, starts, ratios, lam=0.8):
    """ELIP (look-ahead) in BridgeTower's uni-modal vision layers, naively, on one sample: the model's own forward
    with hooks. Guide: the text model's output [CLS] for ``ids`` (1, L) alone (no padding). At block start s (1-based,
    block up to the next start or the end) a copy of the input whose [CLS] is lam * cls + (1 - lam) * guide runs
    through the block; the last layer's head-mean attention map (``need_weights``) gives the [CLS] row over the
    candidates; the top floor(ratio * N) stay in spatial order, the rest fuse with renormalised weights, appended
    last. Provenance is kept as Python sets; each image link tower gets the cross-modal stream rebuilt token by token
    as the patch-count weighted mean of the cross-modal tokens it covers. Returns the model's output."""
    bt = model.bridgetower if hasattr(model, "bridgetower") else model
    blocks = bt.vision_model.visual.transformer.resblocks
    L = len(blocks)
    split = len(bt.text_model.encoder.layer) - bt.config.num_hidden_layers + 1
    with torch.no_grad():
        guide = bt.text_model(input_ids=ids).last_hidden_state[0, 0]
    ends = list(starts[1:]) + [L + 1]
    N = (bt.config.vision_config.image_size // bt.config.vision_config.patch_size) ** 2
    st = {"prov": [{j} for j in range(1 + N)]}

    def prune(s, ratio, end):
        def hook(mod, args):
            x = args[0][:, 0]  # (T, D): batch of one, sequence first
            h = torch.cat([lam * x[:1] + (1 - lam) * guide[None], x[1:]])[:, None]
            for blk in blocks[s - 1:end - 2]:
                h = blk.forward(h)
            last = blocks[end - 2]
            n = last.ln_1(h)
            att = last.attn(n, n, n, need_weights=True, average_attn_weights=True)[1][0]  # (T, T)
            a = att[0, 1:]
            M = x.shape[0] - 1
            k = max(1, min(M, math.floor(ratio * N)))
            order = sorted(range(M), key=lambda j: (-float(a[j]), j))
            kept, rest = sorted(order[:k]), sorted(order[k:])
            prov = st["prov"]
            rows, new_prov = [x[:1]], [prov[0]]
            rows += [x[1 + j][None] for j in kept]
            new_prov += [prov[1 + j] for j in kept]
            if rest:
                w = a[rest] / (a[rest].sum() + 1e-6)
                rows.append(sum(w[i] * x[1 + j] for i, j in enumerate(rest))[None])
                new_prov.append(set().union(*(prov[1 + j] for j in rest)))
            st["prov"] = new_prov
            return (torch.cat(rows)[:, None],) + tuple(args[1:])
        return hook

    def after_split(mod, args, out):
        st["cross"], st["T0"] = list(st["prov"]), len(st["prov"])

    def pad(mod, args, out):
        T0 = st["T0"]
        return torch.cat([out, out.new_zeros(out.shape[0], T0 - out.shape[1], out.shape[2])], 1) if out.shape[1] < T0 else out

    def tower(mod, args):
        h, c, m = args
        T = len(st["prov"])
        rows = []
        for p in st["prov"]:
            w = [len(p & q) for q in st["cross"]]
            rows.append(sum(wi * c[0, j] for j, wi in enumerate(w) if wi) / sum(w))
        st["cross"] = list(st["prov"])
        return h[:, :T], torch.stack(rows)[None], m

    def cut_masks(image_first):
        def hook(mod, args, kwargs):  # transformers 4.x passes all-zero image masks of the unpruned length
            name, T = ("attention_mask", args[0].shape[1]) if image_first else ("encoder_attention_mask", args[1].shape[1])
            m = kwargs.get(name)
            if m is not None and m.shape[-1] != T:
                assert not bool((m != 0).any())
                kwargs[name] = m[..., :T]
            return args, kwargs
        return hook

    hooks = [blocks[s - 1].register_forward_pre_hook(prune(s, r, e)) for s, r, e in zip(starts, ratios, ends)]
    hooks += [m.register_forward_pre_hook(cut_masks(True), with_kwargs=True) for m in bt.cross_modal_image_layers]
    hooks += [m.register_forward_pre_hook(cut_masks(False), with_kwargs=True) for m in bt.cross_modal_text_layers]
    hooks.append(blocks[split - 1].register_forward_hook(after_split))
    tr = bt.cross_modal_image_transform
    hooks += [t.register_forward_hook(pad) for t in (tr if isinstance(tr, torch.nn.ModuleList) else [tr])]
    hooks += [t.register_forward_pre_hook(tower) for t in bt.cross_modal_image_link_tower]
    try:
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=px)
    finally:
        for h in hooks:
            h.remove()
