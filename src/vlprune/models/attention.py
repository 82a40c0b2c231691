"""Multi-head attention on ``scaled_dot_product_attention``, plus the cheap rows reducers need.

Shapes: x (B, T, D); q, k, v (B, H, T, d) with d = D / H; an additive float ``bias`` broadcastable to
(B, H, Tq, Tk) (padding masks, proportional attention, masked training paths).
The forward returns the layer's own ``q`` and ``k`` alongside the output, so that a reducer can take the
[CLS] row ``attention_probs(q[:, :, :1], k)`` or project an external query with ``project_query`` and score it
against the same keys, without the T x T attention map ever being built.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}; valid: gelu, gelu_tanh, quick_gelu, relu")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Attention(nn.Module):
    """Self-attention (fused ``qkv``) or, with ``kv_dim``, cross-attention (``q`` from x, ``kv`` from context)."""

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.cross = kv_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(kv_dim, 2 * dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _split(self, t: Tensor, n: int) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, n, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def forward(
        self, x: Tensor, context: Optional[Tensor] = None, bias: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """x (B, Tq, D) [, context (B, Tk, Dk)] -> out (B, Tq, D), q (B, H, Tq, d), k (B, H, Tk, d)."""
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            q = self._split(self.q(x), 1)[0]
            k, v = self._split(self.kv(context), 2).unbind(0)
        else:
            q, k, v = self._split(self.qkv(x), 3).unbind(0)
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        B, _, Tq, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, Tq, self.dim)), q, k

    def project_key(self, h: Tensor) -> Tensor:
        """The layer's own key projection of already-normalised tokens (self-attention): h (B, T, D) -> (B, H, T, d)."""
        if self.cross:
            raise ValueError("project_key is for self-attention; a cross-attention's keys come from its context")
        w = self.qkv.weight[self.dim : 2 * self.dim]
        b = None if self.qkv.bias is None else self.qkv.bias[self.dim : 2 * self.dim]
        B, T, _ = h.shape
        return F.linear(h, w, b).view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def project_query(self, h: Tensor) -> Tensor:
        """The layer's own query projection of already-normalised external rows: h (B, Lq, D) -> (B, H, Lq, d)."""
        if h.shape[-1] != self.dim:
            raise ValueError(f"query width {h.shape[-1]} does not match the attention width {self.dim}")
        if self.cross:
            w, b = self.q.weight, self.q.bias
        else:
            w = self.qkv.weight[: self.dim]
            b = None if self.qkv.bias is None else self.qkv.bias[: self.dim]
        return self._split(F.linear(h, w, b), 1)[0]


def full_attention_map(q: Tensor, k: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The explicit (B, H, Tq, Tk) attention map. For tests and visualisation only, never on the fast path."""
    logits = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(-1)


def padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Key mask (B, L) with 1 = real token -> additive (B, 1, 1, L) bias using finfo(dtype).min, not -inf."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        mask == 0, torch.finfo(dtype).min
    )[:, None, None, :]
