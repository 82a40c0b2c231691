"""The slot-overhead reference: the same ALBEF network built from plain PyTorch layers, with no reduction slot.

``PlainALBEF(model)`` copies the weights of an ALBEF model (its main encoders and ITM head) into
``nn.TransformerEncoderLayer`` (the ViT's pre-norm layers and BERT's post-norm text layers) and
``nn.TransformerDecoderLayer`` (the fusion layers: self-attention, cross-attention to the image tokens, MLP), and
computes the same ITM logits with no ``TokenState``, no slot and no input checks. Timing it next to vlprune's
model without a method (``vlprune bench --reference``) shows what the slot machinery costs. In inference mode
PyTorch's encoder layers may take their fused "fast path" kernel; that is part of what plain PyTorch gives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.vit import interpolate_pos_embed


def _act(name: str) -> str:
    if name not in ("gelu", "relu"):
        raise ValueError(f"the plain-PyTorch reference supports gelu and relu activations, not {name!r}")
    return name


def _copy_self_attn(mha: nn.MultiheadAttention, attn) -> None:
    mha.in_proj_weight.copy_(attn.qkv.weight)
    mha.in_proj_bias.copy_(attn.qkv.bias)
    mha.out_proj.weight.copy_(attn.proj.weight)
    mha.out_proj.bias.copy_(attn.proj.bias)


def _copy_cross_attn(mha: nn.MultiheadAttention, attn) -> None:
    D = attn.dim
    if mha._qkv_same_embed_dim:
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.kv.weight]))
    else:
        mha.q_proj_weight.copy_(attn.q.weight)
        mha.k_proj_weight.copy_(attn.kv.weight[:D])
        mha.v_proj_weight.copy_(attn.kv.weight[D:])
    mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
    mha.out_proj.weight.copy_(attn.proj.weight)
    mha.out_proj.bias.copy_(attn.proj.bias)


def _copy_mlp(layer, mlp) -> None:
    layer.linear1.load_state_dict(mlp.fc1.state_dict())
    layer.linear2.load_state_dict(mlp.fc2.state_dict())


class PlainALBEF(nn.Module):
    """ALBEF's forward pass (image encoder, text encoder, fusion, ITM head) on plain PyTorch layers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.cfg
        if cfg.arch != "albef":
            raise ValueError(f"the plain-PyTorch reference is built for ALBEF-style models, not {cfg.arch!r}")
        v, t = cfg.vision, cfg.text
        if v.pre_norm or not v.qkv_bias:
            raise ValueError("the plain-PyTorch reference needs a ViT without pre-norm and with qkv biases")
        emb = model.vision.embeddings
        self.patch_embed = nn.Conv2d(v.channels, v.width, v.patch_size, v.patch_size, bias=v.patch_bias)
        self.patch_embed.load_state_dict(emb.patch_embed.state_dict())
        self.cls_token = nn.Parameter(emb.cls_token.detach().clone())
        self.pos_embed = nn.Parameter(emb.pos_embed.detach().clone())
        self.vision_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(v.width, v.heads, v.mlp_dim, dropout=0.0, activation=_act(v.act),
                                       layer_norm_eps=v.ln_eps, batch_first=True, norm_first=True)
            for _ in range(v.layers))
        self.vision_norm = nn.LayerNorm(v.width, eps=v.ln_eps)
        self.text_embeddings = model.text.embeddings  # word + position + type embeddings and LayerNorm: plain already
        self.text_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(t.width, t.heads, t.mlp_dim, dropout=0.0, activation=_act(t.act),
                                       layer_norm_eps=t.ln_eps, batch_first=True, norm_first=False)
            for _ in range(t.layers))
        self.fusion_layers = nn.ModuleList()
        for _ in range(cfg.fusion_layers):
            layer = nn.TransformerDecoderLayer(t.width, t.heads, t.mlp_dim, dropout=0.0, activation=_act(t.act),
                                               layer_norm_eps=t.ln_eps, batch_first=True, norm_first=False)
            if v.width != t.width:  # cross-attention keys / values from the image width
                layer.multihead_attn = nn.MultiheadAttention(t.width, t.heads, dropout=0.0, batch_first=True,
                                                             kdim=v.width, vdim=v.width)
            self.fusion_layers.append(layer)
        self.itm_head = nn.Linear(t.width, 2)
        with torch.no_grad():
            for p, ours in zip(self.vision_layers, model.vision.layers):
                _copy_self_attn(p.self_attn, ours.attn)
                _copy_mlp(p, ours.mlp)
                p.norm1.load_state_dict(ours.ln1.state_dict())
                p.norm2.load_state_dict(ours.ln2.state_dict())
            self.vision_norm.load_state_dict(model.vision.norm.state_dict())
            for p, ours in zip(self.text_layers, model.text.layers):
                _copy_self_attn(p.self_attn, ours.attn)
                _copy_mlp(p, ours.mlp)
                p.norm1.load_state_dict(ours.attn_ln.state_dict())
                p.norm2.load_state_dict(ours.mlp_ln.state_dict())
            for p, ours in zip(self.fusion_layers, model.fusion.layers):
                _copy_self_attn(p.self_attn, ours.attn)
                _copy_cross_attn(p.multihead_attn, ours.cross)
                _copy_mlp(p, ours.mlp)
                p.norm1.load_state_dict(ours.attn_ln.state_dict())
                p.norm2.load_state_dict(ours.cross_ln.state_dict())
                p.norm3.load_state_dict(ours.mlp_ln.state_dict())
            self.itm_head.load_state_dict(model.itm_head.state_dict())
        p0 = next(model.parameters())
        self.to(device=p0.device, dtype=p0.dtype)

    def forward(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """ITM logits (B, 2) of matched pairs, as ``ALBEF.forward(...).itm_logits``."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1] - 1:
            pos = interpolate_pos_embed(pos, int(round(math.sqrt(x.shape[1]))))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        for layer in self.vision_layers:
            x = layer(x)
        image = self.vision_norm(x)
        pad = mask == 0
        text = self.text_embeddings(ids)
        for layer in self.text_layers:
            text = layer(text, src_key_padding_mask=pad)
        fused = text
        for layer in self.fusion_layers:
            fused = layer(fused, image, tgt_key_padding_mask=pad)
        return self.itm_head(fused[:, 0])


def itm_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of ITM logits against "match" (index 1): the loss the reference training step runs."""
    return F.cross_entropy(logits.float(), torch.ones(logits.shape[0], dtype=torch.long, device=logits.device))


__all__ = ["PlainALBEF", "itm_loss"]
