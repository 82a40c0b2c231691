"""FastV inside a vision-language LLM (Chen et al., ECCV 2024; official code pkunlp-icler/FastV, its HF LLaVA port).

Where: the language model of a LLaVA-style model (slot group "llm"), after decoder layer K (1-based): layers
1..K see every token; before layer K+1 the image tokens the **last prompt token** attends to least in layer K are
dropped. The score of image token i is layer K's attention probability from the last real prompt token to i,
softmax over that token's whole causal row (every real key), averaged over heads; keep ``round(keep * N)`` of the
N image tokens of each sample, in their original order. Kept tokens keep their original positions (RoPE gaps, no
renumbering); layers after K cache only the kept tokens, so decoding attends to that fixed set (the HF port's
"static KV-cache pruning"). vlprune runs it per sample on a padded batch (the official code: sample 0, batch 1).
Defaults: K = 2, keep = 0.5 (R = 50 %). The family module (``vlprune.patch.llava``) runs the selection.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import ReduceConfig, Reducer, check_layers, get_spec, per_layer, register
from .select import check_keeps

DEFAULT_LAYERS = (2,)
DEFAULT_KEEP = 0.5


def fastv_keep_count(keep: float, n: int) -> int:
    """k = round(N * keep) image tokens kept (the HF port's round(N * (1 - R))), at least 1."""
    return max(1, min(n, int(round(n * keep))))


def fastv_scores(row_probs: Tensor, image: Tensor) -> Tensor:
    """row_probs (B, H, L): attention of the last prompt token over every key, softmax over the whole row;
    image (B, L) bool -> (B, N) head-mean probability of each image token (its columns, in order)."""
    mean = row_probs.mean(1)  # (B, L)
    B = mean.shape[0]
    return mean[image].view(B, -1)


class LLMReducer(Reducer):
    """Marks a decoder layer of the LLM for an image-token selection by the last prompt token's query row; the
    family module runs it. ``where``: "post" (after the layer) or "mid" (before its MLP); ``softmax``: "row" (the
    whole causal row) or "image" (the image keys only)."""

    softmax = "row"

    def __init__(self, keep: float) -> None:
        super().__init__()
        self.keep = keep

    def extra_repr(self) -> str:
        return f"keep={self.keep}"

    def keep_count(self, n: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError


class FastVLLM(LLMReducer):
    """FastV: ``fastv_scores`` after decoder layer K, ``fastv_keep_count`` image tokens kept."""

    where = "post"
    method = "fastv_llm"

    def keep_count(self, n: int) -> int:
        return fastv_keep_count(self.keep, n)


def llm_schedule(cfg: ReduceConfig, model: nn.Module, default_layers, default_keep):
    """(slots of the LLM, [(1-based layer, keep)]) of an LLM-placed method, checked."""
    _, slots = get_spec(cfg.name).slots(model)
    layers = cfg.layers if cfg.layers is not None else default_layers
    check_layers(layers, len(slots), cfg.name)
    keeps = check_keeps(per_layer(default_keep if cfg.keep is None else cfg.keep, layers, cfg.name), layers, cfg.name)
    return slots, list(zip(layers, keeps))


@register("fastv_llm", groups=("llm",), placement="llm", lvlm_only=True, layers=DEFAULT_LAYERS, keep=DEFAULT_KEEP, text_guided=True)
def build(cfg: ReduceConfig, model: nn.Module, opts: dict) -> None:
    """Install FastV after LLM decoder layer K (one layer; several layers prune again at each)."""
    slots, schedule = llm_schedule(cfg, model, DEFAULT_LAYERS, DEFAULT_KEEP)
    for layer, keep in schedule:
        slots[layer - 1].reducer = FastVLLM(keep)


__all__ = ["LLMReducer", "FastVLLM", "fastv_keep_count", "fastv_scores", "llm_schedule"]
