"""TRIPS inside a vision-language LLM ("trips_llm"): vlprune's transfer of TRIPS (Jiang et al., EMNLP 2022) to
LLaVA-style models. No paper defines it; it is the closest analogue of TRIPS's text-guided selection and fusion.

Where: decoder layer l of the language model (slot group "llm"), after the attention residual and before the MLP.
- Guide: the hidden state entering layer l of the last real prompt token (it has read the question, which follows
  the image in LLaVA / Qwen templates).
- Query q = RoPE(W_q RMSNorm_l(guide)) at the guide's position; keys = layer l's post-RoPE keys of the image
  tokens (grouped-query heads repeated). a_i = mean over heads of softmax over the **image tokens only** of
  q . K_i / sqrt(d) (like TRIPS; FastV instead normalises over the whole row).
- Keep k = ceil(keep * N) image tokens, in original order; the others fuse into one token
  v_f = sum_{i not kept} a_i x_i (raw weights, x the post-attention residual stream), placed right after the kept
  image tokens with the position of the last original image token. Keep 1.0 is exactly the unpatched model.
- Layer l's cache keeps every token; later layers cache the reduced set. Prefill only, per sample.
Defaults: layer 2, keep 0.5 (comparable to FastV K = 2, R = 50 %).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .fastv import LLMReducer, llm_schedule
from .registry import ReduceConfig, register

DEFAULT_LAYERS = (2,)
DEFAULT_KEEP = 0.5


def trips_keep_count(keep: float, n: int) -> int:
    """k = ceil(keep * N) image tokens kept, in [1, N]."""
    return max(1, min(n, math.ceil(keep * n - 1e-9)))


def image_softmax_scores(logits: Tensor, image: Tensor) -> Tensor:
    """logits (B, H, L) of the guide's query over every key; image (B, L) bool with N per row ->
    a (B, N): softmax over the image keys only (fp32), averaged over heads."""
    B, H, _ = logits.shape
    img = logits.float().transpose(1, 2)[image].view(B, -1, H)  # (B, N, H)
    return img.softmax(dim=1).mean(-1)


def inattentive_fusion(x_img: Tensor, a: Tensor, kept: Tensor) -> Tensor:
    """x_img (B, N, D) image tokens, a (B, N) scores, kept (B, N) bool -> v_f (B, 1, D) = sum over the tokens not
    kept of a_i x_i (TRIPS's fused token, raw weights)."""
    w = (a * (~kept).to(a.dtype)).to(x_img.dtype)
    return torch.einsum("bn,bnd->bd", w, x_img)[:, None]


class TripsLLM(LLMReducer):
    """TRIPS-style selection in decoder layer l (``image_softmax_scores`` + ``inattentive_fusion``)."""

    where = "mid"
    method = "trips_llm"
    softmax = "image"

    def keep_count(self, n: int) -> int:
        return trips_keep_count(self.keep, n)


@register("trips_llm", groups=("llm",), placement="llm", lvlm_only=True, layers=DEFAULT_LAYERS, keep=DEFAULT_KEEP, text_guided=True)
def build(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    """Install TRIPS-style selection and fusion in LLM decoder layer(s) l."""
    slots, schedule = llm_schedule(cfg, model, DEFAULT_LAYERS, DEFAULT_KEEP)
    for layer, keep in schedule:
        slots[layer - 1].reducer = TripsLLM(keep)


__all__ = ["TripsLLM", "trips_keep_count", "image_softmax_scores", "inattentive_fusion"]
