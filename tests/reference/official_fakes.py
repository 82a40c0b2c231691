"""Tiny fakes of the official models' module naming (ALBEF's vit.py / xbert.py, LAPS's Hugging Face encoders and
aggregation network, PuMer's ViLT and pruners), with deliberately naive forward passes written from the papers'
and code bases' descriptions. Their ``state_dict()`` has the official key names and shapes; the tests load it with
``vlprune.load_official`` and compare our model's outputs with these forwards. Nothing is downloaded.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn


def naive_attention(q, k, v, heads, key_mask=None):
    """q (B, Tq, D), k/v (B, Tk, D) -> (B, Tq, D), one head at a time; key_mask (B, Tk) 1 = attend."""
    B, Tq, D = q.shape
    d = D // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        if key_mask is not None:
            logits = logits + (1.0 - key_mask[:, None, :].float()) * -10000.0  # BERT's extended mask
        outs.append(logits.softmax(-1) @ v[..., sl])
    return torch.cat(outs, dim=-1)


# -- ALBEF's ViT (models/vit.py names) -------------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)


class _Mlp(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)


class Block(nn.Module):
    def __init__(self, D, H, eps=1e-6):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(D, eps=eps), _Attn(D), nn.LayerNorm(D, eps=eps), _Mlp(D, H)

    def forward(self, x, heads, key_mask=None):
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.attn.proj(naive_attention(q, k, v, heads, key_mask))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class _PatchEmbed(nn.Module):
    def __init__(self, D, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, D, patch, patch)


class FakeViT(nn.Module):
    def __init__(self, image=32, patch=8, D=32, depth=2, mlp=37, eps=1e-6):
        super().__init__()
        n = (image // patch) ** 2
        self.patch_embed = _PatchEmbed(D, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, D) * 0.02)
        self.blocks = nn.ModuleList(Block(D, mlp, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(D, eps=eps)

    def embed(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward(self, images, heads):
        x = self.embed(images)
        for b in self.blocks:
            x = b(x, heads)
        return self.norm(x)


# -- BERT (xbert / Hugging Face names) ------------------------------------------------------------------------
class _Linear3(nn.Module):  # BertSelfAttention: query, key, value
    def __init__(self, D, kv_dim=None):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(kv_dim or D, D), nn.Linear(kv_dim or D, D)


class _Out(nn.Module):
    def __init__(self, i, o, eps=1e-12):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(i, o), nn.LayerNorm(o, eps=eps)


class _BertAttention(nn.Module):
    def __init__(self, D, kv_dim=None):
        super().__init__()
        self.self = _Linear3(D, kv_dim)
        self.output = _Out(D, D)

    def forward(self, x, ctx, heads, key_mask):
        a = naive_attention(self.self.query(x), self.self.key(ctx), self.self.value(ctx), heads, key_mask)
        return self.output.LayerNorm(x + self.output.dense(a))


class _Dense(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.dense = nn.Linear(i, o)


class BertLayer(nn.Module):
    def __init__(self, D, mlp, cross_dim=None):
        super().__init__()
        self.attention = _BertAttention(D)
        if cross_dim is not None:
            self.crossattention = _BertAttention(D, cross_dim)
        self.intermediate, self.output = _Dense(D, mlp), _Out(mlp, D)

    def forward(self, x, mask, heads, image=None):
        x = self.attention(x, x, heads, mask)
        if image is not None:
            x = self.crossattention(x, image, heads, None)
        return self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))


class _Embeddings(nn.Module):
    def __init__(self, vocab, D, max_len, types=2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, D)
        self.position_embeddings = nn.Embedding(max_len, D)
        self.token_type_embeddings = nn.Embedding(types, D)
        self.LayerNorm = nn.LayerNorm(D, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(max_len)[None])

    def forward(self, ids):
        L = ids.shape[1]
        x = self.word_embeddings(ids) + self.position_embeddings.weight[:L][None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, layers: List[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class FakeBert(nn.Module):
    """``fusion_layer``: layers from this index on have cross-attention (xbert)."""

    def __init__(self, vocab=101, D=32, layers=4, fusion_layer=2, mlp=37, max_len=40, cross_dim=32):
        super().__init__()
        self.fusion_layer = fusion_layer
        self.embeddings = _Embeddings(vocab, D, max_len)
        self.encoder = _Encoder([BertLayer(D, mlp, cross_dim if i >= fusion_layer else None) for i in range(layers)])

    def text(self, ids, mask, heads):
        x = self.embeddings(ids)
        for layer in self.encoder.layer[: self.fusion_layer]:
            x = layer(x, mask, heads)
        return x

    def fuse(self, x, mask, image, heads):
        for layer in self.encoder.layer[self.fusion_layer:]:
            x = layer(x, mask, heads, image)
        return x


class _Predictions(nn.Module):
    def __init__(self, D, vocab, tied: nn.Embedding):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense, self.transform.LayerNorm = nn.Linear(D, D), nn.LayerNorm(D, eps=1e-12)
        self.decoder = nn.Linear(D, vocab)
        self.decoder.weight = tied.weight
        self.bias = nn.Parameter(torch.randn(vocab) * 0.02)
        self.decoder.bias = self.bias


class FakeBertForMaskedLM(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.bert = FakeBert(**kw)
        self.cls = nn.Module()
        self.cls.predictions = _Predictions(self.bert.embeddings.word_embeddings.weight.shape[1],
                                            self.bert.embeddings.word_embeddings.weight.shape[0],
                                            self.bert.embeddings.word_embeddings)


class FakeALBEF(nn.Module):
    """ALBEF with the official attribute names. variant: pretrain | retrieval | vqa | ve | nlvr2."""

    def __init__(self, variant="retrieval", image=32, D=32, embed=16, queue=24, momentum=True):
        super().__init__()
        self.variant = variant
        self.visual_encoder = FakeViT(image=image, D=D)
        layers = 6 if variant == "nlvr2" else 4
        if variant == "pretrain":
            self.text_encoder = FakeBertForMaskedLM(layers=layers)
        else:
            self.text_encoder = FakeBert(layers=layers)
        if variant in ("pretrain", "retrieval"):
            self.vision_proj, self.text_proj = nn.Linear(D, embed), nn.Linear(D, embed)
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.itm_head = nn.Linear(D, 2)
        if variant in ("ve", "nlvr2"):
            self.cls_head = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 3 if variant == "ve" else 2))
        if variant == "vqa":
            self.text_decoder = FakeBertForMaskedLM(layers=2, fusion_layer=0)
        if momentum:
            self.visual_encoder_m = FakeViT(image=image, D=D)
            self.text_encoder_m = FakeBertForMaskedLM(layers=layers) if variant == "pretrain" else FakeBert(layers=layers)
            if variant in ("pretrain", "retrieval"):
                self.vision_proj_m, self.text_proj_m = nn.Linear(D, embed), nn.Linear(D, embed)
            if variant == "ve":
                self.cls_head_m = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 3))
        if variant in ("pretrain", "retrieval") and queue:
            self.register_buffer("image_queue", F.normalize(torch.randn(embed, queue), dim=0))
            self.register_buffer("text_queue", F.normalize(torch.randn(embed, queue), dim=0))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
            if variant == "retrieval":
                self.register_buffer("idx_queue", torch.full((1, queue), -100))

    def bert(self):
        return self.text_encoder.bert if self.variant == "pretrain" else self.text_encoder

    def fused_cls(self, images, ids, mask, heads=4):
        image = self.visual_encoder(images, heads)
        b = self.bert()
        return b.fuse(b.text(ids, mask, heads), mask, image, heads)[:, 0]


# -- LAPS (Hugging Face ViTModel + BertModel + its aggregation network) ----------------------------------------
class _HFSelf(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.attention = _Linear3(D)


class _HFViTLayer(nn.Module):
    def __init__(self, D, mlp):
        super().__init__()
        self.attention = nn.Module()
        self.attention.attention = _Linear3(D)
        self.attention.output = _Dense(D, D)
        self.layernorm_before, self.layernorm_after = nn.LayerNorm(D, eps=1e-12), nn.LayerNorm(D, eps=1e-12)
        self.intermediate, self.output = _Dense(D, mlp), _Dense(mlp, D)

    def forward(self, x, heads):
        h = self.layernorm_before(x)
        a = self.attention.attention
        x = x + self.attention.output.dense(naive_attention(a.query(h), a.key(h), a.value(h), heads))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class FakeHFViT(nn.Module):
    def __init__(self, image=32, patch=8, D=32, depth=2, mlp=37):
        super().__init__()
        n = (image // patch) ** 2
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.embeddings.position_embeddings = nn.Parameter(torch.randn(1, n + 1, D) * 0.02)
        self.embeddings.patch_embeddings = nn.Module()
        self.embeddings.patch_embeddings.projection = nn.Conv2d(3, D, patch, patch)
        self.encoder = _Encoder([_HFViTLayer(D, mlp) for _ in range(depth)])
        self.layernorm = nn.LayerNorm(D, eps=1e-12)
        self.pooler = _Dense(D, D)

    def forward(self, images, heads):
        e = self.embeddings
        x = e.patch_embeddings.projection(images).flatten(2).transpose(1, 2)
        x = torch.cat([e.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + e.position_embeddings
        for layer in self.encoder.layer:
            x = layer(x, heads)
        return self.layernorm(x)


class FakeLAPS(nn.Module):
    def __init__(self, D=32, embed=20, n_c=3, scale=1.7):
        super().__init__()
        self.img_enc = nn.Module()
        self.img_enc.visual_encoder = FakeHFViT(D=D)
        self.img_enc.vision_proj = nn.Linear(D, embed)
        self.txt_enc = nn.Module()
        self.txt_enc.bert = FakeBert(D=D, layers=2, fusion_layer=2)
        self.txt_enc.bert.pooler = _Dense(D, D)
        self.txt_enc.fc = nn.Linear(D, embed)
        self.cross_net = nn.Module()
        self.cross_net.aggr_net = nn.Module()
        hidden = int(embed * 0.2)
        self.cross_net.aggr_net.weight = nn.Sequential(nn.LayerNorm(embed), nn.Linear(embed, hidden), nn.GELU(),
                                                       nn.Linear(hidden, n_c))
        self.cross_net.aggr_net.scale = nn.Parameter(torch.full((1, 1, 1), scale))

    def aggregation_weights(self, v):
        """The official TokenAggregation's softmax weights (B, N_c, K) of kept tokens v (B, K, E), with its scale."""
        a = self.cross_net.aggr_net
        return (a.weight(v).transpose(2, 1) * a.scale).softmax(dim=2)


# -- PuMer's ViLT ----------------------------------------------------------------------------------------------
def mlp_pruner(D):
    return nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.GELU(), nn.Linear(D, D // 2), nn.GELU(),
                         nn.Linear(D // 2, D // 4), nn.GELU(), nn.Linear(D // 4, 2), nn.LogSoftmax(dim=-1))


class FakePuMerViLT(nn.Module):
    """``vilt.*`` with its token pruner after the blocks ``prune_layers`` (0-based), an ITM head and a VQA head."""

    def __init__(self, prune_layers=(1, 2), D=32, depth=4, vocab=101, max_len=40, answers=5, contrast=True):
        super().__init__()
        self.prune_layers = tuple(prune_layers)
        self.vilt = nn.Module()
        self.vilt.text_embeddings = _Embeddings(vocab, D, max_len)
        self.vilt.token_type_embeddings = nn.Embedding(2, D)
        self.vilt.transformer = FakeViT(D=D, depth=depth)
        self.vilt.pooler = _Dense(D, D)
        self.vilt.token_pruner = nn.Module()
        self.vilt.token_pruner.token_predictors = nn.ModuleDict({str(i): mlp_pruner(D) for i in prune_layers})
        if contrast:
            self.vilt.token_pruner.text_projections = nn.ModuleDict({str(i): nn.Linear(D, D // 4) for i in prune_layers})
            self.vilt.token_pruner.image_projections = nn.ModuleDict({str(i): nn.Linear(D, D // 4) for i in prune_layers})
        self.itm_score = nn.Module()
        self.itm_score.fc = nn.Linear(D, 2)
        self.vqa_classifier = nn.Sequential(nn.Linear(D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(), nn.Linear(2 * D, answers))

    def forward(self, images, ids, mask, keep: float, heads=4):
        """PuMer's inference: blocks over [text; image]; after a pruning block, keep int(image_len * keep) image
        tokens (image_len counts the image [CLS]) by the pruner's keep log-probability, in score order."""
        v = self.vilt
        text = v.text_embeddings(ids) + v.token_type_embeddings.weight[0]
        img = v.transformer.embed(images) + v.token_type_embeddings.weight[1]
        L = text.shape[1]
        x = torch.cat([text, img], dim=1)
        kept = []
        for i, blk in enumerate(v.transformer.blocks):
            key_mask = torch.cat([mask, torch.ones(x.shape[0], x.shape[1] - L, dtype=mask.dtype)], dim=1)
            x = blk(x, heads, key_mask)
            if i in self.prune_layers:
                image = x[:, L:]
                scores = v.token_pruner.token_predictors[str(i)](image[:, 1:])[..., 0]
                k = int(image.shape[1] * keep)
                idx = scores.topk(k, dim=-1).indices
                kept.append(idx)
                rows = [torch.cat([image[b, :1], image[b, 1:][idx[b]]]) for b in range(x.shape[0])]
                x = torch.cat([x[:, :L], torch.stack(rows)], dim=1)
        x = v.transformer.norm(x)
        pooled = torch.tanh(v.pooler.dense(x[:, 0]))
        return self.itm_score.fc(pooled), self.vqa_classifier(pooled), kept


def interpolate_like_albef(pos, grid: int):
    """ALBEF's interpolate_pos_embed, written out: bicubic, align_corners=False, [CLS] row kept."""
    D = pos.shape[-1]
    old = int((pos.shape[1] - 1) ** 0.5)
    p = pos[:, 1:].reshape(1, old, old, D).permute(0, 3, 1, 2)
    p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], p.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


__all__ = ["FakeALBEF", "FakeLAPS", "FakePuMerViLT", "interpolate_like_albef", "naive_attention"]
