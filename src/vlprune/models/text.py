"""BERT-style text encoder and the fusion encoder (BERT layers with cross-attention to image tokens).

Layers are post-norm as in BERT: ``x = LN(x + attn(x))``, [``x = LN(x + cross(x, image))``], ``x = LN(x + mlp(x))``.
A fusion layer's reduction slot sits after the cross-attention and before the MLP; it reduces the image tokens
that the following fusion layers attend to (TiP in a two-stream model). Text padding masks are honoured in every
attention; a caption with no real token raises.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import TextConfig
from ..reduce.slots import SlotInput
from ..reduce.state import ReduceContext, TokenState
from .attention import Attention, Mlp, padding_bias
from .base import run_block
from .vit import _init_weights


def check_text(ids: Tensor, mask: Tensor, cfg: TextConfig) -> None:
    """Raise naming the problem with a token batch: rank, batch 0, shape mismatch, empty captions, ids/length."""
    for name, t in (("input_ids", ids), ("attention_mask", mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (B, L), got {tuple(t.shape)}")
    if ids.shape != mask.shape:
        raise ValueError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} differ in shape")
    if ids.shape[0] == 0:
        raise ValueError("text batch is empty (batch size 0)")
    if ids.shape[1] > cfg.max_len:
        raise ValueError(f"text length {ids.shape[1]} exceeds the model's max_len {cfg.max_len}")
    empty = (mask.sum(dim=1) == 0).nonzero().flatten()
    if len(empty):
        raise ValueError(f"caption(s) at batch index {empty.tolist()} are fully padded (no real token)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size - 1}], got range [{int(ids.min())}, {int(ids.max())}]")


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_len, cfg.width)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.ln = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, token_type: Optional[Tensor] = None) -> Tensor:
        L = ids.shape[1]
        pos = torch.arange(L, device=ids.device)
        tt = torch.zeros_like(ids) if token_type is None else token_type
        return self.drop(self.ln(self.word(ids) + self.position(pos)[None] + self.token_type(tt)))


class TextLayer(nn.Module):
    """A post-norm BERT layer; with ``cross_dim`` it also cross-attends to image tokens (a fusion layer)."""

    grad_checkpointing = False  # models.base.set_grad_checkpointing

    def __init__(self, cfg: TextConfig, cross_dim: Optional[int] = None):
        super().__init__()
        D = cfg.width
        self.attn = Attention(D, cfg.heads, dropout=cfg.dropout)
        self.attn_ln = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.cross = None
        if cross_dim is not None:
            self.cross = Attention(D, cfg.heads, kv_dim=cross_dim, dropout=cfg.dropout)
            self.cross_ln = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.mlp = Mlp(D, cfg.mlp_dim, cfg.act)
        self.mlp_ln = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.reducer: Optional[nn.Module] = None

    def forward(
        self,
        x: Tensor,
        text_bias: Tensor,
        image: Optional[TokenState] = None,
        ctx: Optional[ReduceContext] = None,
    ) -> Tuple[Tensor, Optional[TokenState]]:
        a, _, _ = self.attn(x, bias=text_bias)
        x = self.attn_ln(x + self.drop(a))
        if self.cross is not None:
            if image is None:
                raise ValueError("a fusion layer needs image tokens")
            c, q, k = self.cross(x, context=image.x, bias=image.cross_attention_bias(x.dtype))
            x = self.cross_ln(x + self.drop(c))
            if self.reducer is not None:
                slot = SlotInput("fusion", self, q, k, self.cross.project_query, q, ctx.text_mask)
                image = self.reducer(image, slot, ctx)
        x = self.mlp_ln(x + self.mlp(x))
        return x, image


class TextEncoder(nn.Module):
    """BERT text encoder: ids (B, L), mask (B, L) -> hidden states (B, L, D)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(TextLayer(cfg) for _ in range(cfg.layers))
        self.apply(_init_weights)

    def forward(self, ids: Tensor, mask: Tensor, token_type: Optional[Tensor] = None) -> Tensor:
        check_text(ids, mask, self.cfg)
        x = self.embeddings(ids, token_type)
        bias = padding_bias(mask, x.dtype)
        for layer in self.layers:
            x, _ = run_block(layer, x, bias)
        return x


class FusionEncoder(nn.Module):
    """Fusion encoder: text states attend to themselves and cross-attend to the image tokens.

    text (B, L, D), mask (B, L), image TokenState (B, T, Dv) -> fused text states (B, L, D) and the image state
    after any reductions in the fusion layers.
    """

    def __init__(self, cfg: TextConfig, layers: int, image_width: int):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TextLayer(cfg, cross_dim=image_width) for _ in range(layers))
        self.apply(_init_weights)

    def forward(
        self, text: Tensor, mask: Tensor, image: TokenState, ctx: Optional[ReduceContext] = None
    ) -> Tuple[Tensor, TokenState]:
        if text.shape[0] != image.x.shape[0]:
            raise ValueError(f"text batch ({text.shape[0]}) and image batch ({image.x.shape[0]}) differ in size")
        ctx = ctx or ReduceContext()
        bias = padding_bias(mask, text.dtype)
        x = text
        for i, layer in enumerate(self.layers):
            x, image = run_block(layer, x, bias, image, ctx.at(i, self))
        return x, image
